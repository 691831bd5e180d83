"""systemd integration written for the protocol itself: sd_notify and the watchdog.

The notification protocol is one datagram per message, sent to the ``AF_UNIX`` socket named by
``$NOTIFY_SOCKET`` (a name starting with ``@`` is in the abstract namespace). The payload is
newline-separated ``KEY=VALUE`` assignments such as ``READY=1``. Nothing here blocks: the socket is
non-blocking and a lost notification is logged, never raised, because a missing supervisor must
not take the proxy down.

The watchdog pings (``WATCHDOG=1``) every half ``$WATCHDOG_USEC`` from a reactor timer, so a ping
proves that the reactor is turning, which is the liveness that matters for an event-driven server.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Mapping
from typing import Any

from twisted.application import service
from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

# The namespace operators see in log lines (kept from before the package layout).
log = Logger(namespace="cocalcproxy.systemd")


# What systemd hands the service's main process only: a worker process started under a
# supervisor must not see them (it would claim readiness, pet the watchdog or adopt sockets).
SUPERVISOR_ONLY_ENV = frozenset(
    {"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"}
)


def notify_address(environ: Mapping[str, str]) -> str | bytes | None:
    """The address to send notifications to, or None when not supervised.

    Abstract socket names (``@name``) become a bytes address starting with a NUL byte; anything
    that is neither an absolute path nor abstract is refused, as sd_notify(3) does.
    """
    name = environ.get("NOTIFY_SOCKET", "")
    if not name:
        return None
    if name.startswith("@"):
        return b"\0" + name[1:].encode()
    if name.startswith("/"):
        return name
    log.warn("ignoring NOTIFY_SOCKET={name!r}: not a path or an abstract name", name=name)
    return None


def watchdog_interval(environ: Mapping[str, str], pid: int) -> float | None:
    """Seconds between watchdog pings (half ``$WATCHDOG_USEC``), or None when not requested.

    ``$WATCHDOG_PID``, when set, must be our own pid: otherwise the watchdog is meant for another
    process (a parent that exec'd us, for instance) and we must stay silent.
    """
    usec = environ.get("WATCHDOG_USEC", "")
    if not usec:
        return None
    watchdog_pid = environ.get("WATCHDOG_PID", "")
    if watchdog_pid and watchdog_pid != str(pid):
        return None
    try:
        value = int(usec)
    except ValueError:
        log.warn("ignoring WATCHDOG_USEC={usec!r}: not a whole number", usec=usec)
        return None
    if value <= 0:
        return None
    return value / 1_000_000 / 2


def encode(**fields: str | int) -> bytes:
    """``encode(READY=1, STATUS="x")`` -> ``b"READY=1\\nSTATUS=x"``; values are one line each."""
    lines = []
    for key, value in fields.items():
        text = str(value)
        if "\n" in text:
            raise ValueError(f"notification value for {key} must be one line")
        lines.append(f"{key}={text}")
    return "\n".join(lines).encode()


class Notifier:
    """Sends notifications to the service manager; a no-op when ``$NOTIFY_SOCKET`` is unset."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.address = notify_address(env)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, **fields: str | int) -> bool:
        """Send one datagram; True when it was handed to the kernel."""
        if self.address is None:
            return False
        payload = encode(**fields)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            sock.setblocking(False)
            sock.sendto(payload, self.address)
        except OSError as e:
            log.warn("systemd notification {what} not sent: {why}", what=payload, why=str(e))
            return False
        finally:
            sock.close()
        return True


class SystemdService(service.Service):
    """``READY=1`` once every listener listens, ``WATCHDOG=1`` pings, ``STOPPING=1`` on stop.

    ``ready`` is a function returning a Deferred that fires once the proxy is really serving
    (``ProxyService.all_listening``); if it fails, nothing claims readiness and systemd sees the
    process exit instead. ``healthy``, when given, is asked before each watchdog ping: no ping
    while it says no (a supervisor whose worker stopped sending heartbeats).
    """

    def __init__(
        self,
        clock: IReactorTime,
        ready: Any,
        environ: Mapping[str, str] | None = None,
        pid: int | None = None,
        healthy: Callable[[], bool] | None = None,
    ) -> None:
        env = os.environ if environ is None else environ
        self.clock = clock
        self.ready = ready
        self.healthy = healthy
        self.notifier = Notifier(env)
        self.interval = watchdog_interval(env, os.getpid() if pid is None else pid)
        self._watchdog: task.LoopingCall | None = None
        self.readied = False
        self.stopping_sent = False

    def startService(self) -> None:  # noqa: N802
        super().startService()
        if not self.notifier.enabled:
            return
        if self.interval is not None:
            self._watchdog = task.LoopingCall(self._pet)
            self._watchdog.clock = self.clock
            self._watchdog.start(self.interval, now=True)
        d: defer.Deferred[Any] = defer.maybeDeferred(self.ready)
        d.addCallbacks(self._ready, self._not_ready)

    def _pet(self) -> None:
        if self.healthy is None or self.healthy():
            self.notifier.notify(WATCHDOG=1)

    def _ready(self, _: object) -> None:
        if not self.running:
            return
        self.readied = True
        self.notifier.notify(READY=1, STATUS="serving")

    def _not_ready(self, failure: Any) -> None:
        log.error("not telling systemd we are ready: {why}", why=failure.getErrorMessage())

    def notify_stopping(self) -> None:
        """Say ``STOPPING=1`` (once); called first thing on shutdown."""
        if self.stopping_sent or not self.notifier.enabled:
            return
        self.stopping_sent = True
        self.notifier.notify(STOPPING=1, STATUS="draining requests in flight")

    def stopService(self) -> None:  # noqa: N802
        super().stopService()
        self.notify_stopping()
        if self._watchdog is not None and self._watchdog.running:
            self._watchdog.stop()
        self._watchdog = None
