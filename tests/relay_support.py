"""Helpers for the WebSocket relay tests: a minimal proxy Site, real backends, clients in threads.

Backends are the ``websockets`` package's asyncio server running its own event loop in a thread;
clients are ``websockets`` asyncio clients run in a worker thread (``deferToThread``), so the
reactor thread stays free to run the proxy.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Awaitable, Callable
from typing import Any

from twisted.internet import defer, reactor, threads
from twisted.internet.defer import Deferred, succeed
from twisted.trial import unittest
from twisted.web.server import Request

from cocalcproxy import pages
from cocalcproxy.directory import Account, Project
from cocalcproxy.handlers import relay
from cocalcproxy.http import routing
from cocalcproxy.http.site import Access, ProxyRequest, ProxySite, Root

PID = "0b2f1d4e-5c6a-4b7d-8e9f-0a1b2c3d4e5f"
TOKEN = "good"


class GrantGuard:
    """Lets ``Authorization: Bearer good`` in to every project (on 127.0.0.1); 401 otherwise."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.accesses: list[Access] = []

    def authorize(self, request: ProxyRequest, route: routing.Route) -> Deferred[Access | None]:
        if request.getHeader(b"authorization") != b"Bearer " + TOKEN.encode():
            request.setHeader(b"WWW-Authenticate", b'Bearer realm="test"')
            pages.write_error(request, 401, "Sign-in required", "No credentials.")
            return succeed(None)
        # As the real guard does: these credentials are the proxy's, so they must not pass on.
        request.authorization_is_proxy_credential = True
        project = Project(route.project_id, 1, "alice", self.host, None, "")
        access = Access(Account(1, "alice"), project)
        self.accesses.append(access)
        return succeed(access)


class _NotHere:
    def handle(self, request: Request, *args: object) -> None:
        pages.not_found(request)


def make_site(handler: relay.Relay, guard: GrantGuard | None = None) -> ProxySite:
    root = Root(
        guard=guard or GrantGuard(),
        forwarder=_NotHere(),
        relay=handler,
        raw=_NotHere(),
        own_pages=_NotHere(),
    )
    return ProxySite(root, reactor=reactor)


class MiniProxy:
    """A Site with the real Relay on plain TCP loopback (TLS is covered end to end)."""

    def __init__(self, case: unittest.TestCase, **relay_options: Any) -> None:
        self.relay = relay.Relay(reactor, **relay_options)
        self.guard = GrantGuard()
        self.site = make_site(self.relay, self.guard)
        self.listening = reactor.listenTCP(0, self.site, interface="127.0.0.1")
        self.port = self.listening.getHost().port
        case.addCleanup(self.stop)

    def url(self, backend_port: int, path: str = "/", form: str = "server") -> str:
        return f"ws://127.0.0.1:{self.port}/{PID}/{form}/{backend_port}{path}"

    def path(self, backend_port: int, path: str = "/") -> str:
        return f"/{PID}/server/{backend_port}{path}"

    @defer.inlineCallbacks
    def stop(self):  # type: ignore[no-untyped-def]
        yield self.relay.close_all()
        yield self.listening.stopListening()


class WSBackend:
    """A ``websockets`` asyncio server in its own thread and event loop."""

    def __init__(self, handler: Callable[[Any], Awaitable[None]], **serve_options: Any) -> None:
        self.handler = handler
        self.serve_options = serve_options
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.ready = threading.Event()
        self.port = 0
        self.connections = 0
        self.request_headers: list[Any] = []
        self._stop: asyncio.Event | None = None
        self.error: BaseException | None = None

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._main())
        except BaseException as e:  # surfaced by start()
            self.error = e
            self.ready.set()
        finally:
            self.loop.close()

    async def _main(self) -> None:
        from websockets.asyncio.server import serve

        self._stop = asyncio.Event()

        async def handler(connection: Any) -> None:
            self.connections += 1
            self.request_headers.append(connection.request.headers)
            await self.handler(connection)

        async with serve(handler, "127.0.0.1", 0, **self.serve_options) as server:
            self.port = server.sockets[0].getsockname()[1]
            self.ready.set()
            await self._stop.wait()
            server.close()
            await server.wait_closed()

    def start(self, case: unittest.TestCase) -> int:
        self.thread.start()
        if not self.ready.wait(10) or self.error is not None:
            raise RuntimeError(f"backend did not start: {self.error!r}")
        case.addCleanup(self.stop)
        return self.port

    def stop(self) -> Deferred[None]:
        if self._stop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self._stop.set)
        return threads.deferToThread(self.thread.join, 20)


def in_thread(scenario: Callable[[], Awaitable[Any]]) -> Deferred[Any]:
    """Run an asyncio scenario (a client) in a worker thread; its result fires the Deferred."""

    def run() -> Any:
        return asyncio.run(scenario())  # type: ignore[arg-type]

    return threads.deferToThread(run)


def on_reactor(fn: Callable[[], Any]) -> Any:
    """From a client thread: run ``fn`` on the reactor thread and return its result."""
    return threads.blockingCallFromThread(reactor, fn)


def free_port() -> int:
    """A loopback port with nothing listening on it (bound then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(
    condition: Callable[[], bool], timeout: float = 10.0, interval: float = 0.01
) -> Deferred[None]:
    """Fire when ``condition()`` holds, polling on the reactor; fail after ``timeout``."""
    d: Deferred[None] = Deferred()
    deadline = reactor.seconds() + timeout

    def check() -> None:
        if condition():
            d.callback(None)
        elif reactor.seconds() > deadline:
            d.errback(AssertionError(f"condition not met within {timeout}s"))
        else:
            reactor.callLater(interval, check)

    check()
    return d
