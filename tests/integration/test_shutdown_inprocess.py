"""Graceful stop of a real proxy in this process, over real loopback TLS.

A slow request is made by holding the directory's health ping open: the test decides when the
"slow" work ends, so nothing depends on timing except the one test of the timeout itself.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, error, reactor, ssl
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.protocol import Factory, Protocol
from twisted.trial import unittest

from cocalcproxy import directory as directory_module
from tests.support import https_client, start_proxy
from tests.test_accesslog import QuietDirectory


class HeldDirectory(QuietDirectory):
    """ping() stays pending until the test releases it; records that close() ran."""

    def __init__(self) -> None:
        self.pings: list[defer.Deferred[None]] = []
        self.closed = False
        self.pinged: defer.Deferred[None] = defer.Deferred()

    def ping(self) -> defer.Deferred[None]:
        d: defer.Deferred[None] = defer.Deferred()
        self.pings.append(d)
        if not self.pinged.called:
            self.pinged.callback(None)
        return d

    def close(self) -> defer.Deferred[None]:
        self.closed = True
        return defer.succeed(None)


def connections(proxy: Any) -> int:
    """Open HTTPS connections, as the listeners' TLS factories count them."""
    return sum(len(listener.factory.protocols) for listener in proxy.service.listeners)


class RawHTTPS(Protocol):
    """Sends bytes over TLS and collects everything until the server closes the connection."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.received = b""
        self.done: defer.Deferred[bytes] = defer.Deferred()

    def connectionMade(self) -> None:  # noqa: N802
        self.transport.write(self.payload)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.received += data

    def connectionLost(self, reason: Any = None) -> None:  # noqa: N802
        self.done.callback(self.received)

    @classmethod
    def request(cls, proxy: Any, payload: bytes) -> defer.Deferred[bytes]:
        with open(proxy.cert_path, "rb") as f:
            authority = ssl.Certificate.loadPEM(f.read())
        endpoint = wrapClientTLS(
            ssl.optionsForClientTLS("localhost", trustRoot=authority),
            TCP4ClientEndpoint(reactor, "127.0.0.1", proxy.port),
        )
        protocol = cls(payload)
        connecting = endpoint.connect(Factory.forProtocol(lambda: protocol))
        return connecting.addCallback(lambda _: protocol.done)


class DrainTests(unittest.TestCase):
    def setUp(self) -> None:
        self.directory = HeldDirectory()
        self.patch(directory_module, "open_directory", lambda url, reactor: self.directory)

    @defer.inlineCallbacks
    def test_request_in_flight_finishes_idle_closed_new_refused(self):  # type: ignore[no-untyped-def]
        proxy = yield start_proxy(self)
        idle_client = https_client(self, proxy.cert_path)

        # An idle keep-alive connection: one quick request, then the pool keeps it open.
        quick = yield idle_client.get(proxy.url + "/_/static/style.css")
        yield quick.content()
        self.assertEqual(quick.code, 200)
        # A slow request in flight, on a raw TLS connection so the test sees every header byte.
        slow = RawHTTPS.request(proxy, b"GET /_/health HTTP/1.1\r\nHost: localhost\r\n\r\n")
        yield self.directory.pinged
        self.assertEqual(connections(proxy), 2)

        stopped = proxy.service.stopService()
        # The idle connection is closed once the listeners have stopped (draining has begun);
        # the busy one stays, and so does the directory.
        yield self.poll(lambda: connections(proxy) == 1)
        with self.assertRaises(error.ConnectionRefusedError):
            yield TCP4ClientEndpoint(reactor, "127.0.0.1", proxy.port).connect(
                Factory.forProtocol(Protocol)
            )
        self.assertFalse(stopped.called)
        self.assertFalse(self.directory.closed)

        self.directory.pings[0].callback(None)
        # The server answers in full, says Connection: close, and closes (slow fires on close).
        raw = yield slow
        head, _, body = raw.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 200 "), raw)
        self.assertIn(b"connection: close", head.lower())
        self.assertIn(b'"status": "ok"', body)
        yield stopped
        self.assertEqual(connections(proxy), 0)
        self.assertTrue(self.directory.closed)

    @defer.inlineCallbacks
    def test_timeout_aborts_what_is_left(self):  # type: ignore[no-untyped-def]
        proxy = yield start_proxy(self, "--shutdown-timeout", "0.3")
        client = https_client(self, proxy.cert_path)
        slow = client.get(proxy.url + "/_/health")
        yield self.directory.pinged
        yield proxy.service.stopService()
        self.assertEqual(connections(proxy), 0)
        self.assertTrue(self.directory.closed)
        with self.assertRaises(Exception):
            yield slow

    @defer.inlineCallbacks
    def test_shutdown_hooks_run_and_are_awaited(self):  # type: ignore[no-untyped-def]
        proxy = yield start_proxy(self)
        hook_done: defer.Deferred[None] = defer.Deferred()
        calls: list[str] = []

        def close_relays() -> defer.Deferred[None]:
            calls.append("closed")
            return hook_done

        proxy.service.on_shutdown.append(close_relays)
        stopped = proxy.service.stopService()
        yield self.poll(lambda: calls == ["closed"])
        self.assertFalse(stopped.called)
        self.assertFalse(self.directory.closed)
        hook_done.callback(None)
        yield stopped
        self.assertTrue(self.directory.closed)

    def poll(self, predicate: Any, timeout: float = 10.0) -> defer.Deferred[None]:
        """Fire once predicate() is true, checking every reactor turn-ish; fail after timeout."""
        from twisted.internet import task

        deadline = reactor.seconds() + timeout

        @defer.inlineCallbacks
        def loop():  # type: ignore[no-untyped-def]
            while not predicate():
                if reactor.seconds() > deadline:
                    raise AssertionError("condition not reached in time")
                yield task.deferLater(reactor, 0.01, lambda: None)

        return loop()  # type: ignore[no-any-return]
