"""Test harness for the forwarder: a real TLS proxy site with an allow-all guard, a Twisted echo
backend with misbehaving paths, a raw TLS client, and connection tracking for a clean reactor.

The guard is replaced (the forwarder must work for any authorised request); everything else is
real: TLS on loopback, the site and root, the forwarder and its pool, and real backends.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import reactor, ssl, task
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, wrapClientTLS
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols.policies import WrappingFactory
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.trial import unittest
from twisted.web import resource, server
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from zope.interface import implementer

from cocalcproxy import pages
from cocalcproxy.directory import Account, Project
from cocalcproxy.handlers import forward
from cocalcproxy.http import routing
from cocalcproxy.http.site import Access, ProxyRequest, ProxySite, Root
from cocalcproxy.ops import tls

PID = "0b0e5c1a-3d4f-4a5b-8c6d-7e8f9a0b1c2d"
#: Authorization value the test guard treats as the proxy's own credential.
PROXY_CREDENTIAL = b"Basic cHJveHk6c2VjcmV0"


# --- waiting without sleeping -------------------------------------------------------------


@inlineCallbacks
def poll(predicate: Callable[[], object], timeout: float = 10.0, what: str = "condition"):  # type: ignore[no-untyped-def]
    """Let the reactor run until ``predicate()`` is truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        yield task.deferLater(reactor, 0.01, lambda: None)


def track(case: unittest.TestCase, factory: Any) -> WrappingFactory:
    """Wrap a server factory so cleanup waits until all of its connections are closed."""
    wrapped = WrappingFactory(factory)

    def closed() -> Deferred[Any]:
        for proto in list(wrapped.protocols):
            if proto.transport is not None:
                proto.transport.loseConnection()
        return poll(lambda: not wrapped.protocols, 10, "server connections to close")

    case.addCleanup(closed)
    return wrapped


# --- the backend --------------------------------------------------------------------------


def pattern(offset: int, size: int) -> bytes:
    """Deterministic bytes for position ``offset`` onwards (a 251-byte cycle)."""
    block = bytes(range(251))
    start = offset % 251
    reps = (start + size) // 251 + 1
    return (block * reps)[start : start + size]


def pattern_sha256(size: int, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    done = 0
    while done < size:
        n = min(chunk, size - done)
        h.update(pattern(done, n))
        done += n
    return h.hexdigest()


@dataclass
class BackendStats:
    requests: list[dict[str, Any]] = field(default_factory=list)
    client_ports: list[int] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    paused: int = 0
    is_paused: bool = False
    produced: int = 0
    pump_paused: Deferred[None] = field(default_factory=Deferred)


@implementer(IPushProducer)
class Pump:
    """Writes ``size`` pattern bytes to a request, honouring pause/resume from its transport."""

    def __init__(self, request: server.Request, size: int, stats: BackendStats) -> None:
        self.request = request
        self.size = size
        self.sent = 0
        self.stats = stats
        self.paused = False
        self.stopped = False
        self.scheduled: Any = None
        request.registerProducer(self, True)
        self._schedule()

    def _schedule(self) -> None:
        if self.scheduled is None and not self.paused and not self.stopped:
            self.scheduled = reactor.callLater(0, self._run)  # type: ignore[attr-defined]

    def _run(self) -> None:
        self.scheduled = None
        for _ in range(16):
            if self.paused or self.stopped or self.sent >= self.size:
                break
            n = min(65536, self.size - self.sent)
            self.request.write(pattern(self.sent, n))
            self.sent += n
            self.stats.produced = self.sent
        if self.stopped:
            return
        if self.sent >= self.size:
            self.request.unregisterProducer()
            self.request.finish()
            return
        self._schedule()

    def pauseProducing(self) -> None:  # noqa: N802
        self.paused = True
        self.stats.paused += 1
        self.stats.is_paused = True
        if not self.stats.pump_paused.called:
            self.stats.pump_paused.callback(None)

    def resumeProducing(self) -> None:  # noqa: N802
        self.paused = False
        self.stats.is_paused = False
        self._schedule()

    def stopProducing(self) -> None:  # noqa: N802
        self.stopped = True
        if self.scheduled is not None and self.scheduled.active():
            self.scheduled.cancel()
        self.scheduled = None


class EchoBackend(resource.Resource):
    """Echoes what it received as JSON, plus paths that misbehave on purpose."""

    isLeaf = True

    def __init__(self, stats: BackendStats) -> None:
        super().__init__()
        self.stats = stats

    def render(self, request: server.Request) -> Any:
        stats = self.stats
        uri = request.uri
        path = uri.split(b"?", 1)[0]
        # Like an app configured with a base URL: the port form's prefix is ours to ignore.
        parts = path.split(b"/", 4)
        if len(parts) == 5 and parts[1] == PID.encode() and parts[2] == b"port":
            path = b"/" + parts[4]
        stats.client_ports.append(request.getClientAddress().port)  # type: ignore[attr-defined]
        request.notifyFinish().addErrback(lambda f: stats.lost.append(path.decode()))
        if path == b"/hang":
            return server.NOT_DONE_YET
        if path == b"/sse":
            request.setHeader(b"Content-Type", b"text/event-stream")
            request.setHeader(b"Cache-Control", b"no-cache")
            request.write(b"data: first\n\n")
            return server.NOT_DONE_YET
        if path == b"/download":
            size = int(uri.split(b"size=", 1)[1])
            request.setHeader(b"Content-Type", b"application/octet-stream")
            request.setHeader(b"Content-Length", str(size).encode())
            if request.method == b"HEAD":
                return b""
            Pump(request, size, stats)
            return server.NOT_DONE_YET
        if path == b"/chunked-download":
            size = int(uri.split(b"size=", 1)[1])
            Pump(request, size, stats)
            return server.NOT_DONE_YET
        if path == b"/die-mid-body":
            request.setHeader(b"Content-Length", b"100000")
            request.write(b"x" * 5000)
            reactor.callLater(0.05, request.channel.transport.abortConnection)  # type: ignore[attr-defined]
            return server.NOT_DONE_YET
        if path == b"/die-mid-chunked":
            request.write(b"y" * 5000)
            reactor.callLater(0.05, request.channel.transport.abortConnection)  # type: ignore[attr-defined]
            return server.NOT_DONE_YET
        if path == b"/cookies":
            request.responseHeaders.setRawHeaders(
                b"Set-Cookie",
                [
                    b"a=1; Path=/",
                    b"b=2; Path=/deep; Domain=example.com; HttpOnly",
                    b"cocalcproxy_session=stolen; Path=/",
                ],
            )
            request.responseHeaders.setRawHeaders(b"Vary", [b"Accept", b"Cookie"])
            request.responseHeaders.setRawHeaders(b"X-Multi", [b"one", b"two"])
            request.setHeader(b"Connection", b"X-Hop")
            request.setHeader(b"X-Hop", b"secret")
            return b"cookies"
        if path == b"/redirect":
            request.setResponseCode(302)
            request.setHeader(b"Location", uri.split(b"to=", 1)[1])
            return b""
        if path == b"/gzip":
            body = gzip.compress(b"compressed hello " * 100)
            request.setHeader(b"Content-Encoding", b"gzip")
            request.setHeader(b"Content-Type", b"text/plain")
            return body
        if path.startswith(b"/status/"):
            request.setResponseCode(int(path[len(b"/status/") :]))
            request.setHeader(b"ETag", b'"v1"')
            return b""
        # The echo: hash the spooled body in chunks.
        assert request.content is not None
        request.content.seek(0)
        h = hashlib.sha256()
        length = 0
        while chunk := request.content.read(1 << 20):
            h.update(chunk)
            length += len(chunk)
        document = {
            "method": request.method.decode(),
            "uri": uri.decode("latin-1"),
            "headers": [
                [name.decode("latin-1"), value.decode("latin-1")]
                for name, values in request.requestHeaders.getAllRawHeaders()
                for value in values
            ],
            "body_sha256": h.hexdigest(),
            "body_length": length,
        }
        stats.requests.append(document)
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps(document).encode()


@dataclass
class Backend:
    port: int
    stats: BackendStats


@inlineCallbacks
def start_backend(case: unittest.TestCase):  # type: ignore[no-untyped-def]
    """A Twisted echo backend on 127.0.0.1 (plain HTTP, as project servers are)."""
    stats = BackendStats()
    site = server.Site(EchoBackend(stats))
    site.displayTracebacks = False
    port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(track(case, site))
    case.addCleanup(port.stopListening)
    return Backend(port.getHost().port, stats)


# --- the proxy ----------------------------------------------------------------------------


class AllowGuard:
    """Authorises everything for one project on ``host``; flags PROXY_CREDENTIAL as the proxy's."""

    def __init__(self, host: str) -> None:
        self.host = host

    def authorize(self, request: ProxyRequest, route: routing.Route) -> Deferred[Access | None]:
        if request.requestHeaders.getRawHeaders(b"authorization") == [PROXY_CREDENTIAL]:
            request.authorization_is_proxy_credential = True
        project = Project(route.project_id, 1, "alice", self.host, None, "test")
        return succeed(Access(Account(1, "alice"), project))


class NoPages:
    def handle(self, request: ProxyRequest, page: Any) -> None:
        pages.not_found(request)


@dataclass
class Proxy:
    port: int
    cert_path: str
    forwarder: forward.Forwarder
    site: ProxySite

    @property
    def url(self) -> str:
        return f"https://localhost:{self.port}"

    def server_url(self, backend_port: int, rest: str = "/") -> str:
        return f"{self.url}/{PID}/server/{backend_port}{rest}"

    def port_url(self, backend_port: int, rest: str = "/") -> str:
        return f"{self.url}/{PID}/port/{backend_port}{rest}"


@inlineCallbacks
def start_proxy(  # type: ignore[no-untyped-def]
    case: unittest.TestCase,
    *,
    project_host: str = "127.0.0.1",
    connect_timeout: float = 10.0,
    response_timeout: float = 300.0,
    max_body_size: int = 1024**3,
    pool_size: int = 8,
    project_domain: str | None = None,
):
    cert, key = tls.ensure_self_signed(case.mktemp(), "localhost")
    creator = tls.ReloadableServerCreator(cert, key)
    pool = forward.make_pool(reactor, pool_size)
    case.addCleanup(pool.closeCachedConnections)
    forwarder = forward.Forwarder(
        reactor,
        pool=pool,
        connect_timeout=connect_timeout,
        response_timeout=response_timeout,
        public_hosts=[b"proxy.example"],
    )
    root = Root(
        guard=AllowGuard(project_host),
        forwarder=forwarder,
        relay=forwarder,
        raw=forwarder,
        own_pages=NoPages(),
        project_domain=project_domain,
    )
    site = ProxySite(root, reactor=reactor)
    site.max_body_size = max_body_size
    tls_factory = TLSMemoryBIOFactory(creator, False, site)
    tls_factory.protocol = tls.LeanTLSProtocol  # type: ignore[assignment]  # as the service does
    factory = track(case, tls_factory)
    port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
    case.addCleanup(port.stopListening)
    return Proxy(port.getHost().port, cert, forwarder, site)


# --- clients ------------------------------------------------------------------------------


class RawClient(Protocol):
    """Sends exact bytes over TLS and collects everything until the connection closes."""

    def __init__(self, request: bytes, pause: bool = False) -> None:
        self.request = request
        self.pause = pause
        self.received: list[bytes] = []
        self.count = 0
        self.done: Deferred[bytes] = Deferred()
        self.reason: Failure | None = None

    def connectionMade(self) -> None:  # noqa: N802
        assert self.transport is not None
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        if self.pause and self.count == 0 and self.transport is not None:
            # Stop reading once the answer starts (not before: TLS must finish its handshake).
            self.transport.pauseProducing()  # type: ignore[attr-defined]
        self.count += len(data)
        if len(self.received) < 64:
            self.received.append(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]  # noqa: N802
        self.reason = reason
        self.done.callback(b"".join(self.received))


def raw_connect(case: unittest.TestCase, proxy: Proxy, client: RawClient) -> Deferred[Any]:
    with open(proxy.cert_path, "rb") as f:
        authority = ssl.Certificate.loadPEM(f.read())
    options = ssl.optionsForClientTLS("localhost", trustRoot=authority)
    endpoint = wrapClientTLS(options, TCP4ClientEndpoint(reactor, "127.0.0.1", proxy.port))
    d = endpoint.connect(Factory.forProtocol(lambda: client))

    def cleanup() -> Deferred[Any] | None:
        if client.done.called:
            return None
        if client.transport is not None:
            client.transport.abortConnection()  # type: ignore[attr-defined]
        return client.done

    case.addCleanup(cleanup)
    return d


@inlineCallbacks
def raw_request(case: unittest.TestCase, proxy: Proxy, data: bytes):  # type: ignore[no-untyped-def]
    client = RawClient(data)
    yield raw_connect(case, proxy, client)
    received = yield client.done
    return received


@implementer(IBodyProducer)
class PatternBody:
    """A request body of ``size`` pattern bytes, produced in chunks (never held whole)."""

    def __init__(self, size: int, known_length: bool = True) -> None:
        self.size = size
        self.length = size if known_length else UNKNOWN_LENGTH
        self._task: task.CooperativeTask | None = None

    def _chunks(self, consumer: Any) -> Any:
        sent = 0
        while sent < self.size:
            n = min(256 * 1024, self.size - sent)
            consumer.write(pattern(sent, n))
            sent += n
            yield None

    def startProducing(self, consumer: Any) -> Deferred[None]:  # noqa: N802
        self._task = task.cooperate(self._chunks(consumer))
        d: Deferred[Any] = self._task.whenDone()
        return d.addCallback(lambda _: None)

    def pauseProducing(self) -> None:  # noqa: N802
        if self._task is not None:
            self._task.pause()

    def resumeProducing(self) -> None:  # noqa: N802
        if self._task is not None:
            self._task.resume()

    def stopProducing(self) -> None:  # noqa: N802
        if self._task is not None:
            self._task.stop()


def header_values(document: dict[str, Any], name: str) -> list[str]:
    return [v for n, v in document["headers"] if n.lower() == name.lower()]


def curl(*args: str) -> Deferred[tuple[bytes, bytes, int]]:
    from twisted.internet.utils import getProcessOutputAndValue

    d: Deferred[tuple[bytes, bytes, int]] = getProcessOutputAndValue(
        "curl", ["--silent", "--show-error", *args], env=dict(os.environ)
    )
    return d
