"""The HTTP face: the Site, its Request class, and the root that routes every request.

The flow is one way: routing.parse -> own page | guard.authorize -> handler. A handler gets an
already-authorised Route, Project and Account and never parses URLs or looks at credentials.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

from twisted.internet import interfaces
from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, resource, server
from twisted.web.http import HTTPChannel
from twisted.web.http_headers import Headers

from cocalcproxy import pages
from cocalcproxy.directory import Account, Project
from cocalcproxy.directory.model import Unavailable
from cocalcproxy.http import headers as headers_module
from cocalcproxy.http import prebody, routing, takeover
from cocalcproxy.http.bannerless import BannerlessRequest

# The namespace operators see in log lines (kept from before the package layout).
log = Logger(namespace="cocalcproxy.site")
_gate_log = Logger(namespace="cocalcproxy.prebody")


@dataclass(eq=False, slots=True, weakref_slot=True)
class Access:
    """An authorised request: who asked and which project they may reach.

    Long-lived users of an Access (WebSocket relays) register ``on_revoked`` callbacks; the guard
    calls ``revoke()`` when the account, its session or token, or its place on the project is
    withdrawn, so open connections are cut within the guard's polling interval.
    """

    account: Account
    project: Project
    #: Set (``link`` or ``public``) when the request came in through a shared port rather than
    #: as a member: no account, no member rights (guard/shares.py).
    share: str | None = field(default=None, kw_only=True)
    _revoked_callbacks: list[Callable[[], None]] = field(default_factory=list, repr=False)
    revoked: bool = False

    def on_revoked(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` once when access is withdrawn; returns a function that cancels."""
        if self.revoked:
            callback()
            return lambda: None
        self._revoked_callbacks.append(callback)
        # A partial, not a closure: a relay keeps it for as long as it is open.
        return partial(self._forget, callback)

    def _forget(self, callback: Callable[[], None]) -> None:
        if callback in self._revoked_callbacks:
            self._revoked_callbacks.remove(callback)

    @property
    def watched(self) -> bool:
        return bool(self._revoked_callbacks)

    def revoke(self) -> None:
        if self.revoked:
            return
        self.revoked = True
        callbacks, self._revoked_callbacks = self._revoked_callbacks, []
        for callback in callbacks:
            try:
                callback()
            except Exception:
                log.failure("revocation callback failed")


class Guard(Protocol):
    def authorize(self, request: ProxyRequest, route: routing.Route) -> Deferred[Access | None]:
        """Fire with Access, or with None after the guard has itself answered (302/401/404)."""
        ...


class Handler(Protocol):
    def handle(self, request: ProxyRequest, route: routing.Route, access: Access) -> None:
        """Take over the request and finish it (or hand the connection to a relay)."""
        ...


class OwnPages(Protocol):
    def handle(self, request: ProxyRequest, page: routing.OwnPage) -> None: ...


@dataclass(slots=True)
class LogInfo:
    """Facts the access log records; filled in as the request travels (slotted: an open
    relay's request keeps its own until the end)."""

    account: str | None = None
    project: str | None = None
    form: str | None = None
    port: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # Set when the site starts handling the request (reactor.seconds()).
    started: float | None = None
    # Body bytes received; a relay adds what it splices outside request.write to both counts.
    bytes_in: int = 0
    bytes_out: int = 0


#: The attributes of a request that anything reads after its connection was taken over:
#: Twisted's (``Request.connectionLost``, ``getClientAddress``) and the access log's (facts_of).
_KEPT_AFTER_TAKEOVER = (
    "notifications",
    "channel",
    "transport",
    "site",
    "client",
    "method",
    "uri",
    "path",
    "clientproto",
    "code",
    "code_message",
    "finished",
    "startedWriting",
    "sentLength",
    "_disconnected",
    "log_info",
)


class ProxyRequest(BannerlessRequest):
    """A Request that carries access-log facts and knows whether it is on TLS."""

    def __init__(self, channel: HTTPChannel, queued: object = None) -> None:
        # Never let Twisted parse a POST body into request.args: it reads a whole urlencoded or
        # multipart body into memory (and answers 400 itself for multipart it cannot parse)
        # before any guard runs. Bodies are passed on, or read by the page that wants them.
        super().__init__(channel, parsePOSTFormSubmission=False)
        self.log_info = LogInfo()
        # Set by the guard when the Authorization header carried the proxy's own credentials, so
        # the header policy removes it before anything goes to a backend.
        self.authorization_is_proxy_credential = False
        # The guard's decision when it was taken on the headers, before the body (prebody).
        self.early_access: tuple[routing.Route, Access] | None = None
        # The signed X-Cocalcproxy-Identity for the backend (--identity-assertion), set by Root.
        self.identity_assertion: bytes | None = None
        self._gate: BodyGate | None = None
        self.site_started = False

    def notifyFinishOrNone(self) -> Deferred[None]:  # noqa: N802
        return self.notifyFinish()

    def shed_http_state(self) -> None:
        """Keep only what is read once the connection has been taken over (a WebSocket relay,
        which may stay open for hours) until it ends: the access log's facts (``Host`` alone
        of the request's headers), the ``notifyFinish`` waiters, the status. Twisted's
        request holds some thirty attributes (headers, cookies, paths, a body spool) in a
        dictionary sized for them: about 3 KiB an open WebSocket would keep for nothing."""
        if self.content is not None:
            self.content.close()
        hosts = self.requestHeaders.getRawHeaders(b"host")
        state = vars(self)
        # A new dictionary, sized for what is left (deleting keys would not shrink the old one).
        self.__dict__ = {name: state[name] for name in _KEPT_AFTER_TAKEOVER if name in state}
        self.requestHeaders = Headers({b"host": hosts} if hosts else None)
        self.responseHeaders = Headers()

    def write(self, data: bytes) -> None:
        if not self.startedWriting:
            self._set_transport_security()
            self._say_if_closing()
            # Twisted writes the head and the first body bytes separately: on a TLS listener
            # they are held and leave as one record and one send (ops.tls.LeanTLSProtocol).
            transport = getattr(self.channel, "transport", None)
            if getattr(transport, "corked", True) is False:
                transport.cork()  # type: ignore[union-attr]
                try:
                    super().write(data)
                finally:
                    transport.uncork()  # type: ignore[union-attr]
                return
        super().write(data)

    def _say_if_closing(self) -> None:
        """``Connection: close`` on every answer after which this connection closes: the request
        said ``Connection: close``, it was HTTP/1.0 (never kept alive), or the proxy decided to
        close (a refused body, shutdown), so clients and load balancers do not reuse it. This is
        the one place: answers whose headers were replaced (the forwarder puts the backend's,
        policed, in their place) get it too."""
        if self.clientproto not in (b"HTTP/1.0", b"HTTP/1.1") or self.code == 101:
            return
        if not getattr(self.channel, "persistent", True):
            self.responseHeaders.setRawHeaders(b"Connection", [b"close"])

    def _set_transport_security(self) -> None:
        """HSTS on every HTTPS answer, proxied or our own, replacing any a backend sent."""
        max_age = getattr(getattr(self.channel, "site", None), "hsts_max_age", 0)
        if max_age > 0 and self.isSecure():
            self.responseHeaders.setRawHeaders(
                b"Strict-Transport-Security", [b"max-age=%d" % (max_age,)]
            )

    # --- request body limit (--max-body-size): 413 before anything is forwarded -----------

    body_refused = False
    _body_limit: int | None = None
    _body_received = 0

    def gotLength(self, length: int | None) -> None:  # noqa: N802
        self._body_limit = getattr(getattr(self.channel, "site", None), "max_body_size", None)
        if self._body_limit is not None and length is not None and length > self._body_limit:
            self.content = io.BytesIO()
            self._refuse_body()
            return
        if length != 0 and self._decide_before_body(length):
            return
        super().gotLength(length)

    def _decide_before_body(self, length: int | None) -> bool:
        """A body is announced: judge the headers first (cocalcproxy.http.prebody). True when the
        spool must not be created now (held back, or the request was answered)."""
        site: Any = getattr(self.channel, "site", None)
        root = getattr(site, "resource", None)
        line = prebody.request_line(self.channel)
        if not isinstance(root, Root) or line is None:
            return False
        command, target, version = line
        self.method, self.uri, self.clientproto = command, target, version
        self.path = target.split(b"?", 1)[0]
        self.site = site
        hosts = self.requestHeaders.getRawHeaders(b"host", [])
        decision = prebody.plan(command, target, hosts, root.project_domain, root.main_host)
        if isinstance(decision, prebody.Cap):
            if self._body_limit is None or decision.limit < self._body_limit:
                self._body_limit = decision.limit
            if length is not None and length > decision.limit:
                self.content = io.BytesIO()
                self._refuse_body()
                return True
            return False
        # From here the request may be answered before Root sees it: log and count it.
        started = getattr(site, "request_started", None)
        if started is not None:
            started(self)
        self.content = io.BytesIO()  # never written: the spool is made only once allowed
        if isinstance(decision, prebody.AnswerNow):
            self.body_refused = True
            answer_now(self, root, decision.status)
            return True
        self._gate = BodyGate(self, root, length)
        self._gate.start(line, decision.route)
        return True

    def open_body(self, length: int | None) -> None:
        """The guard allowed the request: create the spool as Twisted would have."""
        super().gotLength(length)

    def spool_chunk(self, data: bytes) -> None:
        super().handleContentChunk(data)

    def handleContentChunk(self, data: bytes) -> None:  # noqa: N802
        if self.body_refused:
            return
        self._body_received += len(data)
        self.log_info.bytes_in += len(data)
        if self._body_limit is not None and self._body_received > self._body_limit:
            self._refuse_body()
            return
        if self._gate is not None and (self._gate.holding or self.early_access is None):
            if self._gate.holding:
                self._gate.hold(data)
            return  # else refused before its body: dropped, never spooled
        super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:  # noqa: N802
        if self.body_refused:
            return
        if self._gate is not None:
            if self._gate.holding:
                self._gate.hold_received(command, path, version)
                return
            if self.early_access is None:
                return  # refused before its body; the answer has gone out
        super().requestReceived(command, path, version)

    def _refuse_body(self) -> None:
        """Answer 413 at once (headers only seen so far) and close: nothing is forwarded."""
        self.body_refused = True
        if self.finished or getattr(self, "channel", None) is None:
            return  # answered already; the connection is closing
        self.requestHeaders.removeHeader(b"expect")  # no 100-continue for a refused body
        limit = self._body_limit
        body = pages.error_body(
            self,
            413,
            "Request body too large",
            f"The proxy accepts request bodies of at most {limit} bytes.",
            limit=limit,
        )
        self._set_transport_security()
        lines = [b"HTTP/1.1 413 Content Too Large"]
        for name, values in self.responseHeaders.getAllRawHeaders():
            lines.extend(name + b": " + value for value in values)
        lines += [b"Content-Length: %d" % len(body), b"Connection: close", b"", body]
        transport: Any = self.channel.transport
        if transport is not None:
            transport.write(b"\r\n".join(lines))
        prebody.stop_parsing(self.channel)
        self.channel.loseConnection()


class Root(resource.Resource):
    """Routes every request; a leaf so Twisted's path traversal never touches the raw path."""

    isLeaf = True

    def __init__(
        self,
        *,
        guard: Guard,
        forwarder: Handler,
        relay: Handler,
        raw: Handler,
        own_pages: OwnPages,
        project_domain: str | None = None,
        main_host: str | None = None,
        identity: Callable[[routing.Route, Access], bytes | None] | None = None,
        absolute_url_redirect: bool = True,
    ) -> None:
        super().__init__()
        # --identity-assertion: the signed statement of who is calling, for proxied requests.
        self.identity = identity
        self.guard = guard
        self.forwarder = forwarder
        self.relay = relay
        self.raw = raw
        self.own_pages = own_pages
        self.project_domain = project_domain
        self.main_host = main_host
        #: --absolute-url-redirect: 307 an app's absolute URL into its server-form prefix.
        self.absolute_url_redirect = absolute_url_redirect

    def render(self, request: server.Request) -> int:
        assert isinstance(request, ProxyRequest)
        try:
            self._route(request)
        except Exception:
            log.failure("routing failed for {uri!r}", uri=request.uri)
            if not request.finished and not request.startedWriting:
                pages.write_error(request, 500, "Internal error", "The proxy failed; see its log.")
        return server.NOT_DONE_YET

    def _route(self, request: ProxyRequest) -> None:
        hosts = request.requestHeaders.getRawHeaders(b"host", [])
        if len(hosts) > 1:
            pages.write_error(request, 400, "Bad request", "More than one Host header.")
            return
        host = hosts[0] if hosts else None
        outcome = routing.parse(host, request.uri, self.project_domain, self.main_host)
        if isinstance(outcome, routing.NotFound):
            self._not_found(request, outcome, host)
        elif isinstance(outcome, routing.Redirect):
            request.setResponseCode(308 if request.method not in (b"GET", b"HEAD") else 301)
            request.setHeader(b"Location", outcome.location)
            pages.set_own_page_headers(request)
            request.setHeader(b"Content-Length", b"0")
            request.finish()
        elif isinstance(outcome, routing.OwnPage):
            self.own_pages.handle(request, outcome)
        else:
            self._authorize(request, outcome)

    def _not_found(
        self, request: ProxyRequest, outcome: routing.NotFound, host: bytes | None
    ) -> None:
        """A 404, unless it is an app's absolute URL (routing.absolute_url): then a 307 into
        the app's server-form prefix, or a 404 that says what happened and how to fix it."""
        headers = request.requestHeaders
        found = routing.absolute_url(
            outcome,
            host,
            request.uri,
            headers.getRawHeaders(b"referer", []),
            headers.getRawHeaders(b"sec-fetch-site", []),
            websocket=is_websocket_upgrade(request),
            redirect=self.absolute_url_redirect,
        )
        if found is None:
            pages.not_found(request)
            return
        request.log_info.form = "absolute-url"
        # The answer depends on the Referer: no shared cache may keep it for other pages.
        request.setHeader(b"Vary", b"Referer")
        if found.location is None:
            pages.absolute_url_not_found(request, found, host, self.project_domain)
            return
        request.setResponseCode(307)
        request.setHeader(b"Location", found.location)
        pages.set_own_page_headers(request)
        request.setHeader(b"Content-Length", b"0")
        request.finish()

    def answer_without_body(self, request: ProxyRequest) -> None:
        """Answer a request that is not for a project nor a form page (404, redirect, 400);
        none of these reads the body (used by cocalcproxy.http.prebody before it is read)."""
        self._route(request)

    def _authorize(self, request: ProxyRequest, route: routing.Route) -> None:
        request.log_info.form = route.kind
        request.log_info.port = route.port
        early = request.early_access
        d: Deferred[Access | None]
        if early is not None and early[0] == route:
            d = succeed(early[1])  # decided on the headers, before the body (prebody)
        else:
            d = self.guard.authorize(request, route)
        d.addCallback(self._dispatch, request, route)
        d.addErrback(self._failed, request)

    def lane_take(self, request: Any) -> bool:
        """The fast lane's question (cocalcproxy.http.lane): answer this request now, or leave
        it to the ordinary path? Yes only for a project's server (``port`` or ``server`` form)
        whose guard decision is known from its caches; then it is dispatched as ``_dispatch``
        does. Nothing is written, counted or sent before the answer is yes."""
        lane_access = getattr(self.guard, "lane_access", None)
        lane_handle = getattr(self.forwarder, "lane_handle", None)
        if lane_access is None or lane_handle is None:
            return False
        route = routing.parse(request.host, request.uri, self.project_domain, self.main_host)
        if type(route) is not routing.Route or route.kind == "raw" or route.port is None:
            return False
        access = lane_access(request, route)
        if access is None:
            return False
        info = request.log_info
        info.form = route.kind
        info.port = route.port
        info.account = access.account.name
        info.project = access.project.id
        if self.identity is not None:
            request.identity_assertion = self.identity(route, access)
        request.channel.start(request)
        try:
            lane_handle(request, route, access)
        except Exception:
            log.failure("forwarding {uri!r} failed", uri=request.uri)
            if not request.finished and not request.startedWriting and not request._disconnected:
                pages.write_error(request, 500, "Internal error", "The proxy failed; see its log.")
        return True

    def _dispatch(self, access: Access | None, request: ProxyRequest, route: routing.Route) -> None:
        if access is None:
            return
        request.log_info.account = access.account.name if access.share is None else None
        request.log_info.project = access.project.id
        if access.share is not None:
            request.log_info.extra["share"] = access.share
        handler: Handler
        if route.kind == "raw":
            handler = self.raw
        elif is_websocket_upgrade(request):
            handler = self.relay
        else:
            handler = self.forwarder
        if self.identity is not None and route.kind != "raw" and access.share is None:
            request.identity_assertion = self.identity(route, access)
        handler.handle(request, route, access)

    def _failed(self, failure: Failure, request: ProxyRequest) -> None:
        if failure.check(Unavailable):
            pages.directory_unavailable(request)
            return
        log.failure("request for {uri!r} failed", failure, uri=request.uri)
        if not request.finished and not request.startedWriting and not request._disconnected:
            pages.write_error(request, 503, "Service unavailable", "Please try again shortly.")


def is_websocket_upgrade(request: server.Request) -> bool:
    upgrades = request.requestHeaders.getRawHeaders(b"upgrade")
    if not upgrades:
        return False  # nearly every request: no need to read Connection
    upgrade = b",".join(upgrades)
    connection = b",".join(request.requestHeaders.getRawHeaders(b"connection", []))
    return b"websocket" in [t.strip().lower() for t in upgrade.split(b",")] and b"upgrade" in [
        t.strip().lower() for t in connection.split(b",")
    ]


KEEPALIVE_IDLE_TIMEOUT = 75.0
#: Default of --request-head-timeout: seconds from the first byte of a request (for the first
#: request of a connection: from the connection's start, TLS handshake included) to the end of
#: its head. See ProxyChannel.
REQUEST_HEAD_TIMEOUT = 20.0
#: The slowest a request body may arrive, on average, after a grace of --request-head-timeout:
#: the body's deadline moves one second later for every MIN_BODY_RATE bytes received
#: (Apache's mod_reqtimeout rule, with its default rate).
MIN_BODY_RATE = 500.0


def _timeout_answer(detail: str) -> bytes:
    """A complete 408 written straight to the transport (there may be no whole request)."""
    return _closing_answer(408, b"Request Timeout", "Request timeout", detail)


def _closing_answer(status: int, reason: bytes, error: str, detail: str) -> bytes:
    """A complete JSON error answer with ``Connection: close``, written straight to the
    transport when there is no whole request to answer through (``detail`` is ASCII of ours)."""
    body = (
        b'{"status": %d, "error": "' % status
        + error.encode("ascii")
        + b'", "detail": "'
        + detail.encode("ascii")
        + b'"}\n'
    )
    lines = [b"HTTP/1.1 %d %s" % (status, reason)]
    lines += [name + b": " + value for name, value in pages.OWN_PAGE_HEADERS]
    lines += [
        b"Content-Type: application/json",
        b"Content-Length: %d" % len(body),
        b"Connection: close",
        b"",
        body,
    ]
    return b"\r\n".join(lines)


def _ignore() -> None:
    pass


class _Deadline:
    """A deadline set and cleared on every request for the price of one DelayedCall a period.

    Arming a timer per request and cancelling it (Twisted's idle timeout, the head clock) cost
    a DelayedCall, a push onto the reactor's heap and a cancellation each time. Here the
    DelayedCall stays armed: moving the deadline later or clearing it is only noted, and when
    the call comes due early it re-arms for what is left. An earlier deadline moves the call,
    so ``fire`` never runs later than the deadline, nor more than a microsecond early.
    """

    __slots__ = ("_call", "_call_later", "_fire", "deadline")

    def __init__(self, fire: Callable[[], None]) -> None:
        self._fire = fire
        self._call: Any = None
        self._call_later: Any = None
        self.deadline: float | None = None

    def set(self, delay: float, call_later: Callable[..., Any]) -> None:
        call = self._call
        if call is None or not call.active():
            self._call_later = call_later
            call = self._call = call_later(delay, self._due)
            self.deadline = call.getTime()
            return
        self.deadline = call.seconds() + delay
        if self.deadline < call.getTime():
            call.reset(delay)

    def clear(self) -> None:
        self.deadline = None

    def stop(self) -> None:
        """Clear, and give the reactor its DelayedCall back (the connection is gone)."""
        self.deadline = None
        call, self._call = self._call, None
        if call is not None and call.active():
            call.cancel()

    def release(self) -> None:
        """Stop for good, and let go of what it calls: the deadline and its owner refer to
        each other, a cycle only the collector would free otherwise (one per connection)."""
        self.stop()
        self._fire = _ignore
        self._call_later = None

    def _due(self) -> None:
        call, self._call = self._call, None
        if self.deadline is None:
            return
        left = self.deadline - call.seconds()
        if left > 1e-6:
            self._call = self._call_later(left, self._due)
            return
        self.deadline = None
        self._fire()


class ProxyChannel(HTTPChannel):
    """HTTP/1.1 with a deadline for each request head and a minimum rate for bodies.

    Twisted's idle timeout restarts with every byte, so a client sending one byte every few
    seconds (slowloris) could hold a connection for ever. Here:

    * the whole head of a request must arrive within ``site.request_head_timeout`` seconds of
      its first byte (of the connection's start, for the first request);
    * a body may take ``site.request_head_timeout`` seconds plus one second per
      :data:`MIN_BODY_RATE` bytes received (time the proxy itself holds the body back, while
      the guard decides on the headers, does not count).

    Past either deadline the client gets a ``408`` with ``Connection: close`` and the connection
    is closed as after any refusal (``prebody.stop_parsing``). Between requests on a kept-alive
    connection the idle timeout (``KEEPALIVE_IDLE_TIMEOUT``) applies, as before.
    """

    _head_limit = 0.0
    _body_timer: Any = None
    _awaiting_head = True
    _body_start = 0.0
    _body_bytes = 0

    # --- the connection's facts, read once per transport ------------------------------------
    # Twisted's Request.__init__ asks the channel for both addresses on every request (a TCP
    # transport answers getHost with a getsockname system call each time), and isSecure adapts
    # the transport to ISSLTransport on every call. None of them changes while the transport
    # is the same object, so they are read on first use and kept with that transport.
    _facts_of: Any = None
    _host: Any = None
    _peer: Any = None
    _secure = False

    def _read_facts(self) -> Any:
        transport: Any = self.transport
        if transport is not None and transport is not self._facts_of:
            self._host = transport.getHost()
            self._peer = transport.getPeer()
            self._secure = interfaces.ISSLTransport(transport, None) is not None
            self._facts_of = transport
        return transport

    def getHost(self) -> Any:  # noqa: N802
        if self._read_facts() is None:
            return super().getHost()
        return self._host

    def getPeer(self) -> Any:  # noqa: N802
        if self._read_facts() is None:
            return super().getPeer()
        return self._peer

    def isSecure(self) -> bool:  # noqa: N802
        if self._read_facts() is None:
            return False
        return self._secure

    def _head_timeout(self) -> float | None:
        value = getattr(getattr(self, "site", None), "request_head_timeout", None)
        return float(value) if value else None

    def _now(self) -> float:
        clock: Any = getattr(getattr(self, "site", None), "reactor", None)
        if clock is None:
            from twisted.internet import reactor as clock
        return float(clock.seconds())

    # --- the head clock and Twisted's idle timeout, on lazy deadlines ---------------------
    _head_clock: _Deadline | None = None
    _idle_clock: _Deadline | None = None

    def connectionMade(self) -> None:  # noqa: N802
        self._idle_clock = _Deadline(self._idled)
        self._head_clock = _Deadline(self._head_too_slow)
        super().connectionMade()
        self._start_head_clock()

    def setTimeout(self, period: float | None) -> float | None:  # noqa: N802
        """TimeoutMixin's, on a lazy deadline: Twisted turns the idle timeout off for every
        request it handles and on again after it."""
        previous: float | None = self.timeOut
        self.timeOut = period  # type: ignore[assignment]  # Twisted says int; seconds are float
        clock = self._idle_clock
        if clock is None:
            clock = self._idle_clock = _Deadline(self._idled)
        if period is None:
            clock.clear()
        else:
            clock.set(period, self.callLater)
        return previous

    def resetTimeout(self) -> None:  # noqa: N802
        clock = self._idle_clock
        if clock is not None and clock.deadline is not None and self.timeOut is not None:
            clock.set(self.timeOut, self.callLater)

    def _idled(self) -> None:
        self.timeoutConnection()

    def _start_head_clock(self) -> None:
        timeout = self._head_timeout()
        clock = self._head_clock
        if timeout is not None and clock is not None and clock.deadline is None:
            self._head_limit = timeout
            clock.set(timeout, self.callLater)

    def _head_too_slow(self) -> None:
        self._timed_out("head", self._head_limit)

    def _stop_head_clock(self) -> None:
        if self._head_clock is not None:
            self._head_clock.clear()

    def _stop_body_clock(self) -> None:
        timer, self._body_timer = self._body_timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        if self._awaiting_head and data:
            self._start_head_clock()
        super().dataReceived(data)

    def allHeadersReceived(self) -> None:  # noqa: N802
        self._awaiting_head = False
        self._stop_head_clock()
        super().allHeadersReceived()
        timeout = self._head_timeout()
        if self.length != 0 and timeout is not None and not getattr(self, "_draining", False):
            self._body_start = self._now()
            self._body_bytes = 0
            self._body_timer = self.callLater(timeout, partial(self._check_body, timeout))

    def rawDataReceived(self, data: bytes) -> None:  # noqa: N802
        if self._body_timer is not None and not self._handlingRequest:
            self._body_bytes += len(data)
        super().rawDataReceived(data)

    def allContentReceived(self) -> None:  # noqa: N802
        self._stop_body_clock()
        super().allContentReceived()

    def requestDone(self, request: http.Request) -> None:  # noqa: N802
        self._awaiting_head = True
        super().requestDone(request)
        self._back_to_lane()

    def _back_to_lane(self) -> None:
        """A kept-alive connection that the fast lane handed over goes back to it once its
        request is done and nothing of the next one has arrived (cocalcproxy.http.lane):
        a browser's connection whose one request was a sign-in, a body or a cache miss is
        not left on this path for its remaining requests. Skipped whenever anything is in
        the middle (bytes buffered, output paused, a refusal draining, a closing connection)."""
        site: Any = getattr(self, "site", None)
        transport: Any = self.transport
        if (
            not getattr(site, "lane_enabled", False)
            or transport is None
            or not self.persistent
            or self.requests
            or self._handlingRequest
            or self._waitingForTransport
            or self._buffer
            or self._dataBuffer
            or self.line_mode != 1
            or getattr(self, "_draining", False)
            or getattr(self, "_abortingCall", None) is not None
        ):
            return
        try:
            holder, attribute = takeover.protocol_holder(transport, self)
        except takeover.TakeoverUnsupported:
            return
        lane = site.buildProtocol(transport.getPeer())  # a lane: lane_enabled, checked above
        self.setTimeout(None)
        self.stop_timers()
        self._networkProducer.unregisterProducer()
        setattr(holder, attribute, lane)
        self.transport = None
        lane.makeConnection(transport)
        lane.idle()

    def connectionLost(self, reason: Failure = connectionDone) -> None:  # noqa: N802
        self._stop_head_clock()
        self._stop_body_clock()
        super().connectionLost(reason)
        self.stop_timers()

    def stop_timers(self) -> None:
        """Give every DelayedCall back to the reactor: the connection is gone, or has been
        taken over (http.takeover), and armed timers would keep this channel alive until due.
        The clocks go too: each refers back to the channel, a cycle only the collector frees."""
        self._stop_body_clock()
        for clock in (self._head_clock, self._idle_clock):
            if clock is not None:
                clock.stop()
        self._head_clock = self._idle_clock = None

    def _check_body(self, grace: float) -> None:
        self._body_timer = None
        request = self.requests[-1] if self.requests else None
        if request is None or request.finished or request.startedWriting:
            return  # answered already (refused before its body, or 413)
        now = self._now()
        gate = getattr(request, "_gate", None)
        if gate is not None and gate.holding:
            # The proxy holds the body back while the guard decides: not the client's time.
            self._body_start = now - self._body_bytes / MIN_BODY_RATE
            self._body_timer = self.callLater(grace, partial(self._check_body, grace))
            return
        deadline = self._body_start + grace + self._body_bytes / MIN_BODY_RATE
        if now < deadline:
            self._body_timer = self.callLater(deadline - now, partial(self._check_body, grace))
            return
        self._timed_out("body", grace)

    def _timed_out(self, what: str, timeout: float) -> None:
        transport: Any = self.transport
        if transport is None or getattr(self, "_draining", False):
            return
        peer = getattr(transport.getPeer(), "host", "?")
        if what == "head":
            detail = f"The request head did not arrive within {timeout:g} seconds."
        else:
            detail = f"The request body arrived slower than {MIN_BODY_RATE:g} bytes a second."
        log.info("closing a connection from {peer}: {detail}", peer=peer, detail=detail)
        transport.write(_timeout_answer(detail))
        prebody.stop_parsing(self)
        self.loseConnection()

    def _maybeChooseTransferDecoder(self, header: bytes, data: bytes) -> bool:  # noqa: N802
        # Twisted takes "Transfer-Encoding: chunked" then a second "Transfer-Encoding:
        # identity" line for chunked, and ignores "identity" alone (even beside a
        # Content-Length). RFC 9112 section 6.1: a request whose transfer codings do not end
        # with exactly one chunked is refused with 400, and "identity" is no coding at all. A
        # server in front that reads such framing otherwise would split the stream elsewhere
        # than the proxy (request smuggling), so anything but one "chunked" line is refused.
        if header == b"Transfer-Encoding" and (
            data.lower() != b"chunked" or self._transferDecoder is not None
        ):
            return bool(self._failChooseTransferDecoder())
        return bool(super()._maybeChooseTransferDecoder(header, data))

    def lineLengthExceeded(self, line: bytes) -> None:  # noqa: N802
        """A request line or header line longer than ``MAX_LENGTH`` (16 KiB): the ``400`` any
        malformed head gets, and the connection closes. Twisted's own only asks the transport
        to close, which TLS defers while this channel is its producer, so the client waited for
        the head timeout (then a 408) instead."""
        self._respondToBadRequestAndDisconnect()

    def _respondToBadRequestAndDisconnect(self) -> None:  # noqa: N802
        # A malformed request, body or chunk. Twisted's own answer is a bare "400 Bad Request"
        # head (no length, no Connection: close); ours says that the connection closes. Then
        # parse nothing more, and bound how much is read before it goes (prebody.stop_parsing).
        transport: Any = self.transport
        if transport is not None:
            transport.write(
                _closing_answer(400, b"Bad Request", "Bad request", "The request is malformed.")
            )
        self.loseConnection()
        prebody.stop_parsing(self)

    def checkPersistence(self, request: http.Request, version: bytes) -> bool:  # noqa: N802
        """Twisted's rule (only HTTP/1.1 is kept alive, unless the request says ``close``; the
        answer then says so) with ``Connection`` read as the comma-separated list it is, from
        every such header: Twisted splits the first one on spaces only, so it kept
        ``Connection: TE,close`` open."""
        if version != b"HTTP/1.1":
            return False
        values = request.requestHeaders.getRawHeaders(b"connection", [])
        tokens = headers_module.connection_tokens((b"connection", v) for v in values)
        if b"close" in tokens:
            request.responseHeaders.setRawHeaders(b"Connection", [b"close"])
            return False
        return True


def proxy_channel_protocol(factory: Any) -> Any:
    """The protocol of every listener's Site (HTTPS, redirect, metrics, admin API): Twisted's
    HTTP/1.1-or-HTTP/2 wrapper around a ProxyChannel (ALPN offers only http/1.1, see tls.py).
    The Site's ``request_head_timeout`` attribute sets the deadlines."""
    return http._GenericHTTPChannelProtocol(ProxyChannel())


class ProxySite(server.Site):
    """A Site that counts requests in flight so shutdown can wait for them."""

    requestFactory = ProxyRequest  # type: ignore[assignment]
    displayTracebacks = False
    # Strict-Transport-Security max-age for HTTPS answers; 0 sends none (--hsts-max-age).
    hsts_max_age = 0

    #: Largest request body accepted (--max-body-size); None for no limit.
    max_body_size: int | None = None
    #: Deadline for a whole request head, and the grace before a body's minimum rate applies
    #: (--request-head-timeout); None turns both off.
    request_head_timeout: float | None = REQUEST_HEAD_TIMEOUT

    protocol = proxy_channel_protocol

    def __init__(self, root: resource.Resource, **kwargs: Any) -> None:
        # Twisted keeps an idle keep-alive connection (or one trickling a request head) for 12 hours
        # by default; like nginx, close it after 75 s. A request being answered is not idle: Twisted
        # suspends this timeout until the response is finished (long downloads and SSE are safe).
        kwargs.setdefault("timeout", KEEPALIVE_IDLE_TIMEOUT)
        super().__init__(root, **kwargs)
        self.in_flight: set[server.Request] = set()
        self._idle_waiters: list[Deferred[None]] = []
        self.on_request_done: list[Callable[[server.Request], None]] = []
        # The proxy's Metrics (cocalcproxy.ops.metrics), set by build_service.
        self.metrics: Any = None

    #: Whether connections start on the fast lane (cocalcproxy.http.lane); set by the service
    #: for the proxy's own site, whose resource is a Root.
    lane_enabled = False

    def buildProtocol(self, addr: Any) -> Any:  # noqa: N802
        if self.lane_enabled:
            from cocalcproxy.http.lane import LaneChannel

            lane = LaneChannel(self, addr)
            lane.factory = self
            return lane
        return self.build_channel(addr)

    def build_channel(self, addr: Any) -> Any:
        """The ordinary path's protocol (Twisted's HTTP/1.1 channel, a ProxyChannel)."""
        return super().buildProtocol(addr)

    def lane_started(self, request: Any) -> None:
        """A request taken by the fast lane is in flight (as request_started)."""
        self.in_flight.add(request)
        clock: Any = self.reactor
        request.log_info.started = clock.seconds()

    def lane_done(self, request: Any) -> None:
        """... and has ended (finished, or its client went away)."""
        self._request_done(None, request)

    def request_started(self, request: server.Request) -> None:
        if isinstance(request, ProxyRequest):
            # Once per request: prebody may start it before its body, then Twisted again.
            if request.site_started:
                return
            request.site_started = True
        self.in_flight.add(request)
        if isinstance(request, ProxyRequest) and request.log_info.started is None:
            clock: Any = self.reactor
            request.log_info.started = clock.seconds()

        # The request as an argument, not in a closure: an open relay's keeps it for hours.
        request.notifyFinish().addBoth(self._request_done, request)

    def _request_done(self, _: object, request: server.Request) -> None:
        self.in_flight.discard(request)
        for hook in self.on_request_done:
            hook(request)
        if not self.in_flight:
            waiters, self._idle_waiters = self._idle_waiters, []
            for w in waiters:
                w.callback(None)

    def wait_idle(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        if not self.in_flight:
            d.callback(None)
        else:
            self._idle_waiters.append(d)
        return d

    def getResourceFor(self, request: server.Request) -> resource.IResource:  # noqa: N802
        self.request_started(request)
        found: resource.IResource = super().getResourceFor(request)
        return found

    def log(self, request: http.Request) -> None:
        """Twisted's combined log line would carry the query string and Referer (tokens); the
        JSON access log is written from ``on_request_done`` instead (cocalcproxy.ops.accesslog)."""


# --- holding a body back while the guard decides (the pure plan is prebody's) --------------


class BodyGate:
    """Holds one request's body back while its fate is decided on the headers."""

    def __init__(self, request: ProxyRequest, root: Root, length: int | None) -> None:
        self.request = request
        self.root = root
        # Kept here: once the refusal is finished, Twisted detaches the request from it.
        self.channel: Any = request.channel
        self.length = length
        self.holding = True
        self.held: list[bytes] = []
        self.held_size = 0
        self.received: tuple[bytes, bytes, bytes] | None = None
        self.expect_continue = False
        self.was_persistent = True
        self.had_connection: list[bytes] | None = None

    # called by ProxyRequest while holding

    def hold(self, data: bytes) -> None:
        self.held.append(data)
        self.held_size += len(data)
        if self.held_size > prebody.HOLD_LIMIT:
            _gate_log.warn("more body than expected while paused; dropping the connection")
            self._abort()

    def hold_received(self, command: bytes, path: bytes, version: bytes) -> None:
        self.received = (command, path, version)

    # the decision

    def start(self, line: tuple[bytes, bytes, bytes], route: routing.Route) -> None:
        request = self.request
        channel: Any = request.channel
        # Twisted answers "Expect: 100-continue" right after gotLength; only do so once allowed,
        # so a client that waits for it never sends a refused body.
        expect = request.requestHeaders.getRawHeaders(b"expect", [])
        self.expect_continue = bool(expect) and expect[0].lower() == b"100-continue"
        request.requestHeaders.removeHeader(b"expect")
        prebody.pause_reading(channel)
        # Any answer the guard writes closes the connection; undone if it allows.
        self.was_persistent = bool(channel.persistent)
        had = request.responseHeaders.getRawHeaders(b"connection")
        self.had_connection = list(had) if had is not None else None
        channel.persistent = False
        request.responseHeaders.setRawHeaders(b"Connection", [b"close"])
        request.log_info.form = route.kind
        request.log_info.port = route.port
        try:
            d = self.root.guard.authorize(request, route)
        except Exception:
            self._failed(Failure())
            return
        d.addCallbacks(self._decided, self._failed, callbackArgs=(route,))

    def _decided(self, access: Access | None, route: routing.Route) -> None:
        request = self.request
        if access is None:
            self._refused()
            return
        if request._disconnected:
            return
        channel: Any = request.channel
        channel.persistent = self.was_persistent
        if self.had_connection is None:
            request.responseHeaders.removeHeader(b"connection")
        else:
            request.responseHeaders.setRawHeaders(b"Connection", self.had_connection)
        request.early_access = (route, access)
        self.holding = False
        request.open_body(self.length)
        held, self.held = self.held, []
        for chunk in held:
            request.spool_chunk(chunk)
        if self.expect_continue and request.clientproto == b"HTTP/1.1" and channel.transport:
            channel.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        prebody.resume_reading(channel)
        if self.received is not None:
            command, path, version = self.received
            self.received = None
            request.requestReceived(command, path, version)

    def _refused(self) -> None:
        """The guard has answered (or the client left): drop the body and the connection."""
        request = self.request
        self.holding = False
        self.held = []
        if request._disconnected:
            return
        channel = self.channel
        if not request.finished:
            if channel is not None:
                prebody.stop_parsing(channel)
            pages.write_error(request, 503, "Service unavailable", "Please try again shortly.")
            return
        # finish() has handed the connection back: it closes, as persistent is off; what the
        # client still sends is drained within bounds, never parsed.
        if channel is not None:
            prebody.stop_parsing(channel)

    def _failed(self, failure: Failure) -> None:
        unavailable = bool(failure.check(Unavailable))
        if not unavailable:
            _gate_log.failure(
                "deciding on {uri!r} before its body failed", failure, uri=self.request.uri
            )
        request = self.request
        self.holding = False
        self.held = []
        channel = self.channel
        if channel is not None:
            prebody.stop_parsing(channel)
        if request._disconnected or request.finished:
            return
        if unavailable:
            pages.directory_unavailable(request)
        elif not request.startedWriting:
            pages.write_error(request, 503, "Service unavailable", "Please try again shortly.")

    def _abort(self) -> None:
        self.holding = False
        self.held = []
        channel = self.channel
        if channel is not None:
            prebody.stop_parsing(channel)
            if channel.transport is not None:
                channel.transport.abortConnection()


def answer_now(request: ProxyRequest, root: Root, status: int) -> None:
    """Answer a request that announced a body the page does not take, and close."""
    channel: Any = request.channel
    channel.persistent = False
    request.requestHeaders.removeHeader(b"expect")
    request.responseHeaders.setRawHeaders(b"Connection", [b"close"])
    # The answer is written synchronously from inside gotLength; parse nothing after it.
    prebody.stop_parsing(channel)
    if status == 405:
        pages.method_not_allowed(request)
    elif status == 413:
        pages.write_error(
            request, 413, "Request body too large", "This page takes no request body.", limit=0
        )
    else:
        root.answer_without_body(request)
