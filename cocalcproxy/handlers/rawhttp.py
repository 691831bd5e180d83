"""Pure HTTP rules for the raw file server: validators, preconditions, ranges, negotiation.

RFC 9110 sections 8.8 (validators), 13 (conditional requests), 14 (ranges) and 12.5.1 (Accept);
RFC 6266 / 8187 (Content-Disposition file names). No Twisted imports, no I/O.
"""

from __future__ import annotations

import calendar
import email.utils
import mimetypes
import re
from dataclasses import dataclass
from urllib.parse import quote

# More ranges than this in one request is treated as abuse: the header is ignored (200).
MAX_RANGES = 100

_MIME = mimetypes.MimeTypes()  # the built-in table only: the host's /etc/mime.types is not read
for _type, _ext in (
    ("text/markdown", ".md"),
    ("text/markdown", ".markdown"),
    ("application/x-ipynb+json", ".ipynb"),
    ("text/plain", ".log"),
    ("text/x-tex", ".tex"),
    ("text/x-rst", ".rst"),
    ("application/yaml", ".yaml"),
    ("application/yaml", ".yml"),
    ("text/x-python", ".sage"),
    ("application/toml", ".toml"),
):
    _MIME.add_type(_type, _ext)

# A compressed file is served as what it is, never with Content-Encoding (that would make a
# browser silently unpack a download).
_COMPRESSED = {
    "gzip": "application/gzip",
    "bzip2": "application/x-bzip2",
    "xz": "application/x-xz",
    "br": "application/x-brotli",
    "compress": "application/x-compress",
}

_TEXTUAL = (
    "application/json",
    "application/javascript",
    "application/xml",
    "application/yaml",
    "application/toml",
    "application/x-ipynb+json",
)


def content_type(name: bytes) -> bytes:
    """The Content-Type for a file name, with ``charset=utf-8`` for text."""
    text = name.decode("utf-8", "replace")
    guessed, encoding = _MIME.guess_type(text, strict=False)
    if encoding is not None:
        guessed = _COMPRESSED.get(encoding, "application/octet-stream")
    if guessed is None:
        guessed = "application/octet-stream"
    if guessed.startswith("text/") or guessed in _TEXTUAL:
        guessed += "; charset=utf-8"
    return guessed.encode("ascii")


def content_disposition(name: bytes) -> bytes:
    """``attachment`` with an ASCII fallback ``filename`` and an exact UTF-8 ``filename*``."""
    text = name.decode("utf-8", "replace")
    fallback = "".join(c if 0x20 <= ord(c) < 0x7F and c not in '"\\%' else "_" for c in text)
    exact = quote(text.encode("utf-8"), safe="!#$&+-.^_`|~")
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{exact}".encode("ascii")


def etag_for(inode: int, size: int, mtime_ns: int) -> str:
    """A strong validator: changes whenever the file is replaced, resized or touched."""
    return f'"{inode:x}-{size:x}-{mtime_ns:x}"'


def http_date(seconds: float) -> str:
    return email.utils.formatdate(int(seconds), usegmt=True)


def parse_http_date(value: str | None) -> int | None:
    """Seconds since the epoch for any of the three HTTP date formats; None if invalid."""
    if not value:
        return None
    parsed = email.utils.parsedate_tz(value.strip())
    if parsed is None:
        return None
    try:
        return calendar.timegm(parsed[:6]) - (parsed[9] or 0)
    except (ValueError, OverflowError):
        return None


_ETAG = re.compile(r'\s*(W/)?("[\x21\x23-\x7e\x80-\xff]*")\s*(?:,|$)')


def parse_etags(value: str) -> list[tuple[bool, str]] | None:
    """(weak, opaque tag) pairs of an If-Match / If-None-Match list, [] for ``*``, None if bad."""
    if value.strip() == "*":
        return []
    tags: list[tuple[bool, str]] = []
    pos = 0
    while pos < len(value):
        if not value[pos:].strip(" \t,"):
            break
        match = _ETAG.match(value, pos)
        if match is None:
            return None
        tags.append((match.group(1) is not None, match.group(2)))
        pos = match.end()
    return tags


def _matches(value: str, etag: str, strong: bool) -> bool:
    tags = parse_etags(value)
    if tags is None:
        return False
    if tags == []:
        return True  # "*": the file exists
    return any(tag == etag and not (strong and weak) for weak, tag in tags)


@dataclass(frozen=True)
class Validators:
    etag: str
    last_modified: int  # whole seconds, as sent in Last-Modified


def preconditions(
    method: bytes,
    headers: dict[str, str | None],
    validators: Validators,
) -> int | None:
    """Evaluate RFC 9110 section 13.2.2 in order: None to proceed, else 304 or 412.

    ``headers`` maps lower-case names (if-match, if-none-match, if-modified-since,
    if-unmodified-since) to their combined values or None.
    """
    safe = method in (b"GET", b"HEAD")
    if_match = headers.get("if-match")
    if if_match is not None:
        if not _matches(if_match, validators.etag, strong=True):
            return 412
    else:
        since = parse_http_date(headers.get("if-unmodified-since"))
        if since is not None and validators.last_modified > since:
            return 412
    if_none_match = headers.get("if-none-match")
    if if_none_match is not None:
        if _matches(if_none_match, validators.etag, strong=False):
            return 304 if safe else 412
    elif safe:
        since = parse_http_date(headers.get("if-modified-since"))
        if since is not None and validators.last_modified <= since:
            return 304
    return None


def if_range_allows(value: str | None, validators: Validators) -> bool:
    """True when a Range may be honoured: no If-Range, or it still names this version."""
    if value is None:
        return True
    value = value.strip()
    if value.startswith("W/"):
        return False  # weak tags never validate a range
    if value.startswith('"'):
        return value == validators.etag
    return parse_http_date(value) == validators.last_modified


class Unsatisfiable:
    """No requested range overlaps the file: 416 with ``Content-Range: bytes */size``."""


UNSATISFIABLE = Unsatisfiable()

_SPEC = re.compile(r"^(?:([0-9]{1,19})-([0-9]{0,19})|-([0-9]{1,19}))$")


def parse_ranges(value: str | None, size: int) -> list[tuple[int, int]] | Unsatisfiable | None:
    """Inclusive (first, last) byte ranges to send; None to ignore the header and send it all.

    Invalid syntax, another unit or more than MAX_RANGES ranges make the header ignored, as
    RFC 9110 allows. Overlapping or adjacent ranges are coalesced (in ascending order), so a
    client cannot make the server repeat the same bytes many times.
    """
    if value is None:
        return None
    unit, sep, spec_list = value.partition("=")
    if not sep or unit.strip().lower() != "bytes":
        return None
    specs = [s.strip() for s in spec_list.split(",")]
    specs = [s for s in specs if s]
    if not specs or len(specs) > MAX_RANGES:
        return None
    wanted: list[tuple[int, int]] = []
    for spec in specs:
        match = _SPEC.match(spec)
        if match is None:
            return None
        first_s, last_s, suffix_s = match.groups()
        if suffix_s is not None:
            length = int(suffix_s)
            if length > 0 and size > 0:
                wanted.append((max(0, size - length), size - 1))
            continue
        first = int(first_s)
        if last_s:
            last = int(last_s)
            if last < first:
                return None
        else:
            last = size - 1
        if first < size:
            wanted.append((first, min(last, size - 1)))
    if not wanted:
        return UNSATISFIABLE
    return _coalesce(wanted)


def _coalesce(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    ordered = sorted(ranges)
    if all(ordered[i][1] + 1 < ordered[i + 1][0] for i in range(len(ordered) - 1)):
        return ranges  # disjoint: keep the order the client asked for
    merged = [ordered[0]]
    for first, last in ordered[1:]:
        top_first, top_last = merged[-1]
        if first <= top_last + 1:
            merged[-1] = (top_first, max(top_last, last))
        else:
            merged.append((first, last))
    return merged


@dataclass(frozen=True)
class Part:
    """One piece of a response body: ``head`` bytes, then ``length`` bytes of file at ``offset``."""

    head: bytes
    offset: int
    length: int


def multipart_layout(
    ranges: list[tuple[int, int]], size: int, ctype: bytes, boundary: bytes
) -> tuple[list[Part], bytes, int]:
    """Parts, closing delimiter and exact Content-Length of a multipart/byteranges body."""
    parts = []
    total = 0
    for first, last in ranges:
        head = (
            b"\r\n--"
            + boundary
            + b"\r\nContent-Type: "
            + ctype
            + b"\r\nContent-Range: "
            + content_range(first, last, size)
            + b"\r\n\r\n"
        )
        parts.append(Part(head, first, last - first + 1))
        total += len(head) + last - first + 1
    closing = b"\r\n--" + boundary + b"--\r\n"
    return parts, closing, total + len(closing)


def content_range(first: int, last: int, size: int) -> bytes:
    return b"bytes %d-%d/%d" % (first, last, size)


def _quality(accept: str, wanted: str) -> float:
    """The q-value ``accept`` gives to ``wanted`` (most specific matching media range wins)."""
    main, _, sub = wanted.partition("/")
    best_specificity, best_q = -1, 0.0
    for item in accept.split(","):
        fields = [f.strip() for f in item.split(";")]
        media = fields[0].lower()
        q = 1.0
        for param in fields[1:]:
            name, _, val = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = max(0.0, min(1.0, float(val.strip())))
                except ValueError:
                    q = 0.0
        m_main, _, m_sub = media.partition("/")
        if media == wanted:
            specificity = 2
        elif m_main == main and m_sub == "*":
            specificity = 1
        elif media == "*/*":
            specificity = 0
        else:
            continue
        if specificity > best_specificity:
            best_specificity, best_q = specificity, q
    return best_q


def prefers_json(accept: str | None) -> bool:
    """True when the client ranks application/json above text/html."""
    if not accept:
        return False
    json_q = _quality(accept, "application/json")
    return json_q > 0 and json_q > _quality(accept, "text/html")
