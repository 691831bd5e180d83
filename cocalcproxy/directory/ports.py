"""Port lists such as ``8000-8099,8888``: one pure parser, one normal form. No Twisted imports.

Used by ``project add/set --ports``, ``--default-ports`` and ``--deny-ports``, the directory
(where the normal form is stored) and the backend policy (:mod:`cocalcproxy.handlers.backends`).

Grammar: items separated by commas, each a port (``8888``) or an inclusive range
(``8000-8099``); a port is decimal 1..65535 without sign or leading zero, as in URLs. Spaces
around items are ignored. ``none`` is the empty set and ``all`` is 1-65535. The normal form
sorts the ranges and merges overlapping and adjacent ones, so two spellings of one set compare
equal and print alike.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass

MIN_PORT = 1
MAX_PORT = 65535
#: Longest port list accepted (characters) and most items in it: a list is typed by an operator.
MAX_TEXT = 4096
MAX_ITEMS = 1024

_PORT = r"[1-9][0-9]{0,4}"
_ITEM = re.compile(rf"(?P<lo>{_PORT})(?:-(?P<hi>{_PORT}))?")


class PortListError(ValueError):
    """A port list that cannot be parsed; the message is safe to show (the input is quoted)."""


@dataclass(frozen=True)
class PortSet:
    """A set of TCP ports as sorted, disjoint, non-adjacent inclusive ranges."""

    ranges: tuple[tuple[int, int], ...] = ()

    def __post_init__(self) -> None:
        # Keep the bisect keys next to the ranges; frozen, so set through object.__setattr__.
        object.__setattr__(self, "_starts", tuple(lo for lo, _ in self.ranges))

    def __contains__(self, port: object) -> bool:
        if not isinstance(port, int):
            return False
        i = bisect.bisect_right(self._starts, port) - 1  # type: ignore[attr-defined]
        return i >= 0 and self.ranges[i][0] <= port <= self.ranges[i][1]

    def __bool__(self) -> bool:
        return bool(self.ranges)

    def __len__(self) -> int:
        return sum(hi - lo + 1 for lo, hi in self.ranges)

    def __str__(self) -> str:
        if not self.ranges:
            return "none"
        return ",".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in self.ranges)

    def intersection(self, other: PortSet) -> PortSet:
        out: list[tuple[int, int]] = []
        for lo, hi in self.ranges:
            for olo, ohi in other.ranges:
                a, b = max(lo, olo), min(hi, ohi)
                if a <= b:
                    out.append((a, b))
        return normalise(out)


def normalise(ranges: list[tuple[int, int]]) -> PortSet:
    """Sort and merge overlapping or adjacent ranges."""
    merged: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if merged and lo <= merged[-1][1] + 1:
            if hi > merged[-1][1]:
                merged[-1] = (merged[-1][0], hi)
        else:
            merged.append((lo, hi))
    return PortSet(tuple(merged))


NONE = PortSet()
ALL = PortSet(((MIN_PORT, MAX_PORT),))
#: Ports an unprivileged program may listen on (Linux: below 1024 needs privileges).
UNPRIVILEGED = PortSet(((1024, MAX_PORT),))


def _shown(text: str) -> str:
    return repr(text if len(text) <= 60 else text[:60] + "...")


def parse_ports(text: str) -> PortSet:
    """The PortSet a port list names; raises :class:`PortListError` with a clear message."""
    if not isinstance(text, str):
        raise PortListError("a port list must be text such as '8000-8099,8888'")
    if len(text) > MAX_TEXT:
        raise PortListError(f"port list too long (at most {MAX_TEXT} characters)")
    stripped = text.strip()
    if stripped.lower() == "none":
        return NONE
    if stripped.lower() == "all":
        return ALL
    if not stripped:
        raise PortListError("empty port list: give ports such as '8000-8099,8888', or 'none'")
    items = stripped.split(",")
    if len(items) > MAX_ITEMS:
        raise PortListError(f"port list has too many items (at most {MAX_ITEMS})")
    ranges: list[tuple[int, int]] = []
    for item in items:
        m = _ITEM.fullmatch(item.strip())
        if m is None:
            raise PortListError(
                f"invalid port list item {_shown(item.strip())}: give a port (8888) or a range "
                "(8000-8099), ports 1-65535 without leading zeros"
            )
        lo = int(m.group("lo"))
        hi = int(m.group("hi") or lo)
        if hi > MAX_PORT or lo > MAX_PORT:
            raise PortListError(f"invalid port in {_shown(item.strip())}: ports go up to 65535")
        if lo > hi:
            raise PortListError(f"invalid range {_shown(item.strip())}: the first port is larger")
        ranges.append((lo, hi))
    return normalise(ranges)
