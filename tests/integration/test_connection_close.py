"""Every answer after which the proxy closes the connection says ``Connection: close``.

The whole proxy runs in this process (real TLS on loopback, real directory, guard and
forwarder) in front of a real backend; a raw TLS client writes requests byte for byte and reads
until the proxy closes the connection (or, for keep-alive, until the answer is complete).
"""

from __future__ import annotations

import json
import re

from twisted.internet import defer, reactor, ssl
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, wrapClientTLS
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from twisted.trial import unittest
from twisted.web import resource, server

from tests.forward_harness import poll
from tests.support import start_proxy


class Hello(resource.Resource):
    """The backend: a small body, and a ``Connection: keep-alive`` of its own (which is
    hop-by-hop: it must not reach the client, nor decide anything there)."""

    isLeaf = True

    def render(self, request: server.Request) -> bytes:
        request.setHeader(b"Content-Type", b"text/plain")
        request.setHeader(b"Connection", b"keep-alive")
        return b"hello from the backend\n"


class RawClient(Protocol):
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

    def heads(self) -> list[bytes]:
        """The head of every response received so far (lower-cased)."""
        return [
            m.lower() for m in re.findall(rb"HTTP/1\.[01] \d{3} .*?\r\n\r\n", self.received, re.S)
        ]


def says_close(head: bytes) -> bool:
    return re.search(rb"\r\nconnection: *close\r\n", head) is not None


class RawTLSCase(unittest.TestCase):
    """A proxy in this process in front of the Hello backend, and raw TLS clients to it."""

    timeout = 120

    @defer.inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def]
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            server.Site(Hello())
        )
        self.addCleanup(port.stopListening)
        self.proxy = yield start_proxy(self)
        d = self.proxy.directory
        yield d.add_user("alice", "alice-password")
        project = yield d.add_project("alice")
        _, token = yield d.create_token("alice")
        self.auth = f"Authorization: Bearer {token}"
        self.path = f"/{project.id}/server/{port.getHost().port}/hello"

    @defer.inlineCallbacks
    def connect(self):  # type: ignore[no-untyped-def]
        with open(self.proxy.cert_path, "rb") as f:
            authority = ssl.Certificate.loadPEM(f.read())
        options = ssl.optionsForClientTLS("localhost", trustRoot=authority)
        endpoint = wrapClientTLS(options, TCP4ClientEndpoint(reactor, "127.0.0.1", self.proxy.port))
        client = RawClient()
        yield endpoint.connect(Factory.forProtocol(lambda: client))

        def cleanup() -> Deferred[None] | None:
            if client.lost:
                return None
            assert client.transport is not None
            client.transport.abortConnection()  # type: ignore[attr-defined]
            return client.closed

        self.addCleanup(cleanup)
        return client

    def request(self, path: str, *headers: str, version: str = "HTTP/1.1") -> bytes:
        return "\r\n".join([f"GET {path} {version}", "Host: localhost", *headers, "", ""]).encode()

    @defer.inlineCallbacks
    def closed_after_one(self, request: bytes, status: bytes):  # type: ignore[no-untyped-def]
        """Send ``request``; the proxy must answer ``status``, say close, and close."""
        client = yield self.connect()
        client.send(request)
        yield poll(lambda: client.lost, timeout=10, what="the proxy to close the connection")
        heads = client.heads()
        self.assertEqual(len(heads), 1, client.received)
        self.assertRegex(heads[0], rb"^http/1\.[01] " + status + b" ")
        self.assertTrue(says_close(heads[0]), heads[0])
        self.assertEqual(heads[0].count(b"\r\nconnection:"), 1, heads[0])
        return client


class ConnectionClose(RawTLSCase):
    # -- HTTP/1.1 with Connection: close ------------------------------------------------------

    def test_proxied_answer(self):  # type: ignore[no-untyped-def]
        """The forwarder replaces the response headers with the backend's (policed): the close
        must survive that, and the backend's own keep-alive must not leak through."""
        return self.closed_after_one(
            self.request(self.path, self.auth, "Connection: close"), b"200"
        )

    def test_own_page(self):  # type: ignore[no-untyped-def]
        return self.closed_after_one(self.request("/_/health", "Connection: close"), b"200")

    def test_refusal(self):  # type: ignore[no-untyped-def]
        return self.closed_after_one(self.request(self.path, "Connection: close"), b"401")

    def test_not_found(self):  # type: ignore[no-untyped-def]
        return self.closed_after_one(self.request("/nothing-here", "Connection: close"), b"404")

    def test_close_among_other_tokens_and_any_case(self):  # type: ignore[no-untyped-def]
        return self.closed_after_one(
            self.request(self.path, self.auth, "Connection: TE, Close"), b"200"
        )

    # -- HTTP/1.0 -----------------------------------------------------------------------------

    def test_http10_proxied(self):  # type: ignore[no-untyped-def]
        return self.closed_after_one(self.request(self.path, self.auth, version="HTTP/1.0"), b"200")

    def test_http10_own_page(self):  # type: ignore[no-untyped-def]
        return self.closed_after_one(self.request("/_/health", version="HTTP/1.0"), b"200")

    def test_http10_keep_alive_is_not_kept_so_says_close(self):  # type: ignore[no-untyped-def]
        """The proxy does not keep HTTP/1.0 connections alive (nor does Twisted), so even a
        request asking for keep-alive is told the connection closes."""
        return self.closed_after_one(
            self.request(self.path, self.auth, "Connection: keep-alive", version="HTTP/1.0"),
            b"200",
        )

    # -- the proxy's own decision to close ----------------------------------------------------

    @defer.inlineCallbacks
    def test_refused_body(self):  # type: ignore[no-untyped-def]
        """A refused request with a body is answered and closed without reading the body."""
        client = yield self.connect()
        client.send(
            b"POST " + self.path.encode() + b" HTTP/1.1\r\nHost: localhost\r\n"
            b"Content-Length: 1000000\r\n\r\n"
        )
        yield poll(lambda: client.lost, timeout=10, what="the proxy to close the connection")
        heads = client.heads()
        self.assertEqual(len(heads), 1, client.received)
        self.assertTrue(heads[0].startswith(b"http/1.1 401"), heads[0])
        self.assertTrue(says_close(heads[0]), heads[0])

    # -- and not otherwise --------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_keep_alive_answers_do_not_say_close_and_stay_open(self):  # type: ignore[no-untyped-def]
        client = yield self.connect()
        client.send(self.request(self.path, self.auth))
        yield poll(lambda: len(client.heads()) == 1, timeout=10, what="the first answer")
        client.send(self.request("/_/health"))
        yield poll(lambda: len(client.heads()) == 2, timeout=10, what="the second answer")
        self.assertFalse(client.lost)
        for head in client.heads():
            self.assertTrue(head.startswith(b"http/1.1 200"), head)
            self.assertNotIn(b"\r\nconnection:", head)
        # The last request of a kept-alive connection may say close: that answer says so too.
        client.send(self.request(self.path, self.auth, "Connection: close"))
        yield poll(lambda: client.lost, timeout=10, what="the proxy to close the connection")
        heads = client.heads()
        self.assertEqual(len(heads), 3)
        self.assertTrue(says_close(heads[2]), heads[2])


class MalformedAndOddlySpelled(RawTLSCase):
    """Twisted's own answers and parsing of ``Connection``, as the proxy changes them."""

    @defer.inlineCallbacks
    def test_malformed_request_400_says_close(self):  # type: ignore[no-untyped-def]
        client = yield self.connect()
        client.send(b"GET /_/health HTTP/1.1\r\nHost: localhost\r\nno colon here\r\n\r\n")
        yield poll(lambda: client.lost, timeout=10, what="the proxy to close the connection")
        heads = client.heads()
        self.assertEqual(len(heads), 1, client.received)
        self.assertTrue(heads[0].startswith(b"http/1.1 400 "), heads[0])
        self.assertTrue(says_close(heads[0]), heads[0])
        body = client.received.split(b"\r\n\r\n", 1)[1]
        length = re.search(rb"\r\ncontent-length: *(\d+)\r\n", heads[0])
        self.assertIsNotNone(length, heads[0])
        assert length is not None
        self.assertEqual(int(length.group(1)), len(body))
        self.assertEqual(json.loads(body)["status"], 400)

    @defer.inlineCallbacks
    def test_header_line_over_16k_is_400_at_once(self):  # type: ignore[no-untyped-def]
        """Not the head timeout (20 s here): the answer and the close come at once."""
        client = yield self.connect()
        client.send(b"GET /_/health HTTP/1.1\r\nHost: localhost\r\nX-Long: " + b"a" * 20000)
        yield poll(lambda: client.lost, timeout=5, what="the proxy to close the connection")
        heads = client.heads()
        self.assertEqual(len(heads), 1, client.received[:200])
        self.assertTrue(heads[0].startswith(b"http/1.1 400 "), heads[0])
        self.assertTrue(says_close(heads[0]), heads[0])

    def test_close_without_spaces(self):  # type: ignore[no-untyped-def]
        return self.closed_after_one(
            self.request(self.path, self.auth, "Connection: TE,close"), b"200"
        )

    def test_close_in_a_second_connection_header(self):  # type: ignore[no-untyped-def]
        return self.closed_after_one(
            self.request(self.path, self.auth, "Connection: TE", "Connection: close"), b"200"
        )
