"""Authorise on the headers, before the body is read.

Twisted spools a request body (to memory, or to a temporary file above 100 kB) before the
resource renders, so without this anybody could make the proxy write ``--max-body-size`` bytes
per request before the guard refuses them. When the headers of a request that announces a body
are complete (``ProxyRequest.gotLength``), the connection stops reading and the request is judged
on its method, target and headers alone:

* a project route: the guard decides. Refused: its answer (302/401/404/429) goes out with
  ``Connection: close`` and the connection is closed without reading the body. Allowed: the
  ``Access`` is kept on the request (``Root`` does not ask again), the spool is created, and
  reading resumes.
* ``/_/login`` and ``/_/logout``: the body may come, but at most ``FORM_BODY_LIMIT`` bytes.
* other pages of the proxy take no body: 405 for a method other than GET and HEAD, else 413.
* everything else (404, redirects, a doubled Host): answered as ``Root`` would, without the body.

Requests without a body take the ordinary path, unchanged.

A refused body is never read to its end. Once the proxy has answered a request whose body it will
not take (any refusal above, a ``413`` over ``--max-body-size``, a malformed body, a timed-out
head or body), it parses nothing more on that connection (:func:`stop_parsing`): it discards at
most :data:`DRAIN_LIMIT` further bytes and waits at most :data:`LINGER_SECONDS` for the client to
close, then aborts the connection. (A short linger, as nginx's ``lingering_close`` does, lets a
client that stops sending read the answer before the connection goes; closing at once would
reset it. Without a bound, a client that never reads could make the proxy receive and decrypt
gigabytes after the answer: TLS waits for the client's ``close_notify``.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from twisted.logger import Logger
from twisted.python.failure import Failure

from cocalcproxy import pages
from cocalcproxy.directory.model import Unavailable
from cocalcproxy.http import routing

if TYPE_CHECKING:
    from cocalcproxy.http.site import Access, ProxyRequest, Root

# The namespace operators see in log lines (kept from before the package layout).
log = Logger(namespace="cocalcproxy.prebody")

#: Largest body accepted by the sign-in and sign-out forms.
FORM_BODY_LIMIT = 16 * 1024
#: Body bytes held in memory while the guard decides: only what had already been read when the
#: transport was paused (one network read), so more than this means something is wrong.
HOLD_LIMIT = 256 * 1024
#: After refusing a request, at most this many more bytes are read (and discarded) ...
DRAIN_LIMIT = 64 * 1024
#: ... and the client has at most this many seconds to close before the connection is aborted.
LINGER_SECONDS = 5.0

FORM_PAGES = frozenset({"login", "logout", "share"})


# --- the one place that reads Twisted's private channel state --------------------------------


def request_line(channel: Any) -> tuple[bytes, bytes, bytes] | None:
    """Method, request-target and version of the request whose headers have just ended.

    Twisted 26's ``HTTPChannel.lineReceived`` keeps the request line in ``_command``, ``_path``
    and ``_version`` from the first line until ``allContentReceived`` hands them to
    ``Request.requestReceived``; ``gotLength`` runs in between. None if that ever changes.
    """
    try:
        line = (channel._command, channel._path, channel._version)
    except AttributeError:
        return None
    if not all(isinstance(part, bytes) for part in line):
        return None
    return line


def stop_parsing(channel: Any) -> None:
    """Never parse another byte of this connection: neither the rest of a refused body nor
    anything after it can become a request (no smuggling). The connection is being closed: what
    still arrives is discarded, up to :data:`DRAIN_LIMIT` bytes and for :data:`LINGER_SECONDS`.
    Past the byte bound the proxy stops reading and closes once its answer has been sent; past
    the time bound it aborts."""
    if getattr(channel, "_draining", False):
        return
    channel._draining = True
    channel.persistent = False
    left = DRAIN_LIMIT
    aborted = False

    def abort() -> None:
        nonlocal aborted
        if aborted:
            return
        aborted = True
        transport = getattr(channel, "transport", None)
        if transport is not None:
            transport.abortConnection()

    def close_after_flush() -> None:
        # Past the bound: read nothing more (TCP holds the client back) and close the socket
        # once what was written has left. An abort here would discard the answer still in the
        # write buffer, so a client that sends fast would never see its 413 or 401.
        nonlocal aborted
        if aborted:
            return
        aborted = True
        transport = getattr(channel, "transport", None)
        if transport is None:
            return
        tcp = getattr(transport, "transport", None)  # under TLS: the TCP transport
        target = tcp if tcp is not None else transport
        if not getattr(target, "disconnecting", False):
            target.pauseProducing()
            target.loseConnection()

    def drain(data: bytes) -> None:
        nonlocal left
        left -= len(data)
        if left < 0:
            close_after_flush()

    channel.dataReceived = drain
    channel.rawDataReceived = _ignore
    channel.lineReceived = _ignore
    call_later = getattr(channel, "callLater", None)
    if call_later is None:
        return
    timer = call_later(LINGER_SECONDS, abort)
    lost = channel.connectionLost

    def connection_lost(reason: Any) -> None:
        nonlocal aborted
        aborted = True
        if timer.active():
            timer.cancel()
        lost(reason)

    channel.connectionLost = connection_lost


def _ignore(data: bytes) -> None:
    return None


# --- what to do with a request that announces a body ----------------------------------------


@dataclass(frozen=True)
class Judge:
    """A project route: the guard decides before the body is read."""

    route: routing.Route


@dataclass(frozen=True)
class Cap:
    """One of the proxy's form pages: accept a small body."""

    limit: int


@dataclass(frozen=True)
class AnswerNow:
    """Answer without the body: ``status`` is 405 or 413 for pages that take none; 0 means
    answer exactly as ``Root`` does (404, redirect, 400)."""

    status: int = 0


Plan = Judge | Cap | AnswerNow


def plan(
    method: bytes,
    target: bytes,
    hosts: Sequence[bytes],
    project_domain: str | None,
    main_host: str | None = None,
) -> Plan:
    """Pure: what to do with a request announcing a body, from its method, target and Host."""
    if len(hosts) > 1:
        return AnswerNow()
    outcome = routing.parse(hosts[0] if hosts else None, target, project_domain, main_host)
    if isinstance(outcome, routing.Route):
        return Judge(outcome)
    if isinstance(outcome, routing.OwnPage):
        if outcome.name in FORM_PAGES:
            return Cap(FORM_BODY_LIMIT)
        return AnswerNow(413 if method in (b"GET", b"HEAD") else 405)
    return AnswerNow()


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
        if self.held_size > HOLD_LIMIT:
            log.warn("more body than expected while paused; dropping the connection")
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
        _pause(channel)
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
        _resume(channel)
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
                stop_parsing(channel)
            pages.write_error(request, 503, "Service unavailable", "Please try again shortly.")
            return
        # finish() has handed the connection back: it closes, as persistent is off; what the
        # client still sends is drained within bounds, never parsed.
        if channel is not None:
            stop_parsing(channel)

    def _failed(self, failure: Failure) -> None:
        unavailable = bool(failure.check(Unavailable))
        if not unavailable:
            log.failure("deciding on {uri!r} before its body failed", failure, uri=self.request.uri)
        request = self.request
        self.holding = False
        self.held = []
        channel = self.channel
        if channel is not None:
            stop_parsing(channel)
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
            stop_parsing(channel)
            if channel.transport is not None:
                channel.transport.abortConnection()


def answer_now(request: ProxyRequest, root: Root, status: int) -> None:
    """Answer a request that announced a body the page does not take, and close."""
    channel: Any = request.channel
    channel.persistent = False
    request.requestHeaders.removeHeader(b"expect")
    request.responseHeaders.setRawHeaders(b"Connection", [b"close"])
    # The answer is written synchronously from inside gotLength; parse nothing after it.
    stop_parsing(channel)
    if status == 405:
        pages.method_not_allowed(request)
    elif status == 413:
        pages.write_error(
            request, 413, "Request body too large", "This page takes no request body.", limit=0
        )
    else:
        root.answer_without_body(request)


def _pause(channel: Any) -> None:
    transport = channel.transport
    if transport is not None:
        transport.pauseProducing()


def _resume(channel: Any) -> None:
    transport = channel.transport
    if transport is not None:
        transport.resumeProducing()
