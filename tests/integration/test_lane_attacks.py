"""The fast lane (cocalcproxy.http.lane) under attack, over real TLS: every way a client could
make the lane behave differently from the ordinary path in a way that matters (desync, leaked
credentials, access, framing, timeouts, resources, state across a handover).

Harness: tests.integration.test_lane (the whole proxy in this process, raw TLS clients).
"""

from __future__ import annotations

import json
import re
import socket

from twisted.internet import defer, reactor, task
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
        if request.path.endswith(b"/huge"):
            return bytes(range(256)) * (32 * 1024)  # 8 MiB
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
            head, _, rest = self.buffer.partition(b"\r\n\r\n")
            length = re.search(rb"\r\ncontent-length: *(\d+)", head.lower())
            size = int(length.group(1)) if length else 0
            if len(rest) < size:
                return
            self.buffer = rest[size:]
            self.factory.heads.append(head + b"\r\n\r\n")
            self.factory.bodies.append(rest[:size])
            assert self.transport is not None
            self.transport.write(self.factory.reply(head))


class RawBackendFactory(Factory):
    def __init__(self) -> None:
        self.heads: list[bytes] = []
        self.bodies: list[bytes] = []
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


class Backpressure(AttackCase):
    @defer.inlineCallbacks
    def test_a_slow_reader_pauses_the_backend_and_gets_every_byte(self):  # type: ignore[no-untyped-def]
        """Through the lane (the transport's producer), a full send buffer pauses the answer's
        producer, so the backend is not read; when the client reads again, all of it comes."""
        client = yield self.connect()
        yield self.exchange(client, self.request(self.extra_base + "/x", self.auth))
        tcp = self.server_tls().transport
        tcp.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        client.transport.transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.transport.pauseProducing()
        client.send(self.request(self.extra_base + "/huge", self.auth))
        lane = self.server_protocols()[0]

        def backend_paused() -> bool:
            delivery = lane._request_producer
            if delivery is None or delivery.transport is None:
                return False
            backend = delivery.transport._connection.transport
            return lane.waiting_for_transport and backend not in reactor.getReaders()

        yield poll(backend_paused, timeout=10, what="the backend to be paused")
        self.assertLess(len(tcp.dataBuffer) - tcp.offset + tcp._tempDataLen, 1024 * 1024)
        # Ordinary buffers again (4 KiB ones would take minutes for the rest), and read.
        tcp.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        client.transport.transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        client.transport.resumeProducing()
        before = len(client.received)

        expected = bytes(range(256)) * (32 * 1024)

        def whole() -> bool:
            try:
                found = answers(client.received)
            except (ValueError, IndexError):
                return False
            return len(found) == 2 and len(found[1][1]) == len(expected)

        yield poll(whole, timeout=20, what="the whole body")
        head, body = answers(client.received)[1]
        self.assertGreater(len(client.received), before)
        self.assertEqual(body, expected)
        self.assertTrue(self.on_lane())
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


class Smuggling(AttackCase):
    """Heads the lane must not take: each is handed over, with every byte, and answered as
    the ordinary path answers it; nothing smuggled behind it ever reaches a backend as a
    request of its own. Each case starts on a connection the lane has answered a request on."""

    @defer.inlineCallbacks
    def attempt(self, data: bytes):  # type: ignore[no-untyped-def]
        client = yield self.connect()
        yield self.exchange(client, self.request(self.raw_base + "/first", self.auth))
        self.assertTrue(self.on_lane())
        self.handed_over = False
        before = len(client.received)
        client.send(data)
        yield poll(
            lambda: b"\r\n\r\n" in client.received[before:] or client.lost,
            timeout=10,
            what="an answer",
        )
        return client, client.received[before:]

    def smuggled(self) -> list[bytes]:
        return [h for h in self.raw.heads if b"/smuggled" in h.split(b"\r\n", 1)[0]]

    def head(self, *lines: bytes, path: bytes | None = None) -> bytes:
        target = path if path is not None else (self.raw_base + "/x").encode()
        return b"\r\n".join(
            [b"GET " + target + b" HTTP/1.1", b"Host: localhost", self.auth.encode(), *lines]
        )

    @defer.inlineCallbacks
    def test_content_length_and_transfer_encoding(self):  # type: ignore[no-untyped-def]
        smuggle = b"GET /smuggled HTTP/1.1\r\nHost: localhost\r\n\r\n"
        _, got = yield self.attempt(
            self.head(b"Content-Length: 5", b"Transfer-Encoding: chunked", b"", b"0", b"", b"")
            + smuggle
        )
        self.assertTrue(self.handed_over)
        self.assertTrue(got.startswith(b"HTTP/1.1 400 "), got[:60])
        self.assertEqual(self.smuggled(), [])

    @defer.inlineCallbacks
    def test_transfer_encoding_that_is_not_chunked(self):  # type: ignore[no-untyped-def]
        for coding in (b"identity", b"chunked, identity", b"gzip"):
            _, got = yield self.attempt(
                self.head(b"Transfer-Encoding: " + coding, b"", b"")
                + b"GET /smuggled HTTP/1.1\r\nHost: localhost\r\n\r\n"
            )
            self.assertTrue(self.handed_over, coding)
            self.assertTrue(got.startswith(b"HTTP/1.1 400 "), (coding, got[:60]))
        self.assertEqual(self.smuggled(), [])

    @defer.inlineCallbacks
    def test_a_get_with_a_chunked_body_has_its_body_read_as_a_body(self):  # type: ignore[no-untyped-def]
        """The lane sees a whole head and nothing after it only when the body is in a later
        read: it must still not take it, or the body would be read as the next request."""
        client = yield self.connect()
        yield self.exchange(client, self.request(self.raw_base + "/first", self.auth))
        self.handed_over = False
        client.send(self.head(b"Transfer-Encoding: chunked", b"", b""))
        yield poll(lambda: self.handed_over, timeout=10, what="the handover")
        client.send(b"1a\r\nGET /smuggled HTTP/1.1\r\n\r\n\r\n0\r\n\r\n")
        yield poll(lambda: len(self.raw.heads) == 2, timeout=10, what="the request")
        yield poll(lambda: client.received.count(b"HTTP/1.1 200 ") == 2, timeout=10, what="it")
        self.assertEqual(self.smuggled(), [])
        self.assertIn(b"\r\nContent-Length: 26\r\n", self.raw.heads[1])
        self.assertEqual(self.raw.bodies[1], b"GET /smuggled HTTP/1.1\r\n\r\n")

    @defer.inlineCallbacks
    def test_obsolete_line_folding(self):  # type: ignore[no-untyped-def]
        _, got = yield self.attempt(
            self.head(b"X-Folded: a", b" Transfer-Encoding: chunked", b"", b"")
        )
        self.assertTrue(self.handed_over)
        self.assertEqual(self.smuggled(), [])
        self.assertTrue(got.startswith(b"HTTP/1.1 "), got[:60])

    @defer.inlineCallbacks
    def test_bare_cr_nul_and_controls(self):  # type: ignore[no-untyped-def]
        """What llhttp refuses is handed over: the ordinary path refuses NUL and bare CR
        (400), and takes other control bytes in a value (as it would without the lane)."""
        cases = [
            (b"X-A: a\rb", b"400"),
            (b"X-A: a\x00b", b"400"),
            (b"X\x00: a", b"400"),
            (b"X-A: a\x01b", b"200"),
            (b"X-A: a\x7fb", b"200"),
        ]
        for line, status in cases:
            client, got = yield self.attempt(self.head(line, b"", b""))
            self.assertTrue(self.handed_over, line)
            self.assertTrue(got.startswith(b"HTTP/1.1 " + status + b" "), (line, got[:60]))
            if not client.lost:
                client.transport.abortConnection()
            yield poll(lambda: not self.server_protocols(), timeout=10, what="the close")
        # The five first requests, and the two the ordinary path took, nothing else.
        self.assertEqual(len(self.raw.heads), 7)
        self.assertEqual([h for h in self.raw.heads if b"\r" in h.replace(b"\r\n", b"")], [])

    @defer.inlineCallbacks
    def test_leading_empty_lines(self):  # type: ignore[no-untyped-def]
        """One empty line before a request is skipped by both paths; two are the ordinary
        path's (a 400)."""
        client = yield self.connect()
        found = yield self.exchange(client, b"\r\n" + self.head(b"", b""))
        client.transport.abortConnection()
        yield poll(lambda: not self.server_protocols(), timeout=10, what="the close")
        ((head, _),) = found
        self.assertTrue(head.startswith(b"HTTP/1.1 200 "), head)
        self.assertFalse(self.handed_over)
        _, got = yield self.attempt(b"\r\n\r\n" + self.head(b"", b""))
        self.assertTrue(self.handed_over)
        self.assertTrue(got.startswith(b"HTTP/1.1 400 "), got[:60])

    @defer.inlineCallbacks
    def test_a_request_pipelined_behind_a_taken_one_in_the_same_read(self):  # type: ignore[no-untyped-def]
        """Two requests in one read: both the ordinary path's, answered in order."""
        client, _ = yield self.attempt(
            self.head(b"", b"") + self.head(b"", b"", path=(self.raw_base + "/second").encode())
        )
        self.assertTrue(self.handed_over)
        yield poll(lambda: client.received.count(b"HTTP/1.1 200 ") == 3, timeout=10, what="both")
        self.assertEqual([h.split(b" ")[1] for h in self.raw.heads], [b"/first", b"/x", b"/second"])

    @defer.inlineCallbacks
    def test_a_head_longer_than_the_lane_takes(self):  # type: ignore[no-untyped-def]
        """Over 16 KiB without its end: handed over at once, and the ordinary path refuses
        it (its limit is the same) instead of waiting for more."""
        lines = [b"X-Long-%d: %s" % (i, b"a" * 6000) for i in range(4)]
        client, got = yield self.attempt(self.head(*lines, b""))
        self.assertTrue(self.handed_over)
        self.assertTrue(got.startswith(b"HTTP/1.1 400 "), got[:60])
        yield poll(lambda: client.lost, timeout=10, what="the close")
        self.assertEqual(len(self.raw.heads), 1)

    @defer.inlineCallbacks
    def test_a_whole_head_at_the_lane_limit_is_the_ordinary_paths(self):  # type: ignore[no-untyped-def]
        """A whole head a little over what the lane takes: the ordinary path's answer."""
        lines = [b"X-Long-%d: %s" % (i, b"a" * 5450) for i in range(3)]
        data = self.head(*lines, b"", b"")
        self.assertTrue(16384 < len(data) < 16600, len(data))
        _, got = yield self.attempt(data)
        self.assertTrue(self.handed_over)
        self.assertTrue(got.startswith(b"HTTP/1.1 400 "), got[:60])

    @defer.inlineCallbacks
    def test_the_end_of_a_head_split_between_reads(self):  # type: ignore[no-untyped-def]
        client = yield self.connect()
        data = self.head(b"", b"")
        for cut in (1, 2, 3):
            before = len(self.raw.heads)
            client.send(data[:-cut])
            yield poll(lambda: self.server_protocols()[0].buffer, timeout=10, what="a part")
            self.assertEqual(len(self.raw.heads), before)
            ((head, body),) = yield self.exchange(client, data[-cut:])
            self.assertEqual(body, b"ok")
        self.assertFalse(self.handed_over)
        self.assertTrue(self.on_lane())
        self.assertEqual(len(answers(client.received)), 3)


class Access_(AttackCase):
    @defer.inlineCallbacks
    def test_a_denied_port_is_the_ordinary_404_and_never_reached(self):  # type: ignore[no-untyped-def]
        client = yield self.connect()
        yield self.exchange(client, self.request(self.raw_base + "/x", self.auth))
        self.handed_over = False
        ((head, _),) = yield self.exchange(
            client, self.request(f"/{self.project.id}/server/22/", self.auth)
        )
        self.assertTrue(head.startswith(b"HTTP/1.1 404 "), head)
        self.assertTrue(self.handed_over)

    @defer.inlineCallbacks
    def test_the_proxys_own_listener_is_the_404_of_an_unknown_project(self):  # type: ignore[no-untyped-def]
        client = yield self.connect()
        yield self.exchange(client, self.request(self.raw_base + "/x", self.auth))
        before = len(self.access_lines())
        ((head, _),) = yield self.exchange(
            client, self.request(f"/{self.project.id}/server/{self.proxy.port}/", self.auth)
        )
        self.assertTrue(head.startswith(b"HTTP/1.1 404 "), head)
        lines = self.access_lines()[before:]
        self.assertEqual([line["status"] for line in lines], [404])  # not a request to itself
        self.assertEqual(lines[0]["backend"], "own-listener")

    @defer.inlineCallbacks
    def test_another_projects_route_with_cached_credentials(self):  # type: ignore[no-untyped-def]
        """Alice's credentials are cached; Bob's project is not hers: the ordinary 404."""
        yield self.proxy.directory.add_user("bob", "bob-password")
        bobs = yield self.proxy.directory.add_project("bob")
        client = yield self.connect()
        yield self.exchange(client, self.request(self.raw_base + "/x", self.auth))
        port = self.raw_base.rsplit("/", 1)[1]
        for _ in range(2):  # the second from the (negative) cache
            self.handed_over = False
            ((head, _),) = yield self.exchange(
                client, self.request(f"/{bobs.id}/server/{port}/x", self.auth)
            )
            self.assertTrue(head.startswith(b"HTTP/1.1 404 "), head)
            self.assertTrue(self.handed_over)
        self.assertEqual(len(self.raw.heads), 1)


class Subdomains(AttackCase):
    extra = ("--project-domain", "projects.test", "--allow-sharing", "none")

    @defer.inlineCallbacks
    def test_session_cookies_count_only_on_the_host_they_are_bound_to(self):  # type: ignore[no-untyped-def]
        account = yield self.proxy.directory.account_for_token(self.token)
        session = yield self.proxy.directory.create_session(account.id, 3600)
        port = int(self.raw_base.rsplit("/", 1)[1])
        label = f"{self.project.id}-{port}"
        keys = self.guard.hop_keys
        host = f"Host: {label}.projects.test"

        def get(cookie: str) -> bytes:
            return "\r\n".join(
                ["GET /x HTTP/1.1", host, f"Cookie: __Host-cocalcproxy_session={cookie}", "", ""]
            ).encode()

        client = yield self.connect()
        bound = keys.bind(label, session)
        for _ in range(2):  # the first fills the caches on the ordinary path
            ((head, _),) = yield self.exchange(client, get(bound))
            self.assertTrue(head.startswith(b"HTTP/1.1 200 "), head)
        self.assertTrue(self.on_lane())
        self.handed_over = False
        ((head, _),) = yield self.exchange(client, get(bound))
        self.assertFalse(self.handed_over)  # taken by the lane
        self.assertNotIn(b"cocalcproxy_session", b"".join(self.raw.heads).lower())
        served = len(self.raw.heads)
        # The same session bound to a sibling host, or not bound at all: never this host's.
        for cookie in (keys.bind(f"{self.project.id}-{port + 1}", session), session):
            self.handed_over = False
            fresh = yield self.connect()
            ((head, _),) = yield self.exchange(fresh, get(cookie))
            self.assertTrue(self.handed_over)
            self.assertFalse(head.startswith(b"HTTP/1.1 200 "), head)
        self.assertEqual(len(self.raw.heads), served)


class Slow(AttackCase):
    extra = ("--request-head-timeout", "0.5")

    @defer.inlineCallbacks
    def test_a_connection_that_sends_nothing_is_closed(self):  # type: ignore[no-untyped-def]
        client = yield self.connect()
        started = reactor.seconds()
        yield poll(lambda: client.lost, timeout=10, what="the proxy to close")
        self.assertLess(reactor.seconds() - started, 5)

    @defer.inlineCallbacks
    def test_a_head_trickled_byte_by_byte_gets_408(self):  # type: ignore[no-untyped-def]
        """Each byte in time for any idle timer, the head never whole: the head's own
        deadline, from its first byte, ends it (slowloris), after a request the lane took."""
        client = yield self.connect()
        yield self.exchange(client, self.request(self.raw_base + "/x", self.auth))
        self.assertTrue(self.on_lane())
        data = iter(self.request(self.raw_base + "/x", self.auth, "X-Slow: " + "s" * 400))
        started = reactor.seconds()

        def one() -> None:
            if not client.lost:
                client.send(bytes([next(data)]))

        trickle = task.LoopingCall(one)
        trickle.start(0.02)
        self.addCleanup(lambda: trickle.running and trickle.stop())
        yield poll(lambda: client.lost, timeout=10, what="the proxy to close")
        self.assertLess(reactor.seconds() - started, 3)
        head = answers(client.received)[-1][0]
        self.assertTrue(head.startswith(b"HTTP/1.1 408 "), head)
        self.assertEqual(len(self.raw.heads), 1)
        self.assertFalse(self.handed_over)

    @defer.inlineCallbacks
    def test_back_from_the_ordinary_path_no_timer_of_it_is_left(self):  # type: ignore[no-untyped-def]
        """After a handover and the way back, the connection idles on the lane's idle timer
        alone: no 408 from the ordinary channel's head clock, no early close."""
        self.proxy.service.site.timeOut = 2.0
        client = yield self.connect()
        ((head, _),) = yield self.exchange(
            client,
            b"POST "
            + self.raw_base.encode()
            + b"/p HTTP/1.1\r\nHost: localhost\r\n"
            + self.auth.encode()
            + b"\r\nContent-Length: 2\r\n\r\nhi",
        )
        self.assertTrue(head.startswith(b"HTTP/1.1 200 "), head)
        self.assertTrue(self.handed_over)
        self.assertTrue(self.on_lane())
        idle_from = reactor.seconds()
        yield poll(lambda: client.lost, timeout=10, what="the idle close")
        self.assertGreater(reactor.seconds() - idle_from, 1.8)
        self.assertEqual(len(answers(client.received)), 1, client.received)


class Closing(AttackCase):
    @defer.inlineCallbacks
    def test_a_client_that_closes_cleanly_is_gone_at_once(self):  # type: ignore[no-untyped-def]
        """The lane is its transport's producer: a TLS close from the client must still end
        the connection on the proxy's side (nothing waits for the producer to go)."""
        client = yield self.connect()
        yield self.exchange(client, self.request(self.raw_base + "/x", self.auth))
        self.assertTrue(self.on_lane())
        client.transport.loseConnection()
        yield poll(lambda: not self.server_protocols(), timeout=10, what="the proxy's close")
        yield poll(lambda: client.lost, timeout=10, what="the client's close")

    @defer.inlineCallbacks
    def test_connection_close_closes_at_once_after_the_answer(self):  # type: ignore[no-untyped-def]
        client = yield self.connect()
        yield self.exchange(client, self.request(self.raw_base + "/x", self.auth))
        started = reactor.seconds()
        client.send(self.request(self.raw_base + "/x", self.auth, "Connection: close"))
        yield poll(lambda: client.lost, timeout=10, what="the proxy's close")
        self.assertLess(reactor.seconds() - started, 5)  # not the 15 s abort
        self.assertFalse(self.handed_over)


class BackAndForth(AttackCase):
    @defer.inlineCallbacks
    def test_handed_over_and_back_again_many_times(self):  # type: ignore[no-untyped-def]
        """The transport's producer changes hands at every handover and every way back: each
        request is answered once, in order, and the connection ends on the lane."""
        logged = len(self.access_lines())
        client = yield self.connect()
        post = (
            b"POST "
            + self.raw_base.encode()
            + b"/p%d HTTP/1.1\r\nHost: localhost\r\n"
            + self.auth.encode()
            + b"\r\nContent-Length: 2\r\n\r\nhi"
        )
        for i in range(4):
            self.handed_over = False
            ((head, _),) = yield self.exchange(client, post % i)
            self.assertTrue(head.startswith(b"HTTP/1.1 200 "), head)
            self.assertTrue(self.handed_over)
            self.assertTrue(self.on_lane())
            self.handed_over = False
            ((head, _),) = yield self.exchange(
                client, self.request(self.raw_base + f"/g{i}", self.auth)
            )
            self.assertTrue(head.startswith(b"HTTP/1.1 200 "), head)
            self.assertFalse(self.handed_over)
        self.assertEqual(
            [h.split(b" ")[1] for h in self.raw.heads],
            [p for i in range(4) for p in (b"/p%d" % i, b"/g%d" % i)],
        )
        self.assertEqual(self.raw.bodies[::2], [b"hi"] * 4)
        # Each request is in the access log once, as its own path's request.
        lines = self.access_lines()[logged:]
        port = self.raw_base.rsplit("/", 1)[1]
        self.assertEqual(
            [(line["method"], line["path"].rsplit("/", 1)[1], line["status"]) for line in lines],
            [(m, f"{m[0].lower()}{i}", 200) for i in range(4) for m in ("POST", "GET")],
        )
        self.assertEqual(
            {(line["account"], line["port"]) for line in lines}, {("alice", int(port))}
        )
