"""The reactor's event dispatch: established connections first, no logging context per event.

**No logging context per event.** Twisted's ``EPollReactor.doPoll`` hands every ready descriptor
to ``log.callWithLogger``: it asks the descriptor for its ``logPrefix()``, copies the legacy
logging context into a new dict, pushes it on a thread-local stack, calls ``_doReadOrWrite`` and
pops the stack again. The context exists for ``twisted.python.log.msg`` calls made while
handling the event, which then carry the descriptor's prefix as their ``system``. The proxy
makes no such calls (it logs through ``twisted.logger``, which does not read that context), yet
the machinery ran two or three times per proxied request: about 8 % of the CPU of a small
request in a sampling profile (``bench/run.py``, small GET at 16 connections). This is Twisted's
open ticket #6789 ("Remove callWithLogger usage in reactors"; #2534 measured it at 15 % of a
UDP echo server). Here the prefix is computed only for the log line of a failure, so an
unhandled error still names its connection.

**Established connections before new ones, and new ones not starved.** Answering a TLS
ClientHello (the key exchange and the signature) costs the proxy several times what a small
proxied request does. Dispatched in the order the kernel reports them, a request or a backend's
answer that became ready behind a few new connections waited for all their ClientHellos. Each
turn therefore serves every ready descriptor that is not a newcomer first (requests, backend
answers, WebSockets, the directory's connection, and the client's Finished that completes a
handshake, which usually arrives with the first request), then the newcomers (connections
whose ClientHello has not been answered yet, and the listening sockets' accepts), oldest first,
for as long as the established ones took, at least ``SLICE`` and at least one newcomer. The
newcomers left over are still ready, so the next poll reports them again, after the timers have
run and behind whatever established connection became ready meanwhile.

So a request waits behind at most about one slice of handshakes, and when both kinds are
waiting each gets about half of the CPU: a flood of new connections (a class signing in at
once, or an attacker's handshakes) cannot take more than half from the connections already
being served, and a busy proxy still lets new connections in at a steady pace. A first version
served newcomers one at a time with a fresh poll of the established ones before each: at 512
busy connections each such poll served hundreds of requests, so new connections got a few per
cent of the CPU and the 512-connection p99 latency in bench/run.py went from 126 ms to
158-609 ms (medians of three runs); with the slice it is back to 148 ms.

:func:`install` replaces ``doIteration`` on one ``EPollReactor`` instance with :func:`_poll`,
which waits the same way and dispatches each descriptor the same way (read, then write unless
the read ended the connection; a hang-up handled only once no input is left to read; a failure
logged and the descriptor disconnected with it). The class is not subclassed or copied: the
instance keeps every other method, and any other reactor is left as it is.
"""

from __future__ import annotations

import errno
import functools
import time
from collections.abc import Callable
from typing import Any

from twisted.internet import error, tcp
from twisted.internet.main import CONNECTION_DONE, CONNECTION_LOST
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger(namespace="cocalcproxy.eventloop")

#: A descriptor whose fileno() says -1 has been closed under the reactor.
_NO_DESCRIPTOR = error.ConnectionFdescWentAway("File descriptor lost")


#: Seconds of newcomers' work a turn may take at least (when established connections took less):
#: about one ClientHello here. A request that arrives meanwhile waits at most this long (plus
#: the step under way) behind newcomers.
SLICE = 0.0005


def install(reactor: Any, clock: Callable[[], float] = time.monotonic) -> bool:
    """Use :func:`_poll` for this reactor's iterations. True when installed; False (and nothing
    changed) when the reactor is not Twisted's epoll reactor, e.g. ``twistd --reactor=poll``."""
    try:
        from twisted.internet.epollreactor import EPollReactor
    except ImportError:  # not on Linux
        return False
    if not isinstance(reactor, EPollReactor):
        return False
    reactor.doIteration = functools.partial(_poll, reactor, clock)  # type: ignore[method-assign]
    return True


def installed(reactor: Any) -> bool:
    iteration = getattr(reactor, "__dict__", {}).get("doIteration")
    return isinstance(iteration, functools.partial) and iteration.func is _poll


def _poll(reactor: Any, clock: Callable[[], float], timeout: float | None) -> None:
    """One reactor iteration: wait for ready descriptors (at most ``timeout`` seconds, forever
    when None); serve the established ones, then newcomers, oldest first, for as long as the
    established ones took (at least ``SLICE``, and at least one newcomer). Newcomers left over
    are still ready, so the next poll reports them again, after timers have run and behind
    whatever established connection became ready meanwhile."""
    ready = _ready(reactor, -1 if timeout is None else timeout)
    newcomers: dict[int, tuple[Any, int]] = {}
    started = clock()
    _serve(reactor, ready, newcomers)
    if not newcomers:
        return
    now = clock()
    until = now + max(SLICE, now - started)
    for fd, (selectable, event) in newcomers.items():
        # Still the same descriptor (an event served before may have closed it, and an accept
        # may even have reused its number)?
        if reactor._selectables.get(fd) is selectable:
            _dispatch(reactor, selectable, fd, event)
            if clock() >= until:
                return


def _ready(reactor: Any, timeout: float) -> list[tuple[int, int]]:
    try:
        ready: list[tuple[int, int]] = reactor._poller.poll(timeout, len(reactor._selectables))
    except OSError as e:
        if e.errno == errno.EINTR:
            return []
        raise
    return ready


def _serve(reactor: Any, ready: list[tuple[int, int]], newcomers: dict[int, Any]) -> None:
    """Dispatch the ready descriptors, except newcomers: those are put in ``newcomers``."""
    selectables = reactor._selectables
    for fd, event in ready:
        selectable = selectables.get(fd)
        if selectable is None:  # removed by an earlier event of this same turn
            continue
        if newcomer(selectable):
            newcomers[fd] = (selectable, event)
            continue
        _dispatch(reactor, selectable, fd, event)


def newcomer(selectable: Any) -> bool:
    """A listening socket (its event is an accept; TCP or Unix) or a TLS connection whose
    ClientHello the server has not answered yet (``LeanTLSProtocol.awaiting_hello``); anything
    else is established."""
    if isinstance(selectable, tcp.Port):
        return True
    return getattr(getattr(selectable, "protocol", None), "awaiting_hello", False) is True


def _dispatch(reactor: Any, selectable: Any, fd: int, event: int) -> None:
    """Read, then write unless the read ended the connection; a hang-up is handled only once no
    input is left to read; a failure is logged and disconnects the descriptor."""
    in_read = False
    try:
        if event & reactor._POLL_DISCONNECTED and not event & reactor._POLL_IN:
            # Hung up with no input left to read: a clean end if we were reading from it.
            if fd in reactor._reads:
                why: Any = CONNECTION_DONE
                in_read = True
            else:
                why = CONNECTION_LOST
        elif selectable.fileno() == -1:
            why = _NO_DESCRIPTOR
        else:
            why = None
            if event & reactor._POLL_IN:
                why = selectable.doRead()
                in_read = True
            if not why and event & reactor._POLL_OUT:
                why = selectable.doWrite()
                in_read = False
    except BaseException:
        # As Twisted does: the failure is logged and the descriptor is disconnected with it.
        failure = Failure()
        why = failure.value
        _log_failure(selectable, failure)
    if why:
        try:
            reactor._disconnectSelectable(selectable, why, in_read)
        except BaseException:
            _log_failure(selectable, Failure())


def _log_failure(selectable: Any, failure: Failure) -> None:
    try:
        prefix = selectable.logPrefix()
    except BaseException:
        prefix = "(buggy logPrefix method)"
    log.failure(
        "unhandled error while handling an event of {system}",
        failure,
        system=prefix,
        log_system=prefix,
    )
