"""Writing to a TCP connection now, instead of one reactor turn later.

Twisted's ``FileDescriptor.write`` never sends: it appends to a buffer, registers the socket for
writability (an ``epoll_ctl``), and sends when the next ``epoll_wait`` reports it writable, after
which it unregisters (another ``epoll_ctl``). For a proxy that answers one small request with one
small write to the backend and one to the client, that is four system calls and two extra
passes through the reactor per request, and the answer waits behind every other event of that
turn (it was about a tenth of the CPU of a small proxied request, and most of the latency of
the connection-per-request case). This is Twisted's open ticket #5303 ("Default transport
implementation doesn't write out bytes immediately"); node, nginx and asyncio all write at once.

:func:`eager_write` sends at once when nothing is waiting in the transport's buffers (so the
order of bytes is kept), and hands whatever the socket did not take (or any error) to the
transport's own ``write``, whose buffering, producer pausing and error handling then apply
exactly as before. It is used in the two places the proxy writes to sockets on the hot path:
the TLS layer's ``_flushSendBIO`` (every byte to clients) and the backend client.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import tcp


def eager_write(transport: Any, data: bytes) -> None:
    """``transport.write(data)``, sending right away when the transport has nothing pending."""
    if (
        data
        and isinstance(transport, tcp.Connection)
        and not transport._tempDataLen
        and transport.offset == len(transport.dataBuffer)
        and transport.connected
        and not transport._writeDisconnected
        # A pull producer is asked for more only when Twisted's own doWrite drains the buffer;
        # bytes sent here would never trigger that, and its transfer would stall.
        and (transport.producer is None or transport.streamingProducer)
    ):
        sent = transport.writeSomeData(data)
        if type(sent) is int and sent > 0:
            if sent == len(data):
                return
            data = data[sent:]
    transport.write(data)
