"""A backend's response head is bounded (bytes, header fields, interim 1xx responses): over the
bound the client gets a 502 page and the backend connection is closed at once; under it, every
header arrives. Real TLS client, real proxy forwarder, real TCP backends."""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.trial import unittest

from cocalcproxy.http.headlimit import MAX_HEAD_BYTES, MAX_HEAD_FIELDS
from tests.forward_harness import start_proxy
from tests.support import https_client


class HeadBackend(Protocol):
    """Answers the first request with ``head`` (then a small body) in 16 KiB writes, and keeps
    sending filler header lines afterwards if ``endless``; records how much it sent."""

    def __init__(self, server: HeadServer) -> None:
        self.server = server
        self.buffer = b""

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.buffer += data
        if b"\r\n\r\n" in self.buffer and self.transport is not None:
            self.buffer = b""
            head = self.server.head
            for start in range(0, len(head), 16384):
                self.transport.write(head[start : start + 16384])
                self.server.sent += len(head[start : start + 16384])
            if self.server.endless:
                self.more()

    def more(self) -> None:
        if self.transport is None or self.server.closed.called:
            return
        chunk = b"X-Filler: " + b"f" * 54 + b"\r\n"
        self.transport.write(chunk * 256)
        self.server.sent += len(chunk) * 256
        if self.server.sent < 50 * 1024 * 1024:
            reactor.callLater(0, self.more)  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure = connectionDone) -> None:  # noqa: N802
        if not self.server.closed.called:
            self.server.closed.callback(self.server.sent)


class HeadServer(Factory):
    def __init__(self, head: bytes, endless: bool = False) -> None:
        self.head = head
        self.endless = endless
        self.sent = 0
        self.closed: Deferred[int] = Deferred()

    def buildProtocol(self, addr: Any) -> HeadBackend:  # noqa: N802
        return HeadBackend(self)


def head_with(fields: list[bytes], status: bytes = b"200 OK", body: bytes = b"ok") -> bytes:
    lines = [b"HTTP/1.1 " + status, *fields, b"Content-Length: %d" % len(body)]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


class ResponseHeadTests(unittest.TestCase):
    timeout = 60

    @inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def]
        self.proxy = yield start_proxy(self)
        self.client = https_client(self, self.proxy.cert_path, persistent=False)

    @inlineCallbacks
    def backend(self, head: bytes, endless: bool = False):  # type: ignore[no-untyped-def]
        server = HeadServer(head, endless)
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(server)
        self.addCleanup(port.stopListening)
        return server, port.getHost().port

    @inlineCallbacks
    def fetch(self, port: int, html: bool = False):  # type: ignore[no-untyped-def]
        headers = {b"Accept": [b"text/html"]} if html else {}
        response = yield self.client.get(self.proxy.server_url(port, "/"), headers=headers)
        body = yield response.content()
        return response, body

    @inlineCallbacks
    def test_endless_head_is_cut_with_a_502(self):  # type: ignore[no-untyped-def]
        """The reported attack: a backend that sends header lines for ever."""
        server, port = yield self.backend(b"HTTP/1.1 200 OK\r\n", endless=True)
        response, body = yield self.fetch(port, html=True)
        self.assertEqual(response.code, 502, body[:500])
        self.assertIn(b"response head", body)
        self.assertIn(b"<!DOCTYPE html>", body[:200])
        sent = yield server.closed
        # The proxy closed the backend connection soon after the bound, not after 50 MiB.
        self.assertLess(sent, 4 * MAX_HEAD_BYTES)

    @inlineCallbacks
    def test_too_many_bytes_in_few_fields(self):  # type: ignore[no-untyped-def]
        fields = [b"X-Big-%d: %s" % (i, b"v" * 8000) for i in range(9)]  # about 72 KiB
        server, port = yield self.backend(head_with(fields))
        response, body = yield self.fetch(port)
        self.assertEqual(response.code, 502, body[:500])
        doc = json.loads(body)
        self.assertIn(f"larger than {MAX_HEAD_BYTES} bytes", doc["detail"])
        yield server.closed

    @inlineCallbacks
    def test_too_many_fields(self):  # type: ignore[no-untyped-def]
        fields = [b"X-F%d: 1" % i for i in range(MAX_HEAD_FIELDS + 1)]
        server, port = yield self.backend(head_with(fields))
        response, body = yield self.fetch(port)
        self.assertEqual(response.code, 502, body[:500])
        self.assertIn(f"more than {MAX_HEAD_FIELDS} header fields", json.loads(body)["detail"])

    @inlineCallbacks
    def test_endless_interim_responses(self):  # type: ignore[no-untyped-def]
        interim = b"HTTP/1.1 100 Continue\r\nX-I: 1\r\n\r\n" * 3000
        server, port = yield self.backend(interim + head_with([]))
        response, body = yield self.fetch(port)
        self.assertEqual(response.code, 502, body[:500])

    @inlineCallbacks
    def test_just_under_the_bounds_passes_whole(self):  # type: ignore[no-untyped-def]
        # Up to the field bound, and a head just under the byte bound (counting every byte).
        fields = [b"X-F%d: %s" % (i, b"v" * 200) for i in range(MAX_HEAD_FIELDS - 2)]
        head = head_with(fields, body=b"")
        pad = MAX_HEAD_BYTES - len(head) - len(b"X-Pad: \r\n")
        self.assertGreater(pad, 0)
        fields.append(b"X-Pad: " + b"p" * pad)
        head = head_with(fields, body=b"")
        self.assertEqual(len(head), MAX_HEAD_BYTES)
        server, port = yield self.backend(head_with(fields))
        response, body = yield self.fetch(port)
        self.assertEqual(response.code, 200, body[:500])
        self.assertEqual(body, b"ok")
        self.assertEqual(response.headers.getRawHeaders(b"x-pad"), [b"p" * pad])
        self.assertEqual(response.headers.getRawHeaders(b"x-f0"), [b"v" * 200])
