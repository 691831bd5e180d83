"""Taking a connection over from Twisted's HTTPChannel: the only module that touches its privates.

Twisted has no public API for turning an HTTP/1.1 connection into something else after a
request (its own WebSocket support uses the private ``HTTPChannel._protocolUpgradeForWebsockets``,
which loses any bytes the client sent right after the handshake). This module does the same job
completely, and depends on these private facts of ``twisted.web.http.HTTPChannel``, each checked
by tests/test_takeover.py over real sockets:

* ``channel.requests`` is the queue of requests; while one is handled it is the only one.
* ``channel._dataBuffer`` (list of bytes) holds what the client sent after the request while it
  is being handled; ``channel._buffer`` (LineReceiver) holds bytes not yet looked at when the
  takeover happens inside the channel's own ``dataReceived``.
* Twisted's server protocol is a ``_GenericHTTPChannelProtocol`` wrapping the channel (its
  ``_channel``); the transport delivers to it as a TLS wrapper's ``wrappedProtocol`` or a TCP
  connection's ``protocol``, both looked up on every event, so putting another protocol there
  sends every later byte and the end of the connection to that one instead.
* The channel registered itself as the transport's push producer and may have paused the
  transport (more than 16 KiB arrived while the request was handled).

Proven on the Twisted versions named in ``PROVEN_TWISTED`` (and pinned in setup.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet.interfaces import IPushProducer, ITransport
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel, Request

# The Twisted releases this module has been tested on; setup.py pins the same range.
PROVEN_TWISTED = ">=26.10,<26.11"

_PRIVATE_ATTRIBUTES: tuple[tuple[str, type], ...] = (
    ("requests", list),
    ("_dataBuffer", list),
    ("_buffer", bytes),
)


class TakeoverUnsupported(Exception):
    """The connection cannot be taken over (HTTP/2, a changed Twisted, a pipelined request)."""


class ConnectionGone(Exception):
    """The client went away before the takeover."""


@dataclass
class TakenConnection:
    """A client connection that now belongs to the caller.

    ``transport`` is the connection's transport (TLS included); ``buffered`` are the bytes the
    client sent after the request, in order, which the caller must deliver before anything
    passed to its ``data_received`` later.
    """

    transport: ITransport
    buffered: bytes


def check_channel(channel: object) -> HTTPChannel:
    """Return the channel if this module knows how to take it over; else raise."""
    if not isinstance(channel, HTTPChannel):
        raise TakeoverUnsupported(f"not an HTTP/1.1 connection: {type(channel).__name__}")
    for name, kind in _PRIVATE_ATTRIBUTES:
        value = getattr(channel, name, None)
        if not isinstance(value, kind):
            import twisted

            raise TakeoverUnsupported(
                f"Twisted {twisted.__version__}: HTTPChannel.{name} is not a {kind.__name__}; "
                f"connection takeover is proven on Twisted {PROVEN_TWISTED} only"
            )
    return channel


class TakenProtocol:
    """What a taken-over connection delivers to: every byte to the taker, then the end to the
    taker and to the request (so its ``notifyFinish`` waiters see it end).

    It replaces Twisted's HTTP protocol on the transport, so nothing of the HTTP layer (the
    channel with its parser state, buffers and timers, and Twisted's protocol wrapper) is
    referenced any more: a connection held open for hours keeps only this, its request and the
    taker's own objects.
    """

    __slots__ = ("_connection_lost", "_request", "dataReceived")

    def __init__(
        self,
        request: Request,
        data_received: Callable[[bytes], None],
        connection_lost: Callable[[Failure], None],
    ) -> None:
        # The taker's callable itself, not a method calling it: one call less per read.
        self.dataReceived = data_received
        self._connection_lost = connection_lost
        self._request: Request | None = request

    def connectionLost(self, reason: Failure) -> None:  # noqa: N802
        request, self._request = self._request, None
        try:
            self._connection_lost(reason)
        finally:
            if request is not None:
                request.connectionLost(reason)


def protocol_holder(transport: object, delivers_to: object) -> tuple[object, str]:
    """The object and attribute through which ``transport`` reaches ``delivers_to``: a TLS
    wrapper's ``wrappedProtocol`` or a TCP connection's ``protocol``, holding that protocol
    itself or Twisted's HTTP/1.1 wrapper around it (its ``_channel``). Both are looked up on
    every event, so setting another protocol there sends every later byte and the end of the
    connection to it (the takeover, and the fast lane's hand-over and way back)."""
    for attribute in ("wrappedProtocol", "protocol"):
        protocol = getattr(transport, attribute, None)
        if protocol is not None and (
            protocol is delivers_to or getattr(protocol, "_channel", None) is delivers_to
        ):
            return transport, attribute
    raise TakeoverUnsupported("the transport does not deliver to this protocol")


def take_over(
    request: Request,
    data_received: Callable[[bytes], None],
    connection_lost: Callable[[Failure], None],
) -> TakenConnection:
    """Detach the request's connection from Twisted's HTTP parser and hand it to the caller.

    After this, every byte the client sends goes to ``data_received`` and the end of the
    connection to ``connection_lost``; the request itself then gets ``connectionLost`` too, so
    ``notifyFinish`` waiters (the site's in-flight count, the access log) see it end. The
    request is never finished, and is no longer attached to the channel (``request.channel``
    is None, as after any ``connectionLost``). The transport is resumed (reading) and has no
    producer. The channel's timers are stopped (a channel with a ``stop_timers`` method, as
    site.ProxyChannel, has it called) and nothing refers to the channel any more.
    """
    channel = check_channel(request.channel)
    transport = channel.transport
    if transport is None or getattr(request, "_disconnected", False):
        raise ConnectionGone("the client went away")
    if channel.requests != [request]:
        raise TakeoverUnsupported("another request is queued on this connection")
    holder, attribute = protocol_holder(transport, channel)

    private: Any = channel
    buffered = b"".join(private._dataBuffer) + private._buffer
    private._dataBuffer = []
    private._buffer = b""

    channel.setTimeout(None)
    stop_timers = getattr(channel, "stop_timers", None)
    if callable(stop_timers):
        stop_timers()
    aborting = getattr(channel, "_abortingCall", None)
    if aborting is not None and aborting.active():
        aborting.cancel()
        private._abortingCall = None

    setattr(holder, attribute, TakenProtocol(request, data_received, connection_lost))
    private.requests = []
    request.channel = None  # type: ignore[assignment]

    wire: Any = transport
    wire.unregisterProducer()
    producer: Any = IPushProducer(transport, None)
    if producer is not None:
        producer.resumeProducing()
    return TakenConnection(transport, buffered)
