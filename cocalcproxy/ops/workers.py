"""``--workers N``: one supervising process that owns the listeners, N worker processes that serve.

The supervisor (``Supervisor``) binds every listener before twistd drops privileges: a TCP
listener becomes N sockets bound to the same address with ``SO_REUSEPORT``, one per worker, so
the kernel spreads new connections over the workers (a single shared socket lets whichever
process wakes first take them all); any other listener (a Unix socket, a socket systemd passed)
is bound once and shared. Each worker is ``twistd -n cocalcproxy`` with the same arguments,
started with its sockets as inherited descriptors and ``$COCALCPROXY_WORKER`` describing them
(``WorkerSpec``); ``build_service`` adopts them instead of binding.

A worker reports on a pipe: ``ready`` once it listens, then ``beat`` every second. The
supervisor tells systemd ``READY=1`` once every worker is ready, pets the watchdog only while
every worker's heartbeat is fresh, kills a worker whose heartbeat stops (a hung reactor) and
restarts any worker that ends, after a growing delay; five ends within a minute are a crash
loop, which ends the service with status 1. SIGHUP is passed on to every worker; SIGTERM is
passed on too and the supervisor exits 0 once every worker has drained and ended.

Metrics: the workers count into prometheus_client's multiprocess files (in a folder named by
``$PROMETHEUS_MULTIPROC_DIR``, set before they start) and the supervisor's ``--metrics``
listener serves their sum (``MultiProcessCollector``). Access log: a file is appended to by every
worker, one ``write`` per batch of whole lines on an ``O_APPEND`` descriptor; standard output is
owned by the supervisor, each worker sending its lines on its own pipe, written out whole lines
at a time (a batch may arrive in pieces; the pieces of one worker are joined).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.application import service
from twisted.internet import defer, error, protocol, task
from twisted.internet.abstract import FileDescriptor
from twisted.internet.endpoints import serverFromString
from twisted.logger import ILogObserver, Logger, LogPublisher, globalLogPublisher
from twisted.python import usage
from twisted.python.failure import Failure

from cocalcproxy.ops import systemd

# The namespace operators see in log lines (kept from before the package layout).
log = Logger(namespace="cocalcproxy.workers")

ENV = "COCALCPROXY_WORKER"
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
HEARTBEAT_INTERVAL = 1.0
# A worker that sent no heartbeat for this long is hung: it is killed and started again.
HANG_TIMEOUT = 10.0
# Restart delays: RESTART_DELAY, doubled for each further end of the same worker, at most
# RESTART_DELAY_MAX; CRASH_LOOP_DEATHS ends within CRASH_LOOP_WINDOW seconds end the service.
RESTART_DELAY = 0.5
RESTART_DELAY_MAX = 30.0
CRASH_LOOP_DEATHS = 5
CRASH_LOOP_WINDOW = 60.0
# A worker that served this long without ending starts again from the shortest delay.
STABLE_AFTER = 60.0
# Descriptors in a worker: 3 its report pipe, 4 its access-log pipe, then its sockets.
REPORT_FD = 3
ACCESS_LOG_FD = 4
FIRST_SOCKET_FD = 5
# Beyond --shutdown-timeout, how long a worker may take to end before it is killed.
STOP_MARGIN = 10.0


# -- the worker's side ---------------------------------------------------------------------------


@dataclass
class WorkerSpec:
    """What a worker is handed: its index and, for each listener, (descriptor, family)."""

    index: int
    listen: list[tuple[int, int]]
    redirect: tuple[int, int] | None = None
    admin_api: tuple[int, int] | None = None
    # (label, port or None, path or None): the supervisor's own listeners (metrics), which no
    # project route may reach either.
    own: list[tuple[str, int | None, str | None]] = field(default_factory=list)
    report_fd: int = REPORT_FD
    access_log_fd: int = ACCESS_LOG_FD
    # Standard input: a pipe from the supervisor, whose end means the supervisor is gone.
    parent_fd: int = 0

    def encode(self) -> str:
        return json.dumps(
            {
                "index": self.index,
                "listen": self.listen,
                "redirect": self.redirect,
                "admin_api": self.admin_api,
                "own": self.own,
                "report_fd": self.report_fd,
                "access_log_fd": self.access_log_fd,
                "parent_fd": self.parent_fd,
            }
        )

    @classmethod
    def decode(cls, text: str) -> WorkerSpec:
        data = json.loads(text)

        def pair(value: Any) -> tuple[int, int] | None:
            return None if value is None else (int(value[0]), int(value[1]))

        return cls(
            index=int(data["index"]),
            listen=[(int(fd), int(family)) for fd, family in data["listen"]],
            redirect=pair(data.get("redirect")),
            admin_api=pair(data.get("admin_api")),
            own=[(str(label), port, path) for label, port, path in data.get("own", [])],
            report_fd=int(data.get("report_fd", REPORT_FD)),
            access_log_fd=int(data.get("access_log_fd", ACCESS_LOG_FD)),
            parent_fd=int(data.get("parent_fd", 0)),
        )

    @classmethod
    def from_environ(cls) -> WorkerSpec | None:
        """The spec of this process if it is a worker (and takes it out of the environment, so
        nothing this worker starts believes it is one)."""
        text = os.environ.pop(ENV, None)
        return None if not text else cls.decode(text)


class _ParentWatch(FileDescriptor):
    """Reads the worker's standard input, a pipe from the supervisor: at its end (the supervisor
    is gone, even killed with SIGKILL) the worker stops, so no orphan goes on serving."""

    def __init__(self, reactor: Any, fd: int, gone: Callable[[], object]) -> None:
        super().__init__(reactor)
        self.fd = fd
        self.gone = gone
        os.set_blocking(fd, False)

    def fileno(self) -> int:
        return self.fd

    def doRead(self) -> Any:  # noqa: N802
        try:
            data = os.read(self.fd, 4096)
        except BlockingIOError:
            return None
        except OSError:
            data = b""
        if not data:
            return error.ConnectionDone()
        return None

    def connectionLost(self, reason: Failure) -> None:  # noqa: N802
        super().connectionLost(reason)
        self.gone()


def tag_log_lines(index: int, publisher: LogPublisher = globalLogPublisher) -> ILogObserver:
    """Make every log line of worker ``index`` say which worker wrote it.

    The workers share the supervisor's standard output and error, so without this an operator
    cannot tell them apart. Twisted's line format shows an event's ``log_system`` in brackets
    (by default ``<namespace>#<level>``); this observer adds `` worker <index>`` to it. Added to
    the publisher before twistd begins logging, it runs before twistd's own observer sees the
    event: ``[cocalcproxy.guard#info worker 1] ...``."""
    tag = f" worker {index}"

    def tagger(event: dict[str, Any]) -> None:
        system = event.get("log_system")
        if system is None:
            level = event.get("log_level")
            namespace = event.get("log_namespace", "-")
            system = f"{namespace}#{level.name if level is not None else '-'}"
        elif str(system).endswith(tag):
            return
        event["log_system"] = f"{system}{tag}"

    observer: ILogObserver = tagger  # type: ignore[assignment]  # a callable is an observer
    publisher.addObserver(observer)
    return observer


class WorkerLink(service.Service):
    """In a worker: ``ready`` to the supervisor once every listener listens, then a heartbeat
    every second from the reactor (so a hung reactor stops it); ``tick`` hooks run with each
    heartbeat (the metrics' gauges); the worker stops when the supervisor goes away."""

    def __init__(
        self,
        reactor: Any,
        spec: WorkerSpec,
        ready: Callable[[], defer.Deferred[Any]],
        tick: list[Callable[[], object]] | None = None,
        watch_parent: bool = True,
    ) -> None:
        self.reactor = reactor
        self.spec = spec
        self.ready = ready
        self.tick = tick if tick is not None else []
        self.watch_parent = watch_parent
        self._beat: task.LoopingCall | None = None
        self._watch: _ParentWatch | None = None

    def send(self, word: bytes) -> None:
        try:
            os.write(self.spec.report_fd, word + b"\n")
        except BlockingIOError:
            pass  # the supervisor is not reading: it notices missing heartbeats itself
        except OSError as e:
            log.warn("cannot report to the supervisor: {why}", why=e.strerror)

    def _heartbeat(self) -> None:
        for hook in self.tick:
            try:
                hook()
            except Exception:
                log.failure("worker heartbeat hook failed")
        self.send(b"beat")

    def startService(self) -> None:  # noqa: N802
        super().startService()
        os.set_blocking(self.spec.report_fd, False)
        if self.watch_parent:
            if not getattr(self.reactor, "running", True):
                # After Twisted's own handlers, which it installs as the reactor starts (under
                # twistd the service starts first; a reactor already running is a test's).
                # "ready" waits for them in a real worker (set by the twistd plugin); a test
                # runner's reactor may never fire this.
                self._handlers_pending = self.await_handlers
                self.reactor.callWhenRunning(self._signals)
            self._watch = _ParentWatch(self.reactor, self.spec.parent_fd, self._parent_gone)
            self._watch.startReading()
        d: defer.Deferred[Any] = defer.maybeDeferred(self.ready)
        d.addCallbacks(self._listening, lambda failure: None)

    def _signals(self) -> None:
        """SIGINT (a terminal's Ctrl-C reaches every process of the group) is the supervisor's
        to handle: it passes SIGTERM on. A second SIGTERM while draining changes nothing."""
        if hasattr(signal, "SIGINT"):
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        stopping = [False]

        def stop_once(signum: int, frame: object) -> None:
            if not stopping[0]:
                stopping[0] = True
                log.info("SIGTERM: draining this worker")
                self.reactor.callFromThread(self.reactor.stop)

        signal.signal(signal.SIGTERM, stop_once)
        self._handlers_pending = False
        if self._ready_pending:
            self._ready_pending = False
            self._listening(None)

    #: Under twistd every listener may listen before the reactor runs, and so before this
    #: worker's SIGTERM handler exists: a supervisor told "ready" then could stop the worker
    #: with a SIGTERM that kills it outright (seen in CI). Ready waits for the handler.
    _handlers_pending = False
    _ready_pending = False
    #: Set by the twistd plugin in a worker process.
    await_handlers = False

    def _listening(self, _: object) -> None:
        if not self.running:
            return
        if self._handlers_pending:
            self._ready_pending = True
            return
        self.send(b"ready")
        self._beat = task.LoopingCall(self._heartbeat)
        self._beat.clock = self.reactor
        self._beat.start(HEARTBEAT_INTERVAL, now=True)

    def _parent_gone(self) -> None:
        if self.running:
            log.warn("the supervisor went away: stopping this worker")
            self.reactor.stop()

    def stopService(self) -> None:  # noqa: N802
        super().stopService()
        if self._beat is not None and self._beat.running:
            self._beat.stop()
        if self._watch is not None:
            self._watch.stopReading()


# -- the supervisor's side -----------------------------------------------------------------------


def _split(description: str) -> list[str]:
    """Split an endpoint description at colons that are not escaped (``\\:``)."""
    parts, current, escaped = [], [], False
    for char in description:
        if escaped:
            current.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == ":":
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


@dataclass(frozen=True)
class TCPAddress:
    family: int
    host: str
    port: int
    backlog: int


def tcp_address(description: str) -> TCPAddress | None:
    """The address of a plain ``tcp:``/``tcp6:`` description; None for anything else (those
    are bound once by Twisted and shared by the workers)."""
    parts = _split(description)
    kind = parts[0].lower()
    if kind not in ("tcp", "tcp6"):
        return None
    port: int | None = None
    host = ""
    backlog = 50
    for part in parts[1:]:
        key, sep, value = part.partition("=")
        if not sep:
            key, value = "port", part
        if key == "port" and value.isdigit():
            port = int(value)
        elif key == "interface":
            host = value
        elif key == "backlog" and value.isdigit():
            backlog = int(value)
        else:
            return None
    if port is None:
        return None
    six = kind == "tcp6" or ":" in host
    family = socket.AF_INET6 if six else socket.AF_INET
    any_address = "::" if six else "0.0.0.0"  # noqa: S104 - what tcp:PORT means in Twisted
    return TCPAddress(family, host or any_address, port, backlog)


def bind_reuseport(address: TCPAddress, count: int) -> list[socket.socket]:
    """``count`` listening sockets on one address, each with SO_REUSEPORT (port 0: the port the
    first one got)."""
    sockets: list[socket.socket] = []
    port = address.port
    try:
        for _ in range(count):
            sock = socket.socket(address.family, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((address.host, port))
            sock.listen(address.backlog)
            sock.setblocking(False)
            port = sock.getsockname()[1]
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def reuseport_available() -> bool:
    return hasattr(socket, "SO_REUSEPORT")


class _Holder(protocol.Factory):
    """The factory of a listener the supervisor binds but never accepts on."""


@dataclass
class Bound:
    """One configured listener, bound by the supervisor: per-worker fds, or one shared fd."""

    label: str
    description: str
    family: int
    fds: list[int]
    shared: bool
    close: Callable[[], object]
    # The bound address, for the log (the port that port 0 became, the socket's path).
    where: str = ""

    def fd_for(self, index: int) -> int:
        return self.fds[0] if self.shared else self.fds[index]


def bind_listener(reactor: Any, description: str, label: str, count: int) -> Bound:
    """Bind one listener for ``count`` workers; raises with the reason when it cannot."""
    address = tcp_address(description)
    if address is not None and reuseport_available():
        sockets = bind_reuseport(address, count)

        def close_all() -> None:
            for sock in sockets:
                sock.close()

        host, port = sockets[0].getsockname()[:2]
        return Bound(
            label,
            description,
            address.family,
            [s.fileno() for s in sockets],
            False,
            close_all,
            f"{host} port {port}",
        )
    # A Unix socket or a descriptor systemd passed: bound (adopted) once, never accepted on here.
    failures: list[Failure] = []
    ports: list[Any] = []
    d = serverFromString(reactor, description).listen(_Holder())
    d.addCallbacks(ports.append, failures.append)
    if failures:
        failures[0].raiseException()
    if not ports:
        raise RuntimeError(f"{description} did not listen at once")
    port = ports[0]
    port.stopReading()
    family = int(getattr(port, "addressFamily", socket.AF_INET))
    return Bound(
        label, description, family, [port.fileno()], True, port.stopListening, str(port.getHost())
    )


class WorkerProcess(protocol.ProcessProtocol):
    """One running worker, as the supervisor sees it."""

    def __init__(self, supervisor: Supervisor, index: int) -> None:
        self.supervisor = supervisor
        self.index = index
        self.pid: int | None = None
        self.ready = False
        self.last_beat = supervisor.now()
        self.started = supervisor.now()
        self.ended = False
        self._report = b""
        self._log = b""

    def connectionMade(self) -> None:  # noqa: N802
        self.pid = self.transport.pid  # type: ignore[union-attr]

    def childDataReceived(self, childFD: int, data: bytes) -> None:  # noqa: N802, N803
        if childFD == REPORT_FD:
            self._report += data
            *words, self._report = self._report.split(b"\n")
            for word in words:
                self.last_beat = self.supervisor.now()
                if word == b"ready" and not self.ready:
                    self.ready = True
                    self.supervisor.worker_ready(self)
        elif childFD == ACCESS_LOG_FD:
            # Whole lines only, each worker's own, so lines never interleave on the stream.
            self._log += data
            cut = self._log.rfind(b"\n") + 1
            if cut:
                self.supervisor.write_access_log(self._log[:cut])
                self._log = self._log[cut:]

    def signal(self, signum: int) -> None:
        if self.ended or self.transport is None:
            return
        try:
            transport: Any = self.transport
            transport.signalProcess(signum)
        except (error.ProcessExitedAlready, OSError):
            pass

    def processEnded(self, reason: Failure) -> None:  # noqa: N802
        self.ended = True
        self.supervisor.worker_ended(self, reason)


class Supervisor(service.MultiService):
    """Binds the listeners, runs and watches the workers (see the module's description)."""

    def __init__(
        self,
        reactor: Any,
        options: Any,
        argv: list[str],
        count: int,
        metrics_dir: str,
    ) -> None:
        super().__init__()
        self.reactor = reactor
        self.options = options
        self.argv = argv
        self.count = count
        self.metrics_dir = metrics_dir
        self.now: Callable[[], float] = time.monotonic
        self.bound: list[Bound] = []
        self.https: list[Bound] = []
        self.redirect: Bound | None = None
        self.admin_api: Bound | None = None
        self.metrics_port: Any = None
        self.workers: list[WorkerProcess | None] = [None] * count
        self.deaths: list[float] = []
        self.failures_in_row = [0] * count
        self.stopping = False
        self.all_ready: defer.Deferred[None] = defer.Deferred()
        self.systemd: systemd.SystemdService | None = None
        self.hang_timeout = HANG_TIMEOUT
        self.exit_status: int | None = None
        self._restarts: dict[int, Any] = {}
        self._watch: task.LoopingCall | None = None
        self._ended: list[defer.Deferred[None]] = []
        self._previous_hup: Any = None
        self._out = sys.__stdout__.buffer if sys.__stdout__ is not None else None

    # listeners

    def privilegedStartService(self) -> None:  # noqa: N802
        """Bind everything while still privileged (twistd drops privileges after this)."""
        options = self.options
        try:
            for description in options["listen"]:
                bound = bind_listener(self.reactor, description, "HTTPS", self.count)
                self.bound.append(bound)
                self.https.append(bound)
            if options["redirect-http"]:
                self.redirect = bind_listener(
                    self.reactor, options["redirect-http"], "HTTP redirect", self.count
                )
                self.bound.append(self.redirect)
            if options["admin-api"]:
                self.admin_api = bind_listener(
                    self.reactor, options["admin-api"], "admin API", self.count
                )
                self.bound.append(self.admin_api)
            if options["metrics"]:
                self.metrics_port = self._listen_metrics(options["metrics"])
        except Exception as e:
            self._close_bound()
            why = getattr(e, "strerror", None) or str(e)
            raise SystemExit(f"cocalcproxy: cannot listen: {why}") from None
        for bound in self.bound:
            log.info(
                "{label} listening on {desc} ({where}) for {n} worker(s) ({how})",
                label=bound.label,
                desc=bound.description,
                where=bound.where,
                n=self.count,
                how="one socket shared" if bound.shared else "SO_REUSEPORT, a socket each",
            )
        super().privilegedStartService()

    def _listen_metrics(self, description: str) -> Any:
        from cocalcproxy.ops.metrics import multiprocess_site

        ports: list[Any] = []
        failures: list[Failure] = []
        endpoint = serverFromString(self.reactor, description)
        site = multiprocess_site(self.metrics_dir, self.reactor)
        site.request_head_timeout = self.options["request-head-timeout"]  # type: ignore[attr-defined]
        d = endpoint.listen(site)
        d.addCallbacks(ports.append, failures.append)
        if failures:
            failures[0].raiseException()
        log.info("Prometheus metrics (all workers) on {desc}", desc=description)
        return ports[0]

    def _close_bound(self) -> None:
        for bound in self.bound:
            try:
                bound.close()
            except Exception:
                log.failure("closing a listener")
        self.bound = []

    def own_entries(self) -> list[tuple[str, int | None, str | None]]:
        if self.metrics_port is None:
            return []
        host = self.metrics_port.getHost()
        port = getattr(host, "port", None)
        name = getattr(host, "name", None)
        if isinstance(name, bytes):
            name = name.decode("utf-8", "surrogateescape")
        return [("Prometheus metrics listener", port if isinstance(port, int) else None, name)]

    # workers

    def startService(self) -> None:  # noqa: N802
        # Here, not before: twistd has dropped privileges (-u/-g), and the workers, which run
        # as that user, must be able to write their metric files.
        prepare_metrics_dir(self.metrics_dir)
        super().startService()
        if hasattr(signal, "SIGHUP"):
            self._previous_hup = signal.signal(signal.SIGHUP, self._on_sighup)
        self._watch = task.LoopingCall(self._check_heartbeats)
        self._watch.clock = self.reactor
        self._watch.start(HEARTBEAT_INTERVAL, now=False)
        for index in range(self.count):
            self.spawn(index)

    def spec_for(self, index: int) -> tuple[WorkerSpec, dict[int, int | str]]:
        child_fds: dict[int, int | str] = {0: "w", 1: 1, 2: 2, REPORT_FD: "r", ACCESS_LOG_FD: "r"}
        next_fd = FIRST_SOCKET_FD

        def hand(bound: Bound) -> tuple[int, int]:
            nonlocal next_fd
            child_fds[next_fd] = bound.fd_for(index)
            pair = (next_fd, bound.family)
            next_fd += 1
            return pair

        spec = WorkerSpec(
            index=index,
            listen=[hand(b) for b in self.https],
            redirect=hand(self.redirect) if self.redirect is not None else None,
            admin_api=hand(self.admin_api) if self.admin_api is not None else None,
            own=self.own_entries(),
        )
        return spec, child_fds

    def spawn(self, index: int) -> None:
        self._restarts.pop(index, None)
        if self.stopping:
            return
        spec, child_fds = self.spec_for(index)
        env = {
            key: value
            for key, value in os.environ.items()
            if key not in systemd.SUPERVISOR_ONLY_ENV
        }
        env[ENV] = spec.encode()
        env[MULTIPROC_ENV] = self.metrics_dir
        argv = [
            sys.executable,
            "-c",
            "from twisted.scripts.twistd import run; run()",
            "--nodaemon",
            "--pidfile=",
            "cocalcproxy",
            *self.argv,
        ]
        worker = WorkerProcess(self, index)
        self.workers[index] = worker
        self.reactor.spawnProcess(worker, sys.executable, argv, env=env, childFDs=child_fds)
        log.info("worker {i} started (pid {pid})", i=index, pid=worker.pid)

    def worker_ready(self, worker: WorkerProcess) -> None:
        log.info("worker {i} (pid {pid}) is serving", i=worker.index, pid=worker.pid)
        if not self.all_ready.called and all(w is not None and w.ready for w in self.workers):
            log.info("all {n} workers are serving", n=self.count)
            self.all_ready.callback(None)

    def worker_ended(self, worker: WorkerProcess, reason: Failure) -> None:
        if worker.pid is not None:
            _mark_dead(worker.pid, self.metrics_dir)
        if self.workers[worker.index] is worker:
            self.workers[worker.index] = None
        how = _describe_end(reason)
        if self.stopping:
            log.info("worker {i} (pid {pid}) {how}", i=worker.index, pid=worker.pid, how=how)
            self._check_all_ended()
            return
        now = self.now()
        self.deaths = [t for t in self.deaths if now - t < CRASH_LOOP_WINDOW] + [now]
        if len(self.deaths) >= CRASH_LOOP_DEATHS:
            self.crash_loop(worker, how)
            return
        index = worker.index
        if now - worker.started >= STABLE_AFTER:
            self.failures_in_row[index] = 0
        self.failures_in_row[index] += 1
        delay = min(RESTART_DELAY * 2 ** (self.failures_in_row[index] - 1), RESTART_DELAY_MAX)
        log.error(
            "worker {i} (pid {pid}) {how}; starting it again in {delay}s",
            i=index,
            pid=worker.pid,
            how=how,
            delay=delay,
        )
        self._restarts[index] = self.reactor.callLater(delay, self.spawn, index)

    def crash_loop(self, worker: WorkerProcess, how: str) -> None:
        log.critical(
            "cocalcproxy: worker processes keep ending ({n} times within {w:.0f} s, the last: "
            "worker {i} {how}); stopping the service (exit status 1)",
            n=len(self.deaths),
            w=CRASH_LOOP_WINDOW,
            i=worker.index,
            how=how,
        )
        self.exit_status = 1
        self.stopping = True  # the other workers' ends are part of the stop, not more deaths

        def exit_1() -> None:
            sys.stdout.flush()
            os._exit(1)

        self.reactor.addSystemEventTrigger("after", "shutdown", exit_1)
        try:
            self.reactor.stop()
        except error.ReactorNotRunning:
            pass

    def _check_heartbeats(self) -> None:
        now = self.now()
        for worker in self.workers:
            if worker is None or worker.ended or not worker.ready:
                continue
            if now - worker.last_beat > self.hang_timeout:
                log.error(
                    "worker {i} (pid {pid}) sent no heartbeat for {s:.0f} s: killing it",
                    i=worker.index,
                    pid=worker.pid,
                    s=now - worker.last_beat,
                )
                worker.last_beat = now  # one kill per timeout
                worker.signal(signal.SIGKILL)

    def healthy(self) -> bool:
        """For the systemd watchdog: every running worker's heartbeat is fresh."""
        now = self.now()
        return all(
            now - w.last_beat <= self.hang_timeout
            for w in self.workers
            if w is not None and not w.ended and w.ready
        )

    # signals and output

    def _on_sighup(self, signum: int, frame: object) -> None:
        self.reactor.callFromThread(self.forward, signal.SIGHUP)

    def forward(self, signum: int) -> None:
        log.info("passing signal {s} on to every worker", s=signal.Signals(signum).name)
        for worker in self.workers:
            if worker is not None:
                worker.signal(signum)

    def write_access_log(self, lines: bytes) -> None:
        if self._out is None:
            return
        try:
            self._out.write(lines)
            self._out.flush()
        except OSError as e:
            log.warn("access log lines not written to standard output: {why}", why=e.strerror)

    # stopping

    def stopService(self) -> defer.Deferred[None]:  # noqa: N802
        self.stopping = True
        if self._previous_hup is not None:
            signal.signal(signal.SIGHUP, self._previous_hup)
            self._previous_hup = None
        if self.systemd is not None:
            self.systemd.notify_stopping()
        return defer.ensureDeferred(self._stop())

    def _check_all_ended(self) -> None:
        if all(w is None or w.ended for w in self.workers):
            waiters, self._ended = self._ended, []
            for d in waiters:
                d.callback(None)

    async def _stop(self) -> None:
        for call in self._restarts.values():
            if call.active():
                call.cancel()
        self._restarts.clear()
        if self._watch is not None and self._watch.running:
            self._watch.stop()
        running = [w for w in self.workers if w is not None and not w.ended]
        if running:
            log.info("stopping {n} worker(s): each drains its requests", n=len(running))
            for worker in running:
                worker.signal(signal.SIGTERM)
        # Close our copies of the listening sockets: once the workers have closed theirs, new
        # connections are refused, as with one process (no worker would ever accept them).
        self._close_bound()
        if running:
            ended: defer.Deferred[None] = defer.Deferred()
            self._ended.append(ended)
            self._check_all_ended()
            ended.addTimeout(self.options["shutdown-timeout"] + STOP_MARGIN, self.reactor)
            try:
                await ended
            except defer.TimeoutError:
                log.warn("workers still running after the shutdown timeout: killing them")
                for left in self.workers:
                    if left is not None:
                        left.signal(signal.SIGKILL)
        await defer.maybeDeferred(service.MultiService.stopService, self)
        if self.metrics_port is not None:
            await defer.maybeDeferred(self.metrics_port.stopListening)
        shutil.rmtree(self.metrics_dir, ignore_errors=True)
        if self.exit_status is None:
            # twistd re-raises the signal that stopped it (status -15); a complete graceful
            # stop exits 0, as with one process.
            if getattr(self.reactor, "_exitSignal", None) == signal.SIGTERM:
                self.reactor._exitSignal = None
            log.info("stopped cleanly")


def _describe_end(reason: Failure) -> str:
    value = reason.value
    sig = getattr(value, "signal", None)
    code = getattr(value, "exitCode", None)
    if sig:
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = str(sig)
        return f"was killed by {name}"
    return f"exited with status {code}"


def _mark_dead(pid: int, folder: str) -> None:
    try:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, folder)
    except Exception:
        log.failure("cleaning up the metrics of an ended worker")


def prepare_metrics_dir(folder: str) -> None:
    """A fresh folder for the workers' metric files (old files would add old counts)."""
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder, mode=0o700)


@dataclass
class _SyncOnly:
    sync: Any


def build_supervisor(options: Any, reactor: Any = None) -> Supervisor:
    """The service for ``--workers N`` with N above 1. Refuses bad TLS or database with
    UsageError, as ``build_service`` does, and migrates the directory once, before any worker."""
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    from cocalcproxy import directory as directory_module
    from cocalcproxy.ops import service as service_module
    from cocalcproxy.ops import tls

    service_module.prepare_state_dir(options["state-dir"])
    cert, key = options["tls-cert"], options["tls-key"]
    if not cert:
        cert, key = tls.ensure_self_signed(
            options["state-dir"], options["hostname"], options["project-domain"]
        )
    try:
        tls.ReloadableServerCreator(cert, key)
    except tls.TLSConfigError as e:
        raise usage.UsageError(f"TLS: {e}") from None
    service_module._check_database_folder(options["database"])
    # Migrations run here, once, before any worker opens the directory.
    from cocalcproxy.directory.store import open_sync_directory

    try:
        sync = open_sync_directory(options["database"])
    except directory_module.DirectoryError as e:
        raise usage.UsageError(f"cannot open the directory: {e}") from None
    try:
        if options["admin-api"]:
            service_module._refuse_unauthenticated_admin_api(_SyncOnly(sync))
    finally:
        sync.close()
    argv = list(getattr(options, "argv", []))
    supervisor = Supervisor(
        reactor,
        options,
        argv,
        options["workers"],
        os.path.join(os.path.abspath(options["state-dir"]), "metrics"),
    )
    supervisor.systemd = systemd.SystemdService(
        reactor, lambda: supervisor.all_ready, healthy=supervisor.healthy
    )
    supervisor.systemd.setServiceParent(supervisor)
    if supervisor.systemd.interval is not None:
        # Notice a hung worker before systemd's watchdog would (it fires after twice the
        # interval between pings), but never on a pause of a few heartbeats.
        supervisor.hang_timeout = max(3.0, min(HANG_TIMEOUT, supervisor.systemd.interval * 1.5))
    return supervisor
