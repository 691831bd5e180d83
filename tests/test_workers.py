"""Unit tests of the worker-process glue: endpoint parsing, SO_REUSEPORT binding, the spec a
worker is handed, restart delays and the crash loop (a fake reactor with a clock), and the
watchdog that pings only while every worker is healthy (a real datagram socket)."""

from __future__ import annotations

import os
import socket
from typing import Any

from twisted.internet import defer, error, task
from twisted.logger import Logger, LogLevel, LogPublisher, formatEventAsClassicLogText
from twisted.python.failure import Failure
from twisted.trial import unittest

from cocalcproxy.ops import systemd, workers
from cocalcproxy.ops.options import Options, usable_cpus
from tests.test_systemd import Receiver


class ParseTests(unittest.TestCase):
    def test_tcp_forms(self) -> None:
        a = workers.tcp_address("tcp:8443")
        assert a is not None
        self.assertEqual((a.family, a.host, a.port), (socket.AF_INET, "0.0.0.0", 8443))
        a = workers.tcp_address("tcp:port=0:interface=127.0.0.1:backlog=7")
        assert a is not None
        self.assertEqual((a.host, a.port, a.backlog), ("127.0.0.1", 0, 7))
        a = workers.tcp_address("tcp6:port=443:interface=\\:\\:1")
        assert a is not None
        self.assertEqual((a.family, a.host, a.port), (socket.AF_INET6, "::1", 443))
        a = workers.tcp_address("tcp6:443")
        assert a is not None
        self.assertEqual((a.family, a.host), (socket.AF_INET6, "::"))

    def test_anything_else_is_shared(self) -> None:
        for description in (
            "unix:/run/x.sock",
            "systemd:domain=INET:index=0",
            "tcp:8443:frobnicate=1",
            "tcp:interface=127.0.0.1",
        ):
            self.assertIsNone(workers.tcp_address(description), description)


class ReuseportTests(unittest.TestCase):
    def test_one_socket_per_worker_on_one_port(self) -> None:
        address = workers.tcp_address("tcp:0:interface=127.0.0.1")
        assert address is not None
        sockets = workers.bind_reuseport(address, 3)
        self.addCleanup(lambda: [s.close() for s in sockets])
        ports = {s.getsockname()[1] for s in sockets}
        self.assertEqual(len(ports), 1)
        self.assertEqual(len({s.fileno() for s in sockets}), 3)
        self.assertTrue(all(not s.getblocking() for s in sockets))
        with socket.create_connection(("127.0.0.1", ports.pop()), timeout=5):
            pass

    def test_port_taken_by_another_is_an_error_and_closes_what_was_bound(self) -> None:
        taken = socket.socket()
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        address = workers.tcp_address(f"tcp:{taken.getsockname()[1]}:interface=127.0.0.1")
        assert address is not None
        self.assertRaises(OSError, workers.bind_reuseport, address, 2)


class OptionTests(unittest.TestCase):
    def parse(self, *args: str) -> Options:
        options = Options()
        options.parseOptions(["--state-dir", self.mktemp(), *args])
        return options

    def test_default_is_one(self) -> None:
        self.assertEqual(self.parse()["workers"], 1)

    def test_auto_is_the_usable_cpus(self) -> None:
        self.assertEqual(self.parse("--workers", "auto")["workers"], len(os.sched_getaffinity(0)))
        self.assertEqual(usable_cpus(), len(os.sched_getaffinity(0)))

    def test_refusals_name_the_option(self) -> None:
        from twisted.python.usage import UsageError

        for value in ("0", "-1", "two", "257"):
            e = self.assertRaises(UsageError, self.parse, "--workers", value)
            self.assertIn("--workers", str(e))


class SpecTests(unittest.TestCase):
    def test_round_trip(self) -> None:
        spec = workers.WorkerSpec(
            index=1,
            listen=[(5, socket.AF_INET), (6, socket.AF_UNIX)],
            redirect=(7, socket.AF_INET6),
            own=[("Prometheus metrics listener", 9100, None)],
        )
        self.assertEqual(workers.WorkerSpec.decode(spec.encode()), spec)


class FakeTransport:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.signals: list[Any] = []

    def signalProcess(self, signum: Any) -> None:  # noqa: N802
        self.signals.append(signum)


class FakeReactor(task.Clock):
    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[Any] = []
        self.running = True
        self.stopped = False
        self.triggers: list[Any] = []
        self.next_pid = 1000

    def spawnProcess(self, proto: Any, executable: str, args: Any, env: Any, childFDs: Any) -> Any:  # noqa: N802, N803
        self.next_pid += 1
        proto.makeConnection(FakeTransport(self.next_pid))
        self.spawned.append((proto, env, childFDs))
        return proto.transport

    def addSystemEventTrigger(self, *args: Any) -> None:  # noqa: N802
        self.triggers.append(args)

    def stop(self) -> None:
        if self.stopped:
            raise error.ReactorNotRunning()
        self.stopped = True


def killed() -> Failure:
    return Failure(error.ProcessTerminated(signal=9))


class SupervisorTests(unittest.TestCase):
    def make(self, count: int = 2) -> tuple[workers.Supervisor, FakeReactor]:
        reactor = FakeReactor()
        options = {"shutdown-timeout": 30}
        folder = self.mktemp()
        os.makedirs(folder)
        supervisor = workers.Supervisor(reactor, options, ["--workers", "2"], count, folder)
        supervisor.now = reactor.seconds
        for index in range(count):
            supervisor.spawn(index)
        return supervisor, reactor

    def test_workers_get_their_spec_and_no_systemd_variables(self) -> None:
        os.environ["NOTIFY_SOCKET"] = "/nonexistent"
        self.addCleanup(os.environ.pop, "NOTIFY_SOCKET", None)
        supervisor, reactor = self.make()
        for index, (_, env, child_fds) in enumerate(reactor.spawned):
            self.assertNotIn("NOTIFY_SOCKET", env)
            self.assertEqual(workers.WorkerSpec.decode(env[workers.ENV]).index, index)
            self.assertEqual(env[workers.MULTIPROC_ENV], supervisor.metrics_dir)
            self.assertEqual(child_fds[workers.REPORT_FD], "r")

    def test_ready_when_every_worker_says_so(self) -> None:
        supervisor, reactor = self.make()
        first, second = (p for p, _, _ in reactor.spawned)
        first.childDataReceived(workers.REPORT_FD, b"ready\n")
        self.assertFalse(supervisor.all_ready.called)
        second.childDataReceived(workers.REPORT_FD, b"rea")
        self.assertFalse(supervisor.all_ready.called)
        second.childDataReceived(workers.REPORT_FD, b"dy\n")
        self.assertTrue(supervisor.all_ready.called)

    def test_restart_delays_grow_and_five_ends_are_a_crash_loop(self) -> None:
        supervisor, reactor = self.make(count=1)
        delays = []
        for _ in range(4):
            worker = reactor.spawned[-1][0]
            worker.processEnded(killed())
            call = reactor.getDelayedCalls()[0]
            delays.append(call.getTime() - reactor.seconds())
            reactor.advance(delays[-1])
        self.assertEqual(delays, [0.5, 1.0, 2.0, 4.0])
        self.assertFalse(reactor.stopped)
        reactor.spawned[-1][0].processEnded(killed())
        self.assertTrue(reactor.stopped)
        self.assertEqual(supervisor.exit_status, 1)
        self.assertEqual(len(reactor.spawned), 5)
        self.assertEqual(reactor.getDelayedCalls(), [])

    def test_ends_spread_over_more_than_a_minute_are_no_crash_loop(self) -> None:
        supervisor, reactor = self.make(count=1)
        for _ in range(8):
            reactor.spawned[-1][0].processEnded(killed())
            reactor.advance(61)  # served a minute: the next delay starts from 0.5 s again
        self.assertFalse(reactor.stopped)
        self.assertIsNone(supervisor.exit_status)

    def test_an_ended_workers_live_gauges_are_dropped(self) -> None:
        supervisor, reactor = self.make()
        ended = reactor.spawned[0][0]
        folder = supervisor.metrics_dir
        for name in (f"gauge_livesum_{ended.pid}.db", f"counter_{ended.pid}.db"):
            with open(os.path.join(folder, name), "wb"):
                pass
        ended.processEnded(killed())
        # Its in-flight requests and relays no longer count; what it counted stays counted.
        self.assertEqual(os.listdir(folder), [f"counter_{ended.pid}.db"])

    def test_a_silent_worker_is_killed_and_unhealthy_meanwhile(self) -> None:
        supervisor, reactor = self.make()
        for proto, _, _ in reactor.spawned:
            proto.childDataReceived(workers.REPORT_FD, b"ready\n")
        supervisor.hang_timeout = 3.0
        hung = reactor.spawned[1][0]
        for _ in range(3):
            reactor.advance(1)
            reactor.spawned[0][0].childDataReceived(workers.REPORT_FD, b"beat\n")
        self.assertTrue(supervisor.healthy())
        reactor.advance(0.5)
        self.assertFalse(supervisor.healthy())
        supervisor._check_heartbeats()
        self.assertEqual(hung.transport.signals, [9])
        self.assertEqual(reactor.spawned[0][0].transport.signals, [])


class WatchdogTests(unittest.TestCase):
    def test_no_ping_while_unhealthy(self) -> None:
        receiver = Receiver(self)
        clock = task.Clock()
        healthy = [True]
        env = {"NOTIFY_SOCKET": receiver.env_value, "WATCHDOG_USEC": "2000000"}
        svc = systemd.SystemdService(
            clock, defer.Deferred, env, pid=os.getpid(), healthy=lambda: healthy[0]
        )
        svc.startService()
        self.addCleanup(svc.stopService)
        self.assertEqual(receiver.messages(), [b"WATCHDOG=1"])
        healthy[0] = False
        clock.advance(1)
        clock.advance(1)
        self.assertEqual(receiver.messages(), [])
        healthy[0] = True
        clock.advance(1)
        self.assertEqual(receiver.messages(), [b"WATCHDOG=1"])


class ReadyAfterTheSignalHandlers(unittest.TestCase):
    def test_ready_waits_for_the_sigterm_handler(self) -> None:
        import signal

        from twisted.internet import task

        for signum in (signal.SIGTERM, signal.SIGINT):
            self.addCleanup(signal.signal, signum, signal.getsignal(signum))
        clock: Any = task.Clock()
        clock.running = False  # twistd starts services, then the reactor
        clock.addReader = clock.removeReader = lambda reader: None
        when_running: list[Any] = []
        clock.callWhenRunning = lambda f, *a: when_running.append((f, a))
        report_r, report_w = os.pipe()
        parent_r, parent_w = os.pipe()
        for fd in (report_r, report_w, parent_r, parent_w):
            self.addCleanup(lambda fd=fd: _close(fd))
        spec = workers.WorkerSpec(
            index=0, listen=[], own=[], report_fd=report_w, parent_fd=parent_r
        )
        link = workers.WorkerLink(clock, spec, lambda: defer.succeed(None))
        link.await_handlers = True  # as the twistd plugin sets it
        link.startService()
        self.addCleanup(link.stopService)
        os.set_blocking(report_r, False)
        with self.assertRaises(BlockingIOError):
            os.read(report_r, 100)  # listening, but no SIGTERM handler yet: not ready
        clock.running = True
        for f, a in when_running:
            f(*a)
        self.assertIsNot(signal.getsignal(signal.SIGTERM), signal.SIG_DFL)
        self.assertTrue(os.read(report_r, 100).startswith(b"ready\n"))


class WorkerModeTests(unittest.TestCase):
    """``build_service`` in a worker: adopts the socket it is handed, registers it and the
    supervisor's metrics listener among its own endpoints, and reports ``ready``."""

    @defer.inlineCallbacks
    def test_adopts_registers_and_reports(self):  # type: ignore[no-untyped-def]
        from twisted.internet import reactor

        from cocalcproxy.ops.service import build_service
        from tests.support import options_for

        address = workers.tcp_address("tcp:0:interface=127.0.0.1")
        assert address is not None
        (sock,) = workers.bind_reuseport(address, 1)
        self.addCleanup(sock.close)
        port = sock.getsockname()[1]
        report_r, report_w = os.pipe()
        parent_r, parent_w = os.pipe()
        for fd in (report_r, report_w, parent_r, parent_w):
            self.addCleanup(lambda fd=fd: _close(fd))
        spec = workers.WorkerSpec(
            index=0,
            listen=[(os.dup(sock.fileno()), socket.AF_INET)],
            own=[("Prometheus metrics listener", 59999, None)],
            report_fd=report_w,
            parent_fd=parent_r,
        )
        os.environ[workers.ENV] = spec.encode()
        self.addCleanup(os.environ.pop, workers.ENV, None)
        state = self.mktemp()
        os.makedirs(state)
        proxy = build_service(options_for(state, "--workers", "2"), reactor)
        self.assertNotIn(workers.ENV, os.environ)  # nothing the worker starts inherits it
        proxy.startService()
        self.addCleanup(proxy.stopService)
        yield proxy.all_listening()
        self.assertEqual(proxy.listeners[0].port.getHost().port, port)
        self.assertIn(port, proxy.own_listeners.local_ports())
        self.assertIn(59999, proxy.own_listeners.local_ports())
        self.assertIsNone(proxy.systemd)  # the supervisor talks to systemd, not a worker
        os.set_blocking(report_r, False)
        self.assertTrue(os.read(report_r, 100).startswith(b"ready\n"))


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


class LogTagTests(unittest.TestCase):
    def test_every_line_names_the_worker(self) -> None:
        publisher = LogPublisher()
        workers.tag_log_lines(3, publisher)
        lines: list[str] = []
        publisher.addObserver(lambda event: lines.append(formatEventAsClassicLogText(event) or ""))
        Logger(namespace="cocalcproxy.guard", observer=publisher).info("signed in {who}", who="x")
        publisher({"log_system": "-", "log_format": "legacy", "log_time": 0.0})
        self.assertIn("[cocalcproxy.guard#info worker 3] signed in x", lines[0])
        self.assertIn("[- worker 3] legacy", lines[1])

    def test_tagged_once(self) -> None:
        publisher = LogPublisher()
        workers.tag_log_lines(1, publisher)
        workers.tag_log_lines(1, publisher)
        event: dict[str, Any] = {"log_namespace": "n", "log_level": LogLevel.warn}
        publisher(event)
        self.assertEqual(event["log_system"], "n#warn worker 1")
