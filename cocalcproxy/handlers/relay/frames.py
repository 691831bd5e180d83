"""Frame boundaries in a spliced WebSocket stream, and the Close frames the proxy adds. Pure.

The relay copies bytes, not frames. :class:`FrameBoundary` follows one direction of the stream
just far enough to know whether it is between frames, so the proxy may add a Close frame of its
own (:func:`close_frame`) when it ends a relay itself, without corrupting a frame in flight.
No Twisted imports.
"""

from __future__ import annotations

import os


class FrameBoundary:
    """Follows one direction of a WebSocket byte stream just far enough to know where frames end.

    The relay copies bytes, not frames; this only lets it add a Close frame of its own when it
    ends a relay (shutdown, revocation, idle) without cutting into a frame in flight. Payloads
    are skipped, never looked at, so permessage-deflate and fragmentation make no difference.
    """

    __slots__ = ("_header", "_remaining")

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
