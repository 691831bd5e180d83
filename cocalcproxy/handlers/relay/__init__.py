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

The parts: ``handshake`` (the pure checks and one upgrade from connect to 101), ``frames``
(frame boundaries and the proxy's Close frames, pure) and ``splice`` (the relay after the 101).
This module keeps :class:`Relay`, the handler, and names the parts' public names.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, task

from cocalcproxy import pages
from cocalcproxy.handlers import backendio, backends
from cocalcproxy.handlers.relay.frames import (
    GOING_AWAY,
    POLICY_VIOLATION,
    FrameBoundary,
    close_frame,
)
from cocalcproxy.handlers.relay.handshake import (
    MAX_RESPONSE_HEAD,
    WEBSOCKET_GUID,
    Origin,
    _Handshake,
    accept_for,
    handshake_refusal,
    origin_allowed,
    own_origin,
    parse_origin,
    switch_is_valid,
)
from cocalcproxy.handlers.relay.splice import CLOSE_GRACE, Splice
from cocalcproxy.http import routing
from cocalcproxy.http.site import Access, ProxyRequest

__all__ = [
    "CLOSE_GRACE",
    "GOING_AWAY",
    "MAX_RESPONSE_HEAD",
    "POLICY_VIOLATION",
    "WEBSOCKET_GUID",
    "FrameBoundary",
    "Origin",
    "Relay",
    "Splice",
    "accept_for",
    "close_frame",
    "handshake_refusal",
    "origin_allowed",
    "own_origin",
    "parse_origin",
    "switch_is_valid",
]


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
        self._idle_sweep: task.LoopingCall | None = None

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

    # -- open relays, and one timer for all of their idle timeouts

    def opened(self, splice: Splice) -> None:
        """A splice has started: count it, and watch it for the idle timeout.

        One LoopingCall checks every open relay every ``idle_timeout / 60`` seconds (1 s to
        60 s) rather than a DelayedCall per relay: thousands of idle WebSockets would each keep
        one (with its two bound methods) on the reactor's heap. A relay is closed at most that
        much later than its idle timeout."""
        self._open.add(splice)
        self.opened_total += 1
        if self._idle_sweep is None:
            sweep = task.LoopingCall(self._sweep_idle)
            sweep.clock = self.clock
            self._idle_sweep = sweep
            sweep.start(idle_check_interval(self.idle_timeout), now=False)

    def finished(self, splice: Splice) -> None:
        """A splice has ended on both sides; with none left open the idle timer stops."""
        self._open.discard(splice)
        if not self._open and self._idle_sweep is not None:
            sweep, self._idle_sweep = self._idle_sweep, None
            sweep.stop()

    def _sweep_idle(self) -> None:
        """End relays quiet for the idle timeout; let those quiet for one interval give back
        the buffers their traffic grew."""
        now = self.clock.seconds()
        quiet = idle_check_interval(self.idle_timeout)
        for splice in list(self._open):
            splice.check_idle(now)
            splice.release_buffers(now, quiet)

    def close_all(self) -> defer.Deferred[None]:
        """Refuse new relays, abandon handshakes in progress, close every open relay.

        Fires when every relay's connections are gone (at most ``CLOSE_GRACE`` seconds later).
        """
        self._closing = True
        for handshake in list(self._pending):
            handshake.abandon(503, "Service unavailable", "The proxy is shutting down.")
        waits = [splice.close("proxy shutting down") for splice in list(self._open)]
        return defer.DeferredList(waits, consumeErrors=True).addCallback(lambda _: None)


def idle_check_interval(idle_timeout: float) -> float:
    """How often the relay looks for idle relays: a sixtieth of the timeout, 1 s to 60 s."""
    return min(60.0, max(1.0, idle_timeout / 60))
