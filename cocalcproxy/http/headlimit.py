"""Pure: a bound on a backend's response head, counted as its bytes arrive.

Twisted's HTTP client (``twisted.web._newclient.HTTPParser``, a ``LineReceiver``) bounds only the
length of each line (``LineReceiver.MAX_LENGTH``, 16 KiB); it keeps any number of header lines,
and silently skips any number of ``1xx`` interim responses. A backend could make the proxy hold an
unbounded head in memory and relay it (16,630 header lines once). :class:`HeadLimit` is fed the
raw bytes before the parser sees them and raises :class:`HeadTooLarge` as soon as the head, with
any interim responses before it, exceeds ``max_bytes`` or has more than ``max_fields`` fields.

Lines end at LF with an optional CR, as Twisted parses them; a line starting with a space or tab
continues the previous field (obsolete folding) and does not count as a field of its own.
"""

from __future__ import annotations

#: The whole response head, interim responses included: as the WebSocket relay's 64 KiB.
MAX_HEAD_BYTES = 64 * 1024
#: Header fields in one head. Browsers keep at most about 180 cookies per domain; a legitimate
#: head has a few dozen fields.
MAX_HEAD_FIELDS = 256


class HeadTooLarge(Exception):
    """The backend's response head went over a bound; the message says which."""


class HeadLimit:
    """Counts one response head (and the 1xx interim responses before it) as it arrives."""

    def __init__(self, max_bytes: int = MAX_HEAD_BYTES, max_fields: int = MAX_HEAD_FIELDS) -> None:
        self.max_bytes = max_bytes
        self.max_fields = max_fields
        self.size = 0
        self.fields = 0
        self.done = False
        self._line_length = 0
        self._line_start = b""
        self._status_line = True
        self._interim = False

    def feed(self, data: bytes) -> bool:
        """Count ``data``; True once the final head is complete (feed nothing more after that).

        Raises :class:`HeadTooLarge` when a bound is passed.
        """
        if self.done:
            return True
        if self.size == 0 and self._fits_whole(data):
            return True
        position, end = 0, len(data)
        while position < end:
            newline = data.find(b"\n", position)
            stop = end if newline < 0 else newline + 1
            taken = stop - position
            self.size += taken
            if self.size > self.max_bytes:
                raise HeadTooLarge(f"response head larger than {self.max_bytes} bytes")
            room = 16 - len(self._line_start)
            if room > 0:
                self._line_start += data[position : min(stop, position + room)]
            self._line_length += taken
            position = stop
            if newline >= 0:
                self._line_ended()
                if self.done:
                    return True
        return False

    def _fits_whole(self, data: bytes) -> bool:
        """The usual case at once: the first bytes hold a whole final head, well within both
        bounds. The head ends at the first blank line, which is at or before the first
        CRLF CRLF; so it is no longer than that, and has no more fields than the lines up to
        there less the status line and the blank one. Anything else is counted line by line."""
        end = data.find(b"\r\n\r\n")
        if end < 0 or end + 4 > self.max_bytes:
            return False
        if data.count(b"\n", 0, end + 4) - 2 > self.max_fields:
            return False
        if _is_interim(data[: data.find(b"\n")]):
            return False
        self.size = end + 4
        self.done = True
        return True

    def _line_ended(self) -> None:
        start = self._line_start
        blank = self._line_length <= 2 and start.rstrip(b"\r\n") == b""
        self._line_start = b""
        self._line_length = 0
        if self._status_line:
            self._status_line = False
            self._interim = _is_interim(start)
            return
        if blank:
            if self._interim:
                # A 1xx response Twisted will skip: the next line is another status line.
                self._status_line = True
                self.fields = 0
            else:
                self.done = True
            return
        if start[:1] not in (b" ", b"\t"):
            self.fields += 1
            if self.fields > self.max_fields:
                raise HeadTooLarge(f"more than {self.max_fields} header fields")


def _is_interim(status_line: bytes) -> bool:
    """``HTTP/1.1 1xx ...``: Twisted's client parser skips every 1xx response and reads on."""
    parts = status_line.split(b" ", 2)
    if len(parts) < 2:
        return False
    code = parts[1][:3]
    return len(code) == 3 and code.isdigit() and code[:1] == b"1"
