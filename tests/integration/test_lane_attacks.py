"""The fast lane (cocalcproxy.http.lane) under attack, over real TLS: every way a client could
make the lane behave differently from the ordinary path in a way that matters (desync, leaked
credentials, access, framing, timeouts, resources, state across a handover).

Harness: tests.integration.test_lane (the whole proxy in this process, raw TLS clients).
"""

from __future__ import annotations

import json
import socket

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.web import resource, server

from tests.forward_harness import poll
from tests.integration.test_lane import LaneCase, answers


class Extra(resource.Resource):
    """A second backend of the same project: ``/big`` (``size`` bytes with a length),
    ``/echo`` (what it got), anything else: a short body."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.served = 0

    def render(self, request: server.Request) -> bytes:
        self.served += 1
        if request.path.endswith(b"/echo") or request.path == b"/echo":
            seen = {
                "uri": request.uri.decode(),
                "headers": [
                    [name.decode(), value.decode("latin-1")]
                    for name, values in request.requestHeaders.getAllRawHeaders()
                    for value in values
                ],
            }
            return json.dumps(seen).encode()
        if request.path.endswith(b"/padded"):
            request.setHeader(b"X-Pad", b"p" * 8000)
            return b"x" * 100
        if request.path.endswith(b"/small"):
            return b"x" * (8 * 1024)
        return b"short\n"


class RawBackend(Protocol):
    """A backend that records every request head byte for byte and answers each with its
    factory's ``reply`` (a whole response, framing and all, as the test wants it)."""

    def __init__(self, factory: RawBackendFactory) -> None:
        self.factory = factory
        self.buffer = b""

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
            self.factory.heads.append(head + b"\r\n\r\n")
            assert self.transport is not None
            self.transport.write(self.factory.reply(head))


class RawBackendFactory(Factory):
    def __init__(self) -> None:
        self.heads: list[bytes] = []
        self.answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

    def reply(self, head: bytes) -> bytes:
        return self.answer

    def buildProtocol(self, addr: object) -> RawBackend:  # noqa: N802
        return RawBackend(self)


class AttackCase(LaneCase):
    @defer.inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def]
        yield super().setUp()
        self.extra_backend = Extra()
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            server.Site(self.extra_backend)
        )
        self.addCleanup(port.stopListening)
        self.extra_base = f"/{self.project.id}/server/{port.getHost().port}"
        self.raw = RawBackendFactory()
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(self.raw)
        self.addCleanup(port.stopListening)
        self.raw_base = f"/{self.project.id}/server/{port.getHost().port}"
        # The guard drops its caches at its first poll after setUp's changes: let that happen
        # now and warm them again, so the lane takes what each test expects it to take.
        self.guard = self.proxy.service.site.resource.guard._guard
        yield self.guard.poll()
        warm = yield self.connect()
        warm.send(self.request(self.path, self.auth, "Connection: close"))
        yield poll(lambda: warm.lost, timeout=10, what="the warm-up answer")
        yield poll(lambda: not self.server_protocols(), timeout=10, what="the warm-up's close")
        self.handed_over = False

    def server_tls(self) -> object:
        factory = self.proxy.service.listeners[0].factory
        (protocol,) = factory.protocols
        return protocol


class FlowControl(AttackCase):
    @defer.inlineCallbacks
    def test_a_client_that_reads_nothing_stops_being_read(self):  # type: ignore[no-untyped-def]
        """A client that sends requests one at a time and never reads the answers must not make
        the proxy buffer answers without bound: once the connection's send buffer is full, the
        proxy stops reading it (as Twisted's HTTPChannel does, twisted#8868), on the lane too."""
        client = yield self.connect()
        yield self.exchange(client, self.request(self.extra_base + "/x", self.auth))
        self.assertTrue(self.on_lane())
        tcp = self.server_tls().transport
        # Small kernel buffers on both ends, so what the proxy holds shows at once.
        tcp.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        client.transport.transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.transport.pauseProducing()  # read nothing more
        # HEAD: no body, so nothing the answer writes can hold it back.
        request = self.request(self.extra_base + "/padded", self.auth).replace(b"GET", b"HEAD", 1)

        def reading() -> bool:
            return tcp in reactor.getReaders()

        def held() -> int:
            return len(tcp.dataBuffer) - tcp.offset + tcp._tempDataLen

        sent = 0
        for _ in range(1000):
            sent += 1
            served = self.extra_backend.served
            client.send(request)
            yield poll(
                lambda s=served: self.extra_backend.served > s or not reading(),
                timeout=10,
                what="the request to be served or the proxy to stop reading",
            )
            if not reading() or held() > 1024 * 1024:
                break
        self.assertFalse(self.handed_over)
        self.assertFalse(reading(), f"still reading with {held()} bytes of answers held")
        self.assertLess(held(), 256 * 1024)
        # Once the client reads again, every answer arrives and the connection goes on.
        client.transport.resumeProducing()
        yield poll(
            lambda: client.received.count(b"HTTP/1.1 200 ") == sent + 1,
            timeout=10,
            what="every answer",
        )
        self.assertTrue(self.on_lane())
        client.received = b""
        ((head, body),) = yield self.exchange(client, self.request(self.path, self.auth))
        self.assertEqual(body, b"hello, world\n")
        self.assertFalse(self.handed_over)


class Credentials(AttackCase):
    extra = ("--identity-assertion",)

    @defer.inlineCallbacks
    def test_what_the_backend_gets_from_the_lane(self):  # type: ignore[no-untyped-def]
        """The proxy's credential and session cookie never reach the backend; spoofed identity
        and forwarding headers (any spelling) are replaced by the proxy's own, exactly once."""
        client = yield self.connect()
        ((head, _),) = yield self.exchange(
            client,
            self.request(
                self.raw_base + "/x",
                self.auth,
                "Cookie: app=1; __Host-cocalcproxy_session=stolen; __host-COCALCPROXY_session=x",
                "X-Cocalcproxy-Identity: forged",
                "x_cocalcproxy_identity: forged",
                "X-Forwarded-Host: evil.example",
                "X-Forwarded-For: 6.6.6.6",
                "Forwarded: for=6.6.6.6",
                "X-Real-IP: 6.6.6.6",
                "Connection: X-Hop",
                "X-Hop: hop",
            ),
        )
        self.assertTrue(head.startswith(b"HTTP/1.1 200 "), head)
        self.assertFalse(self.handed_over)
        (sent,) = self.raw.heads
        lower = sent.lower()
        self.assertNotIn(self.token.encode(), sent)
        self.assertNotIn(b"authorization", lower)
        self.assertNotIn(b"cocalcproxy_session", lower)
        self.assertNotIn(b"stolen", sent)
        self.assertIn(b"\r\nCookie: app=1\r\n", sent)
        self.assertNotIn(b"forged", sent)
        self.assertNotIn(b"x_cocalcproxy", lower)
        self.assertEqual(lower.count(b"\r\nx-cocalcproxy-identity: ey"), 1)
        self.assertNotIn(b"6.6.6.6", sent)
        self.assertNotIn(b"evil.example", sent)
        self.assertNotIn(b"x-hop", lower)
        self.assertIn(b"\r\nX-Forwarded-For: 127.0.0.1\r\n", sent)
        self.assertIn(b"\r\nX-Forwarded-Host: localhost\r\n", sent)

    @defer.inlineCallbacks
    def test_header_values_reach_the_backend_as_on_the_ordinary_path(self):  # type: ignore[no-untyped-def]
        """Whitespace around a header value is not part of it (RFC 9110 5.5): the ordinary path
        strips it on both sides; so must the lane, for what it forwards and what it decides on
        (Host, and with it X-Forwarded-Host and the Location rewriting)."""
        client = yield self.connect()
        yield self.exchange(
            client,
            b"GET "
            + self.raw_base.encode()
            + b"/x HTTP/1.1\r\nHost: localhost \t\r\n"
            + self.auth.encode()
            + b"\r\nX-Padded: \tvalue \t \r\n\r\n",
        )
        self.assertFalse(self.handed_over)
        (sent,) = self.raw.heads
        self.assertIn(b"\r\nX-Padded: value\r\n", sent)
        self.assertIn(b"\r\nHost: localhost\r\n", sent)
        self.assertIn(b"\r\nX-Forwarded-Host: localhost\r\n", sent)
