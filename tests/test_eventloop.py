"""The reactor's event dispatch (cocalcproxy.ops.eventloop), on a real epoll reactor of its own
(not the test runner's) with real sockets: what is dispatched, in which order, and what a
failure or a hang-up does."""

from __future__ import annotations

import select
import signal
import socket
import ssl
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from twisted.internet import error, protocol, tcp
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.pollreactor import PollReactor
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import globalLogPublisher
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.trial import unittest

from cocalcproxy.ops import eventloop, service, tls
from tests import tlsutil
from tests.support import options_for


class Descriptor:
    """One end of a socket pair, registered with the reactor, recording when it is served."""

    def __init__(
        self,
        name: str,
        order: list[str],
        handshake: bool | None = None,
        clock: list[float] | None = None,
        cost: float = 0.0,
    ) -> None:
        self.sock, self.peer = socket.socketpair()
        self.sock.setblocking(False)
        self.name = name
        self.order = order
        # Looks like a TLS connection (in its handshake or past it) when handshake is given.
        if handshake is not None:
            self.protocol = SimpleNamespace(awaiting_hello=handshake)
        self.lost: list[Any] = []
        self.on_read: Any = None
        self.fd = self.sock.fileno()
        # Serving it takes ``cost`` seconds on the test's clock.
        self.clock = clock if clock is not None else [0.0]
        self.cost = cost

    def fileno(self) -> int:
        return self.fd

    def doRead(self) -> Any:  # noqa: N802
        self.order.append(self.name)
        self.clock[0] += self.cost
        data = self.sock.recv(65536)
        if self.on_read is not None:
            self.on_read()
        return None if data else error.ConnectionDone()

    def doWrite(self) -> Any:  # noqa: N802
        self.order.append(f"{self.name} writable")
        return None

    def connectionLost(self, reason: Any) -> None:  # noqa: N802
        self.lost.append(reason)

    def logPrefix(self) -> str:  # noqa: N802
        return f"Descriptor {self.name}"

    def close(self) -> None:
        self.sock.close()
        self.peer.close()


class EventLoop(unittest.TestCase):
    def setUp(self) -> None:
        self.reactor = EPollReactor()
        self.now = [100.0]
        self.assertTrue(eventloop.install(self.reactor, clock=lambda: self.now[0]))
        self.order: list[str] = []
        self.addCleanup(self.reactor._poller.close)

    def descriptor(self, name: str, handshake: bool | None = None, cost: float = 0.0) -> Descriptor:
        d = Descriptor(name, self.order, handshake, self.now, cost)
        self.addCleanup(d.close)
        self.reactor.addReader(d)
        self.addCleanup(self.reactor.removeReader, d)
        return d

    def turn(self) -> list[str]:
        """One reactor iteration that does not wait; what it served."""
        del self.order[:]
        self.reactor.doIteration(0)
        return list(self.order)

    def test_installs_only_on_the_epoll_reactor(self) -> None:
        self.assertTrue(eventloop.installed(self.reactor))
        other = PollReactor()
        self.addCleanup(other.waker.connectionLost, None)
        self.assertFalse(eventloop.install(other))
        self.assertFalse(eventloop.installed(other))
        self.assertFalse(eventloop.install(MemoryReactorClock()))
        # Only the instance: a new epoll reactor dispatches as Twisted does.
        fresh = EPollReactor()
        self.addCleanup(fresh._poller.close)
        self.assertFalse(eventloop.installed(fresh))

    def test_a_ready_descriptor_is_read(self) -> None:
        d = self.descriptor("plain")
        self.assertEqual(self.turn(), [])
        d.peer.send(b"x")
        self.assertEqual(self.turn(), ["plain"])
        self.assertEqual(self.turn(), [])  # everything was read

    def test_an_established_connection_before_a_handshake(self) -> None:
        new = self.descriptor("handshake", handshake=True)
        old = self.descriptor("established", handshake=False)
        backend = self.descriptor("backend")
        # The kernel reports them in the order they became ready.
        new.peer.send(b"client hello")
        old.peer.send(b"GET")
        backend.peer.send(b"HTTP/1.1 200 OK")
        self.assertEqual(self.turn(), ["established", "backend", "handshake"])

    def test_newcomers_get_a_slice_then_established_connections_go_first_again(self) -> None:
        step = 0.6 * eventloop.SLICE
        first = self.descriptor("hello 1", handshake=True, cost=step)
        second = self.descriptor("hello 2", handshake=True, cost=step)
        third = self.descriptor("hello 3", handshake=True, cost=step)
        old = self.descriptor("established", handshake=False)
        first.on_read = lambda: old.peer.send(b"GET")
        for d in (first, second, third):
            d.peer.send(b"client hello")
        # The slice is spent after the second (the one under way is finished).
        self.assertEqual(self.turn(), ["hello 1", "hello 2"])
        self.assertEqual(self.turn(), ["established", "hello 3"])

    def test_newcomers_get_as_long_as_established_connections_took(self) -> None:
        self.descriptor("established", handshake=False, cost=10 * eventloop.SLICE).peer.send(b"x")
        hellos = [
            self.descriptor(f"hello {i}", handshake=True, cost=3 * eventloop.SLICE)
            for i in range(1, 6)
        ]
        for d in hellos:
            d.peer.send(b"client hello")
        # 10 slices of established work: four hellos (the fourth passes the mark) ...
        self.assertEqual(self.turn(), ["established", "hello 1", "hello 2", "hello 3", "hello 4"])
        # ... and at least one in every turn, however long it takes.
        self.assertEqual(self.turn(), ["hello 5"])

    def test_a_turn_serves_only_the_handshakes_it_started_with(self) -> None:
        first = self.descriptor("handshake 1", handshake=True)
        second = self.descriptor("handshake 2", handshake=True)
        first.on_read = lambda: second.peer.send(b"client hello")
        first.peer.send(b"client hello")
        self.assertEqual(self.turn(), ["handshake 1"])  # handshake 2 was not ready at the poll
        self.assertEqual(self.turn(), ["handshake 2"])

    def test_accepts_wait_for_established_connections(self) -> None:
        accepted: list[str] = []

        class Recording(protocol.Protocol):
            def connectionMade(self) -> None:  # noqa: N802
                accepted.append("accept")
                self_.order.append("accept")

        self_ = self
        factory = protocol.Factory.forProtocol(Recording)
        port = self.reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.connectionLost, Failure(error.ConnectionDone()))
        old = self.descriptor("established", handshake=False)
        client = socket.create_connection(("127.0.0.1", port.getHost().port))
        self.addCleanup(client.close)
        old.peer.send(b"GET")
        self.assertEqual(self.turn(), ["established", "accept"])
        self.assertEqual(accepted, ["accept"])
        for transport in [p for p in self.reactor.getReaders() if p is not port and p is not old]:
            self.addCleanup(transport.connectionLost, Failure(error.ConnectionDone()))

    def test_a_closed_descriptor_waiting_behind_others_is_not_served(self) -> None:
        new = self.descriptor("handshake", handshake=True)
        old = self.descriptor("established", handshake=False)

        def close_the_other() -> None:
            self.reactor.removeReader(new)

        old.on_read = close_the_other
        new.peer.send(b"client hello")
        old.peer.send(b"GET")
        self.assertEqual(self.turn(), ["established"])

    def test_a_failure_is_logged_once_with_its_connection_and_disconnects_it(self) -> None:
        d = self.descriptor("faulty")

        def fault() -> None:
            raise ValueError("boom")

        d.on_read = fault
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        d.peer.send(b"x")
        self.assertEqual(self.turn(), ["faulty"])
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        failures = [e for e in events if "log_failure" in e]
        self.assertEqual(len(failures), 1)
        self.assertEqual(failures[0]["log_system"], "Descriptor faulty")
        self.assertEqual([r.type for r in d.lost], [ValueError])
        self.assertNotIn(d, self.reactor.getReaders())

    def test_end_of_input_is_a_clean_close(self) -> None:
        d = self.descriptor("reader")
        d.peer.close()
        self.assertEqual(self.turn(), ["reader"])
        self.assertEqual([r.type for r in d.lost], [error.ConnectionDone])

    def test_a_hang_up_on_a_writer_is_a_lost_connection(self) -> None:
        d = Descriptor("writer", self.order)
        self.addCleanup(d.close)
        self.reactor.addWriter(d)
        self.addCleanup(self.reactor.removeWriter, d)
        d.peer.close()
        d.sock.shutdown(socket.SHUT_WR)  # both directions shut: EPOLLHUP
        self.assertEqual(self.turn(), [])  # not written to: it is gone
        self.assertEqual([r.type for r in d.lost], [error.ConnectionLost])

    def test_a_descriptor_whose_file_went_away(self) -> None:
        d = self.descriptor("gone")
        d.peer.send(b"x")
        d.fd = -1
        self.assertEqual(self.turn(), [])
        self.assertEqual([r.type for r in d.lost], [error.ConnectionFdescWentAway])


class Newcomers(unittest.TestCase):
    """What counts as a newcomer, on real connections: the proxy's TLS wrapper, over a real
    handshake with a real client."""

    def test_a_tls_connection_is_a_newcomer_until_its_client_hello_is_answered(self) -> None:
        reactor = EPollReactor()
        self.addCleanup(reactor._poller.close)
        cert, key, _, _ = tlsutil.write_pair(Path(self.mktemp()), "server")
        factory = TLSMemoryBIOFactory(
            tls.ReloadableServerCreator(str(cert), str(key)), False, Factory.forProtocol(Protocol)
        )
        factory.protocol = tls.LeanTLSProtocol
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.connectionLost, Failure(error.ConnectionDone()))
        self.assertTrue(eventloop.newcomer(port))
        client = socket.create_connection(("127.0.0.1", port.getHost().port))
        self.addCleanup(client.close)

        def until(condition: Any) -> None:
            deadline = time.monotonic() + 10
            while not condition():
                self.assertLess(time.monotonic(), deadline, "timed out")
                reactor.doIteration(0.05)

        def server_side() -> list[Any]:
            return [r for r in reactor.getReaders() if isinstance(r, tcp.Server)]

        until(server_side)
        (server,) = server_side()
        self.addCleanup(server.connectionLost, Failure(error.ConnectionDone()))
        self.assertIsInstance(server.protocol, tls.LeanTLSProtocol)
        self.assertTrue(eventloop.newcomer(server))

        # A real client, one flight at a time.
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls_client = context.wrap_bio(incoming, outgoing)
        with self.assertRaises(ssl.SSLWantReadError):
            tls_client.do_handshake()
        client.sendall(outgoing.read())  # the ClientHello
        until(lambda: select.select([client], [], [], 0)[0])
        # Answered (the server's flight is here), not yet done (no client Finished yet).
        self.assertFalse(server.protocol._handshakeDone)
        self.assertFalse(eventloop.newcomer(server))
        client.setblocking(False)
        while True:
            try:
                incoming.write(client.recv(65536))
            except BlockingIOError:
                break
        tls_client.do_handshake()
        client.sendall(outgoing.read())  # the client's Finished
        until(lambda: server.protocol._handshakeDone)
        self.assertFalse(eventloop.newcomer(server))

    def test_a_unix_listener_is_a_newcomer_too(self) -> None:
        reactor = EPollReactor()
        self.addCleanup(reactor._poller.close)
        port = reactor.listenUNIX(self.mktemp(), Factory.forProtocol(Protocol))
        self.addCleanup(port.connectionLost, Failure(error.ConnectionDone()))
        self.assertTrue(eventloop.newcomer(port))

    def test_anything_else_is_established(self) -> None:
        self.assertFalse(eventloop.newcomer(SimpleNamespace()))
        self.assertFalse(eventloop.newcomer(SimpleNamespace(protocol=Protocol())))


class TheService(unittest.TestCase):
    def setUp(self) -> None:
        # startService takes SIGHUP (certificate reload); the test runner's is given back.
        self.addCleanup(signal.signal, signal.SIGHUP, signal.getsignal(signal.SIGHUP))

    def test_installs_when_the_plugin_asks(self) -> None:
        state_dir = self.mktemp()
        reactor = EPollReactor()
        self.addCleanup(reactor._poller.close)
        proxy = service.ProxyService(reactor, options_for(state_dir))
        proxy.own_event_dispatch = True
        proxy.startService()
        self.assertTrue(eventloop.installed(reactor))

    def test_not_unless_asked(self) -> None:
        state_dir = self.mktemp()
        reactor = EPollReactor()
        self.addCleanup(reactor._poller.close)
        proxy = service.ProxyService(reactor, options_for(state_dir))
        proxy.startService()
        self.assertFalse(eventloop.installed(reactor))
