"""The HTTP forwarder: one authorised request to a project's server, streamed both ways.

It is given ``(request, route, access)`` by the root after the guard said yes, and never parses
URLs or looks at credentials itself: the backend is always ``access.project.host`` and
``route.port``, and the backend sees ``route.backend_target`` byte for byte.

* Requests go through a Twisted Agent over one persistent :class:`HTTPConnectionPool`, so a
  browser's keep-alive requests reuse backend connections.
* The request body goes from what Twisted spooled (memory under 100 KB, a temporary file above)
  to the backend through a :class:`FileBodyProducer`: read in chunks, never whole.
* The response body is delivered with backpressure: :class:`_Delivery` is registered as the
  streaming producer of the client's request, so when the client's transport is full the
  backend connection is paused, and resumed when the client reads again.
* A client that goes away cancels the backend request (or closes the backend connection
  mid-body). A backend that fails mid-body makes the proxy abort the client's connection, so a
  short body can never look complete.
* Failures become clear pages (:mod:`cocalcproxy.pages`): 502 when nothing answers on the port or
  the server closes without answering, 504 when connecting or waiting for the response headers
  takes too long.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.internet import error
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IConsumer, IDelayedCall, IPushProducer
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web._newclient import HTTP11ClientProtocol, RequestNotSent
from twisted.web.client import (
    URI,
    Agent,
    FileBodyProducer,
    HTTPConnectionPool,
    RequestTransmissionFailed,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
    _HTTP11ClientFactory,
    _RetryingHTTP11ClientProtocol,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer, IResponse
from zope.interface import implementer

from cocalcproxy import pages
from cocalcproxy.handlers import backendio, backends, socketdir
from cocalcproxy.http import headers, routing
from cocalcproxy.http.headlimit import HeadLimit, HeadTooLarge
from cocalcproxy.http.site import Access, ProxyRequest

# The namespace operators see in log lines (kept from before the package layout).
log = Logger(namespace="cocalcproxy.forward")

#: Idle backend connections are dropped after this many seconds (servers close them anyway).
CACHED_CONNECTION_TIMEOUT = 60.0
#: Host names whose IDNA form is kept for reuse (the cache is simply emptied when full).
HOST_CACHE_SIZE = 4096
#: Bytes read from the spooled request body per write to the backend.
BODY_CHUNK = 64 * 1024


class _BackendProtocol(HTTP11ClientProtocol):
    """Keeps the response's connection-control headers, and bounds the response head.

    Twisted's parser files the connection-control headers (Connection, Keep-Alive, ...) away from
    ``response.headers``; the header policy needs them to drop every header a backend names in
    ``Connection``. They are attached to the response as ``connection_headers``.

    Twisted's parser bounds each header line but neither their number nor the head's size (see
    :mod:`cocalcproxy.http.headlimit`): every byte is counted here before the parser sees it, until
    the head is complete, and a head over the bound fails the request with :class:`HeadTooLarge`
    (a 502) and closes the connection.
    """

    _head_limit: HeadLimit | None = None
    #: Whether any byte arrived since the current request was sent: a backend that answered
    #: (even with a head the proxy refuses) has the request, so it is never sent again.
    answered = False

    def request(self, request: Any) -> Deferred[IResponse]:
        self._head_limit = HeadLimit()
        self.answered = False
        d = super().request(request)
        parser = getattr(self, "_parser", None)

        def keep(response: Any) -> Any:
            response.connection_headers = getattr(parser, "connHeaders", None)
            return response

        return d.addCallback(keep)

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        if data:
            self.answered = True
        limit = self._head_limit
        if limit is not None:
            try:
                if limit.feed(data):
                    self._head_limit = None
            except HeadTooLarge as e:
                self._head_limit = None
                self._giveUp(Failure(e))
                return
        super().dataReceived(data)


class _BackendProtocolFactory(_HTTP11ClientFactory):
    # One factory per backend connection: "Starting/Stopping factory" lines would flood the log.
    noisy = False

    def buildProtocol(self, addr: Any) -> HTTP11ClientProtocol:  # noqa: N802
        return _BackendProtocol(self._quiescentCallback)


class _ReplayingRetry(_RetryingHTTP11ClientProtocol):
    """A pooled (reused) connection whose request is tried once more on a fresh connection when
    it fails before any byte of the response arrived, for every method, as browsers do.

    A backend may close an idle keep-alive connection just as the proxy sends the next request
    on it; the request then fails although the backend never saw it. Twisted retries only
    GET, HEAD, OPTIONS, DELETE and TRACE, and only without a body. The proxy has every body
    spooled, so it can send it again: the retry gets a fresh producer over the same spool.
    A request cancelled (client gone, response timeout) is never retried.
    """

    def _shouldRetry(self, method: bytes, exception: object, bodyProducer: Any) -> bool:  # noqa: N802, N803
        if not isinstance(
            exception, (RequestNotSent, RequestTransmissionFailed, ResponseNeverReceived)
        ):
            return False
        reasons = getattr(exception, "reasons", None) or []
        if any(reason.check(CancelledError) for reason in reasons):
            return False
        # Twisted calls a failure "never received" when its parser saw no byte; a head refused
        # by the HeadLimit before the parser saw it is an answer all the same.
        if getattr(self._clientProtocol, "answered", False):
            return False
        return bodyProducer is None or isinstance(bodyProducer, _SpooledBody)

    def request(self, request: Any) -> Deferred[IResponse]:
        d: Deferred[IResponse] = self._clientProtocol.request(request)

        def failed(reason: Failure) -> Any:
            if not self._shouldRetry(request.method, reason.value, request.bodyProducer):
                return reason
            if isinstance(request.bodyProducer, _SpooledBody):
                request.bodyProducer = request.bodyProducer.replay()
            log.debug("reused backend connection failed before the response; retrying once")
            return self._newConnection().addCallback(lambda fresh: fresh.request(request))

        return d.addErrback(failed)


class _ReplayingPool(HTTPConnectionPool):
    """Twisted's pool, with :class:`_ReplayingRetry` around each reused connection."""

    def getConnection(self, key: Any, endpoint: Any) -> Deferred[Any]:  # noqa: N802
        d: Deferred[Any] = super().getConnection(key, endpoint)

        def rewrap(connection: Any) -> Any:
            if isinstance(connection, _RetryingHTTP11ClientProtocol):
                return _ReplayingRetry(connection._clientProtocol, connection._newConnection)
            return connection

        return d.addCallback(rewrap)


def make_pool(reactor: Any, pool_size: int) -> HTTPConnectionPool:
    """The shared backend pool: persistent, up to ``pool_size`` idle connections per host:port."""
    pool = _ReplayingPool(reactor, persistent=True)
    pool._factory = _BackendProtocolFactory
    pool.maxPersistentPerHost = pool_size
    pool.cachedConnectionTimeout = CACHED_CONNECTION_TIMEOUT  # type: ignore[assignment]
    return pool


class Forwarder:
    """The handler for ``server`` and ``port`` routes (HTTP; WebSocket upgrades go to the relay)."""

    def __init__(
        self,
        reactor: Any,
        *,
        pool: HTTPConnectionPool,
        connect_timeout: float = 10.0,
        response_timeout: float = 300.0,
        public_hosts: Sequence[bytes] = (),
        backends: backendio.Backends | None = None,
    ) -> None:
        self.reactor = reactor
        self.pool = pool
        self.connect_timeout = connect_timeout
        self.response_timeout = response_timeout
        self.public_hosts = tuple(public_hosts)
        self.backends = (
            backends
            if backends is not None
            else backendio.Backends(reactor, connect_timeout=connect_timeout)
        )
        self._agent = Agent(reactor, pool=pool)
        self._hosts: dict[str, bytes] = {}

    def handle(self, request: ProxyRequest, route: routing.Route, access: Access) -> None:
        assert route.port is not None and route.kind != "raw"
        _Exchange(self, request, route, access).start()

    def backend_request(
        self,
        method: bytes,
        backend: backends.Target,
        target: bytes,
        request_headers: Headers,
        body: IBodyProducer | None,
    ) -> Deferred[IResponse]:
        """Send ``method target`` to ``backend`` over the pool, with ``target`` byte for byte.

        ``Agent.request`` would reparse a URL and may re-serialise the path (an empty ``?``
        vanishes), so the request goes through the Agent's endpoint-level entry point with the
        routing layer's exact origin-form target. The endpoint comes from the backend policy
        (cocalcproxy.handlers.backendio): TCP with screened addresses, or a checked Unix socket.
        """
        endpoint = self.backends.endpoint(backend)
        port = backend.port
        key: tuple[bytes, bytes, int]
        if isinstance(backend, backends.UnixTarget):
            host_b = b"localhost"
            owner = -1 if backend.owner is None else backend.owner
            key = (b"unix:" + backend.path.encode("utf-8", "surrogateescape"), b"", owner)
        else:
            host_b = self._host_bytes(backend.host)
            key = (b"http", host_b, port)
        uri = URI(b"http", b"%s:%d" % (host_b, port), host_b, port, target, b"", b"", b"")
        return self._agent._requestWithEndpoint(
            key, endpoint, method, uri, request_headers, body, target
        )

    def _host_bytes(self, host: str) -> bytes:
        """The host as the Agent wants it (IDNA costs enough to keep the answers)."""
        found = self._hosts.get(host)
        if found is None:
            if len(self._hosts) >= HOST_CACHE_SIZE:
                self._hosts.clear()
            found = self._hosts[host] = host.encode() if _is_ipv6(host) else host.encode("idna")
        return found


def _is_ipv6(host: str) -> bool:
    return ":" in host


def _raw_headers(h: Headers) -> list[tuple[bytes, bytes]]:
    return [(name, value) for name, values in h.getAllRawHeaders() for value in values]


class _WatchedConsumer:
    """Passes body chunks to the real consumer and tells the exchange that the upload moves."""

    def __init__(self, consumer: Any, progress: Any) -> None:
        self._consumer = consumer
        self._progress = progress

    def write(self, data: bytes) -> None:
        self._progress()
        self._consumer.write(data)


class _Unclosable:
    """The spool as a producer reads it: FileBodyProducer closes its file when done or stopped,
    but the spool belongs to the request, and a retry reads it again."""

    def __init__(self, content: Any) -> None:
        self._content = content

    def read(self, size: int = -1) -> bytes:
        data: bytes = self._content.read(size)
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        position: int = self._content.seek(offset, whence)
        return position

    def tell(self) -> int:
        position: int = self._content.tell()
        return position

    def close(self) -> None:
        pass


class _SpooledBody(FileBodyProducer):
    """The client's spooled body as a producer; each chunk written counts as upload progress."""

    def __init__(self, content: Any, progress: Any, reactor: Any) -> None:
        from twisted.internet.task import Cooperator

        content.seek(0)
        super().__init__(
            _Unclosable(content),
            cooperator=Cooperator(scheduler=_soon(reactor)),
            readSize=BODY_CHUNK,
        )
        self._content = content
        self._progress = progress
        self._reactor = reactor

    def replay(self) -> _SpooledBody:
        """A new producer of the same body from its start (for a retry)."""
        return _SpooledBody(self._content, self._progress, self._reactor)

    def stopProducing(self) -> None:  # noqa: N802
        # Twisted stops the producer of a request whose connection broke, even when it never
        # started it (an empty body is not produced at all): there is no task to stop then.
        if hasattr(self, "_task"):
            super().stopProducing()

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:  # noqa: N802
        self._progress()
        started: Deferred[None] = super().startProducing(_WatchedConsumer(consumer, self._progress))
        return started


def _soon(reactor: Any) -> Any:
    def schedule(f: Any) -> IDelayedCall:
        return reactor.callLater(0, f)  # type: ignore[no-any-return]

    return schedule


class _Exchange:
    """One request's journey to the backend and the answer's journey back."""

    def __init__(
        self, forwarder: Forwarder, request: ProxyRequest, route: routing.Route, access: Access
    ) -> None:
        self.forwarder = forwarder
        self.reactor = forwarder.reactor
        self.request = request
        self.route = route
        self.project = access.project
        self.port: int = route.port or 0
        self.backend: backends.Target | None = None
        self.pending: Deferred[IResponse] | None = None
        self.delivery: _Delivery | None = None
        self.watchdog: Any = None
        self.timed_out = False
        self.client_gone = False
        # True once the backend's response headers (or a failure) arrived. ``pending.called``
        # cannot tell: it is already True while the Deferred waits on the Agent's inner one.
        self.settled = False

    # --- request ------------------------------------------------------------------------

    def start(self) -> None:
        request = self.request
        decision = self.forwarder.backends.decide(self.route, self.project)
        if isinstance(decision, backends.Refused):
            backendio.refuse(request, decision)
            return
        self.backend = decision
        request.notifyFinish().addErrback(self._client_lost)
        client_headers = [
            (name, value)
            for name, values in request.requestHeaders.getAllRawHeaders()
            for value in values
        ]
        hosts = request.requestHeaders.getRawHeaders(b"host")
        peer = request.getClientAddress()
        outgoing = headers.backend_request_headers(
            client_headers,
            route=self.route,
            client_ip=str(getattr(peer, "host", "")),
            proto=b"https" if request.isSecure() else b"http",
            host=hosts[0] if hosts else None,
            strip_authorization=request.authorization_is_proxy_credential,
            identity=request.identity_assertion,
        )
        backend_headers = Headers()
        for name, value in outgoing:
            if name.lower() != b"content-length":  # the Agent frames the body itself
                backend_headers.addRawHeader(name, value)
        body: Any = None
        if request.requestHeaders.hasHeader(b"content-length") or request.requestHeaders.hasHeader(
            b"transfer-encoding"
        ):
            assert request.content is not None
            body = _SpooledBody(request.content, self._progress, self.reactor)
        self._progress()
        method = request.method
        self.pending = self.forwarder.backend_request(
            method, decision, self.route.backend_target, backend_headers, body
        )
        self.pending.addCallbacks(self._got_response, self._failed)

    def _progress(self) -> None:
        """(Re)arm the response-header timeout: it counts from the last upload progress."""
        if self.settled:
            return
        if self.watchdog is not None and self.watchdog.active():
            self.watchdog.reset(self.forwarder.response_timeout)
        else:
            self.watchdog = self.reactor.callLater(self.forwarder.response_timeout, self._timeout)

    def _disarm(self) -> None:
        if self.watchdog is not None and self.watchdog.active():
            self.watchdog.cancel()
        self.watchdog = None

    def _timeout(self) -> None:
        self.watchdog = None
        if self.pending is not None and not self.settled:
            self.timed_out = True
            self.pending.cancel()

    def _client_lost(self, reason: Failure) -> None:
        self.client_gone = True
        self._disarm()
        if self.pending is not None and not self.settled:
            self.pending.cancel()
        if self.delivery is not None:
            self.delivery.stopProducing()

    # --- response -----------------------------------------------------------------------

    def _got_response(self, response: Any) -> None:
        self.settled = True
        self._disarm()
        request = self.request
        if self.client_gone or request._disconnected:
            response.deliverBody(_Discard())
            return
        backend_headers = _raw_headers(response.headers)
        connection_headers = getattr(response, "connection_headers", None)
        if connection_headers is not None:
            backend_headers += [
                (name, value)
                for name, value in _raw_headers(connection_headers)
                if name.lower() not in (b"content-length", b"transfer-encoding")
            ]
        proxy_hosts = list(self.forwarder.public_hosts)
        proxy_hosts.extend(request.requestHeaders.getRawHeaders(b"host", []))
        outgoing = headers.client_response_headers(
            backend_headers,
            route=self.route,
            project_host=self.project.host,
            proxy_hosts=proxy_hosts,
        )
        date = request.responseHeaders.getRawHeaders(b"date")
        request.responseHeaders = Headers()
        for name, value in outgoing:
            request.responseHeaders.addRawHeader(name, value)
        if date and not request.responseHeaders.hasHeader(b"date"):
            request.responseHeaders.setRawHeaders(b"Date", date)
        request.defaultContentType = None
        if (
            response.length is not UNKNOWN_LENGTH
            and response.code not in (204, 304)
            and request.method != b"HEAD"
        ):
            request.responseHeaders.setRawHeaders(b"Content-Length", [b"%d" % response.length])
        request.setResponseCode(response.code, response.phrase or None)
        self.delivery = _Delivery(self)
        response.deliverBody(self.delivery)

    def _failed(self, failure: Failure) -> None:
        self.settled = True
        self._disarm()
        request = self.request
        if self.client_gone or request._disconnected or request.finished:
            return
        port = self.port
        facts: dict[str, object] = {"project": self.project.id, "port": port}
        if isinstance(failure.value, backendio.BackendRefused):
            backendio.refuse(request, failure.value.refusal)
            return
        if isinstance(failure.value, socketdir.SocketRefused):
            socketdir.write_refused(request, failure.value, **facts)
            return
        if isinstance(self.backend, backends.UnixTarget) and failure.check(
            error.ConnectError, error.DNSLookupError
        ):
            socketdir.write_not_listening(request, self.backend, **facts)
            return
        if self.timed_out:
            self.request.log_info.extra["backend"] = "response-timeout"
            pages.write_error(
                request,
                504,
                "The project's server did not answer in time",
                f"The server on port {port} of this project accepted the request but sent no "
                f"answer within {self.forwarder.response_timeout:g} seconds.",
                **facts,
            )
        elif failure.check(error.TimeoutError, CancelledError):
            self.request.log_info.extra["backend"] = "connect-timeout"
            pages.write_error(
                request,
                504,
                "The project's server did not answer in time",
                f"Connecting to port {port} of this project took longer than "
                f"{self.forwarder.connect_timeout:g} seconds.",
                **facts,
            )
        elif failure.check(error.ConnectError, error.DNSLookupError):
            self.request.log_info.extra["backend"] = "refused"
            pages.write_error(
                request,
                502,
                "Nothing is answering",
                f"Nothing answered on port {port} of this project. Start the server in the "
                "project and make it listen on all addresses, not only on localhost: for "
                "example --bind 0.0.0.0 or --ip=0.0.0.0.",
                **facts,
            )
        elif (too_large := _head_too_large(failure)) is not None:
            log.info(
                "backend on port {port} sent too large a response head: {why}",
                port=port,
                why=too_large,
            )
            self.request.log_info.extra["backend"] = "head-too-large"
            pages.write_error(
                request,
                502,
                "The project's server sent too large an answer head",
                f"The server on port {port} of this project answered with a response head "
                f"over the proxy's limit ({too_large}).",
                **facts,
            )
        elif failure.check(
            ResponseFailed, ResponseNeverReceived, RequestTransmissionFailed, error.ConnectionLost
        ):
            self.request.log_info.extra["backend"] = "no-response"
            pages.write_error(
                request,
                502,
                "The project's server closed the connection",
                f"The server on port {port} of this project closed the connection without a "
                "valid answer.",
                **facts,
            )
        else:
            log.failure("forwarding to port {port} failed", failure, port=port)
            self.request.log_info.extra["backend"] = "error"
            pages.write_error(
                request,
                502,
                "Bad gateway",
                f"The request could not be passed to port {port} of this project.",
                **facts,
            )

    def _body_done(self, reason: Failure) -> None:
        request = self.request
        self.delivery = None
        if self.client_gone or request._disconnected:
            return
        # isinstance rather than Failure.check, which builds the qualified names of the
        # exception's classes on every first call (once per request here).
        if isinstance(reason.value, (ResponseDone, PotentialDataLoss)):
            request.unregisterProducer()
            request.finish()
            return
        # The backend failed mid-body: never let a short body look complete.
        log.info(
            "backend on port {port} failed mid-body: {why}",
            port=self.port,
            why=reason.getErrorMessage(),
        )
        request.log_info.extra["backend"] = "failed-mid-body"
        request.unregisterProducer()
        transport = getattr(request.channel, "transport", None)
        if transport is not None:
            transport.abortConnection()


def _head_too_large(failure: Failure) -> str | None:
    """The reason when the request failed because the response head was over the bound."""
    if isinstance(failure.value, ResponseFailed):
        for reason in failure.value.reasons:
            if isinstance(reason.value, HeadTooLarge):
                return str(reason.value)
    return None


@implementer(IPushProducer)
class _Delivery(Protocol):
    """Writes the backend's body to the client, pausing the backend while the client is full.

    ``self.transport`` is the backend response's producer (a TransportProxyProducer around the
    backend connection): pausing it stops reading from the backend socket, so TCP flow control
    pushes back on the backend.
    """

    def __init__(self, exchange: _Exchange) -> None:
        self.exchange = exchange
        self.stopped = False

    def connectionMade(self) -> None:  # noqa: N802
        self.exchange.request.registerProducer(self, True)

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        if not self.stopped:
            self.exchange.request.write(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:  # noqa: N802
        self.exchange._body_done(reason)

    def pauseProducing(self) -> None:  # noqa: N802
        if self.transport is not None:
            self.transport.pauseProducing()

    def resumeProducing(self) -> None:  # noqa: N802
        if self.transport is not None and not self.stopped:
            self.transport.resumeProducing()

    def stopProducing(self) -> None:  # noqa: N802
        """The client went away: close the backend connection mid-body."""
        if self.stopped:
            return
        self.stopped = True
        if self.transport is not None:
            self.transport.stopProducing()


class _Discard(Protocol):
    """For an answer nobody wants any more: closes the backend connection at once."""

    def connectionMade(self) -> None:  # noqa: N802
        if self.transport is not None:
            self.transport.stopProducing()

    def connectionLost(self, reason: Failure = connectionDone) -> None:  # noqa: N802
        pass
