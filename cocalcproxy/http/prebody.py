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

This module is the pure plan (:func:`plan`) and the few helpers that touch Twisted's channel;
the glue that holds one request's body while the guard decides (``BodyGate``, ``answer_now``)
lives with the request in :mod:`cocalcproxy.http.site`, so the import runs one way: site uses
prebody, never the reverse.

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
from typing import Any

from cocalcproxy.http import routing

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


def pause_reading(channel: Any) -> None:
    transport = channel.transport
    if transport is not None:
        transport.pauseProducing()


def resume_reading(channel: Any) -> None:
    transport = channel.transport
    if transport is not None:
        transport.resumeProducing()
