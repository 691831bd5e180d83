"""The site's shortcuts on the hot path keep Twisted's behaviour: over real sockets on loopback,
with and without TLS, on a kept-alive connection serving several requests."""

from __future__ import annotations

import email.utils
import json
import time
from typing import Any
from unittest import mock

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, wrapClientTLS
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.trial import unittest
from twisted.web import http, resource, server

from cocalcproxy.http import bannerless
from cocalcproxy.http.site import ProxySite
from cocalcproxy.ops import tls


class Facts(resource.Resource):
    """Answers with what the request knows about its connection."""

    isLeaf = True

    def render_GET(self, request: server.Request) -> bytes:  # noqa: N802
        host: Any = request.getHost()
        peer: Any = request.getClientAddress()
        facts = {
            "host": [host.type, host.host, host.port],
            "peer": [peer.type, peer.host, peer.port],
            "secure": request.isSecure(),
            "postpath": [part.decode("latin-1") for part in request.postpath],
        }
        return json.dumps(facts).encode()


class Collect(Protocol):
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.received: list[bytes] = []
        self.done: Deferred[bytes] = Deferred()

    def connectionMade(self) -> None:  # noqa: N802
        assert self.transport is not None
        self.transport.write(self.data)

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.received.append(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]  # noqa: N802
        self.done.callback(b"".join(self.received))


THREE_REQUESTS = (
    b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\n"
    b"GET /2 HTTP/1.1\r\nHost: x\r\n\r\n"
    b"GET /3 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
)


def bodies(answer: bytes) -> list[dict[str, Any]]:
    found = []
    for part in answer.split(b"HTTP/1.1 200 OK\r\n")[1:]:
        body = part.split(b"\r\n\r\n", 1)[1]
        found.append(json.loads(body[: body.index(b"}") + 1]))
    return found


class ConnectionFactsTests(unittest.TestCase):
    @inlineCallbacks
    def _exchange(self, secure: bool, ask: bytes = THREE_REQUESTS):  # type: ignore[no-untyped-def]
        site = ProxySite(Facts(), reactor=reactor)
        factory: Any = site
        client_endpoint: Any
        if secure:
            cert, key = tls.ensure_self_signed(self.mktemp(), "localhost")
            factory = TLSMemoryBIOFactory(tls.ReloadableServerCreator(cert, key), False, site)
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
        self.addCleanup(port.stopListening)
        client_endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
        if secure:
            with open(cert, "rb") as f:
                authority = Certificate.loadPEM(f.read())
            client_endpoint = wrapClientTLS(
                optionsForClientTLS("localhost", trustRoot=authority), client_endpoint
            )
        client = Collect(ask)
        connected = yield client_endpoint.connect(Factory.forProtocol(lambda: client))
        local = connected.transport.getHost()
        answer = yield client.done
        self.answer = answer
        return port.getHost(), local, bodies(answer)

    @inlineCallbacks
    def test_date_once_a_second_no_banner_and_postpath_on_demand(self):  # type: ignore[no-untyped-def]
        """The request's own ``process``: a ``Date`` that is the current second's, no
        ``Server`` banner, and ``postpath`` percent-decoded like Twisted's when read."""
        before = time.time()
        ask = b"GET /a%2Fb/c%20d/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        _, _, facts = yield self._exchange(secure=True, ask=ask)
        after = time.time()
        self.assertEqual(facts[0]["postpath"], ["a/b", "c d", ""])
        head = self.answer.split(b"\r\n\r\n", 1)[0].lower()
        self.assertNotIn(b"\r\nserver:", head)
        dates = [line[6:] for line in head.split(b"\r\n") if line.startswith(b"date: ")]
        self.assertEqual(len(dates), 1)
        stamp = email.utils.parsedate_to_datetime(dates[0].decode()).timestamp()
        self.assertTrue(int(before) <= stamp <= after, (before, dates, after))

    def test_the_date_changes_with_the_second(self) -> None:
        clock = [1_000_000.4]
        date = bannerless._HttpDate()
        with mock.patch.object(bannerless.time, "time", lambda: clock[0]):
            first = date.now()
            clock[0] = 1_000_000.9
            self.assertIs(date.now(), first)
            clock[0] = 1_000_001.0
            second = date.now()
        self.assertEqual(first, http.datetimeToString(1_000_000))
        self.assertEqual(second, http.datetimeToString(1_000_001))

    @inlineCallbacks
    def test_addresses_and_security_over_tls(self):  # type: ignore[no-untyped-def]
        listening, client, facts = yield self._exchange(secure=True)
        self.assertEqual(len(facts), 3)
        for fact in facts:
            self.assertEqual(fact["host"], ["TCP", "127.0.0.1", listening.port])
            self.assertEqual(fact["peer"], ["TCP", "127.0.0.1", client.port])
            self.assertIs(fact["secure"], True)

    @inlineCallbacks
    def test_addresses_and_security_over_tcp(self):  # type: ignore[no-untyped-def]
        listening, client, facts = yield self._exchange(secure=False)
        self.assertEqual(len(facts), 3)
        for fact in facts:
            self.assertEqual(fact["host"], ["TCP", "127.0.0.1", listening.port])
            self.assertEqual(fact["peer"], ["TCP", "127.0.0.1", client.port])
            self.assertIs(fact["secure"], False)

    def test_a_new_transport_is_asked_again(self) -> None:
        from twisted.internet.address import IPv4Address
        from twisted.internet.testing import StringTransport

        from cocalcproxy.http.site import ProxyChannel

        channel = ProxyChannel()
        first = StringTransport(
            hostAddress=IPv4Address("TCP", "10.0.0.1", 443),
            peerAddress=IPv4Address("TCP", "10.0.0.2", 5000),
        )
        asked = []
        ask_host = first.getHost
        first.getHost = lambda: asked.append(1) or ask_host()  # type: ignore[method-assign]
        channel.transport = first
        for _ in range(3):
            self.assertEqual(channel.getHost().host, "10.0.0.1")
        self.assertEqual(len(asked), 1)  # once per transport, not once per request
        self.assertEqual(channel.getPeer().port, 5000)
        self.assertFalse(channel.isSecure())
        channel.transport = StringTransport(
            hostAddress=IPv4Address("TCP", "10.0.0.3", 8443),
            peerAddress=IPv4Address("TCP", "10.0.0.4", 6000),
        )
        self.assertEqual(channel.getHost().port, 8443)
        self.assertEqual(channel.getPeer().host, "10.0.0.4")
        channel.transport = None
        self.assertFalse(channel.isSecure())


class LazyDeadlines(unittest.TestCase):
    """site._Deadline: one DelayedCall however often the deadline moves, firing on time."""

    def setUp(self) -> None:
        from twisted.internet.task import Clock

        from cocalcproxy.http.site import _Deadline

        self.clock = Clock()
        self.fired: list[float] = []
        self.deadline = _Deadline(lambda: self.fired.append(self.clock.seconds()))

    def test_moved_later_many_times_fires_once_at_the_last_deadline(self) -> None:
        for _ in range(1000):
            self.deadline.set(10, self.clock.callLater)
            self.deadline.clear()
            self.clock.advance(1 / 128)
        self.deadline.set(10, self.clock.callLater)  # at 7.8125: due at 17.8125
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.advance(10 - 1 / 1024)
        self.assertEqual(self.fired, [])
        self.clock.advance(1 / 1024)
        self.assertEqual(self.fired, [17.8125])
        self.clock.advance(100)
        self.assertEqual(self.fired, [17.8125])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_an_earlier_deadline_moves_the_call(self) -> None:
        self.deadline.set(10, self.clock.callLater)
        self.deadline.set(2, self.clock.callLater)
        self.clock.advance(2)
        self.assertEqual(self.fired, [2.0])

    def test_cleared_never_fires_and_stop_cancels(self) -> None:
        self.deadline.set(1, self.clock.callLater)
        self.deadline.clear()
        self.clock.advance(5)
        self.assertEqual(self.fired, [])
        self.deadline.set(1, self.clock.callLater)
        self.deadline.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])


class IdleAndHeadTimeouts(unittest.TestCase):
    """The channel's idle timeout and head deadline on the lazy clock, with a task.Clock."""

    def connect(self, head_timeout: float | None = 20.0):  # type: ignore[no-untyped-def]
        from twisted.internet.address import IPv4Address
        from twisted.internet.task import Clock
        from twisted.internet.testing import StringTransport

        clock = Clock()
        site = ProxySite(Facts(), reactor=clock)
        site.request_head_timeout = head_timeout
        channel: Any = site.buildProtocol(IPv4Address("TCP", "10.0.0.2", 5000))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.2", 5000))
        channel.makeConnection(transport)
        return clock, channel, transport

    def test_idle_timeout_counts_from_the_end_of_the_last_request(self) -> None:
        clock, channel, transport = self.connect(head_timeout=None)
        timeout = channel.timeOut
        self.assertGreater(timeout, 0)
        for _ in range(3):
            clock.advance(timeout - 1)
            channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(transport.value().count(b"HTTP/1.1 200 OK"), 3)
        self.assertFalse(transport.disconnecting)
        clock.advance(timeout - 0.5)
        self.assertFalse(transport.disconnecting)
        clock.advance(0.5)
        self.assertTrue(transport.disconnecting)

    def test_a_slow_head_gets_408_at_its_deadline(self) -> None:
        clock, channel, transport = self.connect(head_timeout=20.0)
        channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        clock.advance(5)
        channel.dataReceived(b"GET / HTTP/1.1\r\n")  # a second head starts at 5 s
        clock.advance(19.9)
        self.assertNotIn(b"408", transport.value())
        clock.advance(0.1)
        self.assertIn(b"HTTP/1.1 408 Request Timeout", transport.value())

    def test_no_timer_left_behind_when_the_connection_goes(self) -> None:
        from twisted.internet.error import ConnectionDone

        clock, channel, transport = self.connect()
        channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        channel.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(clock.getDelayedCalls(), [])


class WebSocketUpgrade(unittest.TestCase):
    def test_which_requests_are_upgrades(self) -> None:
        from twisted.web.test.requesthelper import DummyRequest

        from cocalcproxy.http.site import is_websocket_upgrade

        cases = [
            ({}, False),
            ({b"connection": [b"keep-alive"]}, False),
            ({b"upgrade": [b"websocket"]}, False),
            ({b"upgrade": [b"WebSocket"], b"connection": [b"keep-alive, Upgrade"]}, True),
            ({b"upgrade": [b"h2c", b"websocket"], b"connection": [b"x", b"upgrade"]}, True),
            ({b"upgrade": [b"h2c"], b"connection": [b"upgrade"]}, False),
        ]
        for headers, expected in cases:
            request = DummyRequest([b""])
            for name, values in headers.items():
                request.requestHeaders.setRawHeaders(name, values)
            self.assertIs(is_websocket_upgrade(request), expected, headers)  # type: ignore[arg-type]
