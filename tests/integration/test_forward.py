"""The forwarder end to end over real TLS, with a Twisted echo backend that also misbehaves.

The guard is an allow-all stand-in (tests.forward_harness); everything else is the real thing.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import socket
from typing import Any

import treq
from twisted.internet import reactor, task
from twisted.internet.defer import inlineCallbacks
from twisted.trial import unittest
from twisted.web.client import ResponseFailed

from tests.forward_harness import (
    PID,
    PROXY_CREDENTIAL,
    PatternBody,
    RawClient,
    curl,
    header_values,
    pattern_sha256,
    poll,
    raw_connect,
    raw_request,
    start_backend,
    start_proxy,
)
from tests.processes import free_port
from tests.support import https_client


def head_and_body(raw: bytes) -> tuple[bytes, bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return head, body


class Forwarding(unittest.TestCase):
    timeout = 60

    @inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def]
        self.backend = yield start_backend(self)
        self.proxy = yield start_proxy(self)
        self.client = https_client(self, self.proxy.cert_path)

    @inlineCallbacks
    def echo(self, method: str, url: str, **kw: Any):  # type: ignore[no-untyped-def]
        response = yield self.client.request(method, url, **kw)
        body = yield response.content()
        self.assertEqual(response.code, 200, body)
        return json.loads(body)

    @inlineCallbacks
    def test_server_form_strips_prefix_port_form_keeps_path(self):  # type: ignore[no-untyped-def]
        doc = yield self.echo("GET", self.proxy.server_url(self.backend.port, "/a/b?x=1&y=2"))
        self.assertEqual(doc["uri"], "/a/b?x=1&y=2")
        doc = yield self.echo("GET", self.proxy.port_url(self.backend.port, "/a/b?x=1"))
        self.assertEqual(doc["uri"], f"/{PID}/port/{self.backend.port}/a/b?x=1")

    @inlineCallbacks
    def test_path_after_prefix_byte_for_byte(self):  # type: ignore[no-untyped-def]
        rest = b"/a%2Fb/../c/./%2e%2e;p=1//d?q=%00&r=&&s=%C3%A9?"
        target = f"/{PID}/server/{self.backend.port}".encode() + rest
        raw = yield raw_request(
            self,
            self.proxy,
            b"GET " + target + b" HTTP/1.0\r\nHost: localhost\r\n\r\n",
        )
        head, body = head_and_body(raw)
        self.assertIn(b" 200 ", head.split(b"\r\n")[0])
        self.assertEqual(json.loads(body)["uri"], rest.decode())

    @inlineCallbacks
    def test_no_host_gets_the_backends_address_once(self):  # type: ignore[no-untyped-def]
        target = f"/{PID}/server/{self.backend.port}/h".encode()
        raw = yield raw_request(self, self.proxy, b"GET " + target + b" HTTP/1.0\r\n\r\n")
        head, body = head_and_body(raw)
        self.assertIn(b" 200 ", head.split(b"\r\n")[0])
        doc = json.loads(body)
        self.assertEqual(header_values(doc, "host"), [f"127.0.0.1:{self.backend.port}"])
        self.assertEqual(header_values(doc, "x-forwarded-host"), [])

    @inlineCallbacks
    def test_curl_path_as_is(self):  # type: ignore[no-untyped-def]
        out, err, code = yield curl(
            "--cacert",
            self.proxy.cert_path,
            "--path-as-is",
            self.proxy.server_url(self.backend.port, "/x/../../y%2f"),
        )
        self.assertEqual(code, 0, err)
        self.assertEqual(json.loads(out)["uri"], "/x/../../y%2f")

    @inlineCallbacks
    def test_every_method(self):  # type: ignore[no-untyped-def]
        url = self.proxy.server_url(self.backend.port, "/m")
        for method in ("GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "PROPFIND", "MKCOL"):
            doc = yield self.echo(method, url, data=b"payload")
            self.assertEqual(doc["method"], method)
            self.assertEqual(doc["body_length"], len(b"payload"))

    @inlineCallbacks
    def test_empty_bodies(self):  # type: ignore[no-untyped-def]
        url = self.proxy.server_url(self.backend.port, "/e")
        doc = yield self.echo("POST", url, data=b"")
        self.assertEqual((doc["body_length"], header_values(doc, "content-length")), (0, ["0"]))
        doc = yield self.echo("GET", url)
        self.assertEqual(doc["body_length"], 0)
        self.assertEqual(header_values(doc, "content-length"), [])
        self.assertEqual(header_values(doc, "transfer-encoding"), [])

    @inlineCallbacks
    def test_chunked_upload(self):  # type: ignore[no-untyped-def]
        size = 3 * 1024 * 1024 + 17
        doc = yield self.echo(
            "PUT",
            self.proxy.server_url(self.backend.port, "/up"),
            data=PatternBody(size, known_length=False),
        )
        self.assertEqual(doc["body_length"], size)
        self.assertEqual(doc["body_sha256"], pattern_sha256(size))

    @inlineCallbacks
    def test_request_headers_policy(self):  # type: ignore[no-untyped-def]
        doc = yield self.echo(
            "GET",
            self.proxy.server_url(self.backend.port, "/h"),
            headers={
                b"Cookie": [b"app=1; cocalcproxy_session=SECRET; other=two"],
                b"X-Forwarded-For": [b"6.6.6.6"],
                b"X-Forwarded-Host": [b"evil.example"],
                b"X-Forwarded-Proto": [b"http"],
                b"X-Forwarded-Prefix": [b"/evil"],
                b"Forwarded": [b"for=6.6.6.6"],
                b"Connection": [b"X-Drop-Me"],
                b"X-Drop-Me": [b"1"],
                b"X-Keep": [b"a", b"b"],
                b"Authorization": [b"Bearer app-token"],
            },
        )
        self.assertEqual(header_values(doc, "cookie"), ["app=1; other=two"])
        self.assertEqual(header_values(doc, "x-forwarded-for"), ["127.0.0.1"])
        self.assertEqual(header_values(doc, "x-forwarded-host"), [f"localhost:{self.proxy.port}"])
        self.assertEqual(header_values(doc, "host"), [f"localhost:{self.proxy.port}"])
        self.assertEqual(header_values(doc, "x-forwarded-proto"), ["https"])
        self.assertEqual(
            header_values(doc, "x-forwarded-prefix"), [f"/{PID}/server/{self.backend.port}"]
        )
        self.assertEqual(header_values(doc, "forwarded"), [])
        self.assertEqual(header_values(doc, "x-drop-me"), [])
        self.assertEqual(header_values(doc, "x-keep"), ["a", "b"])
        self.assertEqual(header_values(doc, "authorization"), ["Bearer app-token"])

    @inlineCallbacks
    def test_proxy_authorization_removed(self):  # type: ignore[no-untyped-def]
        doc = yield self.echo(
            "GET",
            self.proxy.port_url(self.backend.port, "/h"),
            headers={b"Authorization": [PROXY_CREDENTIAL]},
        )
        self.assertEqual(header_values(doc, "authorization"), [])
        self.assertEqual(header_values(doc, "x-forwarded-prefix"), [])

    @inlineCallbacks
    def test_response_headers_policy(self):  # type: ignore[no-untyped-def]
        response = yield self.client.get(self.proxy.server_url(self.backend.port, "/cookies"))
        body = yield response.content()
        self.assertEqual(body, b"cookies")
        prefix = f"/{PID}/server/{self.backend.port}".encode()
        h = response.headers
        self.assertEqual(
            h.getRawHeaders(b"set-cookie"),
            [b"a=1; Path=" + prefix + b"/", b"b=2; Path=" + prefix + b"/deep; HttpOnly"],
        )
        self.assertEqual(h.getRawHeaders(b"vary"), [b"Accept", b"Cookie"])
        self.assertEqual(h.getRawHeaders(b"x-multi"), [b"one", b"two"])
        self.assertIsNone(h.getRawHeaders(b"x-hop"))

    @inlineCallbacks
    def test_location_rewrites(self):  # type: ignore[no-untyped-def]
        b = self.backend.port
        prefix = f"/{PID}/server/{b}"
        cases = [
            ("/login", prefix + "/login"),
            (f"http://127.0.0.1:{b}/x?y=1", prefix + "/x?y=1"),
            (f"https://localhost:{self.proxy.port}/z", prefix + "/z"),
            ("relative/path", "relative/path"),
            ("../up", "../up"),
            ("https://example.org/elsewhere", "https://example.org/elsewhere"),
        ]
        for given, expected in cases:
            response = yield self.client.get(
                self.proxy.server_url(b, "/redirect?to=" + given), allow_redirects=False
            )
            yield response.content()
            self.assertEqual(response.code, 302)
            self.assertEqual(response.headers.getRawHeaders(b"location"), [expected.encode()])
        response = yield self.client.get(
            self.proxy.port_url(b, "/redirect?to=/login"), allow_redirects=False
        )
        yield response.content()
        self.assertEqual(response.headers.getRawHeaders(b"location"), [b"/login"])

    @inlineCallbacks
    def test_content_encoding_untouched(self):  # type: ignore[no-untyped-def]
        out_file = self.mktemp()
        out, err, code = yield curl(
            "--cacert",
            self.proxy.cert_path,
            "-H",
            "Accept-Encoding: gzip",
            "--dump-header",
            "-",
            "--output",
            out_file,
            self.proxy.server_url(self.backend.port, "/gzip"),
        )
        self.assertEqual(code, 0, err)
        self.assertIn(b"content-encoding: gzip", out.lower())
        self.assertIn(b"content-length: ", out.lower())
        with open(out_file, "rb") as f:
            self.assertEqual(gzip.decompress(f.read()), b"compressed hello " * 100)

    @inlineCallbacks
    def test_head_204_304_have_no_body(self):  # type: ignore[no-untyped-def]
        b = self.backend.port
        target = f"/{PID}/server/{b}".encode()
        raw = yield raw_request(
            self,
            self.proxy,
            b"HEAD " + target + b"/download?size=5000 HTTP/1.1\r\nHost: localhost\r\n\r\n"
            b"GET " + target + b"/status/204 HTTP/1.1\r\nHost: localhost\r\n\r\n"
            b"GET " + target + b"/status/304 HTTP/1.1\r\nHost: localhost\r\n\r\n"
            b"GET " + target + b"/gzip HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
        )
        # Four answers on one connection: any stray body would corrupt the framing.
        parts = raw.split(b"HTTP/1.1 ")
        self.assertEqual([p[:3] for p in parts[1:]], [b"200", b"204", b"304", b"200"], raw[:600])
        self.assertIn(b"Content-Length: 5000", parts[1])
        self.assertTrue(parts[1].endswith(b"\r\n\r\n"))
        self.assertTrue(parts[2].endswith(b"\r\n\r\n"))
        self.assertTrue(parts[3].endswith(b"\r\n\r\n"))

    @inlineCallbacks
    def test_statuses_survive(self):  # type: ignore[no-untyped-def]
        for status in (201, 202, 299, 400, 404, 410, 418, 500, 503, 599):
            response = yield self.client.get(
                self.proxy.server_url(self.backend.port, f"/status/{status}")
            )
            yield response.content()
            self.assertEqual(response.code, status)
            self.assertEqual(response.headers.getRawHeaders(b"etag"), [b'"v1"'])

    @inlineCallbacks
    def test_routing_edges_never_reach_the_backend(self):  # type: ignore[no-untyped-def]
        b = str(self.backend.port).encode()
        p = PID.encode()
        for target in (
            b"/" + p + b"/server/" + b + b"%2F",
            b"/" + p + b"/server/" + b + b"%2f..%2f",
            b"/" + p + b"/server/0" + b + b"/",
            b"/" + p.upper() + b"/server/" + b + b"/",
            b"/" + p + b"//server/" + b + b"/",
            b"//" + p + b"/server/" + b + b"/",
            b"/x/../" + p + b"/server/" + b + b"/",
            b"/%2e%2e/" + p + b"/server/" + b + b"/",
            b"/" + p + b"/server/" + b + b"/\xc3\xa9",
            b"/" + p + b"/server/" + b + b"/" + b"a" * 9000,
            b"http://127.0.0.1:" + b + b"/" + p + b"/server/" + b + b"/",
        ):
            raw = yield raw_request(
                self,
                self.proxy,
                b"GET " + target + b" HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
            )
            status = raw.split(b"\r\n", 1)[0]
            self.assertIn(status[9:12], (b"404", b"400"), (target[:80], status))
        self.assertEqual(self.backend.stats.client_ports, [])

    @inlineCallbacks
    def test_keep_alive_reuses_backend_connection(self):  # type: ignore[no-untyped-def]
        for _ in range(3):
            yield self.echo("GET", self.proxy.server_url(self.backend.port, "/k"))
        ports = self.backend.stats.client_ports
        self.assertEqual(len(ports), 3)
        self.assertEqual(len(set(ports)), 1, ports)

    @inlineCallbacks
    def test_sse_first_event_while_open(self):  # type: ignore[no-untyped-def]
        response = yield self.client.get(
            self.proxy.server_url(self.backend.port, "/sse"), unbuffered=True
        )
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"text/event-stream"])
        received: list[bytes] = []
        finished = treq.collect(response, received.append)
        yield poll(lambda: b"".join(received) == b"data: first\n\n", 10, "first event")
        self.assertFalse(finished.called, "stream still open")
        self.assertEqual(self.backend.stats.lost, [])
        # The client goes away: the backend's request is cancelled too.
        response.original._transport.stopProducing()
        yield finished.addErrback(lambda f: f.trap(ResponseFailed))
        yield poll(lambda: self.backend.stats.lost == ["/sse"], 10, "backend to see the abort")

    @inlineCallbacks
    def test_client_abort_before_response_cancels_backend(self):  # type: ignore[no-untyped-def]
        d = self.client.get(self.proxy.server_url(self.backend.port, "/hang"))
        yield poll(lambda: self.backend.stats.client_ports, 10, "backend to get the request")
        d.cancel()
        yield d.addErrback(lambda f: None)
        yield poll(lambda: self.backend.stats.lost == ["/hang"], 10, "backend to see the abort")

    @inlineCallbacks
    def test_backend_dying_mid_body_aborts_client(self):  # type: ignore[no-untyped-def]
        for path in ("/die-mid-body", "/die-mid-chunked"):
            response = yield self.client.get(self.proxy.server_url(self.backend.port, path))
            self.assertEqual(response.code, 200)
            with self.assertRaises(ResponseFailed):
                yield response.content()

    @inlineCallbacks
    def test_curl_sees_incomplete_body(self):  # type: ignore[no-untyped-def]
        url = self.proxy.server_url(self.backend.port, "/die-mid-body")
        _, err, code = yield curl("--cacert", self.proxy.cert_path, url)
        self.assertNotEqual(code, 0, "curl must notice the short body")

    @inlineCallbacks
    def test_slow_client_pauses_backend(self):  # type: ignore[no-untyped-def]
        size = 64 * 1024 * 1024
        target = f"/{PID}/server/{self.backend.port}/download?size={size}".encode()
        client = RawClient(
            b"GET " + target + b" HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
            pause=True,
        )
        yield raw_connect(self, self.proxy, client)
        stats = self.backend.stats
        # The client stopped reading; the proxy must push that back to the backend, which ends
        # up paused by its own transport long before it has produced everything.
        yield poll(
            lambda: client.count and stats.is_paused and stats.produced, 20, "backend paused"
        )
        self.assertLess(stats.produced, size // 4, "the backend was paused long before the end")
        # Give the reactor a few turns: a proxy that buffered would pull more meanwhile.
        for _ in range(10):
            yield task.deferLater(reactor, 0.02, lambda: None)
        # Kernel buffers may still settle a little, but nothing pulls the body through.
        yield poll(lambda: stats.is_paused, 10, "backend paused again")
        self.assertLess(stats.produced, size // 4, "still paused far from the end")
        client.transport.resumeProducing()  # type: ignore[union-attr]
        yield client.done
        self.assertGreater(client.count, size)
        self.assertEqual(stats.produced, size)


class Subdomain(unittest.TestCase):
    """``<pid>-<port>.<domain>``: the backend sees the path unchanged; cookies stay host-only."""

    timeout = 60

    @inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def]
        self.backend = yield start_backend(self)
        self.proxy = yield start_proxy(self, project_domain="projects.example")
        self.host = f"{PID}-{self.backend.port}.projects.example".encode()

    @inlineCallbacks
    def request(self, target: bytes):  # type: ignore[no-untyped-def]
        raw = yield raw_request(
            self,
            self.proxy,
            b"GET " + target + b" HTTP/1.0\r\nHost: " + self.host + b"\r\n\r\n",
        )
        return head_and_body(raw)

    @inlineCallbacks
    def test_path_unchanged_and_no_prefix(self):  # type: ignore[no-untyped-def]
        head, body = yield self.request(b"/a/b?c=%2F")
        doc = json.loads(body)
        self.assertEqual(doc["uri"], "/a/b?c=%2F")
        self.assertEqual(header_values(doc, "host"), [self.host.decode()])
        self.assertEqual(header_values(doc, "x-forwarded-host"), [self.host.decode()])
        self.assertEqual(header_values(doc, "x-forwarded-prefix"), [])

    @inlineCallbacks
    def test_location_and_cookies(self):  # type: ignore[no-untyped-def]
        head, _ = yield self.request(b"/redirect?to=/login")
        self.assertIn(b"\r\nLocation: /login", head)
        head, _ = yield self.request(
            b"/redirect?to=http://127.0.0.1:" + str(self.backend.port).encode() + b"/x"
        )
        self.assertIn(b"\r\nLocation: /x", head)
        head, _ = yield self.request(b"/cookies")
        self.assertIn(b"\r\nSet-Cookie: a=1; Path=/\r\n", head)
        self.assertIn(b"\r\nSet-Cookie: b=2; Path=/deep; HttpOnly", head)
        self.assertNotIn(b"cocalcproxy_session", head)

    @inlineCallbacks
    def test_unknown_project_host_is_404(self):  # type: ignore[no-untyped-def]
        self.host = b"www.projects.example"
        head, _ = yield self.request(b"/")
        self.assertTrue(head.startswith(b"HTTP/1.0 404") or head.startswith(b"HTTP/1.1 404"), head)
        self.assertEqual(self.backend.stats.client_ports, [])


class BigBodies(unittest.TestCase):
    """100 MB each way, streamed, compared by SHA-256 (the harness never holds a whole body)."""

    timeout = 240

    @inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def]
        self.backend = yield start_backend(self)
        self.proxy = yield start_proxy(self)
        self.client = https_client(self, self.proxy.cert_path)

    @inlineCallbacks
    def test_100mb_upload_and_download(self):  # type: ignore[no-untyped-def]
        size = 100 * 1024 * 1024
        expected = pattern_sha256(size)
        response = yield self.client.put(
            self.proxy.server_url(self.backend.port, "/upload"), data=PatternBody(size)
        )
        doc = json.loads((yield response.content()))
        self.assertEqual((doc["body_length"], doc["body_sha256"]), (size, expected))

        response = yield self.client.get(
            self.proxy.server_url(self.backend.port, f"/download?size={size}")
        )
        digest = hashlib.sha256()
        count = [0]

        def take(data: bytes) -> None:
            digest.update(data)
            count[0] += len(data)

        yield treq.collect(response, take)
        self.assertEqual((count[0], digest.hexdigest()), (size, expected))


class Limits(unittest.TestCase):
    timeout = 60

    @inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def]
        self.backend = yield start_backend(self)
        self.proxy = yield start_proxy(self, max_body_size=1024 * 1024)

    @inlineCallbacks
    def test_413_before_the_body_is_sent(self):  # type: ignore[no-untyped-def]
        target = f"/{PID}/server/{self.backend.port}/x".encode()
        raw = yield raw_request(
            self,
            self.proxy,
            b"POST " + target + b" HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n"
            b"Expect: 100-continue\r\nContent-Length: 1048577\r\n\r\n",
        )
        head, body = head_and_body(raw)
        self.assertTrue(head.startswith(b"HTTP/1.1 413 "), raw[:200])
        self.assertNotIn(b"100 Continue", raw)
        self.assertEqual(json.loads(body)["status"], 413)
        self.assertEqual(self.backend.stats.client_ports, [], "nothing reached the backend")

    @inlineCallbacks
    def test_413_for_chunked_over_the_limit(self):  # type: ignore[no-untyped-def]
        """A chunked body past the limit: a 413 reaches the client, nothing reaches the backend.

        A raw client that sends everything and reads until the close, because the proxy stops
        reading after the refusal (a bounded drain) and closes; a client library that fails the
        request when its writes fail would hide whether the 413 was sent.
        """
        target = f"/{PID}/server/{self.backend.port}/x".encode()
        chunk = b"x" * 65536
        body = (b"10000\r\n" + chunk + b"\r\n") * 32 + b"0\r\n\r\n"
        raw = yield raw_request(
            self,
            self.proxy,
            b"POST " + target + b" HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n" + body,
        )
        head, answer = head_and_body(raw)
        self.assertTrue(head.startswith(b"HTTP/1.1 413 "), raw[:200])
        self.assertEqual(json.loads(answer)["status"], 413)
        self.assertEqual(self.backend.stats.client_ports, [])

    @inlineCallbacks
    def test_transfer_codings_other_than_one_chunked_are_refused(self):  # type: ignore[no-untyped-def]
        """RFC 9112 6.1: Twisted alone read "chunked" then "identity" on a second line as
        chunked, and ignored "identity" (beside a Content-Length too): a server in front that
        frames these otherwise would see a different next request (smuggling). Each is a 400
        that closes; the smuggled request never reaches the backend."""
        target = f"/{PID}/server/{self.backend.port}/x".encode()
        smuggled = b"GET " + target + b"?smuggled HTTP/1.1\r\nHost: localhost\r\n\r\n"
        chunked_body = b"3\r\nabc\r\n0\r\n\r\n"
        for framing, body in [
            (b"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity", chunked_body),
            (b"Transfer-Encoding: identity\r\nTransfer-Encoding: chunked", chunked_body),
            (b"Transfer-Encoding: identity\r\nContent-Length: 3", b"abc"),
            (b"Content-Length: 3\r\nTransfer-Encoding: identity", b"abc"),
            (b"Transfer-Encoding: identity", b""),
        ]:
            raw = yield raw_request(
                self,
                self.proxy,
                b"POST "
                + target
                + b" HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
                + framing
                + b"\r\n\r\n"
                + body
                + smuggled,
            )
            self.assertTrue(raw.startswith(b"HTTP/1.1 400 "), (framing, raw[:200]))
            self.assertEqual(raw.count(b"HTTP/1.1 "), 1, (framing, raw[:400]))
        self.assertEqual(self.backend.stats.client_ports, [], "nothing reached the backend")
        # One chunked line still works.
        raw = yield raw_request(
            self,
            self.proxy,
            b"POST " + target + b" HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
            b"Transfer-Encoding: Chunked\r\n\r\n" + chunked_body,
        )
        head, answer = head_and_body(raw)
        self.assertTrue(head.startswith(b"HTTP/1.1 200 "), raw[:200])
        self.assertEqual(json.loads(answer)["body_length"], 3)

    @inlineCallbacks
    def test_at_the_limit_passes(self):  # type: ignore[no-untyped-def]
        client = https_client(self, self.proxy.cert_path)
        response = yield client.post(
            self.proxy.server_url(self.backend.port, "/x"), data=PatternBody(1024 * 1024)
        )
        doc = json.loads((yield response.content()))
        self.assertEqual(doc["body_length"], 1024 * 1024)


class Failures(unittest.TestCase):
    timeout = 60

    @inlineCallbacks
    def test_nothing_listening_502(self):  # type: ignore[no-untyped-def]
        proxy = yield start_proxy(self)
        client = https_client(self, proxy.cert_path)
        port = free_port()
        response = yield client.get(
            proxy.server_url(port, "/"), headers={b"Accept": [b"text/html"]}
        )
        body = yield response.content()
        self.assertEqual(response.code, 502)
        self.assertIn(f"Nothing answered on port {port} of this project".encode(), body)
        self.assertIn(b"0.0.0.0", body)
        self.assertIn(b"--ip=0.0.0.0", body)
        response = yield client.get(proxy.port_url(port, "/"))
        doc = json.loads((yield response.content()))
        self.assertEqual((doc["status"], doc["port"], doc["project"]), (502, port, PID))
        self.assertIn("listen on all addresses", doc["detail"])

    @inlineCallbacks
    def test_connect_timeout_504(self):  # type: ignore[no-untyped-def]
        # A listening socket whose accept queue is full: the kernel drops further SYNs.
        blocker = socket.socket()
        self.addCleanup(blocker.close)
        blocker.bind(("127.0.0.1", 0))
        blocker.listen(0)
        port = blocker.getsockname()[1]
        fillers = []
        for _ in range(4):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
            fillers.append(s)
            self.addCleanup(s.close)
        proxy = yield start_proxy(self, connect_timeout=0.5)
        client = https_client(self, proxy.cert_path)
        response = yield client.get(proxy.server_url(port, "/"))
        doc = json.loads((yield response.content()))
        self.assertEqual(response.code, 504)
        self.assertIn("0.5 seconds", doc["detail"])

    @inlineCallbacks
    def test_response_timeout_504_and_backend_released(self):  # type: ignore[no-untyped-def]
        backend = yield start_backend(self)
        proxy = yield start_proxy(self, response_timeout=0.5)
        client = https_client(self, proxy.cert_path)
        response = yield client.get(
            proxy.server_url(backend.port, "/hang"), headers={b"Accept": [b"text/html"]}
        )
        body = yield response.content()
        self.assertEqual(response.code, 504)
        self.assertIn(b"did not answer in time", body)
        yield poll(lambda: backend.stats.lost == ["/hang"], 10, "backend request to be cancelled")

    @inlineCallbacks
    def test_reflected_text_is_escaped(self):  # type: ignore[no-untyped-def]
        proxy = yield start_proxy(self)
        client = https_client(self, proxy.cert_path)
        port = free_port()
        response = yield client.get(
            proxy.server_url(port, "/<script>alert(1)</script>?<b>"),
            headers={b"Accept": [b"text/html"]},
        )
        body = yield response.content()
        self.assertEqual(response.code, 502)
        self.assertNotIn(b"<script>", body)
        self.assertNotIn(b"Traceback", body)


__all__ = ["reactor"]
