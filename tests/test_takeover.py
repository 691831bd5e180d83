"""takeover.py against the real Twisted HTTPChannel, over real loopback sockets (plain and TLS).

These tests pin the private Twisted behaviour the relay depends on (see takeover.py's
docstring). If a Twisted upgrade changes any of it, they fail here, loudly, rather than the
relay losing bytes or connections in production.
"""

from __future__ import annotations

import gc
import os
import weakref
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Protocol
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.trial import unittest
from twisted.web import resource, server
from twisted.web.http import HTTPChannel

import twisted
from cocalcproxy.http import takeover
from cocalcproxy.ops import tls
from tests.relay_support import wait_for

REQUEST = (
    b"GET /ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
)


class TakingResource(resource.Resource):
    """Takes every request's connection over, at once or when the test says so."""

    isLeaf = True

    def __init__(self, at_once: bool = False) -> None:
        super().__init__()
        self.at_once = at_once
        self.requests: list[server.Request] = []
        self.ends: list[object] = []
        self.taken: takeover.TakenConnection | None = None
        self.received = b""
        self.lost: list[Failure] = []

    def render(self, request: server.Request) -> Any:
        self.requests.append(request)
        request.notifyFinish().addBoth(self.ends.append)
        if self.at_once:
            self.take(request)
        return server.NOT_DONE_YET

    def take(self, request: server.Request) -> takeover.TakenConnection:
        self.taken = takeover.take_over(request, self._data, self.lost.append)
        self.taken.transport.write(b"taken\n")
        self._data(self.taken.buffered)
        return self.taken

    def _data(self, data: bytes) -> None:
        self.received += data
        if self.taken is not None and data.startswith(b"echo "):
            self.taken.transport.write(data[5:])


class Client(Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.reason: Failure | None = None
        self.lost: defer.Deferred[None] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.data += data

    def connectionLost(self, reason: Failure = ConnectionDone()) -> None:  # type: ignore[assignment]  # noqa: N802, B008
        self.reason = reason
        self.lost.callback(None)


class PlainTakeoverTests(unittest.TestCase):
    """Takeover on a plain TCP connection."""

    tls = False
    timeout = 30

    def setUp(self) -> None:
        self.resource = TakingResource()
        self.site = server.Site(self.resource, reactor=reactor)
        factory: Any = self.site
        if self.tls:
            state = self.mktemp()
            os.makedirs(state)
            cert, key = tls.ensure_self_signed(state, "localhost")
            self.cert_path = cert
            factory = TLSMemoryBIOFactory(tls.ReloadableServerCreator(cert, key), False, self.site)
        self.port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)

    @defer.inlineCallbacks
    def connect(self):  # type: ignore[no-untyped-def]
        endpoint: Any = TCP4ClientEndpoint(reactor, "127.0.0.1", self.port.getHost().port)
        if self.tls:
            with open(self.cert_path, "rb") as f:
                authority = Certificate.loadPEM(f.read())
            endpoint = wrapClientTLS(optionsForClientTLS("localhost", authority), endpoint)
        client = Client()
        yield connectProtocol(endpoint, client)

        def close() -> defer.Deferred[None]:
            if client.transport is not None and client.transport.connected:  # type: ignore[attr-defined]
                client.transport.loseConnection()
            return client.lost

        self.addCleanup(close)
        return client

    @defer.inlineCallbacks
    def test_bytes_in_the_same_packet_as_the_request_are_kept(self):  # type: ignore[no-untyped-def]
        client = yield self.connect()
        client.transport.write(REQUEST + b"first frame")
        yield wait_for(lambda: bool(self.resource.requests))
        channel = self.resource.requests[0].channel
        yield wait_for(lambda: b"".join(channel._dataBuffer) == b"first frame")
        self.resource.take(self.resource.requests[0])
        self.assertEqual(self.resource.taken.buffered, b"first frame")  # type: ignore[union-attr]
        client.transport.write(b"echo and later")
        yield wait_for(lambda: client.data == b"taken\nand later")
        self.assertEqual(self.resource.received, b"first frameecho and later")

    @defer.inlineCallbacks
    def test_taking_over_inside_the_request_keeps_the_rest_of_the_packet(self):  # type: ignore[no-untyped-def]
        self.resource.at_once = True
        client = yield self.connect()
        client.transport.write(REQUEST + b"echo same packet")
        yield wait_for(lambda: client.data == b"taken\nsame packet")
        self.assertEqual(self.resource.received, b"echo same packet")

    @defer.inlineCallbacks
    def test_a_paused_connection_is_resumed_and_nothing_is_lost(self):  # type: ignore[no-untyped-def]
        client = yield self.connect()
        body = os.urandom(256 * 1024)
        client.transport.write(REQUEST + body)
        yield wait_for(lambda: bool(self.resource.requests))
        channel = self.resource.requests[0].channel
        # HTTPChannel buffers at most _optimisticEagerReadSize bytes, then pauses the transport.
        limit = channel._optimisticEagerReadSize
        yield wait_for(lambda: sum(map(len, channel._dataBuffer)) > limit)
        self.resource.take(self.resource.requests[0])
        yield wait_for(lambda: len(self.resource.received) == len(body))
        self.assertEqual(self.resource.received, body)

    @defer.inlineCallbacks
    def test_http_is_no_longer_parsed(self):  # type: ignore[no-untyped-def]
        client = yield self.connect()
        client.transport.write(REQUEST)
        yield wait_for(lambda: bool(self.resource.requests))
        self.resource.take(self.resource.requests[0])
        client.transport.write(b"GET /again HTTP/1.1\r\n\r\nnot http at all\r\n\r\n")
        yield wait_for(lambda: self.resource.received.endswith(b"not http at all\r\n\r\n"))
        self.assertEqual(len(self.resource.requests), 1)
        self.assertEqual(client.data, b"taken\n")

    @defer.inlineCallbacks
    def test_client_going_away_reaches_the_taker_and_ends_the_request(self):  # type: ignore[no-untyped-def]
        client = yield self.connect()
        client.transport.write(REQUEST)
        yield wait_for(lambda: bool(self.resource.requests))
        request = self.resource.requests[0]
        channel = request.channel
        self.resource.take(request)
        # The channel's idle timeout (TimeoutMixin) is off.
        self.assertIsNone(channel._TimeoutMixin__timeoutCall)
        yield wait_for(lambda: client.data == b"taken\n")
        client.transport.loseConnection()
        yield wait_for(lambda: bool(self.resource.lost) and bool(self.resource.ends))
        self.assertEqual(len(self.resource.lost), 1)
        [end] = self.resource.ends
        self.assertIsInstance(end, Failure)  # notifyFinish errbacks: the request never finished
        self.assertFalse(request.finished)

    @defer.inlineCallbacks
    def test_nothing_of_the_http_layer_stays_referenced(self):  # type: ignore[no-untyped-def]
        client = yield self.connect()
        client.transport.write(REQUEST)
        yield wait_for(lambda: bool(self.resource.requests))
        request = self.resource.requests[0]
        channel = weakref.ref(request.channel)
        transport = request.channel.transport
        wrapper = weakref.ref(getattr(transport, "wrappedProtocol", None) or transport.protocol)
        gc.disable()  # freed at once, by reference counting: no cycle is left to the collector
        self.addCleanup(gc.enable)
        self.resource.take(request)
        self.assertIsNone(channel())
        self.assertIsNone(wrapper())
        self.assertIsNone(request.channel)
        # The connection still works both ways, and its end still reaches the request.
        client.transport.write(b"echo still here")
        yield wait_for(lambda: client.data == b"taken\nstill here")
        client.transport.loseConnection()
        yield wait_for(lambda: bool(self.resource.lost) and bool(self.resource.ends))

    @defer.inlineCallbacks
    def test_closing_from_the_server_side_is_clean(self):  # type: ignore[no-untyped-def]
        client = yield self.connect()
        client.transport.write(REQUEST)
        yield wait_for(lambda: bool(self.resource.requests))
        taken = self.resource.take(self.resource.requests[0])
        taken.transport.write(b"bye\n")
        taken.transport.loseConnection()
        yield client.lost
        reason = client.reason
        # Over TLS this means a close_notify arrived: a bare TCP close would be ConnectionLost.
        self.assertTrue(reason.check(ConnectionDone), reason)
        self.assertEqual(client.data, b"taken\nbye\n")
        yield wait_for(lambda: bool(self.resource.lost))


class TLSTakeoverTests(PlainTakeoverTests):
    """The same over TLS: the transport is a TLSMemoryBIOProtocol, not a socket."""

    tls = True


class GuardTests(unittest.TestCase):
    def test_refuses_what_is_not_an_http11_channel(self) -> None:
        with self.assertRaises(takeover.TakeoverUnsupported):
            takeover.check_channel(object())

    def test_a_changed_channel_is_refused_with_the_twisted_version(self) -> None:
        channel = HTTPChannel()
        self.assertIs(takeover.check_channel(channel), channel)
        del channel._dataBuffer
        with self.assertRaises(takeover.TakeoverUnsupported) as caught:
            takeover.check_channel(channel)
        self.assertIn(twisted.__version__, str(caught.exception))

    def test_installed_twisted_is_a_proven_one(self) -> None:
        """setup.py pins the range this module was proven on; fail if something else runs."""
        from packaging.specifiers import SpecifierSet

        self.assertIn(twisted.__version__, SpecifierSet(takeover.PROVEN_TWISTED))
        setup_py = os.path.join(os.path.dirname(__file__), os.pardir, "setup.py")
        with open(setup_py, encoding="utf-8") as f:
            self.assertIn(f'"Twisted[tls]{takeover.PROVEN_TWISTED}"', f.read())


class DrainSweepTests(unittest.TestCase):
    """The shutdown sweep closes connections without a request; a taken-over one has no HTTP
    channel any more, and is busy: its taker (the relay's shutdown hook) ends it."""

    def test_a_taken_over_connection_is_busy_and_left_open(self) -> None:
        from twisted.internet.task import Clock

        from cocalcproxy.http.site import ProxySite
        from cocalcproxy.ops.service import DrainService

        closed: list[str] = []

        class Wire:
            def loseConnection(self) -> None:  # noqa: N802
                closed.append("wire")

        class Connection:
            transport = Wire()

            def __init__(self) -> None:
                request: Any = object()  # only kept, for the end
                self.wrappedProtocol = takeover.TakenProtocol(
                    request, lambda data: None, lambda reason: None
                )

            def loseConnection(self) -> None:  # noqa: N802
                closed.append("connection")

        class Factory:
            protocols = {Connection(): 1}

        drain = DrainService(Clock(), ProxySite(resource.Resource()), 1.0, [Factory()])  # type: ignore[list-item]
        self.assertEqual(drain.sweep(), 1)
        self.assertEqual(closed, [])
