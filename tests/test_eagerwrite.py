"""cocalcproxy.http.eagerwrite: bytes go out at once when nothing waits, in order otherwise.

Over real loopback TCP connections made by the reactor (tcp.Server and tcp.Client transports).
"""

from __future__ import annotations

import os
import socket
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.trial import unittest

from cocalcproxy.http.eagerwrite import eager_write


class Keep(Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.connected_d: defer.Deferred[Keep] = defer.Deferred()
        self.more: defer.Deferred[None] | None = None

    def connectionMade(self) -> None:  # noqa: N802
        self.connected_d.callback(self)

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.data += data
        if self.more is not None:
            more, self.more = self.more, None
            more.callback(None)


class _Pair(unittest.TestCase):
    @defer.inlineCallbacks
    def pair(self):  # type: ignore[no-untyped-def]
        server = Keep()
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            Factory.forProtocol(lambda: server)
        )
        self.addCleanup(port.stopListening)
        client = yield TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port).connect(
            Factory.forProtocol(Keep)
        )
        yield server.connected_d
        self.addCleanup(client.transport.loseConnection)
        self.addCleanup(server.transport.loseConnection)
        return server, client

    @defer.inlineCallbacks
    def receive(self, protocol: Keep, size: int):  # type: ignore[no-untyped-def]
        for _ in range(100_000):
            if len(protocol.data) >= size:
                return protocol.data
            protocol.more = defer.Deferred()
            yield protocol.more.addTimeout(10, reactor)  # a stalled transfer fails, not hangs
        raise AssertionError("never arrived")


class EagerWrite(_Pair):
    @defer.inlineCallbacks
    def test_small_write_leaves_at_once_without_registering(self):  # type: ignore[no-untyped-def]
        server, client = yield self.pair()
        transport: Any = server.transport
        eager_write(transport, b"hello")
        self.assertNotIn(transport, reactor.getWriters(), "sent: no epoll registration")
        self.assertEqual((transport._tempDataLen, transport.dataBuffer), (0, b""))
        data = yield self.receive(client, 5)
        self.assertEqual(data, b"hello")

    @defer.inlineCallbacks
    def test_what_the_socket_refuses_is_buffered_in_order(self):  # type: ignore[no-untyped-def]
        server, client = yield self.pair()
        transport: Any = server.transport
        transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        client.transport.pauseProducing()  # the peer stops reading: the socket fills up
        blob = os.urandom(4 * 1024 * 1024)
        eager_write(transport, blob[: 2 * 1024 * 1024])
        self.assertGreater(transport._tempDataLen, 0, "the rest waits in Twisted's buffer")
        self.assertIn(transport, reactor.getWriters())
        eager_write(transport, blob[2 * 1024 * 1024 :])  # pending bytes: it must queue behind
        client.transport.resumeProducing()
        data = yield self.receive(client, len(blob))
        self.assertEqual(data, blob)

    @defer.inlineCallbacks
    def test_client_transport_and_closed_connection(self):  # type: ignore[no-untyped-def]
        server, client = yield self.pair()
        eager_write(client.transport, b"to the server")
        data = yield self.receive(server, 13)
        self.assertEqual(data, b"to the server")
        lost: defer.Deferred[None] = defer.Deferred()
        client.connectionLost = lambda reason: lost.callback(None)  # type: ignore[method-assign]
        client.transport.loseConnection()
        yield lost
        eager_write(client.transport, b"after the end")  # ignored, as transport.write does

    def test_other_transports_use_their_own_write(self) -> None:
        from twisted.internet.testing import StringTransport

        transport = StringTransport()
        eager_write(transport, b"abc")
        self.assertEqual(transport.value(), b"abc")


class _Pull:
    def __init__(self, transport: Any, chunks: list[bytes]) -> None:
        self.transport = transport
        self.chunks = chunks

    def resumeProducing(self) -> None:  # noqa: N802
        if self.chunks:
            eager_write(self.transport, self.chunks.pop(0))
        else:
            self.transport.unregisterProducer()

    def stopProducing(self) -> None:  # noqa: N802
        pass


class PullProducer(_Pair):
    @defer.inlineCallbacks
    def test_pull_producer_writes_are_left_to_twisted(self):  # type: ignore[no-untyped-def]
        server, client = yield self.pair()
        transport: Any = server.transport
        chunks = [b"a" * 1000, b"b" * 1000, b"c" * 1000]
        transport.registerProducer(_Pull(transport, list(chunks)), False)
        data = yield self.receive(client, 3000)
        self.assertEqual(data, b"".join(chunks), "every chunk asked for and delivered")
