"""A bounded cache whose entries end at a given time. Pure: the caller passes the clock reading."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


@dataclass(frozen=True)
class Entry(Generic[V]):
    value: V
    expires_at: float


class ExpiringCache(Generic[K, V]):
    """Least-recently-used eviction beyond ``max_entries``; ``get`` no longer returns an entry
    once it expires, but the entry stays (until evicted or replaced) for ``stale``: while the
    directory is unreachable, the guard may fall back on it for a bounded time."""

    def __init__(self, max_entries: int) -> None:
        if max_entries <= 0:
            raise ValueError("max_entries must be positive")
        self.max_entries = max_entries
        self._entries: OrderedDict[K, Entry[V]] = OrderedDict()

    def get(self, key: K, now: float) -> Entry[V] | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.expires_at <= now:
            return None
        self._entries.move_to_end(key)
        return entry

    def stale(self, key: K) -> Entry[V] | None:
        """The entry, expired or not."""
        return self._entries.get(key)

    def put(self, key: K, value: V, expires_at: float) -> None:
        self._entries[key] = Entry(value, expires_at)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def discard(self, key: K) -> None:
        self._entries.pop(key, None)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
