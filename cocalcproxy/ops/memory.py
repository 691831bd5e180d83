"""Give memory back to the system once a burst of work is over.

Under load (hundreds of TLS connections, each with OpenSSL buffers allocated with ``malloc``),
glibc's heap grows; when the connections close, the freed chunks stay in the process (glibc
returns only the top of the heap by itself), so a proxy that once served a burst stays ~10 MiB
larger at rest than one that never did. ``malloc_trim(0)`` hands every free page back
(``MADV_DONTNEED`` on free chunks inside the heap as well as its top).

Before trimming it runs the cyclic garbage collector once: a closed connection's protocol,
transport and Deferreds refer to each other, so their objects (and the OpenSSL buffers they
own) are only freed when the collector next runs, which after a burst may be a long time.

Both are done only when the process has just gone quiet after being busy, judged by its own
CPU time sampled once a second: no cost on the request path, and no page given back while a
burst is running (which would only be faulted in again). A quiet process is also collected
and trimmed once every ``period`` (a minute): what goes away at rest (the backend pool's idle
connections, closed a minute after the burst that opened them) is given back too. On a C
library without ``malloc_trim`` (musl, macOS) the service does nothing.
"""

from __future__ import annotations

import ctypes
import gc
import time
from collections.abc import Callable
from typing import Any

from twisted.application import service
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

log = Logger()

#: A second in which the process used at least this share of a CPU counts as busy ...
BUSY_SHARE = 0.2
#: ... and one below this share counts as quiet; a quiet second after a busy one trims.
QUIET_SHARE = 0.05


def malloc_trim() -> Callable[[], int] | None:
    """glibc's ``malloc_trim(0)`` as a callable, or None where the C library lacks it."""
    try:
        function = ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError):
        return None
    function.argtypes = [ctypes.c_size_t]
    function.restype = ctypes.c_int
    return lambda: int(function(0))


class IdleTrim(service.Service):
    """Every ``interval`` seconds, reads the process's CPU time; after a busy interval, the
    first quiet one calls ``collect`` and then ``trim``; so does a quiet one ``period``
    seconds after the last time."""

    def __init__(
        self,
        reactor: Any,
        trim: Callable[[], object] | None = None,
        collect: Callable[[], object] = gc.collect,
        cpu_time: Callable[[], float] = time.process_time,
        interval: float = 1.0,
        period: float = 60.0,
    ) -> None:
        self.reactor = reactor
        self.trim = trim if trim is not None else malloc_trim()
        self.collect = collect
        self.cpu_time = cpu_time
        self.interval = interval
        self.period = period
        self._since = 0.0
        self.busy = False
        self.trims = 0
        self._last = 0.0
        self._loop: LoopingCall | None = None

    def startService(self) -> None:  # noqa: N802
        super().startService()
        if self.trim is None:
            return
        self._last = self.cpu_time()
        self._loop = LoopingCall(self.check)
        self._loop.clock = self.reactor
        self._loop.start(self.interval, now=False).addErrback(
            lambda f: log.failure("memory trim stopped", f)
        )

    def stopService(self) -> None:  # noqa: N802
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    def check(self) -> None:
        now = self.cpu_time()
        share = (now - self._last) / self.interval
        self._last = now
        self._since += self.interval
        if share >= BUSY_SHARE:
            self.busy = True
        elif share < QUIET_SHARE and (self.busy or self._since >= self.period):
            self.busy = False
            self._since = 0.0
            if self.trim is not None:
                self.collect()
                self.trim()
                self.trims += 1
            # The trim's own CPU time must not count as the next interval's work.
            self._last = self.cpu_time()
