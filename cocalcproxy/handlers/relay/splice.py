"""The splice: a relay after the 101.

Bytes (not frames) both ways with flow control, an idle timeout and a cut on revocation; when
the proxy itself ends a relay it sends each side a Close frame (1001, 1008) if that side's
stream is between frames (:mod:`cocalcproxy.handlers.relay.frames`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from cocalcproxy.handlers.relay.frames import (
    GOING_AWAY,
    POLICY_VIOLATION,
    FrameBoundary,
    close_frame,
)
from cocalcproxy.http import takeover
from cocalcproxy.http.site import Access, ProxyRequest

if TYPE_CHECKING:
    from cocalcproxy.handlers.relay import Relay
    from cocalcproxy.handlers.relay.handshake import _BackendProtocol

# The namespace operators see in log lines (kept from before the package layout).
log = Logger(namespace="cocalcproxy.relay")

#: Seconds a closing side may take to flush before its connection is aborted.
CLOSE_GRACE = 15.0

# --- the splice -------------------------------------------------------------------------------


@implementer(IPushProducer)
class _Valve:
    """One side's reading, paused by the other side's transport when its write buffer is full."""

    __slots__ = ("pauses", "paused", "transport")

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
    """A relay after the 101: bytes both ways until either side ends, idles or is revoked.

    Slotted, as are its valves and frame trackers: an idle WebSocket may stay open for hours,
    thousands at once."""

    __slots__ = (
        "_abort_call",
        "_cancel_revocation",
        "_finished",
        "access",
        "backend",
        "backend_done",
        "backend_reading",
        "bytes_down",
        "bytes_up",
        "client",
        "client_done",
        "client_reading",
        "down_frames",
        "ending",
        "last_activity",
        "reactor",
        "relay",
        "released_at",
        "request",
        "up_frames",
    )

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
        # When the client connection's buffers were last given back (release_buffers).
        self.released_at = float("-inf")
        self.ending: str | None = None
        self.client_done = False
        self.backend_done = False
        self._abort_call: Any = None
        self._cancel_revocation: Any = None
        self._finished: list[defer.Deferred[None]] | None = None
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
        self.relay.opened(self)
        client.write(head)
        if backend_bytes:
            self.backend_data(backend_bytes)
        if taken.buffered:
            self.client_data(taken.buffered)
        if backend_closed:
            self._end("backend closed")
        self._cancel_revocation = self.access.on_revoked(self._revoked)

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

    def _revoked(self) -> None:
        self._end("access revoked", POLICY_VIOLATION)

    def check_idle(self, now: float) -> None:
        """End the relay if nothing went either way for the relay's idle timeout."""
        if self.ending is None and now - self.last_activity >= self.relay.idle_timeout:
            self._end("idle timeout", GOING_AWAY)

    def release_buffers(self, now: float, quiet: float) -> None:
        """Once the relay has been quiet for ``quiet`` seconds after any traffic, let the client
        connection give back the buffers that traffic grew (a TLS listener's memory BIOs,
        ops.tls.LeanTLSProtocol.release_buffers); once per quiet spell."""
        if self.ending is not None or self.last_activity <= self.released_at:
            return
        if now - self.last_activity < quiet:
            return
        self.released_at = now
        release = getattr(self.client, "release_buffers", None)
        if callable(release):
            release()

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
        if self._finished is None:
            self._finished = []
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
        self.relay.finished(self)
        waiters, self._finished = self._finished or [], None
        for d in waiters:
            d.callback(None)
