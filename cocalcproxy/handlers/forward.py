"""The HTTP forwarder: one authorised request to a project's server, streamed both ways.

It is given ``(request, route, access)`` by the root after the guard said yes, and never parses
URLs or looks at credentials itself: the backend is always ``access.project.host`` and
``route.port``, and the backend sees ``route.backend_target`` byte for byte.

* Requests go through the lean HTTP/1.1 client of :mod:`.backendhttp` and its pool, so a
  browser's keep-alive requests reuse backend connections.
* The request body goes from what Twisted spooled (memory under 100 KB, a temporary file above)
  to the backend with its length, in 64 KiB chunks as the backend reads, never whole.
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
from twisted.internet.defer import CancelledError
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import (
    RequestTransmissionFailed,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from zope.interface import implementer

from cocalcproxy import pages
from cocalcproxy.handlers import backendio, backends, socketdir
from cocalcproxy.handlers.backendhttp import (
    BackendPool,
    BadRequestForBackend,
    request_head,
)
from cocalcproxy.http import headers, routing
from cocalcproxy.http.headlimit import HeadTooLarge
from cocalcproxy.http.site import Access, ProxyRequest

# The namespace operators see in log lines (kept from before the package layout).
log = Logger(namespace="cocalcproxy.forward")

#: Idle backend connections are dropped after this many seconds (servers close them anyway).
CACHED_CONNECTION_TIMEOUT = 60.0
#: Host names whose IDNA form is kept for reuse (the cache is simply emptied when full).
HOST_CACHE_SIZE = 4096
#: Headers the forwarder frames itself (the body is spooled, its length known).
_FRAMING = frozenset((b"content-length", b"transfer-encoding"))


def make_pool(reactor: Any, pool_size: int) -> BackendPool:
    """The shared backend pool: persistent, at least ``pool_size`` idle connections kept per
    backend (more while more were busy at once), each closed after a minute idle."""
    return BackendPool(reactor, pool_size, idle_timeout=CACHED_CONNECTION_TIMEOUT)


class Forwarder:
    """The handler for ``server`` and ``port`` routes (HTTP; WebSocket upgrades go to the relay)."""

    def __init__(
        self,
        reactor: Any,
        *,
        pool: BackendPool,
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
        self._hosts: dict[str, bytes] = {}

    def handle(self, request: ProxyRequest, route: routing.Route, access: Access) -> None:
        assert route.port is not None and route.kind != "raw"
        _Exchange(self, request, route, access).start()

    def lane_handle(self, request: Any, route: routing.Route, access: Access) -> None:
        """A request the fast lane took (cocalcproxy.http.lane): its target is decided already
        (``request.lane_target``), it has no body, and its headers are a plain list."""
        _LaneExchange(self, request, route, access).start()

    def backend_request(
        self,
        method: bytes,
        backend: backends.Target,
        target: bytes,
        request_headers: list[tuple[bytes, bytes]],
        content: Any,
        length: int,
        progress: Any,
        sink: Any = None,
        has_host: bool | None = None,
        receiver: tuple[Any, Any] | None = None,
    ) -> Any:
        """Send ``method target`` to ``backend`` over the pool, ``target`` byte for byte.

        ``request_headers`` hold no body framing: the body is ``length`` bytes of the seekable
        ``content`` (the spool), or there is none when ``content`` is None. A request without a
        Host header gets the backend's address as its Host (``has_host`` says whether there is
        one when the caller knows; None looks). A Deferred, or with ``receiver`` the pool's
        direct form (BackendPool.request). The endpoint comes from the backend
        policy (cocalcproxy.handlers.backendio: TCP with screened addresses, or a checked Unix
        socket) and is only asked for when a new connection is needed.
        """
        key: tuple[bytes, bytes, int]
        if isinstance(backend, backends.UnixTarget):
            host_b = b"localhost"
            owner = -1 if backend.owner is None else backend.owner
            key = (b"unix:" + backend.path.encode("utf-8", "surrogateescape"), b"", owner)
        else:
            host_b = self._host_bytes(backend.host)
            key = (b"http", host_b, backend.port)
        if has_host is None:
            has_host = any(name.lower() == b"host" for name, _ in request_headers)
        if not has_host:
            authority = b"[%s]" % host_b if b":" in host_b else host_b
            if backend.port != 80 and not isinstance(backend, backends.UnixTarget):
                authority += b":%d" % backend.port
            request_headers = [(b"Host", authority), *request_headers]
        head = request_head(
            method, target, request_headers, length if content is not None else None
        )
        endpoints = self.backends

        def endpoint() -> Any:
            return endpoints.endpoint(backend)

        return self.pool.request(
            key,
            endpoint,
            head,
            content,
            length,
            progress,
            head_only=method == b"HEAD",
            sink=sink,
            receiver=receiver,
        )

    def _host_bytes(self, host: str) -> bytes:
        """The host as the request line's peer wants it (IDNA costs enough to keep answers)."""
        found = self._hosts.get(host)
        if found is None:
            if len(self._hosts) >= HOST_CACHE_SIZE:
                self._hosts.clear()
            found = self._hosts[host] = host.encode() if _is_ipv6(host) else host.encode("idna")
        return found


def _is_ipv6(host: str) -> bool:
    return ":" in host


def _corkable(request: ProxyRequest) -> Any:
    """The client's transport if it can hold writes (the TLS listeners' wrapper), else None."""
    transport = getattr(request.channel, "transport", None)
    return transport if hasattr(transport, "cork") else None


def _spool_length(content: Any) -> int:
    content.seek(0, 2)
    length: int = content.tell()
    content.seek(0)
    return length


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
        # The backend request: a Deferred, or the pool's direct form (_LaneExchange).
        self.pending: Any = None
        self.delivery: _Delivery | None = None
        self.watchdog: Any = None
        self.timed_out = False
        self.client_gone = False
        # True once the backend's response headers (or a failure) arrived. ``pending.called``
        # is not enough: a cancelled Deferred is called too.
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
        # The body is spooled whole, so it goes out with its length, whatever its framing was.
        backend_headers = [(n, v) for n, v in outgoing if n.lower() not in _FRAMING]
        content: Any = None
        length = 0
        if request.requestHeaders.hasHeader(b"content-length") or request.requestHeaders.hasHeader(
            b"transfer-encoding"
        ):
            assert request.content is not None
            content = request.content
            length = _spool_length(content)
        self._progress()
        try:
            self.pending = self.forwarder.backend_request(
                request.method,
                decision,
                self.route.backend_target,
                backend_headers,
                content,
                length,
                self._progress,
                sink=_corkable(request),
                # backend_request_headers puts the client's Host first when there is one.
                has_host=bool(hosts),
            )
        except BadRequestForBackend as e:
            self._bad_request(e)
            return
        self.pending.addCallbacks(self._got_response, self._failed)

    def _bad_request(self, why: BadRequestForBackend) -> None:
        """A method or target that cannot be written into a request line: 400, nothing sent."""
        self._disarm()
        self.settled = True
        self.request.log_info.extra["backend"] = "bad-request"
        pages.write_error(
            self.request,
            400,
            "Bad request",
            f"The request cannot be passed on to a project's server: {why}.",
        )

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
        proxy_hosts = list(self.forwarder.public_hosts)
        proxy_hosts.extend(request.requestHeaders.getRawHeaders(b"host", []))
        outgoing = self._policed_headers(response, proxy_hosts)
        date = request.responseHeaders.getRawHeaders(b"date")
        response_headers = request.responseHeaders = Headers()
        for name, value in outgoing:
            response_headers.addRawHeader(name, value)
        if date and not request.responseHeaders.hasHeader(b"date"):
            request.responseHeaders.setRawHeaders(b"Date", date)
        request.defaultContentType = None
        length = self._content_length(response)
        if length is not None:
            request.responseHeaders.setRawHeaders(b"Content-Length", [length])
        request.setResponseCode(response.code, response.phrase or None)
        self.delivery = _Delivery(self)
        response.deliverBody(self.delivery)

    def _policed_headers(self, response: Any, proxy_hosts: Sequence[bytes]) -> list[Any]:
        """The backend's response headers as the client gets them: its framing dropped (the
        answer is framed again towards the client), the header policy applied."""
        if self.request.method == b"HEAD":
            # The length of what a GET would have sent: a header of the representation.
            kept = [(n, v) for n, v in response.headers if n.lower() != b"transfer-encoding"]
        else:
            kept = [(n, v) for n, v in response.headers if n.lower() not in _FRAMING]
        return headers.client_response_headers(
            kept, route=self.route, project_host=self.project.host, proxy_hosts=proxy_hosts
        )

    def _content_length(self, response: Any) -> bytes | None:
        """The Content-Length the answer is framed with, when its body's length is known."""
        if response.length is None or response.code in (204, 304) or self.request.method == b"HEAD":
            return None
        return b"%d" % response.length

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


class _LaneExchange(_Exchange):
    """``_Exchange`` for a request of the fast lane: the same journey without the steps the
    lane has taken already (the backend policy's decision, body framing) or has no need of
    (Twisted's header objects); failures are answered by ``_Exchange``'s own pages."""

    def start(self) -> None:
        request: Any = self.request
        self.backend = decision = request.lane_target
        request.on_lost = self._client_lost
        channel = request.channel
        outgoing = headers.backend_request_headers(
            request.requestHeaders.raw,
            route=self.route,
            client_ip=str(getattr(channel.peer, "host", "")),
            proto=b"https" if channel.secure else b"http",
            host=request.host,
            strip_authorization=request.authorization_is_proxy_credential,
            identity=request.identity_assertion,
        )
        self._progress()
        try:
            self.pending = self.forwarder.backend_request(
                request.method,
                decision,
                self.route.backend_target,
                outgoing,
                None,
                0,
                self._progress,
                sink=_corkable(request),
                has_host=True,
                receiver=(self._got_response, self._failed),
            )
        except BadRequestForBackend as e:
            self._bad_request(e)
            return

    def _progress(self) -> None:
        """The response timeout on the lane connection's one lazily moved deadline, instead
        of a reactor timer armed, moved and cancelled for every request."""
        if self.settled:
            return
        channel: Any = self.request.channel
        if channel is not None:
            channel.response_deadline(self.forwarder.response_timeout, self._timeout)

    def _disarm(self) -> None:
        channel: Any = self.request.channel
        if channel is not None:
            channel.response_deadline_clear()

    def _got_response(self, response: Any) -> None:
        try:
            self._answer(response)
        except Exception:
            # A fault of ours with the answer half made: nothing sensible can follow on this
            # connection, and it must not wait for a finish that never comes.
            log.failure("answering {uri!r} from its backend failed", uri=self.request.uri)
            response.deliverBody(_Discard())
            channel: Any = self.request.channel
            if channel is not None:
                channel.abort()

    def _answer(self, response: Any) -> None:
        self.settled = True
        self._disarm()
        request: Any = self.request
        if self.client_gone or request._disconnected:
            response.deliverBody(_Discard())
            return
        outgoing = self._policed_headers(response, (*self.forwarder.public_hosts, request.host))
        length = self._content_length(response)
        if length is not None:
            outgoing.append((b"Content-Length", length))
        request.set_proxied_head(response.code, response.phrase or None, outgoing)
        self.delivery = _Delivery(self)
        response.deliverBody(self.delivery)


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
