"""Authorisation on the headers: a refused request's body is never read, spooled or parsed.

The whole proxy runs in this process (real TLS on loopback, real directory, real guard and
forwarder) in front of a real backend that hashes what it receives. Raw TLS clients send only
the headers of a request announcing a big body and wait, with a deadline, for the answer.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
from typing import Any

from twisted.internet import defer, reactor, ssl
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, wrapClientTLS
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from twisted.trial import unittest
from twisted.web import http, resource, server

from tests import forward_harness
from tests.forward_harness import PatternBody, pattern_sha256, poll
from tests.support import https_client, start_proxy

BIG = 1_000_000


class Hashing(resource.Resource):
    """Answers with the method, target, body length and SHA-256 of what it got."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[dict[str, Any]] = []

    def render(self, request: server.Request) -> bytes:
        digest = hashlib.sha256()
        size = 0
        content = request.content
        if content is not None:
            while chunk := content.read(1 << 20):
                digest.update(chunk)
                size += len(chunk)
        record = {
            "method": request.method.decode(),
            "uri": request.uri.decode("latin-1"),
            "size": size,
            "sha256": digest.hexdigest(),
        }
        self.seen.append(record)
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps(record).encode()


class Talker(Protocol):
    """A raw TLS client that writes when told and records what comes back, and when."""

    def __init__(self) -> None:
        self.received = b""
        self.closed: Deferred[None] = Deferred()
        self.lost = False

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.received += data

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]  # noqa: N802
        self.lost = True
        self.closed.callback(None)

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def statuses(self) -> list[bytes]:
        return re.findall(rb"HTTP/1\.1 \d{3} ", self.received)


class BeforeTheBody(unittest.TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def]
        self.backend = Hashing()
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            server.Site(self.backend)
        )
        self.addCleanup(port.stopListening)
        self.backend_port = port.getHost().port
        self.proxy = yield start_proxy(self)
        d = self.proxy.directory
        yield d.add_user("alice", "alice-password")
        yield d.add_user("bob", "bob-password")
        project = yield d.add_project("alice")
        _, self.token = yield d.create_token("alice")
        _, self.bob_token = yield d.create_token("bob")
        self.path = f"/{project.id}/server/{self.backend_port}/upload"
        # Every request-body spool twisted.web creates in this process (the proxy's and the
        # backend's), counted: refused requests must create none.
        self.spools: list[int | None] = []
        original = http._getContentFile

        def counting(length: int | None) -> Any:
            self.spools.append(length)
            return original(length)

        self.patch(http, "_getContentFile", counting)

    @defer.inlineCallbacks
    def connect(self):  # type: ignore[no-untyped-def]
        with open(self.proxy.cert_path, "rb") as f:
            authority = ssl.Certificate.loadPEM(f.read())
        options = ssl.optionsForClientTLS("localhost", trustRoot=authority)
        endpoint = wrapClientTLS(options, TCP4ClientEndpoint(reactor, "127.0.0.1", self.proxy.port))
        talker = Talker()
        yield endpoint.connect(Factory.forProtocol(lambda: talker))

        def cleanup() -> Deferred[None] | None:
            if talker.lost:
                return None
            assert talker.transport is not None
            talker.transport.abortConnection()  # type: ignore[attr-defined]
            return talker.closed

        self.addCleanup(cleanup)
        return talker

    def head(self, path: str, *headers: str, method: str = "POST") -> bytes:
        lines = [f"{method} {path} HTTP/1.1", "Host: localhost", *headers, "", ""]
        return "\r\n".join(lines).encode()

    @defer.inlineCallbacks
    def refused_before_body(self, head: bytes, status: bytes):  # type: ignore[no-untyped-def]
        """Send only ``head``; the answer must come, and the connection close, without a body."""
        talker = yield self.connect()
        talker.send(head)
        yield poll(lambda: talker.lost, timeout=10, what="the answer and the close")
        self.assertTrue(talker.received.startswith(b"HTTP/1.1 " + status), talker.received[:200])
        self.assertIn(b"\r\nconnection: close\r\n", talker.received.lower())
        self.assertEqual(len(talker.statuses()), 1)
        return talker

    @defer.inlineCallbacks
    def test_no_credentials_401_without_the_body_and_nothing_parsed_after(self):  # type: ignore[no-untyped-def]
        talker = yield self.connect()
        talker.send(self.head(self.path, f"Content-Length: {BIG}"))
        yield poll(lambda: b"\r\n\r\n" in talker.received, timeout=10, what="the 401")
        self.assertTrue(talker.received.startswith(b"HTTP/1.1 401 "), talker.received[:200])
        self.assertIn(b"www-authenticate: basic", talker.received.lower())
        # What looks like a second, authorised request must never be parsed as one.
        smuggled = self.head(
            self.path + "?smuggled",
            f"Authorization: Bearer {self.token}",
            "Content-Length: 0",
            method="GET",
        )
        if not talker.lost:
            try:
                talker.send(smuggled * 3)
            except Exception:
                pass
        yield poll(lambda: talker.lost, timeout=10, what="the connection to close")
        self.assertEqual(len(talker.statuses()), 1, talker.received)
        self.assertEqual(self.backend.seen, [])
        self.assertEqual(self.spools, [])

    @defer.inlineCallbacks
    def test_smuggled_request_in_the_same_write_is_not_parsed(self):  # type: ignore[no-untyped-def]
        smuggled = self.head(
            self.path + "?smuggled",
            f"Authorization: Bearer {self.token}",
            "Content-Length: 0",
            method="GET",
        )
        head = self.head(self.path, f"Content-Length: {len(smuggled)}")
        yield self.refused_before_body(head + smuggled, b"401")
        self.assertEqual(self.backend.seen, [])
        self.assertEqual(self.spools, [])

    @defer.inlineCallbacks
    def test_bogus_basic_credentials_401(self):  # type: ignore[no-untyped-def]
        basic = base64.b64encode(b"alice:wrong-password").decode()
        yield self.refused_before_body(
            self.head(self.path, f"Authorization: Basic {basic}", f"Content-Length: {BIG}"), b"401"
        )
        self.assertEqual(self.spools, [])

    @defer.inlineCallbacks
    def test_non_member_404(self):  # type: ignore[no-untyped-def]
        yield self.refused_before_body(
            self.head(
                self.path, f"Authorization: Bearer {self.bob_token}", f"Content-Length: {BIG}"
            ),
            b"404",
        )
        self.assertEqual(self.spools, [])
        self.assertEqual(self.backend.seen, [])

    @defer.inlineCallbacks
    def test_chunked_without_credentials_401(self):  # type: ignore[no-untyped-def]
        talker = yield self.refused_before_body(
            self.head(self.path, "Transfer-Encoding: chunked") + b"10\r\n0123456789abcdef\r\n",
            b"401",
        )
        self.assertNotIn(b"0123456789abcdef", talker.received)
        self.assertEqual(self.spools, [])

    @defer.inlineCallbacks
    def test_expect_continue_is_not_sent_to_a_refused_request(self):  # type: ignore[no-untyped-def]
        talker = yield self.refused_before_body(
            self.head(self.path, "Expect: 100-continue", f"Content-Length: {BIG}"), b"401"
        )
        self.assertNotIn(b"100 Continue", talker.received)

    @defer.inlineCallbacks
    def test_expect_continue_is_sent_once_allowed(self):  # type: ignore[no-untyped-def]
        talker = yield self.connect()
        talker.send(
            self.head(
                self.path,
                f"Authorization: Bearer {self.token}",
                "Expect: 100-continue",
                "Content-Length: 5",
            )
        )
        yield poll(lambda: b"100 Continue" in talker.received, timeout=10, what="100 Continue")
        talker.send(b"hello")
        yield poll(lambda: b'"size": 5' in talker.received, timeout=10, what="the answer")
        self.assertTrue(talker.received.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200"))
        self.assertEqual(self.backend.seen[0]["sha256"], hashlib.sha256(b"hello").hexdigest())

    @defer.inlineCallbacks
    def test_login_refuses_a_huge_body_unread(self):  # type: ignore[no-untyped-def]
        yield self.refused_before_body(
            self.head(
                "/_/login",
                "Content-Type: application/x-www-form-urlencoded",
                f"Content-Length: {BIG}",
            ),
            b"413",
        )
        self.assertEqual(self.spools, [])

    @defer.inlineCallbacks
    def test_login_refuses_a_long_chunked_body(self):  # type: ignore[no-untyped-def]
        talker = yield self.connect()
        talker.send(self.head("/_/login", "Transfer-Encoding: chunked"))
        chunk = b"a" * 4096
        for _ in range(5):
            if talker.lost:
                break
            talker.send(b"1000\r\n" + chunk + b"\r\n")
        yield poll(lambda: talker.lost, timeout=10, what="the close")
        self.assertTrue(talker.received.startswith(b"HTTP/1.1 413 "), talker.received[:200])

    @defer.inlineCallbacks
    def test_own_pages_take_no_body(self):  # type: ignore[no-untyped-def]
        yield self.refused_before_body(self.head("/_/health", f"Content-Length: {BIG}"), b"405")
        yield self.refused_before_body(
            self.head("/_/health", f"Content-Length: {BIG}", method="GET"), b"413"
        )
        yield self.refused_before_body(self.head("/nowhere", f"Content-Length: {BIG}"), b"404")
        self.assertEqual(self.spools, [])

    @defer.inlineCallbacks
    def test_authorised_upload_goes_through(self):  # type: ignore[no-untyped-def]
        size = 20 * 1024 * 1024
        client = https_client(self, self.proxy.cert_path)
        response = yield client.request(
            "PUT",
            self.proxy.url + self.path,
            headers={"Authorization": f"Bearer {self.token}"},
            data=PatternBody(size),
        )
        document = json.loads((yield response.content()))
        self.assertEqual(response.code, 200)
        self.assertEqual(document["size"], size)
        self.assertEqual(document["sha256"], pattern_sha256(size))
        # One spool in the proxy, one in the backend (also twisted.web, in this process).
        self.assertEqual(self.spools, [size, size])

    @defer.inlineCallbacks
    def test_authorised_chunked_upload_goes_through(self):  # type: ignore[no-untyped-def]
        size = 300_000
        client = https_client(self, self.proxy.cert_path)
        response = yield client.request(
            "POST",
            self.proxy.url + self.path,
            headers={"Authorization": f"Bearer {self.token}"},
            data=PatternBody(size, known_length=False),
        )
        document = json.loads((yield response.content()))
        self.assertEqual(response.code, 200)
        self.assertEqual(document["size"], size)
        self.assertEqual(document["sha256"], pattern_sha256(size))

    def log_records(self) -> list[dict[str, Any]]:
        self.proxy.service.access_log.flush()  # not waiting up to 100 ms for the lines
        with open(os.path.join(self.proxy.state_dir, "access.log")) as f:
            return [json.loads(line) for line in f]

    @defer.inlineCallbacks
    def test_body_arriving_while_the_guard_decides_is_passed_on(self):  # type: ignore[no-untyped-def]
        # First use of the token: the guard asks the directory (not a cache hit), so the body
        # sent in the same write as the headers is held, then spooled once allowed.
        talker = yield self.connect()
        body = b"held while deciding"
        head = self.head(
            self.path, f"Authorization: Bearer {self.token}", f"Content-Length: {len(body)}"
        )
        talker.send(head + body)
        yield poll(lambda: b'"sha256"' in talker.received, timeout=10, what="the answer")
        self.assertTrue(talker.received.startswith(b"HTTP/1.1 200 "), talker.received[:200])
        self.assertEqual(self.backend.seen[0]["sha256"], hashlib.sha256(body).hexdigest())
        # The connection stays usable (keep-alive restored after the early decision).
        talker.send(self.head(self.path, f"Authorization: Bearer {self.token}", method="GET"))
        yield poll(lambda: len(self.backend.seen) == 2, timeout=10, what="a second request")
        yield poll(lambda: len(talker.statuses()) == 2, timeout=10, what="a second answer")
        self.assertFalse(talker.lost)
        records = [r for r in self.log_records() if r["method"] == "POST"]
        self.assertEqual(len(records), 1, records)
        self.assertEqual(records[0]["status"], 200)
        self.assertEqual(records[0]["bytes_in"], len(body))
        self.assertEqual(records[0]["account"], "alice")

    @defer.inlineCallbacks
    def test_body_arriving_while_the_guard_decides_is_dropped_when_refused(self):  # type: ignore[no-untyped-def]
        body = b"x" * 50_000
        head = self.head(
            self.path, f"Authorization: Bearer {self.bob_token}", f"Content-Length: {len(body)}"
        )
        yield self.refused_before_body(head + body, b"404")
        self.assertEqual(self.spools, [])
        self.assertEqual(self.backend.seen, [])

    @defer.inlineCallbacks
    def test_refusals_before_the_body_are_logged_once(self):  # type: ignore[no-untyped-def]
        yield self.refused_before_body(self.head(self.path, f"Content-Length: {BIG}"), b"401")
        yield poll(lambda: self.log_records(), timeout=10, what="the access log line")
        (record,) = self.log_records()
        self.assertEqual((record["method"], record["status"]), ("POST", 401))
        self.assertEqual(record["form"], "server")


class DecidedOnce(unittest.TestCase):
    """With the forwarder's harness (allow-all guard, echo backend): the guard is asked once per
    request, on the headers when a body is announced, and not again by Root."""

    @defer.inlineCallbacks
    def test_guard_asked_once_per_request(self):  # type: ignore[no-untyped-def]
        backend = yield forward_harness.start_backend(self)
        proxy = yield forward_harness.start_proxy(self)
        guard = proxy.site.resource.guard
        asked: list[bytes] = []
        original = guard.authorize

        def counting(request: Any, route: Any) -> Any:
            asked.append(bytes(request.method))
            return original(request, route)

        self.patch(guard, "authorize", counting)
        client = https_client(self, proxy.cert_path)
        url = proxy.server_url(backend.port, "/echo")
        response = yield client.post(url, data=b"y" * 200_000)
        document = json.loads((yield response.content()))
        self.assertEqual(response.code, 200)
        self.assertEqual(document["body_length"], 200_000)
        response = yield client.get(url)
        yield response.content()
        self.assertEqual(asked, [b"POST", b"GET"])

    @defer.inlineCallbacks
    def start_with_guard(self, authorize: Any):  # type: ignore[no-untyped-def]
        backend = yield forward_harness.start_backend(self)
        proxy = yield forward_harness.start_proxy(self)
        self.patch(proxy.site.resource.guard, "authorize", authorize)
        return backend, proxy

    @defer.inlineCallbacks
    def test_guard_failure_is_503_and_close_without_the_body(self):  # type: ignore[no-untyped-def]
        backend, proxy = yield self.start_with_guard(
            lambda request, route: defer.fail(RuntimeError("directory down"))
        )
        head = (
            f"POST /{forward_harness.PID}/server/{backend.port}/echo HTTP/1.1\r\n"
            f"Host: localhost\r\nContent-Length: {BIG}\r\n\r\n"
        ).encode()
        client = forward_harness.RawClient(head)
        yield forward_harness.raw_connect(self, proxy, client)
        received = yield client.done
        self.assertTrue(received.startswith(b"HTTP/1.1 503 "), received[:200])
        self.assertIn(b"\r\nconnection: close\r\n", received.lower())
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    @defer.inlineCallbacks
    def test_client_gone_before_the_decision(self):  # type: ignore[no-untyped-def]
        pending: list[Deferred[Any]] = []

        def later(request: Any, route: Any) -> Deferred[Any]:
            d: Deferred[Any] = Deferred()
            pending.append(d)
            return d

        backend, proxy = yield self.start_with_guard(later)
        head = (
            f"POST /{forward_harness.PID}/server/{backend.port}/echo HTTP/1.1\r\n"
            f"Host: localhost\r\nContent-Length: 10\r\n\r\n01234"
        ).encode()
        client = forward_harness.RawClient(head)
        yield forward_harness.raw_connect(self, proxy, client)
        yield poll(lambda: pending, timeout=10, what="the guard to be asked")
        assert client.transport is not None
        client.transport.abortConnection()  # type: ignore[attr-defined]
        yield client.done
        # The paused connection notices the close once the guard answers and reading resumes;
        # the half-sent request then ends without reaching the backend, and without an error.
        project = forward_harness.Project(forward_harness.PID, 1, "alice", "127.0.0.1", None, "t")
        pending[0].callback(forward_harness.Access(forward_harness.Account(1, "alice"), project))
        yield poll(lambda: not proxy.site.in_flight, timeout=10, what="the request to end")
        self.assertEqual(backend.stats.client_ports, [])
