"""Pure path parsing for the raw file server: an encoded URL path -> safe name segments.

The rules are deliberately strict, because the result names files on the server's disk:

* the path is split on ``/`` *before* decoding, and each segment is percent-decoded exactly
  once, so ``%2f`` can never become a separator and ``%252e`` stays the literal name ``%2e``;
* a malformed escape (``%zz``, ``%4``) is refused rather than guessed at;
* after decoding, a segment may not be empty (``//``: an absolute path in disguise), ``.`` or
  ``..``, and may not contain NUL, ``/`` or ``\\``.

Segments stay ``bytes``: POSIX file names are bytes and need not be UTF-8.
No Twisted imports, no file system access.
"""

from __future__ import annotations

from dataclasses import dataclass

_HEX = b"0123456789abcdefABCDEF"


@dataclass(frozen=True)
class RawPath:
    """A checked path below the home directory.

    ``segments`` are decoded names; ``directory_form`` is true when the URL ended in ``/``
    (the root, ``/``, has no segments and is in directory form).
    """

    segments: tuple[bytes, ...]
    directory_form: bool


@dataclass(frozen=True)
class BadPath:
    """A refused path; ``reason`` is fixed text (it never echoes the input)."""

    reason: str


def percent_decode(segment: bytes) -> bytes | None:
    """Decode ``%XX`` escapes once; None when an escape is malformed."""
    if b"%" not in segment:
        return segment
    out = bytearray()
    i, n = 0, len(segment)
    while i < n:
        byte = segment[i]
        if byte == 0x25:  # "%"
            pair = segment[i + 1 : i + 3]
            if len(pair) != 2 or pair[0] not in _HEX or pair[1] not in _HEX:
                return None
            out.append(int(pair, 16))
            i += 3
        else:
            out.append(byte)
            i += 1
    return bytes(out)


def check_segment(name: bytes) -> str | None:
    """Why a decoded segment is refused, or None when it is an acceptable file name."""
    if name == b"":
        return "The path contains an empty segment."
    if name in (b".", b".."):
        return "The path contains a '.' or '..' segment."
    if b"\x00" in name:
        return "The path contains a NUL byte."
    if b"/" in name:
        return "The path contains an encoded slash."
    if b"\\" in name:
        return "The path contains a backslash."
    return None


def parse(path: bytes) -> RawPath | BadPath:
    """Parse the still-encoded path after the raw prefix (no query), e.g. ``b"/a%20b/c.txt"``."""
    if not path.startswith(b"/"):
        return BadPath("The path must start with a slash.")
    body = path[1:]
    if body == b"":
        return RawPath((), True)
    pieces = body.split(b"/")
    directory_form = pieces[-1] == b""
    if directory_form:
        pieces.pop()
    segments: list[bytes] = []
    for piece in pieces:
        decoded = percent_decode(piece)
        if decoded is None:
            return BadPath("The path contains a malformed percent-escape.")
        reason = check_segment(decoded)
        if reason is not None:
            return BadPath(reason)
        segments.append(decoded)
    return RawPath(tuple(segments), directory_form)


def has_query_flag(query: bytes, flag: bytes) -> bool:
    """True when the query string names ``flag`` as a key (``?download`` or ``?download=1``)."""
    for part in query.split(b"&"):
        key = part.split(b"=", 1)[0]
        if percent_decode(key.replace(b"+", b" ")) == flag:
            return True
    return False
