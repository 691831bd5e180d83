"""Sign-in failure limits per client address and per account name. Pure: callers pass the time.

Only failures count. A client that reached either limit is refused (429 with Retry-After) until
its oldest counted failure leaves the window, whether or not its next password would be right;
that is what makes guessing slow. Memory is bounded: the oldest keys are forgotten first.
"""

from __future__ import annotations

import ipaddress
import math
from collections import OrderedDict, deque
from dataclasses import dataclass


class SlidingWindow:
    """At most ``limit`` failures per key within any ``window`` seconds."""

    def __init__(self, limit: int, window: float, max_keys: int = 100_000) -> None:
        if limit <= 0 or window <= 0:
            raise ValueError("limit and window must be positive")
        self.limit = limit
        self.window = window
        self.max_keys = max_keys
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def _recent(self, key: str, now: float) -> deque[float] | None:
        times = self._failures.get(key)
        if times is None:
            return None
        while times and times[0] <= now - self.window:
            times.popleft()
        if not times:
            del self._failures[key]
            return None
        return times

    def retry_after(self, key: str, now: float) -> float | None:
        """Seconds until ``key`` may try again, or None when it may try now."""
        times = self._recent(key, now)
        if times is None or len(times) < self.limit:
            return None
        return times[0] + self.window - now

    def failed(self, key: str, now: float) -> None:
        times = self._recent(key, now)
        if times is None:
            times = deque(maxlen=self.limit)
            self._failures[key] = times
        times.append(now)
        self._failures.move_to_end(key)
        while len(self._failures) > self.max_keys:
            self._failures.popitem(last=False)

    def forgive(self, key: str, at: float) -> None:
        """Take back one failure counted at ``at`` (an attempt that turned out right)."""
        times = self._failures.get(key)
        if times is not None and at in times:
            times.remove(at)
            if not times:
                del self._failures[key]

    def reset(self, key: str) -> None:
        self._failures.pop(key, None)


def address_key(host: str) -> str:
    """IPv4 addresses count alone; IPv6 by /64, since one client usually holds a whole /64."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


def name_key(name: str) -> str:
    return name.strip().casefold()


@dataclass
class SignInLimits:
    per_address: SlidingWindow
    per_name: SlidingWindow

    @classmethod
    def default(cls) -> SignInLimits:
        return cls(per_address=SlidingWindow(20, 600.0), per_name=SlidingWindow(10, 600.0))

    def retry_after(self, address: str, name: str, now: float) -> int | None:
        """Whole seconds (at least 1) until this address may try this name, or None."""
        waits = [
            self.per_address.retry_after(address_key(address), now),
            self.per_name.retry_after(name_key(name), now),
        ]
        longest = max((w for w in waits if w is not None), default=None)
        return None if longest is None else max(1, math.ceil(longest))

    def begin(self, address: str, name: str, now: float) -> int | None:
        """Start an attempt: seconds to wait if limited, else None, the attempt counted as failed
        until ``succeeded`` takes it back. Counting first means concurrent guesses cannot
        overrun the limit while their passwords are being checked."""
        wait = self.retry_after(address, name, now)
        if wait is None:
            self.per_address.failed(address_key(address), now)
            self.per_name.failed(name_key(name), now)
        return wait

    def succeeded(self, address: str, name: str, started: float) -> None:
        """The attempt begun at ``started`` was right: uncount it and forget the name's failures.
        The address keeps its other failures, so a client cannot clear its count by signing in
        to an account of its own between guesses at others."""
        self.per_address.forgive(address_key(address), started)
        self.per_name.reset(name_key(name))
