"""Sign-in failure limits, after OWASP's "device cookies". Pure: callers pass the time.

Only password attempts count (API tokens are 256-bit random values: never limited). A password
attempt comes either from a *known device* -- a browser that presents a device cookie bound to
that very account (guard/devices.py), which only a successful sign-in to the account hands
out -- or from an *unknown client*:

* a known device is limited on its own (``per_device``): its failures lock out that device
  only, never the account's other devices;
* unknown clients are limited per account name (``per_name``), whatever their addresses, and
  per address (``per_address``).

So guessing from any number of addresses stays bounded per name (``per_name``: 10 failures per
10 minutes, at most 60 an hour), while a flood of wrong guesses cannot lock the owner out of a
browser she signed in with before. A client that reached a limit is refused (429 with
Retry-After) until its oldest counted failure leaves the window, whether or not its next
password would be right. Memory is bounded: the oldest keys are forgotten first.

All state is failure times per string key. The guard asks a :class:`Limiter`: the proxy uses
:class:`DirectoryLimiter`, which keeps the failures in the directory (table
``signin_failures``), so every worker process and every machine on one directory counts
together; :class:`MemoryLimiter` keeps them in :class:`SlidingWindow` objects in this process
(tests, and the rules in their plainest form).
"""

from __future__ import annotations

import ipaddress
import math
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from twisted.internet.defer import Deferred, succeed

#: (failures, window in seconds) for unknown clients per address, per account name, and for
#: each known device.
PER_ADDRESS = (20, 600.0)
PER_NAME = (10, 600.0)
PER_DEVICE = (10, 600.0)


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
    per_device: SlidingWindow

    @classmethod
    def default(cls) -> SignInLimits:
        return cls(
            per_address=SlidingWindow(*PER_ADDRESS),
            per_name=SlidingWindow(*PER_NAME),
            per_device=SlidingWindow(*PER_DEVICE),
        )

    def retry_after(
        self, address: str, name: str, now: float, device: str | None = None
    ) -> int | None:
        """Whole seconds (at least 1) until this client may try this name, or None."""
        if device is not None:
            waits = [self.per_device.retry_after(device, now)]
        else:
            waits = [
                self.per_address.retry_after(address_key(address), now),
                self.per_name.retry_after(name_key(name), now),
            ]
        longest = max((w for w in waits if w is not None), default=None)
        return None if longest is None else max(1, math.ceil(longest))

    def begin(self, address: str, name: str, now: float, device: str | None = None) -> int | None:
        """Start a password attempt: seconds to wait if limited, else None, the attempt counted
        as failed until ``succeeded`` takes it back. Counting first means concurrent guesses
        cannot overrun the limit while their passwords are being checked. ``device`` is the
        known device the attempt comes from (a device cookie valid for ``name``), else None."""
        wait = self.retry_after(address, name, now, device)
        if wait is None:
            if device is not None:
                self.per_device.failed(device, now)
            else:
                self.per_address.failed(address_key(address), now)
                self.per_name.failed(name_key(name), now)
        return wait

    def succeeded(self, address: str, name: str, started: float, device: str | None = None) -> None:
        """The attempt begun at ``started`` was right: uncount it and forget the name's (or the
        device's) failures. The address keeps its other failures, so a client cannot clear its
        count by signing in to an account of its own between guesses at others."""
        if device is not None:
            self.per_device.reset(device)
            return
        self.per_address.forgive(address_key(address), started)
        self.per_name.reset(name_key(name))


# --- the guard's interface ------------------------------------------------------------------


@dataclass(frozen=True)
class Attempt:
    """A password attempt allowed to go ahead (counted as failed until ``succeeded``)."""

    address: str
    name: str
    device: str | None
    started: float


class Limiter(Protocol):
    def begin(self, address: str, name: str, device: str | None) -> Deferred[int | Attempt]:
        """The Attempt to go ahead with, or the whole seconds (at least 1) to wait."""
        ...

    def succeeded(self, attempt: Attempt) -> Deferred[None]:
        """The attempt's password was right."""
        ...


class Clock(Protocol):
    def seconds(self) -> float: ...


class MemoryLimiter:
    """The limits counted in this process only."""

    def __init__(self, limits: SignInLimits, clock: Clock) -> None:
        self.limits = limits
        self.clock = clock

    def begin(self, address: str, name: str, device: str | None) -> Deferred[int | Attempt]:
        now = self.clock.seconds()
        wait = self.limits.begin(address, name, now, device)
        if wait is not None:
            return succeed(wait)
        return succeed(Attempt(address, name, device, now))

    def succeeded(self, attempt: Attempt) -> Deferred[None]:
        self.limits.succeeded(attempt.address, attempt.name, attempt.started, attempt.device)
        return succeed(None)


def _checks(address: str, name: str, device: str | None) -> list[tuple[str, int, float]]:
    if device is not None:
        return [("device:" + device, *PER_DEVICE)]
    return [
        ("address:" + address_key(address), *PER_ADDRESS),
        ("name:" + name_key(name), *PER_NAME),
    ]


class SignInStore(Protocol):
    """What DirectoryLimiter needs of the directory (``IDirectory``'s sign-in counters)."""

    def signin_attempt(
        self, checks: Sequence[tuple[str, int, float]]
    ) -> Deferred[tuple[float | None, float]]: ...

    def signin_forgive(self, key: str, at: float) -> Deferred[None]: ...

    def signin_reset(self, key: str) -> Deferred[None]: ...


class DirectoryLimiter:
    """The same rules, counted in the directory: every process on it counts together (one
    transaction per attempt; two processes racing on one key can each let one more through)."""

    def __init__(self, store: SignInStore) -> None:
        self.store = store

    def begin(self, address: str, name: str, device: str | None) -> Deferred[int | Attempt]:
        def decided(answer: tuple[float | None, float]) -> int | Attempt:
            wait, at = answer
            if wait is not None:
                return max(1, math.ceil(wait))
            return Attempt(address, name, device, at)

        return self.store.signin_attempt(_checks(address, name, device)).addCallback(decided)

    def succeeded(self, attempt: Attempt) -> Deferred[None]:
        if attempt.device is not None:
            return self.store.signin_reset("device:" + attempt.device)
        forgiven = self.store.signin_forgive(
            "address:" + address_key(attempt.address), attempt.started
        )

        def reset(_: Any) -> Deferred[None]:
            return self.store.signin_reset("name:" + name_key(attempt.name))

        return forgiven.addCallback(reset)
