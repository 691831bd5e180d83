"""Test support for the raw file server: the handler on a loopback HTTP site, a byte-exact client.

The site is a real ProxySite on a real TCP socket, with a root that hands every request to the
RawHandler as the router and guard would (a Route for one project, an Access for its owner),
so the handler is driven exactly as in production, minus TLS and sign-in.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.trial import unittest
from twisted.web import resource, server

from cocalcproxy.directory import Account, Project
from cocalcproxy.handlers.raw import RawHandler
from cocalcproxy.http.routing import Route
from cocalcproxy.http.site import Access, ProxyRequest, ProxySite

PID = "0b0e5c1a-3d4f-4a5b-8c6d-7e8f9a0b1c2d"
PREFIX = b"/" + PID.encode() + b"/raw"


class OneProject(resource.Resource):
    isLeaf = True

    def __init__(self, handler: RawHandler, home: str | None, subdomain: bool = False) -> None:
        super().__init__()
        self.handler = handler
        self.home = home
        self.subdomain = subdomain
        self.accesses: list[Access] = []

    def render(self, request: server.Request) -> Any:
        assert isinstance(request, ProxyRequest)
        if self.subdomain:
            route = Route(PID, "raw", None, b"", request.uri, subdomain=True)
        else:
            assert request.uri.startswith(PREFIX)
            route = Route(PID, "raw", None, PREFIX, request.uri[len(PREFIX) :])
        project = Project(PID, 1, "alice", "127.0.0.1", self.home, "")
        access = Access(Account(1, "alice"), project)
        self.accesses.append(access)
        self.handler.handle(request, route, access)
        return server.NOT_DONE_YET


@dataclass
class Response:
    status: int
    headers: dict[bytes, list[bytes]]
    body: bytes
    raw: bytes

    def header(self, name: bytes) -> bytes | None:
        values = self.headers.get(name.lower())
        return values[-1] if values else None


def parse_response(raw: bytes) -> Response:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ")[1])
    headers: dict[bytes, list[bytes]] = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers.setdefault(name.strip().lower(), []).append(value.strip())
    return Response(status, headers, body, raw)


class Exchange(Protocol):
    """Send bytes, optionally stop reading, collect everything until the server closes."""

    def __init__(self, data: bytes, pause: bool = False) -> None:
        self.data = data
        self.pause = pause
        self.received: list[bytes] = []
        self.closed: defer.Deferred[bytes] = defer.Deferred()

    def connectionMade(self) -> None:  # noqa: N802
        self.transport.write(self.data)  # type: ignore[union-attr]
        if self.pause:
            self.transport.pauseProducing()  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.received.append(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]  # noqa: N802
        self.closed.callback(b"".join(self.received))


def request_bytes(method: bytes, target: bytes, headers: dict[bytes, bytes] | None = None) -> bytes:
    lines = [method + b" " + target + b" HTTP/1.1", b"Host: localhost", b"Connection: close"]
    lines += [k + b": " + v for k, v in (headers or {}).items()]
    return b"\r\n".join(lines) + b"\r\n\r\n"


@defer.inlineCallbacks
def poll(predicate: Callable[[], object], what: str, timeout: float = 10.0):  # type: ignore[no-untyped-def]
    """Wait (without blocking the reactor) until ``predicate()`` is truthy; fail at the deadline."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        yield task.deferLater(reactor, 0.01, lambda: None)


class RawSiteCase(unittest.TestCase):
    """Starts a ProxySite with OneProject on loopback; ``home`` is set by subclasses' setUp."""

    home: str | None = None
    subdomain = False

    def start(self, handler: RawHandler | None = None) -> RawHandler:
        self.handler = handler or RawHandler(reactor)
        self.root = OneProject(self.handler, self.home, self.subdomain)
        site = ProxySite(self.root)
        port = reactor.listenTCP(0, site, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)
        self.port = port.getHost().port
        return self.handler

    def connect(self, data: bytes, pause: bool = False) -> defer.Deferred[Exchange]:
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.port)
        return connectProtocol(endpoint, Exchange(data, pause))

    @defer.inlineCallbacks
    def fetch(  # type: ignore[no-untyped-def]
        self, path: bytes, method: bytes = b"GET", headers: dict[bytes, bytes] | None = None
    ):
        """One request to ``PREFIX + path`` (or ``path`` itself in subdomain mode)."""
        target = path if self.subdomain else PREFIX + path
        exchange = yield self.connect(request_bytes(method, target, headers))
        raw = yield exchange.closed
        response = parse_response(raw)
        self.assertNotIn(b"chunked", response.header(b"transfer-encoding") or b"")
        length = response.header(b"content-length")
        if method != b"HEAD" and response.status != 304:
            assert length is not None, response.raw[:500]
            self.assertEqual(int(length), len(response.body))
        return response
