"""Change notifications from PostgreSQL: every running proxy hears of a directory change at once.

Every write that bumps the change counter also sends ``NOTIFY`` on ``CHANGES_CHANNEL`` in the
same transaction (``Dialect.announce_change``), so the notification is delivered when, and only
when, the change is committed. ``ChangeListener`` keeps one extra connection per proxy that
``LISTEN``s on that channel and calls ``on_change()`` for each batch of notifications that
arrives. The notification carries nothing: the change counter stays the one source of truth, and
``on_change`` only makes the guard read it now instead of at its next poll.

How it waits: the connection's socket is registered with the reactor as an ``IReadDescriptor``,
so waiting costs no thread and wakes the reactor the moment bytes arrive; reading is libpq's
``PQconsumeInput`` on its non-blocking socket, which never blocks. Only connecting and the
``LISTEN`` statement (DNS, TCP, TLS, authentication: these can block) run in a thread. A thread
blocked in ``Connection.notifies()`` would also work but would hold a thread per proxy for ever,
need a wake-up to stop, and hand every notification across threads.

When the connection is lost (PostgreSQL restarted, the backend terminated, a network cut found
by TCP keepalives) the listener logs one line, retries with exponential backoff (0.5 s doubling
to 30 s) and logs one line when it listens again; meanwhile the guard's one-second poll of the
change counter still notices every change. Each time it starts listening it calls
``on_change()`` once, because notifications sent while it was away are lost.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReadDescriptor
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from cocalcproxy.directory.dialect import CHANGES_CHANNEL

log = Logger()

# Parameters of the listening connection where the database URL does not set them: a name
# operators can find in pg_stat_activity, and TCP keepalives so that a silently dead network
# path is noticed (idle 30 s, then 3 probes 10 s apart) rather than leaving the proxy deaf.
APPLICATION_NAME = "cocalcproxy change listener"
LISTENER_PARAMETERS: dict[str, str | int] = {
    "application_name": APPLICATION_NAME,
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
}

MIN_BACKOFF = 0.5
MAX_BACKOFF = 30.0


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


@implementer(IReadDescriptor)
class _Socket:
    """The listening connection's socket as the reactor sees it.

    The reactor gets a duplicate of libpq's descriptor, owned by us: libpq closes its own as soon
    as it finds the connection gone, and the reactor must still be able to unregister ours.
    """

    def __init__(self, listener: ChangeListener, connection: Any) -> None:
        self.listener = listener
        self.connection = connection
        self.fd: int = os.dup(connection.pgconn.socket)

    def fileno(self) -> int:
        return self.fd

    def logPrefix(self) -> str:  # noqa: N802
        return "ChangeListener"

    def doRead(self) -> None:  # noqa: N802
        self.listener._readable(self)

    def connectionLost(self, reason: Failure) -> None:  # noqa: N802
        self.listener._lost(self, _first_line(reason.value or Exception("connection lost")))


class ChangeListener:
    """``LISTEN`` for directory changes on PostgreSQL; see the module docstring.

    ``connect`` opens a new psycopg connection in autocommit mode (blocking; it runs in a
    thread). ``reactor`` must provide ``IReactorFDSet``, ``IReactorTime`` and a thread pool.
    """

    def __init__(
        self,
        connect: Callable[..., Any],
        reactor: Any,
        on_change: Callable[[], object],
        describe: str = "the directory",
        min_backoff: float = MIN_BACKOFF,
        max_backoff: float = MAX_BACKOFF,
    ) -> None:
        self.connect = connect
        self.reactor = reactor
        self.on_change = on_change
        self.describe = describe
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        self.running = False
        self.listening = False
        # Set once a connection was lost (or the first one failed); cleared when back.
        self.down_since_logged = False
        self.backend_pid: int | None = None
        self._backoff = min_backoff
        self._socket: _Socket | None = None
        self._retry: Any = None
        self._connecting: Deferred[Any] | None = None

    # -- life cycle ----------------------------------------------------------------------------

    def start(self) -> None:
        if self.running:
            return
        self.running = True
        self._open()

    def stop(self) -> Deferred[None]:
        """Stop listening; the Deferred fires once no thread is using a connection."""
        self.running = False
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        self._close()
        connecting, self._connecting = self._connecting, None
        if connecting is None:
            return succeed(None)
        done: Deferred[None] = Deferred()
        connecting.addBoth(lambda _: done.callback(None))
        return done

    # -- connecting ----------------------------------------------------------------------------

    def _open(self) -> None:
        self._retry = None
        d = deferToThreadPool(self.reactor, self.reactor.getThreadPool(), self._connect_and_listen)
        self._connecting = d
        d.addCallbacks(self._opened, self._failed)

    def _connect_and_listen(self) -> Any:
        connection = self.connect(**LISTENER_PARAMETERS)
        try:
            connection.execute(f"LISTEN {CHANGES_CHANNEL}")
        except BaseException:
            connection.close()
            raise
        return connection

    def _opened(self, connection: Any) -> None:
        self._connecting = None
        if not self.running:
            connection.close()
            return
        self._socket = _Socket(self, connection)
        self.backend_pid = connection.pgconn.backend_pid
        self.reactor.addReader(self._socket)
        self.listening = True
        self._backoff = self.min_backoff
        if self.down_since_logged:
            log.info(
                "directory change notifications from {db} are back; revocations apply at once",
                db=self.describe,
            )
            self.down_since_logged = False
        # Anything committed while nobody listened was not announced to us.
        self.on_change()

    def _failed(self, failure: Failure) -> None:
        self._connecting = None
        if not self.running:
            return
        self._went_down(_first_line(failure.value or Exception("cannot connect")))

    # -- listening -----------------------------------------------------------------------------

    def _readable(self, sock: _Socket) -> None:
        if sock is not self._socket:
            return
        pgconn = sock.connection.pgconn
        try:
            pgconn.consume_input()
        except Exception as e:  # psycopg.OperationalError: the connection is gone
            self._lost(sock, _first_line(e))
            return
        heard = False
        while pgconn.notifies() is not None:
            heard = True
        if heard:
            self.on_change()

    def _lost(self, sock: _Socket, why: str) -> None:
        if sock is not self._socket:
            return
        self._close()
        if self.running:
            self._went_down(why)

    def _went_down(self, why: str) -> None:
        if not self.down_since_logged:
            log.warn(
                "directory change notifications from {db} are down ({why}); "
                "polling the change counter every second until they are back",
                db=self.describe,
                why=why,
            )
            self.down_since_logged = True
        delay, self._backoff = self._backoff, min(self._backoff * 2, self.max_backoff)
        self._retry = self.reactor.callLater(delay, self._open)

    def _close(self) -> None:
        sock, self._socket = self._socket, None
        self.listening = False
        self.backend_pid = None
        if sock is None:
            return
        self.reactor.removeReader(sock)
        os.close(sock.fd)
        try:
            sock.connection.close()
        except Exception:  # noqa: S110 - already broken
            pass
