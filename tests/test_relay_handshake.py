"""The relay's checks (pure) and its handling of odd backends and clients (raw loopback sockets).

Here both ends are small Twisted protocols writing exact bytes, so the tests control what a
library would never send: a 101 with the wrong accept, a 101 and a frame in one packet, a
chunked 200, a body cut short, a backend that never answers.
"""

from __future__ import annotations

import base64
import hashlib
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from twisted.trial import unittest
from twisted.web.http_headers import Headers

from cocalcproxy.handlers import relay
from tests.relay_support import TOKEN, MiniProxy, free_port, wait_for

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def expected_accept(key: bytes) -> bytes:
    return base64.b64encode(hashlib.sha1(key + GUID).digest())  # noqa: S324


# --- pure -------------------------------------------------------------------------------------


class AcceptTests(unittest.TestCase):
    def test_rfc_6455_example(self) -> None:
        self.assertEqual(
            relay.accept_for(b"dGhlIHNhbXBsZSBub25jZQ=="), b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        )

    def test_switch_needs_status_upgrade_connection_and_the_right_accept(self) -> None:
        key = b"dGhlIHNhbXBsZSBub25jZQ=="
        good = [
            (b"Upgrade", b"WebSocket"),
            (b"Connection", b"keep-alive, Upgrade"),
            (b"Sec-WebSocket-Accept", expected_accept(key)),
        ]
        self.assertTrue(relay.switch_is_valid(101, good, key))
        self.assertFalse(relay.switch_is_valid(200, good, key))
        self.assertFalse(relay.switch_is_valid(101, good[1:], key))
        self.assertFalse(relay.switch_is_valid(101, [good[0], good[2]], key))
        self.assertFalse(relay.switch_is_valid(101, [*good[:2], (good[2][0], b"bm9wZQ==")], key))
        self.assertFalse(relay.switch_is_valid(101, [*good, good[2]], key))  # two accepts
        self.assertFalse(relay.switch_is_valid(101, good, b"another key"))


def frame(payload_length: int, masked: bool, opcode: int = 0x2) -> bytes:
    """A frame built independently of the proxy's code (RFC 6455 section 5.2)."""
    second = 0x80 if masked else 0
    if payload_length < 126:
        header = bytes([0x80 | opcode, second | payload_length])
    elif payload_length < 65536:
        header = bytes([0x80 | opcode, second | 126]) + payload_length.to_bytes(2, "big")
    else:
        header = bytes([0x80 | opcode, second | 127]) + payload_length.to_bytes(8, "big")
    return header + (b"MASK" if masked else b"") + b"\xab" * payload_length


class FrameBoundaryTests(unittest.TestCase):
    @settings(deadline=None)  # a loaded shared machine must not fail a correct example
    @given(
        lengths=st.lists(
            st.one_of(st.integers(0, 130), st.sampled_from([125, 126, 127, 65535, 65536, 70000])),
            min_size=1,
            max_size=6,
        ),
        masked=st.booleans(),
        cuts=st.lists(st.integers(0, 200_000), max_size=8),
    )
    def test_boundaries_found_however_the_stream_is_split(
        self, lengths: list[int], masked: bool, cuts: list[int]
    ) -> None:
        frames = [frame(n, masked) for n in lengths]
        stream = b"".join(frames)
        ends = set()
        total = 0
        for f in frames:
            total += len(f)
            ends.add(total)
        points = sorted({c % (len(stream) + 1) for c in cuts} | {len(stream)})
        tracker = relay.FrameBoundary()
        previous = 0
        for point in points:
            tracker.feed(stream[previous:point])
            previous = point
            self.assertEqual(tracker.at_boundary, point == 0 or point in ends, point)

    def test_close_frames(self) -> None:
        self.assertEqual(relay.close_frame(1001, "bye", masked=False), b"\x88\x05\x03\xe9bye")
        masked = relay.close_frame(1008, "access revoked", masked=True)
        self.assertEqual(masked[:2], bytes([0x88, 0x80 | 16]))
        key = masked[2:6]
        payload = bytes(b ^ key[i % 4] for i, b in enumerate(masked[6:]))
        self.assertEqual(payload, b"\x03\xf0access revoked")


class OriginTests(unittest.TestCase):
    def test_parse(self) -> None:
        self.assertEqual(relay.parse_origin(b"https://Example.COM"), ("https", "example.com", 443))
        self.assertEqual(relay.parse_origin(b"HTTP://a.b:8080"), ("http", "a.b", 8080))
        self.assertEqual(relay.parse_origin(b"https://[::1]:8443"), ("https", "[::1]", 8443))
        for bad in (
            b"null",
            b"https://example.com/",
            b"https://example.com/path",
            b"https://user@example.com",
            b"ftp://example.com",
            b"https://exa mple.com",
            b"https://example.com:0",
            b"https://example.com:65536",
            b"https://example.com:08443",
            b"https://example.com:",
            b"https://",
            b"//example.com",
            "https://exämple.com".encode(),
        ):
            self.assertIsNone(relay.parse_origin(bad), bad)

    def test_allowed(self) -> None:
        allowed = relay.origin_allowed
        self.assertTrue(allowed([], b"proxy.example", True))
        self.assertTrue(allowed([b"https://proxy.example"], b"proxy.example", True))
        self.assertTrue(allowed([b"https://PROXY.example:443"], b"proxy.EXAMPLE", True))
        self.assertTrue(allowed([b"https://proxy.example:8443"], b"proxy.example:8443", True))
        self.assertFalse(allowed([b"https://proxy.example"], b"proxy.example:8443", True))
        self.assertFalse(allowed([b"http://proxy.example"], b"proxy.example", True))
        self.assertFalse(allowed([b"https://evil.example"], b"proxy.example", True))
        self.assertFalse(allowed([b"https://proxy.example.evil"], b"proxy.example", True))
        self.assertFalse(allowed([b"null"], b"proxy.example", True))
        self.assertFalse(allowed([b"https://proxy.example"], None, True))
        self.assertFalse(
            allowed([b"https://proxy.example", b"https://proxy.example"], b"proxy.example", True)
        )
        # Subdomain mode: the Host is the project's own name, so its origin is the allowed one.
        sub = b"0b2f1d4e-5c6a-4b7d-8e9f-0a1b2c3d4e5f-8888.projects.example"
        self.assertTrue(allowed([b"https://" + sub], sub, True))
        self.assertFalse(allowed([b"https://projects.example"], sub, True))

    @settings(deadline=None)
    @given(
        host=st.from_regex(
            r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?(\.[a-z0-9]{1,10}){0,3}", fullmatch=True
        ),
        port=st.integers(1, 65535),
        other=st.integers(1, 65535),
    )
    def test_own_origin_and_only_it(self, host: str, port: int, other: int) -> None:
        hostport = f"{host}:{port}".encode()
        self.assertTrue(
            relay.origin_allowed([f"https://{host.upper()}:{port}".encode()], hostport, True)
        )
        if other != port:
            self.assertFalse(
                relay.origin_allowed([f"https://{host}:{other}".encode()], hostport, True)
            )
        self.assertFalse(relay.origin_allowed([f"http://{host}:{port}".encode()], hostport, True))


class FakeRequest:
    def __init__(self, method: bytes = b"GET", proto: bytes = b"HTTP/1.1", **headers: Any) -> None:
        self.method = method
        self.clientproto = proto
        self.requestHeaders = Headers()
        base = {"host": b"proxy.example", "sec_websocket_key": b"x" * 24}
        base.update(headers)
        for name, value in base.items():
            if value is not None:
                values = value if isinstance(value, list) else [value]
                self.requestHeaders.setRawHeaders(name.replace("_", "-").encode(), values)

    def isSecure(self) -> bool:  # noqa: N802
        return True


class RefusalRuleTests(unittest.TestCase):
    def status(self, **kwargs: Any) -> int | None:
        refusal = relay.handshake_refusal(FakeRequest(**kwargs))  # type: ignore[arg-type]
        return None if refusal is None else refusal[0]

    def test_rules(self) -> None:
        self.assertIsNone(self.status())
        self.assertIsNone(self.status(content_length=b"0"))
        self.assertEqual(self.status(origin=b"https://evil.example"), 403)
        self.assertEqual(self.status(method=b"POST"), 400)
        self.assertEqual(self.status(proto=b"HTTP/1.0"), 400)
        self.assertEqual(self.status(content_length=b"5"), 400)
        self.assertEqual(self.status(transfer_encoding=b"chunked"), 400)
        self.assertEqual(self.status(sec_websocket_key=None), 400)
        self.assertEqual(self.status(sec_websocket_key=[b"a" * 24, b"b" * 24]), 400)
        self.assertEqual(self.status(host=[b"a.example", b"b.example"]), 400)
        two_hosts = [b"proxy.example", b"proxy.example"]
        self.assertEqual(self.status(host=two_hosts, origin=b"https://proxy.example"), 403)
        # Origin is checked first: a cross-site request learns nothing else.
        self.assertEqual(self.status(origin=b"https://evil.example", method=b"POST"), 403)


# --- raw backends and clients -----------------------------------------------------------------


class RawBackend(Protocol):
    """Reads one request head, then writes whatever the test's ``answer`` returns."""

    def __init__(self, owner: RawBackendFactory) -> None:
        self.owner = owner
        self.buffer = b""
        self.head: bytes | None = None
        self.after = b""
        self.lost = False

    def connectionMade(self) -> None:  # noqa: N802
        self.owner.protocols.append(self)

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        if self.head is not None:
            self.after += data
            if self.owner.echo:
                self.transport.write(data)  # type: ignore[union-attr]
            return
        self.buffer += data
        if b"\r\n\r\n" in self.buffer:
            self.head, _, rest = self.buffer.partition(b"\r\n\r\n")
            self.owner.heads.append(self.head)
            answer = self.owner.answer(self, self.head)
            if answer:
                self.transport.write(answer)  # type: ignore[union-attr]
            if rest:
                self.dataReceived(rest)

    def key(self) -> bytes:
        assert self.head is not None
        for line in self.head.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"sec-websocket-key":
                return value.strip()
        raise AssertionError("no key")

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]  # noqa: N802
        self.lost = True


class RawBackendFactory(Factory):
    def __init__(self, answer: Any, echo: bool = False) -> None:
        self.answer = answer
        self.echo = echo
        self.heads: list[bytes] = []
        self.protocols: list[RawBackend] = []

    def buildProtocol(self, addr: Any) -> RawBackend:  # noqa: N802
        return RawBackend(self)


def switch(backend: RawBackend, head: bytes, extra: bytes = b"") -> bytes:
    return (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + expected_accept(backend.key()) + b"\r\n\r\n" + extra
    )


class RawClient(Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.lost: defer.Deferred[None] = defer.Deferred()
        self.reason: Failure | None = None

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.data += data

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]  # noqa: N802
        self.reason = reason
        self.lost.callback(None)


def upgrade(path: str, key: bytes = b"dGhlIHNhbXBsZSBub25jZQ==", extra: bytes = b"") -> bytes:
    return (
        (
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
            f"Authorization: Bearer {TOKEN}\r\nSec-WebSocket-Key: "
        ).encode()
        + key
        + b"\r\n"
        + extra
        + b"\r\n"
    )


class RawTests(unittest.TestCase):
    timeout = 30

    def setUp(self) -> None:
        self.clock = task.Clock()
        self.proxy = MiniProxy(self, clock=self.clock, idle_timeout=100.0, response_timeout=50.0)

    def backend(self, answer: Any, echo: bool = False) -> tuple[RawBackendFactory, int]:
        factory = RawBackendFactory(answer, echo)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)

        def close_all() -> None:
            for p in factory.protocols:
                if p.transport is not None and not p.lost:
                    p.transport.abortConnection()  # type: ignore[attr-defined]

        self.addCleanup(close_all)
        return factory, port.getHost().port

    @defer.inlineCallbacks
    def connect(self):  # type: ignore[no-untyped-def]
        client = RawClient()
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.proxy.port), client)

        def close() -> defer.Deferred[None]:
            if not client.lost.called:
                client.transport.abortConnection()  # type: ignore[union-attr]
            return client.lost

        self.addCleanup(close)
        return client

    @defer.inlineCallbacks
    def test_backend_bytes_in_the_101_packet_are_kept(self):  # type: ignore[no-untyped-def]
        factory, port = self.backend(lambda b, h: switch(b, h, b"\x81\x05early"), echo=True)
        client = yield self.connect()
        client.transport.write(upgrade(self.proxy.path(port, "/ws?q=1")) + b"client-early")
        yield wait_for(lambda: b"\x81\x05earlyclient-early" in client.data)
        head, _, rest = client.data.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 101 "))
        self.assertIn(b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=", head)
        self.assertEqual(rest, b"\x81\x05earlyclient-early")
        [sent] = factory.heads
        self.assertTrue(sent.startswith(b"GET /ws?q=1 HTTP/1.1\r\n"), sent)
        self.assertNotIn(b"authorization", sent.lower())
        self.assertIn(b"\r\nSec-Websocket-Key: dGhlIHNhbXBsZSBub25jZQ==", sent)
        self.assertIn(
            b"\r\nX-Forwarded-Prefix: " + self.proxy.path(port).rstrip("/").encode(), sent
        )

    @defer.inlineCallbacks
    def test_wrong_accept_is_502_and_nothing_is_relayed(self):  # type: ignore[no-untyped-def]
        def wrong(backend: RawBackend, head: bytes) -> bytes:
            return (
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Accept: bm9wZQ==\r\n\r\nsecret"
            )

        factory, port = self.backend(wrong)
        client = yield self.connect()
        client.transport.write(upgrade(self.proxy.path(port)))
        yield wait_for(lambda: b"\r\n\r\n" in client.data and client.data.endswith(b"}\n"))
        self.assertTrue(client.data.startswith(b"HTTP/1.1 502 "), client.data)
        self.assertNotIn(b"secret", client.data)
        self.assertEqual(self.proxy.relay.opened_total, 0)
        yield wait_for(lambda: factory.protocols[0].lost)

    @defer.inlineCallbacks
    def test_garbage_answer_is_502(self):  # type: ignore[no-untyped-def]
        _, port = self.backend(lambda b, h: b"SSH-2.0-OpenSSH\r\n\r\n")
        client = yield self.connect()
        client.transport.write(upgrade(self.proxy.path(port)))
        yield wait_for(lambda: client.data.endswith(b"}\n"))
        self.assertTrue(client.data.startswith(b"HTTP/1.1 502 "), client.data)

    @defer.inlineCallbacks
    def test_chunked_answer_passes_and_the_connection_stays_http(self):  # type: ignore[no-untyped-def]
        def first_refuse_then_switch(backend: RawBackend, head: bytes) -> bytes:
            if len(backend.owner.heads) == 1:
                return (
                    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-From: backend\r\n"
                    b"Set-Cookie: a=b; Domain=evil.example; Path=/\r\n\r\n"
                    b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
                )
            return switch(backend, head)

        _, port = self.backend(first_refuse_then_switch)
        client = yield self.connect()
        client.transport.write(upgrade(self.proxy.path(port)))
        yield wait_for(lambda: client.data.endswith(b"0\r\n\r\n"))
        head, _, body = client.data.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 200 OK"), head)
        self.assertIn(b"X-From: backend", head)
        self.assertNotIn(b"evil.example", head)  # the header policy scoped the cookie
        self.assertIn(b"hello", body)
        self.assertIn(b" world", body)
        client.data = b""
        # Same connection, second handshake: now relayed.
        client.transport.write(upgrade(self.proxy.path(port)))
        yield wait_for(lambda: client.data.startswith(b"HTTP/1.1 101 "))
        yield wait_for(lambda: self.proxy.relay.open_count() == 1)

    @defer.inlineCallbacks
    def test_answer_until_close_is_delivered_whole(self):  # type: ignore[no-untyped-def]
        def close_delimited(backend: RawBackend, head: bytes) -> bytes:
            backend.transport.write(b"HTTP/1.0 404 Not Found\r\n\r\nno such socket")  # type: ignore[union-attr]
            backend.transport.loseConnection()  # type: ignore[union-attr]
            return b""

        _, port = self.backend(close_delimited)
        client = yield self.connect()
        client.transport.write(upgrade(self.proxy.path(port)))
        yield wait_for(lambda: client.data.endswith(b"0\r\n\r\n"))
        self.assertTrue(client.data.startswith(b"HTTP/1.1 404 Not Found"))
        self.assertIn(b"no such socket", client.data)

    @defer.inlineCallbacks
    def test_body_cut_short_aborts_the_client(self):  # type: ignore[no-untyped-def]
        def short(backend: RawBackend, head: bytes) -> bytes:
            backend.transport.write(
                b"HTTP/1.1 403 Forbidden\r\nContent-Length: 100\r\n\r\nonly ten!!"
            )  # type: ignore[union-attr]
            backend.transport.loseConnection()  # type: ignore[union-attr]
            return b""

        _, port = self.backend(short)
        client = yield self.connect()
        client.transport.write(upgrade(self.proxy.path(port)))
        yield client.lost
        # The connection is aborted: whatever arrived, it is never a complete-looking answer.
        self.assertNotIn(b"only ten!!" + b"x" * 90, client.data)
        head, _, body = client.data.partition(b"\r\n\r\n")
        if head:
            self.assertIn(b"Content-Length: 100", head)
            self.assertLess(len(body), 100)

    @defer.inlineCallbacks
    def test_backend_that_never_answers_is_504(self):  # type: ignore[no-untyped-def]
        factory, port = self.backend(lambda b, h: b"")
        client = yield self.connect()
        client.transport.write(upgrade(self.proxy.path(port)))
        yield wait_for(lambda: len(factory.heads) == 1)
        self.clock.advance(51)
        yield wait_for(lambda: client.data.endswith(b"}\n"))
        self.assertTrue(client.data.startswith(b"HTTP/1.1 504 "), client.data)
        yield wait_for(lambda: factory.protocols[0].lost)

    @defer.inlineCallbacks
    def test_connect_timeout_is_504(self):  # type: ignore[no-untyped-def]
        # A backend whose connect never completes. (A listener with a full backlog is not a
        # reliable way to get that: the kernel sometimes refuses instead, which is a 502.)
        hanging: list[defer.Deferred[Any]] = []

        class HangingEndpoint:
            def connect(self, factory: Any) -> defer.Deferred[Any]:
                d: defer.Deferred[Any] = defer.Deferred()
                hanging.append(d)
                return d

        real = self.proxy.relay.backends
        self.patch(real, "endpoint", lambda target: HangingEndpoint())
        port = 40123  # unprivileged and on no deny list; nothing connects anyway
        client = yield self.connect()
        client.transport.write(upgrade(self.proxy.path(port)))
        yield wait_for(lambda: len(self.proxy.relay._pending) == 1)
        self.assertEqual(len(hanging), 1)
        self.clock.advance(11)
        yield wait_for(lambda: client.data.endswith(b"}\n"))
        self.assertTrue(client.data.startswith(b"HTTP/1.1 504 "), client.data)
        self.assertIn(f"port {port}".encode(), client.data)
        self.assertTrue(hanging[0].called, "the timed-out connect was cancelled")

    @defer.inlineCallbacks
    def test_refused_requests_never_reach_a_backend(self):  # type: ignore[no-untyped-def]
        factory, port = self.backend(switch)
        path = self.proxy.path(port)
        for request, status in (
            (upgrade(path, extra=b"Content-Length: 4\r\n") + b"body", b"400"),
            (upgrade(path).replace(b"GET ", b"POST ", 1), b"400"),
            (upgrade(path, extra=b"Origin: https://evil.example\r\n"), b"403"),
            (upgrade(path).replace(b"Bearer " + TOKEN.encode(), b"Bearer bad"), b"401"),
        ):
            client = yield self.connect()
            client.transport.write(request)
            yield wait_for(lambda c=client: c.data.endswith(b"}\n"))  # type: ignore[misc]
            self.assertTrue(client.data.startswith(b"HTTP/1.1 " + status), client.data)
        self.assertEqual(factory.heads, [])

    @defer.inlineCallbacks
    def test_backend_down_is_502(self):  # type: ignore[no-untyped-def]
        port = free_port()
        client = yield self.connect()
        client.transport.write(upgrade(self.proxy.path(port)))
        yield wait_for(lambda: client.data.endswith(b"}\n"))
        self.assertTrue(client.data.startswith(b"HTTP/1.1 502 "), client.data)
        self.assertIn(b"--bind 0.0.0.0", client.data)

    @defer.inlineCallbacks
    def test_idle_relay_is_closed_and_traffic_keeps_it_open(self):  # type: ignore[no-untyped-def]
        factory, port = self.backend(switch, echo=True)
        client = yield self.connect()
        client.transport.write(upgrade(self.proxy.path(port)))
        yield wait_for(lambda: self.proxy.relay.open_count() == 1)
        self.clock.advance(60)
        client.transport.write(b"ping")
        yield wait_for(lambda: client.data.endswith(b"ping"))
        self.clock.advance(60)  # 120 s since the start, 60 s since traffic: still open
        self.assertEqual(self.proxy.relay.open_count(), 1)
        self.clock.advance(41)
        yield client.lost
        yield wait_for(lambda: factory.protocols[0].lost and self.proxy.relay.open_count() == 0)

    @defer.inlineCallbacks
    def test_one_timer_watches_every_open_relay_for_idleness(self):  # type: ignore[no-untyped-def]
        factory, port = self.backend(switch, echo=True)
        clients = []
        for _ in range(3):
            client = yield self.connect()
            client.transport.write(upgrade(self.proxy.path(port)))
            clients.append(client)
        yield wait_for(lambda: self.proxy.relay.open_count() == 3)
        [sweep] = self.clock.getDelayedCalls()  # not one per relay
        self.assertAlmostEqual(sweep.getTime() - self.clock.seconds(), 100.0 / 60, delta=0.5)
        self.clock.advance(101)
        for client in clients:
            yield client.lost
        yield wait_for(lambda: self.proxy.relay.open_count() == 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])  # none left once none is open

    @defer.inlineCallbacks
    def test_a_quiet_relay_gives_back_its_buffers_once_per_quiet_spell(self):  # type: ignore[no-untyped-def]
        factory, port = self.backend(switch, echo=True)
        client = yield self.connect()
        client.transport.write(upgrade(self.proxy.path(port)))
        yield wait_for(lambda: self.proxy.relay.open_count() == 1)
        [splice] = self.proxy.relay._open
        released: list[float] = []
        # What a TLS listener's transport offers (ops.tls.LeanTLSProtocol.release_buffers).
        splice.client.release_buffers = lambda: released.append(self.clock.seconds())
        interval = relay.idle_check_interval(100.0)
        self.clock.advance(interval)  # the first sweep: quiet for exactly one interval
        self.assertEqual(len(released), 1)
        self.clock.advance(interval)
        self.clock.advance(interval)
        self.assertEqual(len(released), 1)  # nothing happened since: not again
        client.transport.write(b"a large message")
        yield wait_for(lambda: client.data.endswith(b"a large message"))
        self.clock.advance(interval)  # the traffic was less than an interval ago at the sweep
        self.clock.advance(interval)
        self.assertEqual(len(released), 2)

    def test_idle_check_interval_is_a_sixtieth_between_one_second_and_a_minute(self) -> None:
        self.assertEqual(relay.idle_check_interval(3600), 60)
        self.assertEqual(relay.idle_check_interval(86400), 60)
        self.assertEqual(relay.idle_check_interval(600), 10)
        self.assertEqual(relay.idle_check_interval(5), 1)

    @defer.inlineCallbacks
    def test_backend_half_close_ends_the_relay_cleanly(self):  # type: ignore[no-untyped-def]
        def switch_then_half_close(backend: RawBackend, head: bytes) -> bytes:
            backend.transport.write(switch(backend, head, b"last words"))  # type: ignore[union-attr]
            backend.transport.loseWriteConnection()  # type: ignore[union-attr]
            return b""

        factory, port = self.backend(switch_then_half_close)
        client = yield self.connect()
        client.transport.write(upgrade(self.proxy.path(port)))
        yield client.lost
        self.assertTrue(client.data.endswith(b"\r\n\r\nlast words"), client.data)
        yield wait_for(lambda: factory.protocols[0].lost and self.proxy.relay.open_count() == 0)

    @defer.inlineCallbacks
    def test_client_leaving_during_the_handshake_drops_the_backend(self):  # type: ignore[no-untyped-def]
        factory, port = self.backend(lambda b, h: b"")
        client = yield self.connect()
        client.transport.write(upgrade(self.proxy.path(port)))
        yield wait_for(lambda: len(factory.heads) == 1)
        client.transport.loseConnection()
        yield wait_for(lambda: factory.protocols[0].lost)
        self.assertEqual(self.proxy.relay._pending, set())

    @defer.inlineCallbacks
    def test_no_close_frame_is_cut_into_a_frame_in_flight(self):  # type: ignore[no-untyped-def]
        # The backend is in the middle of a 1000-byte frame when the relay is revoked.
        partial = frame(1000, masked=False)[:300]
        factory, port = self.backend(lambda b, h: switch(b, h, partial))
        client = yield self.connect()
        client.transport.write(upgrade(self.proxy.path(port)) + frame(3, masked=True))
        yield wait_for(lambda: client.data.endswith(partial))
        yield wait_for(lambda: len(factory.protocols[0].after) == len(frame(3, masked=True)))
        self.proxy.guard.accesses[-1].revoke()
        yield client.lost
        yield wait_for(lambda: factory.protocols[0].lost)
        # The client got the partial frame and nothing after it; the backend, whose stream was
        # between frames, got a masked Close frame after the client's complete frame.
        self.assertTrue(client.data.endswith(partial))
        after = factory.protocols[0].after
        self.assertEqual(after[: len(frame(3, masked=True))], frame(3, masked=True))
        self.assertEqual(
            after[len(frame(3, masked=True)) : len(frame(3, masked=True)) + 2], b"\x88\x90"
        )

    @defer.inlineCallbacks
    def test_revocation_cuts_the_relay(self):  # type: ignore[no-untyped-def]
        factory, port = self.backend(switch, echo=True)
        client = yield self.connect()
        client.transport.write(upgrade(self.proxy.path(port)))
        yield wait_for(lambda: self.proxy.relay.open_count() == 1)
        access = self.proxy.guard.accesses[-1]
        self.assertTrue(access.watched)
        access.revoke()
        yield client.lost
        yield wait_for(lambda: factory.protocols[0].lost and self.proxy.relay.open_count() == 0)
        self.assertFalse(access.watched)
