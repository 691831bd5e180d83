"""The WebSocket handshake: the pure checks, and one upgrade request from connect to 101.

The pure part (:func:`accept_for`, :func:`origin_allowed`, :func:`switch_is_valid`,
:func:`handshake_refusal`) needs no reactor. ``_Handshake`` connects to the backend, sends the
handshake with the shared header policy (http.headers), reads the answer with h11, and either
hands the connection to a :class:`~cocalcproxy.handlers.relay.splice.Splice` after a real 101
or passes the answer back as ordinary HTTP.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import h11
from twisted.internet import defer, error
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from cocalcproxy import pages
from cocalcproxy.handlers import backendio, backends, socketdir
from cocalcproxy.handlers.relay.splice import Splice
from cocalcproxy.http import headers, routing, takeover
from cocalcproxy.http.site import Access, ProxyRequest

if TYPE_CHECKING:
    from cocalcproxy.handlers.relay import Relay

# The namespace operators see in log lines (kept from before the package layout).
log = Logger(namespace="cocalcproxy.relay")

WEBSOCKET_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
#: Largest response head accepted from a backend.
MAX_RESPONSE_HEAD = 64 * 1024

_HOST = re.compile(
    r"(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9._~!$&'()*+,;=-]*))(?::(?P<port>[0-9]{1,5}))?"
)
_DEFAULT_PORTS = {"http": 80, "https": 443}

Origin = tuple[str, str, int]


# --- pure checks ------------------------------------------------------------------------------


def accept_for(key: bytes) -> bytes:
    """The ``Sec-WebSocket-Accept`` a server must answer to ``key`` (RFC 6455 section 4.2.2)."""
    return base64.b64encode(hashlib.sha1(key.strip() + WEBSOCKET_GUID).digest())  # noqa: S324 (RFC 6455)


def _authority(scheme: str, text: str) -> Origin | None:
    m = _HOST.fullmatch(text)
    if m is None:
        return None
    port_s = m.group("port")
    if port_s is None:
        port = _DEFAULT_PORTS[scheme]
    else:
        if port_s.startswith("0") and port_s != "0":
            return None
        port = int(port_s)
        if not 0 < port <= 65535:
            return None
    return scheme, m.group("host").lower(), port


def parse_origin(value: bytes) -> Origin | None:
    """(scheme, lower-case host, port) of a serialised origin; None if it is not one."""
    try:
        text = value.decode("ascii")
    except UnicodeDecodeError:
        return None
    scheme, sep, rest = text.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in _DEFAULT_PORTS:
        return None
    return _authority(scheme, rest)


def own_origin(host: bytes | None, secure: bool) -> Origin | None:
    """The origin the client reached the proxy at: its Host header on this connection's scheme."""
    if host is None:
        return None
    try:
        text = host.decode("ascii")
    except UnicodeDecodeError:
        return None
    return _authority("https" if secure else "http", text)


def origin_allowed(origins: Sequence[bytes], host: bytes | None, secure: bool) -> bool:
    """True when no Origin was sent (not a browser) or it is exactly the proxy's own origin.

    In subdomain mode the Host is the project's own subdomain, so that origin is the allowed one.
    """
    if not origins:
        return True
    if len(origins) > 1:
        return False
    theirs = parse_origin(origins[0])
    ours = own_origin(host, secure)
    return theirs is not None and theirs == ours


def _tokens(values: list[bytes]) -> set[bytes]:
    return {t.strip().lower() for v in values for t in v.split(b",") if t.strip()}


def switch_is_valid(status: int, response_headers: list[tuple[bytes, bytes]], key: bytes) -> bool:
    """Is this backend answer a real WebSocket switch for ``key``?"""
    if status != 101:
        return False

    def values(name: bytes) -> list[bytes]:
        return [v for n, v in response_headers if n.lower() == name]

    accepts = values(b"sec-websocket-accept")
    return (
        b"websocket" in _tokens(values(b"upgrade"))
        and b"upgrade" in _tokens(values(b"connection"))
        and len(accepts) == 1
        and accepts[0].strip() == accept_for(key)
    )


def handshake_refusal(request: ProxyRequest) -> tuple[int, str, str] | None:
    """Why this upgrade request must not reach a backend, as (status, title, detail); or None."""
    h = request.requestHeaders
    origins = h.getRawHeaders(b"origin", [])
    hosts = h.getRawHeaders(b"host", [])
    if not origin_allowed(origins, hosts[0] if len(hosts) == 1 else None, request.isSecure()):
        return (
            403,
            "Cross-origin WebSocket refused",
            "This WebSocket was opened by a page from another site.",
        )
    if request.method != b"GET" or request.clientproto != b"HTTP/1.1":
        return 400, "Bad request", "A WebSocket handshake is an HTTP/1.1 GET request."
    if len(hosts) != 1:
        return 400, "Bad request", "A WebSocket handshake needs exactly one Host header."
    lengths = h.getRawHeaders(b"content-length", [])
    if h.hasHeader(b"transfer-encoding") or any(v.strip() != b"0" for v in lengths):
        return 400, "Bad request", "A WebSocket handshake has no request body."
    if len(h.getRawHeaders(b"sec-websocket-key", [])) != 1:
        return 400, "Bad request", "A WebSocket handshake needs one Sec-WebSocket-Key header."
    return None


@implementer(IHalfCloseableProtocol)
class _BackendProtocol(Protocol):
    """The backend connection; its events go to the handshake, then to the splice.

    Once spliced it forgets the handshake (its h11 state, the request's headers): a relay may
    stay open for hours."""

    def __init__(self, handshake: _Handshake) -> None:
        self.handshake: _Handshake | None = handshake
        self.splice: Splice | None = None

    @property
    def wire(self) -> Any:
        """The backend transport (untyped: Twisted's transports provide more than ITransport)."""
        return self.transport

    def connectionMade(self) -> None:  # noqa: N802
        if self.handshake is not None:
            self.handshake.backend_connected(self)

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        if self.splice is not None:
            self.splice.backend_data(data)
        elif self.handshake is not None:
            self.handshake.backend_data(data)

    def readConnectionLost(self) -> None:  # noqa: N802
        if self.splice is not None:
            self.splice.backend_eof()
        elif self.handshake is not None:
            self.handshake.backend_eof()

    def writeConnectionLost(self) -> None:  # noqa: N802
        pass

    def connectionLost(self, reason: Failure = connectionDone) -> None:  # noqa: N802
        if self.splice is not None:
            self.splice.backend_lost(reason)
        elif self.handshake is not None:
            self.handshake.backend_eof()


class _ClientWatch:
    """Tells a handshake that its client went away, until the handshake no longer cares: the
    request's ``notifyFinish`` keeps this (not the handshake) until the relay ends."""

    __slots__ = ("handshake",)

    def __init__(self, handshake: _Handshake) -> None:
        self.handshake: _Handshake | None = handshake

    def gone(self, failure: Failure) -> None:
        handshake, self.handshake = self.handshake, None
        if handshake is not None:
            handshake._client_gone(failure)


class _Handshake:
    """One upgrade request from connect to 101 (then a Splice) or to an ordinary HTTP answer."""

    def __init__(
        self,
        relay: Relay,
        request: ProxyRequest,
        route: routing.Route,
        access: Access,
        target: backends.Target,
    ) -> None:
        self.relay = relay
        self.request = request
        self.route = route
        self.access = access
        self.target = target
        self.key = request.requestHeaders.getRawHeaders(b"sec-websocket-key", [b""])[0]
        self.conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_RESPONSE_HEAD)
        self.backend: _BackendProtocol | None = None
        self.phase = "connecting"  # -> waiting -> (response | spliced) ; or done
        self._connecting: defer.Deferred[Any] | None = None
        self._timer: Any = None
        self._head = b""
        self._watch = _ClientWatch(self)
        self._watching: defer.Deferred[None] | None = None

    # -- start

    def start(self) -> None:
        request = self.request
        hosts = request.requestHeaders.getRawHeaders(b"host", [])
        client_headers = [
            (name, value)
            for name, values in request.requestHeaders.getAllRawHeaders()
            for value in values
        ]
        outgoing = headers.backend_request_headers(
            client_headers,
            route=self.route,
            client_ip=_peer_ip(request),
            proto=b"https" if request.isSecure() else b"http",
            host=hosts[0] if hosts else None,
            strip_authorization=request.authorization_is_proxy_credential,
            websocket=True,
            identity=request.identity_assertion,
        )
        try:
            self._head = self.conn.send(
                h11.Request(method=b"GET", target=self.route.backend_target, headers=outgoing)
            )
            self._head += self.conn.send(h11.EndOfMessage())
        except h11.LocalProtocolError:
            self._fail(400, "Bad request", "The handshake cannot be forwarded as it was sent.")
            return
        self._watching = request.notifyFinish().addErrback(self._watch.gone)
        endpoint = self.relay.backends.endpoint(self.target)
        d = endpoint.connect(_quiet_factory(_BackendProtocol(self)))
        d.addTimeout(self.relay.connect_timeout, self.relay.clock)
        self._connecting = d
        d.addErrback(self._connect_failed)

    def _connect_failed(self, failure: Failure) -> None:
        self._connecting = None
        if self.phase != "connecting":
            return
        port = self.route.port
        if isinstance(failure.value, backendio.BackendRefused):
            self._done_without_backend()
            backendio.refuse(self.request, failure.value.refusal)
            return
        if isinstance(failure.value, socketdir.SocketRefused):
            self._done_without_backend()
            socketdir.write_refused(self.request, failure.value, port=port)
            return
        if isinstance(self.target, backends.UnixTarget) and failure.check(error.ConnectError):
            self._done_without_backend()
            socketdir.write_not_listening(self.request, self.target, port=port)
            return
        if failure.check(
            defer.TimeoutError,
            error.TimeoutError,
            defer.CancelledError,
            error.ConnectingCancelledError,
        ):
            self._fail(
                504,
                "Gateway timeout",
                f"The server on port {port} of this project did not accept a connection in time.",
                backend="connect-timeout",
                port=port,
            )
            return
        self._fail(
            502,
            "Bad gateway",
            f"Nothing answered on port {port} of this project. The server there must listen on "
            "all addresses (for example --bind 0.0.0.0 or --ip=0.0.0.0), not only on localhost.",
            backend="refused",
            port=port,
        )

    def _done_without_backend(self) -> None:
        self.phase = "done"
        self.relay._pending.discard(self)
        self._cancel_timer()

    def backend_connected(self, backend: _BackendProtocol) -> None:
        self._connecting = None
        self.backend = backend
        if self.phase != "connecting":
            backend.wire.abortConnection()
            return
        self.phase = "waiting"
        backend.wire.write(self._head)
        self._timer = self.relay.clock.callLater(self.relay.response_timeout, self._timed_out)

    def _timed_out(self) -> None:
        self._timer = None
        if self.phase == "waiting":
            port = self.route.port
            self._fail(
                504,
                "Gateway timeout",
                f"The server on port {port} of this project did not answer in time.",
                backend="response-timeout",
                port=port,
            )

    # -- backend answer

    def backend_data(self, data: bytes) -> None:
        if self.phase not in ("waiting", "response"):
            return
        self.conn.receive_data(data)
        self._pump()

    def backend_eof(self) -> None:
        if self.phase not in ("waiting", "response"):
            return
        self.conn.receive_data(b"")
        self._pump()
        if self.phase == "waiting":
            self._fail(
                502,
                "Bad gateway",
                f"The server on port {self.route.port} closed the connection without answering.",
                backend="no-response",
            )

    def _pump(self) -> None:
        while self.phase in ("waiting", "response"):
            try:
                event = self.conn.next_event()
            except h11.RemoteProtocolError:
                self._broken()
                return
            if event is h11.NEED_DATA:
                return
            if event is h11.PAUSED:
                self._switch()
                return
            if isinstance(event, h11.InformationalResponse):
                if event.status_code == 101:
                    self._cancel_timer()
                    if not switch_is_valid(101, list(event.headers.raw_items()), self.key):
                        self._fail(
                            502,
                            "Bad gateway",
                            f"The server on port {self.route.port} answered the WebSocket "
                            "handshake incorrectly.",
                            backend="error",
                        )
                        return
                    self._switch_event = event
            elif isinstance(event, h11.Response):
                self._cancel_timer()
                self._start_response(event)
            elif isinstance(event, h11.Data):
                if not self.request._disconnected:
                    self.request.write(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                self._end_response()
                return
            else:
                return

    def _broken(self) -> None:
        if self.phase == "waiting":
            self._fail(
                502,
                "Bad gateway",
                f"The server on port {self.route.port} sent an invalid HTTP response.",
                backend="error",
            )
        elif self.phase == "response":
            # Never let a broken body look complete: cut the client connection.
            self.phase = "done"
            self._drop_backend()
            transport = self.request.channel.transport
            if transport is not None:
                transport.abortConnection()
            self.relay._pending.discard(self)

    # -- an ordinary HTTP answer

    def _start_response(self, event: h11.Response) -> None:
        self.phase = "response"
        request = self.request
        if request._disconnected:
            return
        request.setResponseCode(event.status_code, bytes(event.reason) or None)
        hosts = request.requestHeaders.getRawHeaders(b"host", [])
        proxy_hosts = list(hosts)
        if self.relay.public_hostname:
            proxy_hosts.append(self.relay.public_hostname.encode("idna"))
        for name, value in headers.client_response_headers(
            list(event.headers.raw_items()),
            route=self.route,
            project_host=self.access.project.host,
            proxy_hosts=proxy_hosts,
        ):
            request.responseHeaders.addRawHeader(name, value)
        assert self.backend is not None
        request.registerProducer(self.backend.wire, True)

    def _end_response(self) -> None:
        self.phase = "done"
        self.relay._pending.discard(self)
        request = self.request
        self._drop_backend(abort=False)
        if not request._disconnected and not request.finished:
            request.unregisterProducer()
            request.finish()

    # -- the switch

    def _switch(self) -> None:
        assert self.backend is not None
        self.relay._pending.discard(self)
        event: h11.InformationalResponse = self._switch_event
        trailing, closed = self.conn.trailing_data
        splice = Splice(self.relay, self.access, self.backend, self.request)
        try:
            taken = takeover.take_over(self.request, splice.client_data, splice.client_lost)
        except takeover.ConnectionGone:
            self.phase = "done"
            self._drop_backend()
            return
        except takeover.TakeoverUnsupported as e:
            log.error("cannot relay a WebSocket: {why}", why=str(e))
            self._fail(502, "Bad gateway", "This connection cannot carry a WebSocket relay.")
            return
        self.phase = "spliced"
        self.request.setResponseCode(101)
        self.request.shed_http_state()
        response_headers = headers.client_response_headers(
            list(event.headers.raw_items()),
            route=self.route,
            project_host=self.access.project.host,
            websocket=True,
        )
        head = [b"HTTP/1.1 101 Switching Protocols\r\n"]
        for name, value in response_headers:
            head.append(name + b": " + value + b"\r\n")
        head.append(b"\r\n")
        self.backend.splice = splice
        self.backend.handshake = None
        self._watch.handshake = None
        self._stop_watching()
        splice.start(taken, b"".join(head), trailing, closed)

    # -- endings

    def _stop_watching(self) -> None:
        """The request's notifyFinish keeps the relay's waiter only: this one's is dropped
        (Twisted fires ``request.notifications`` in turn, nothing else holds them)."""
        watching, self._watching = self._watching, None
        notifications = getattr(self.request, "notifications", None)
        if watching is not None and isinstance(notifications, list) and watching in notifications:
            notifications.remove(watching)

    def _client_gone(self, failure: Failure) -> None:
        if self.phase in ("spliced", "done"):
            return
        self.phase = "done"
        self.relay._pending.discard(self)
        self._cancel_timer()
        self._drop_backend()

    def abandon(self, status: int, title: str, detail: str) -> None:
        """Give up on this handshake (shutdown): answer the client if it still waits."""
        if self.phase in ("connecting", "waiting"):
            self._fail(status, title, detail)
        elif self.phase == "response":
            self._broken()

    def _fail(
        self, status: int, title: str, detail: str, backend: str | None = None, **facts: object
    ) -> None:
        """Answer with an error page; ``backend`` names a backend failure for the metrics."""
        if backend is not None:
            self.request.log_info.extra["backend"] = backend
        self.phase = "done"
        self.relay._pending.discard(self)
        self._cancel_timer()
        self._drop_backend()
        request = self.request
        if not request._disconnected and not request.finished and not request.startedWriting:
            pages.write_error(request, status, title, detail, **facts)

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _drop_backend(self, abort: bool = True) -> None:
        if self._connecting is not None:
            d, self._connecting = self._connecting, None
            d.cancel()
        if self.backend is not None and self.backend.wire is not None:
            if abort:
                self.backend.wire.abortConnection()
            else:
                self.backend.wire.loseConnection()


class _OneConnection(Factory):
    """A one-connection factory, like ``connectProtocol``'s but not ``noisy`` (Twisted would log
    "Starting factory" and "Stopping factory" for every backend WebSocket connection), and
    holding its protocol itself rather than through a closure: it lives as long as the relay."""

    noisy = False

    def __init__(self, protocol: _BackendProtocol) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: object) -> _BackendProtocol:  # noqa: N802
        self._protocol.factory = self
        return self._protocol


def _quiet_factory(protocol: _BackendProtocol) -> Any:
    return _OneConnection(protocol)


def _peer_ip(request: ProxyRequest) -> str:
    peer = request.getClientAddress()
    host = getattr(peer, "host", None)
    return host if isinstance(host, str) else "unknown"
