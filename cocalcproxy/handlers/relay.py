"""The WebSocket relay: check, forward the handshake, and splice bytes only after a real 101.

A request reaches :meth:`Relay.handle` already authorised (site.Root dispatches ``Upgrade:
websocket`` requests here after the guard). The relay

1. refuses cross-site requests (an ``Origin`` that is present and is not the proxy's own) and
   malformed handshakes before anything touches a backend;
2. connects to the project's host and the route's port and sends the handshake with the shared
   header policy (headers.py);
3. reads the backend's answer with h11. Only a ``101`` whose ``Sec-WebSocket-Accept`` matches the
   client's key turns into a relay; anything else is passed back as an ordinary HTTP response and
   the client connection stays HTTP;
4. after the 101, takes the client connection over from Twisted (takeover.py) and copies bytes,
   not frames, both ways with flow control, an idle timeout, and a cut on revocation. When the
   proxy itself ends a relay (shutdown, idle, revocation) it sends each side a Close frame
   (1001 going away, 1008 revoked) if that side's stream is between frames (FrameBoundary).

Open relays are registered so shutdown can close them (:meth:`Relay.close_all`) and metrics can
count them (:meth:`Relay.open_count`).
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
from collections.abc import Sequence
from typing import Any

import h11
from twisted.internet import defer, error
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from cocalcproxy import pages
from cocalcproxy.handlers import backendio, backends, socketdir
from cocalcproxy.http import headers, routing, takeover
from cocalcproxy.http.site import Access, ProxyRequest

# The namespace operators see in log lines (kept from before the package layout).
log = Logger(namespace="cocalcproxy.relay")

WEBSOCKET_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
#: Largest response head accepted from a backend.
MAX_RESPONSE_HEAD = 64 * 1024
#: Seconds a closing side may take to flush before its connection is aborted.
CLOSE_GRACE = 15.0

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


class FrameBoundary:
    """Follows one direction of a WebSocket byte stream just far enough to know where frames end.

    The relay copies bytes, not frames; this only lets it add a Close frame of its own when it
    ends a relay (shutdown, revocation, idle) without cutting into a frame in flight. Payloads
    are skipped, never looked at, so permessage-deflate and fragmentation make no difference.
    """

    def __init__(self) -> None:
        self._header = bytearray()
        self._remaining = 0

    @property
    def at_boundary(self) -> bool:
        return not self._header and self._remaining == 0

    def _header_size(self) -> int | None:
        if len(self._header) < 2:
            return None
        second = self._header[1]
        length = second & 0x7F
        extended = 2 if length == 126 else 8 if length == 127 else 0
        return 2 + extended + (4 if second & 0x80 else 0)

    def feed(self, data: bytes) -> None:
        i, n = 0, len(data)
        while i < n:
            if self._remaining:
                step = min(self._remaining, n - i)
                self._remaining -= step
                i += step
                continue
            size = self._header_size()
            want = (size if size is not None else 2) - len(self._header)
            self._header += data[i : i + want]
            i += min(want, n - i)
            size = self._header_size()
            if size is None or len(self._header) < size:
                continue
            length = self._header[1] & 0x7F
            if length == 126:
                length = int.from_bytes(self._header[2:4], "big")
            elif length == 127:
                length = int.from_bytes(self._header[2:10], "big")
            self._header.clear()
            self._remaining = length


def close_frame(code: int, reason: str, masked: bool) -> bytes:
    """A Close frame (RFC 6455 section 5.5.1); ``masked`` for frames sent to a server."""
    payload = code.to_bytes(2, "big") + reason.encode()[:120]
    if not masked:
        return bytes([0x88, len(payload)]) + payload
    key = os.urandom(4)
    return (
        bytes([0x88, 0x80 | len(payload)])
        + key
        + bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    )


#: Close codes the proxy sends when it ends a relay itself.
GOING_AWAY = 1001
POLICY_VIOLATION = 1008


# --- the relay --------------------------------------------------------------------------------


class Relay:
    """The handler for WebSocket upgrade requests; one per proxy."""

    def __init__(
        self,
        reactor: Any,
        *,
        connect_timeout: float = 10.0,
        response_timeout: float = 300.0,
        idle_timeout: float = 3600.0,
        public_hostname: str | None = None,
        clock: Any = None,
        backends: backendio.Backends | None = None,
    ) -> None:
        self.reactor = reactor
        self.backends = (
            backends
            if backends is not None
            else backendio.Backends(reactor, connect_timeout=connect_timeout)
        )
        # Timeouts run on ``clock`` (the reactor unless a test injects a task.Clock).
        self.clock = reactor if clock is None else clock
        self.connect_timeout = connect_timeout
        self.response_timeout = response_timeout
        self.idle_timeout = idle_timeout
        self.public_hostname = public_hostname
        self._pending: set[_Handshake] = set()
        self._open: set[Splice] = set()
        self._closing = False
        self.opened_total = 0

    def open_count(self) -> int:
        """Relays currently splicing (for metrics)."""
        return len(self._open)

    @property
    def open_relays(self) -> frozenset[Splice]:
        return frozenset(self._open)

    def handle(self, request: ProxyRequest, route: routing.Route, access: Access) -> None:
        refusal = handshake_refusal(request)
        if refusal is not None:
            pages.write_error(request, *refusal)
            return
        if self._closing:
            pages.write_error(request, 503, "Service unavailable", "The proxy is shutting down.")
            return
        if access.revoked or route.port is None:
            pages.not_found(request)
            return
        decision = self.backends.decide(route, access.project)
        if isinstance(decision, backends.Refused):
            backendio.refuse(request, decision)
            return
        handshake = _Handshake(self, request, route, access, decision)
        self._pending.add(handshake)
        handshake.start()

    def close_all(self) -> defer.Deferred[None]:
        """Refuse new relays, abandon handshakes in progress, close every open relay.

        Fires when every relay's connections are gone (at most ``CLOSE_GRACE`` seconds later).
        """
        self._closing = True
        for handshake in list(self._pending):
            handshake.abandon(503, "Service unavailable", "The proxy is shutting down.")
        waits = [splice.close("proxy shutting down") for splice in list(self._open)]
        return defer.DeferredList(waits, consumeErrors=True).addCallback(lambda _: None)


@implementer(IHalfCloseableProtocol)
class _BackendProtocol(Protocol):
    """The backend connection; its events go to the handshake, then to the splice."""

    def __init__(self, handshake: _Handshake) -> None:
        self.handshake = handshake
        self.splice: Splice | None = None

    @property
    def wire(self) -> Any:
        """The backend transport (untyped: Twisted's transports provide more than ITransport)."""
        return self.transport

    def connectionMade(self) -> None:  # noqa: N802
        self.handshake.backend_connected(self)

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        if self.splice is not None:
            self.splice.backend_data(data)
        else:
            self.handshake.backend_data(data)

    def readConnectionLost(self) -> None:  # noqa: N802
        if self.splice is not None:
            self.splice.backend_eof()
        else:
            self.handshake.backend_eof()

    def writeConnectionLost(self) -> None:  # noqa: N802
        pass

    def connectionLost(self, reason: Failure = connectionDone) -> None:  # noqa: N802
        if self.splice is not None:
            self.splice.backend_lost(reason)
        else:
            self.handshake.backend_eof()


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
        request.notifyFinish().addErrback(self._client_gone)
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
        splice.start(taken, b"".join(head), trailing, closed)

    # -- endings

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


def _quiet_factory(protocol: _BackendProtocol) -> Any:
    """A one-connection factory, like ``connectProtocol``'s but not ``noisy``: Twisted would log
    "Starting factory" and "Stopping factory" for every backend WebSocket connection."""
    factory: Factory[_BackendProtocol] = Factory.forProtocol(lambda: protocol)
    factory.noisy = False
    return factory


def _peer_ip(request: ProxyRequest) -> str:
    peer = request.getClientAddress()
    host = getattr(peer, "host", None)
    return host if isinstance(host, str) else "unknown"


# --- the splice -------------------------------------------------------------------------------


@implementer(IPushProducer)
class _Valve:
    """One side's reading, paused by the other side's transport when its write buffer is full."""

    def __init__(self, transport: Any) -> None:
        self.transport = transport
        self.paused = False
        self.pauses = 0

    def pauseProducing(self) -> None:  # noqa: N802
        if not self.paused:
            self.paused = True
            self.pauses += 1
            self.transport.pauseProducing()

    def resumeProducing(self) -> None:  # noqa: N802
        if self.paused:
            self.paused = False
            self.transport.resumeProducing()

    def stopProducing(self) -> None:  # noqa: N802
        """The consumer went away; the splice ends both sides itself."""


class Splice:
    """A relay after the 101: bytes both ways until either side ends, idles or is revoked."""

    def __init__(
        self,
        relay: Relay,
        access: Access,
        backend: _BackendProtocol,
        request: ProxyRequest | None = None,
    ) -> None:
        self.relay = relay
        self.request = request
        self.reactor = relay.clock
        self.access = access
        self.backend = backend
        self.client: Any = None
        self.client_reading: _Valve | None = None
        self.backend_reading: _Valve | None = None
        self.bytes_up = 0
        self.bytes_down = 0
        self.last_activity = self.reactor.seconds()
        self.ending: str | None = None
        self.client_done = False
        self.backend_done = False
        self._idle_call: Any = None
        self._abort_call: Any = None
        self._cancel_revocation: Any = None
        self._finished: list[defer.Deferred[None]] = []
        self.up_frames = FrameBoundary()
        self.down_frames = FrameBoundary()

    def start(
        self,
        taken: takeover.TakenConnection,
        head: bytes,
        backend_bytes: bytes,
        backend_closed: bool,
    ) -> None:
        client: Any = taken.transport
        self.client = client
        backend = self.backend.wire
        self.client_reading = _Valve(client)
        self.backend_reading = _Valve(backend)
        client.registerProducer(self.backend_reading, True)
        backend.registerProducer(self.client_reading, True)
        self.relay._open.add(self)
        self.relay.opened_total += 1
        self._idle_call = self.reactor.callLater(self.relay.idle_timeout, self._check_idle)
        client.write(head)
        if backend_bytes:
            self.backend_data(backend_bytes)
        if taken.buffered:
            self.client_data(taken.buffered)
        if backend_closed:
            self._end("backend closed")
        self._cancel_revocation = self.access.on_revoked(
            lambda: self._end("access revoked", POLICY_VIOLATION)
        )

    @property
    def client_paused(self) -> bool:
        """Is the proxy not reading from the client (the backend is not keeping up)?"""
        return self.client_reading is not None and self.client_reading.paused

    @property
    def backend_paused(self) -> bool:
        """Is the proxy not reading from the backend (the client is not keeping up)?"""
        return self.backend_reading is not None and self.backend_reading.paused

    # -- traffic

    def client_data(self, data: bytes) -> None:
        if self.ending is not None:
            return
        self.last_activity = self.reactor.seconds()
        self.bytes_up += len(data)
        self.up_frames.feed(data)
        self.backend.wire.write(data)

    def backend_data(self, data: bytes) -> None:
        if self.ending is not None:
            return
        self.last_activity = self.reactor.seconds()
        self.bytes_down += len(data)
        self.down_frames.feed(data)
        self.client.write(data)

    def _check_idle(self) -> None:
        self._idle_call = None
        if self.ending is not None:
            return
        quiet = self.reactor.seconds() - self.last_activity
        if quiet >= self.relay.idle_timeout:
            self._end("idle timeout", GOING_AWAY)
        else:
            self._idle_call = self.reactor.callLater(
                self.relay.idle_timeout - quiet, self._check_idle
            )

    # -- endings

    def backend_eof(self) -> None:
        self._end("backend closed")

    def backend_lost(self, reason: Failure) -> None:
        self.backend_done = True
        self._end("backend closed")
        self._maybe_finished()

    def client_lost(self, reason: Failure) -> None:
        # The request ends right after this (takeover.py): give the access log the byte counts.
        if self.request is not None:
            self.request.log_info.bytes_in += self.bytes_up
            self.request.log_info.bytes_out += self.bytes_down
            self.request.log_info.extra["websocket_end"] = self.ending or "client closed"
        self.client_done = True
        self._end("client closed")
        self._maybe_finished()

    def close(
        self, why: str = "closed by the proxy", code: int = GOING_AWAY
    ) -> defer.Deferred[None]:
        """End both sides cleanly (a Close frame with ``code`` to each side between frames);
        fires when both connections are gone."""
        d: defer.Deferred[None] = defer.Deferred()
        if self.client_done and self.backend_done:
            d.callback(None)
            return d
        self._finished.append(d)
        self._end(why, code)
        return d

    def _end(self, why: str, code: int | None = None) -> None:
        """End both sides. With ``code`` the proxy itself ends the relay and tells each side
        with a Close frame, where that side's stream is between frames."""
        if self.ending is not None:
            return
        self.ending = why
        log.debug("WebSocket relay ending: {why}", why=why)
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.cancel()
        self._idle_call = None
        if self._cancel_revocation is not None:
            self._cancel_revocation()
            self._cancel_revocation = None
        client, backend = self.client, self.backend.wire
        # Producers first: a transport with a paused producer would wait for it before closing.
        if client is not None:
            client.unregisterProducer()
        if backend is not None:
            backend.unregisterProducer()
        if code is not None:
            if not self.backend_done and backend is not None and self.up_frames.at_boundary:
                backend.write(close_frame(code, why, masked=True))
            if not self.client_done and client is not None and self.down_frames.at_boundary:
                client.write(close_frame(code, why, masked=False))
        if not self.backend_done and backend is not None:
            backend.loseConnection()
        if not self.client_done and client is not None:
            assert self.client_reading is not None
            self.client_reading.resumeProducing()  # let a TLS peer's close_notify in
            client.loseConnection()
        if not (self.client_done and self.backend_done):
            self._abort_call = self.reactor.callLater(CLOSE_GRACE, self._abort)

    def _abort(self) -> None:
        self._abort_call = None
        if not self.backend_done and self.backend.wire is not None:
            self.backend.wire.abortConnection()
        if not self.client_done and self.client is not None:
            self.client.abortConnection()

    def _maybe_finished(self) -> None:
        if not (self.client_done and self.backend_done):
            return
        if self._abort_call is not None and self._abort_call.active():
            self._abort_call.cancel()
        self._abort_call = None
        self.relay._open.discard(self)
        waiters, self._finished = self._finished, []
        for d in waiters:
            d.callback(None)
