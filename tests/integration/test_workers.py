"""``--workers N``: a supervisor and real worker processes, over real sockets and real TLS.

Which worker holds a connection is read from the kernel: the worker's open descriptors
(/proc/PID/fd) against the established TCP sockets on the proxy's port (/proc/net/tcp).
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import ssl
from pathlib import Path

from twisted.trial import unittest

from tests import tlsutil
from tests.integration.test_socket_activation import Activated
from tests.processes import GiveUp, ProxyProcess, wait_for

SERVING = re.compile(r"worker (\d+) \(pid (\d+)\) is serving")


def serving(proxy: ProxyProcess | Activated) -> dict[int, int]:
    """Worker index -> pid of the latest of each that said it serves."""
    pids: dict[int, int] = {}
    for match in SERVING.finditer(proxy.output()):
        pids[int(match.group(1))] = int(match.group(2))
    return pids


def wait_serving(proxy: ProxyProcess, count: int, timeout: float = 60) -> dict[int, int]:
    def ready() -> dict[int, int] | None:
        assert proxy.process is not None
        if proxy.process.poll() is not None:
            raise GiveUp(f"the supervisor exited:\n{proxy.output()[-3000:]}")
        pids = serving(proxy)
        return pids if len(pids) == count and "workers are serving" in proxy.output() else None

    return wait_for(ready, timeout, f"{count} workers serving")


def established(pid: int, port: int) -> int:
    """How many established TCP connections to ``port`` the process ``pid`` holds."""
    inodes = set()
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            next(f)
            for line in f:
                fields = line.split()
                local_port = int(fields[1].rsplit(":", 1)[1], 16)
                if local_port == port and fields[3] == "01" and fields[9] in inodes:
                    count += 1
    return count


def context(proxy: ProxyProcess) -> ssl.SSLContext:
    generated = Path(proxy.state_dir) / "tls" / "cert.pem"
    if generated.exists():
        return ssl.create_default_context(cafile=str(generated))
    # A certificate given with --tls-cert (its fingerprint is what the test checks).
    unverified = ssl.create_default_context()
    unverified.check_hostname = False
    unverified.verify_mode = ssl.CERT_NONE
    return unverified


def open_tls(proxy: ProxyProcess) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", proxy.port), timeout=30)
    return context(proxy).wrap_socket(raw, server_hostname="localhost")


def get(proxy: ProxyProcess, conn: http.client.HTTPSConnection | None = None) -> int:
    own = conn is None
    if conn is None:
        conn = http.client.HTTPSConnection(
            "localhost", proxy.port, context=context(proxy), timeout=30
        )
    try:
        conn.request("GET", "/")
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        if own:
            conn.close()


def start(case: unittest.TestCase, *args: str, workers: int = 2) -> ProxyProcess:
    proxy = ProxyProcess(case.mktemp(), "--workers", str(workers), *args).start()
    case.addCleanup(lambda: proxy.stop() if proxy.process and proxy.process.poll() is None else 0)
    return proxy


def split(proxy: ProxyProcess, pids: dict[int, int], connections: int) -> dict[int, int]:
    """Open ``connections`` TLS connections and say how many each worker holds."""
    held = [open_tls(proxy) for _ in range(connections)]
    try:

        def counted() -> dict[int, int] | None:
            counts = {index: established(pid, proxy.port) for index, pid in pids.items()}
            return counts if sum(counts.values()) == connections else None

        return wait_for(counted, 20, f"{connections} connections held by the workers")
    finally:
        for sock in held:
            sock.close()


class WorkerTests(unittest.TestCase):
    def test_split_kill_and_restart(self) -> None:
        proxy = start(self)
        pids = wait_serving(proxy, 2)
        self.assertIn("SO_REUSEPORT, a socket each", proxy.output())

        # 16 connections: every worker takes a share. The kernel picks a worker's socket by a
        # hash of the connection's addresses and ports, so the split varies around 8/8 (a
        # single shared socket gives one worker all 16).
        counts = split(proxy, pids, 16)
        print(f"connections per worker at 16: {counts}")
        self.assertTrue(all(n >= 2 for n in counts.values()), counts)

        # Keep-alive connections on each worker, then kill worker 0.
        conns = [
            http.client.HTTPSConnection("localhost", proxy.port, context=context(proxy))
            for _ in range(8)
        ]
        for conn in conns:
            self.assertLess(get(proxy, conn), 500)
        owners = {index: established(pid, proxy.port) for index, pid in pids.items()}
        self.assertTrue(owners[1] > 0, owners)
        os.kill(pids[0], signal.SIGKILL)
        wait_for(
            lambda: f"worker 0 (pid {pids[0]}) was killed by SIGKILL" in proxy.output(),
            20,
            "the supervisor to see worker 0 end",
        )
        # The other worker's connections go on serving.
        survivors = 0
        for conn in conns:
            try:
                self.assertLess(get(proxy, conn), 500)
                survivors += 1
            except (OSError, http.client.HTTPException):
                pass  # a connection the killed worker held
        self.assertGreaterEqual(survivors, owners[1])
        # Worker 0 comes back under a new pid and serves new connections.
        back = wait_for(
            lambda: serving(proxy).get(0) not in (None, pids[0]) and serving(proxy),
            30,
            "worker 0 to come back",
        )
        self.assertNotEqual(back[0], pids[0])
        self.assertEqual(back[1], pids[1])
        for _ in range(4):
            self.assertLess(get(proxy), 500)
        for conn in conns:
            conn.close()
        wait_for(
            lambda: sum(established(pid, proxy.port) for pid in back.values()) == 0,
            20,
            "the keep-alive connections to close",
        )
        counts = split(proxy, back, 16)
        self.assertGreater(counts[0], 0, counts)
        self.assertEqual(proxy.stop(), 0, proxy.output()[-3000:])

    def test_sigterm_drains_every_worker_and_exits_0(self) -> None:
        proxy = start(self)
        pids = wait_serving(proxy, 2)
        self.assertLess(get(proxy), 500)
        self.assertEqual(proxy.stop(), 0, proxy.output()[-3000:])
        output = proxy.output()
        # Each worker and the supervisor say they stopped cleanly.
        self.assertEqual(output.count("stopped cleanly"), 3, output[-3000:])
        for pid in pids.values():
            self.assertFalse(os.path.exists(f"/proc/{pid}"), f"worker {pid} still runs")
        self.assertNotIn("Traceback", output)

    def test_workers_stop_when_the_supervisor_is_killed(self) -> None:
        proxy = start(self)
        pids = wait_serving(proxy, 2)
        assert proxy.process is not None
        proxy.process.kill()
        proxy.process.wait(timeout=30)

        def gone() -> bool:
            for pid in pids.values():
                try:
                    with open(f"/proc/{pid}/stat") as f:
                        if f.read().split(")")[-1].split()[0] != "Z":
                            return False
                except FileNotFoundError:
                    pass
            return True

        wait_for(gone, 30, "the orphaned workers to stop")
        self.assertIn("the supervisor went away: stopping this worker", proxy.output())

    def test_sighup_reaches_every_worker(self) -> None:
        tls_dir = Path(self.mktemp()).absolute()
        cert, key, leaf, _ = tlsutil.write_pair(tls_dir, "first")
        log_path = Path(self.mktemp()).absolute()
        proxy = start(
            self,
            "--tls-cert",
            str(cert),
            "--tls-key",
            str(key),
            "--access-log",
            str(log_path),
        )
        pids = wait_serving(proxy, 2)
        self.assertEqual(tlsutil.peer_fingerprint(proxy.port), tlsutil.fingerprint(leaf))
        for _ in range(4):
            get(proxy)

        new_cert, new_key, new_leaf, _ = tlsutil.write_pair(tls_dir, "second")
        os.replace(new_cert, cert)
        os.replace(new_key, key)
        rotated = log_path.with_name("access.log.1")
        os.rename(log_path, rotated)
        proxy.signal(signal.SIGHUP)
        wait_for(
            lambda: proxy.output().count("TLS certificate reloaded") == 2,
            20,
            "both workers to reload the certificate",
        )
        # Each worker's line says which worker it is (workers.tag_log_lines).
        reloads = [
            line for line in proxy.output().splitlines() if "TLS certificate reloaded" in line
        ]
        tags = sorted(re.findall(r"#info worker (\d+)\] ", "\n".join(reloads)))
        self.assertEqual(tags, ["0", "1"], reloads)
        # New connections to every worker see the new certificate: 16 handshakes, and the
        # kernel's split puts some on each worker (checked above all on new connections).
        seen = {tlsutil.peer_fingerprint(proxy.port) for _ in range(16)}
        self.assertEqual(seen, {tlsutil.fingerprint(new_leaf)})
        # Every worker writes to the new file: requests until both workers have held one.
        held = [open_tls(proxy) for _ in range(16)]
        owners = {index: established(pid, proxy.port) for index, pid in pids.items()}
        for sock in held:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            while sock.recv(65536):
                pass
            sock.close()
        self.assertTrue(all(n > 0 for n in owners.values()), owners)
        wait_for(
            lambda: log_path.exists() and len(log_path.read_text().splitlines()) == 16,
            20,
            "16 lines in the new access log",
        )
        self.assertEqual(len(rotated.read_text().splitlines()), 4)
        self.assertEqual(proxy.stop(), 0, proxy.output()[-3000:])

    def test_metrics_are_the_sum_of_all_workers(self) -> None:
        proxy = start(self, "--metrics", "tcp:0:interface=127.0.0.1")
        pids = wait_serving(proxy, 2)
        match = re.search(r"QuietSite starting on (\d+)", proxy.output())
        assert match is not None, proxy.output()
        metrics_port = int(match.group(1))
        held = [open_tls(proxy) for _ in range(20)]
        owners = {index: established(pid, proxy.port) for index, pid in pids.items()}
        for sock in held:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            while sock.recv(65536):
                pass
            sock.close()
        self.assertTrue(all(n > 0 for n in owners.values()), owners)

        def total() -> float:
            conn = http.client.HTTPConnection("127.0.0.1", metrics_port, timeout=10)
            conn.request("GET", "/metrics")
            text = conn.getresponse().read().decode()
            conn.close()
            return sum(
                float(line.rsplit(" ", 1)[1])
                for line in text.splitlines()
                if line.startswith("cocalcproxy_requests_total{")
            )

        wait_for(lambda: total() == 20, 20, "20 requests counted")
        self.assertEqual(total(), 20)
        # Gauges combine as their mode says: the directory is up (the minimum over workers),
        # one series each, not one per worker.
        conn = http.client.HTTPConnection("127.0.0.1", metrics_port, timeout=10)
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
        conn.close()
        up = [line for line in text.splitlines() if line.startswith("cocalcproxy_directory_up")]
        self.assertEqual(up, ["cocalcproxy_directory_up 1.0"])
        self.assertEqual(proxy.stop(), 0, proxy.output()[-3000:])

    def test_access_log_on_standard_output_has_whole_lines(self) -> None:
        proxy = start(self, "--access-log", "-")
        wait_serving(proxy, 2)
        held = [open_tls(proxy) for _ in range(24)]
        long_path = "/" + "x" * 6000  # longer than a pipe's atomic write
        for sock in held:
            sock.sendall(
                f"GET {long_path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode()
            )
        for sock in held:
            while sock.recv(65536):
                pass
            sock.close()

        def lines() -> list[dict[str, object]]:
            found = []
            for line in proxy.output().splitlines():
                if line.startswith("{"):
                    found.append(json.loads(line))  # a torn line fails here
            return found

        records = wait_for(lambda: len(lines()) == 24 and lines(), 20, "24 access-log lines")
        self.assertTrue(all(str(r.get("path", "")).startswith("/xxx") for r in records), records)
        self.assertEqual(proxy.stop(), 0, proxy.output()[-3000:])

    def test_crash_loop_ends_the_service_with_one_line(self) -> None:
        proxy = start(self)
        wait_serving(proxy, 2)
        killed: set[int] = set()

        def kill_every_worker() -> bool:
            assert proxy.process is not None
            if proxy.process.poll() is not None:
                return True
            for match in re.finditer(r"worker \d+ started \(pid (\d+)\)", proxy.output()):
                pid = int(match.group(1))
                if pid not in killed:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    killed.add(pid)
            return False

        wait_for(kill_every_worker, 30, "the supervisor to give up")
        assert proxy.process is not None
        self.assertEqual(proxy.process.wait(timeout=30), 1)
        output = proxy.output()
        self.assertEqual(output.count("worker processes keep ending"), 1, output[-3000:])
        self.assertIn("stopping the service (exit status 1)", output)
        self.assertNotIn("Traceback", output)


class OtherListenerTests(unittest.TestCase):
    def test_unix_listener_shared_and_admin_api_with_workers(self) -> None:
        import tempfile

        from tests.integration.test_admin_api_listener import make_admin_token

        state = str(Path(self.mktemp()).absolute())
        os.makedirs(state)
        token = make_admin_token(state)
        folder = tempfile.mkdtemp(prefix="cp-w-")  # short: AF_UNIX paths are limited
        self.addCleanup(lambda: __import__("shutil").rmtree(folder, True))
        path = os.path.join(folder, "https.sock")
        proxy = ProxyProcess(
            state,
            "--workers",
            "2",
            "--listen",
            f"unix:{path}",
            "--admin-api",
            "tcp:0:interface=127.0.0.1",
        ).start()
        self.addCleanup(
            lambda: proxy.stop() if proxy.process and proxy.process.poll() is None else 0
        )
        wait_serving(proxy, 2)
        output = proxy.output()
        self.assertIn(f"HTTPS listening on unix:{path}", output)
        self.assertIn("one socket shared", output)
        match = re.search(r"admin API listening on \S+ \(127.0.0.1 port (\d+)\)", output)
        assert match is not None, output[-3000:]
        # HTTPS over the shared Unix socket, served by the workers.
        for _ in range(4):
            raw = socket.socket(socket.AF_UNIX)
            raw.settimeout(30)
            raw.connect(path)
            with context(proxy).wrap_socket(raw, server_hostname="localhost") as tls:
                tls.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                self.assertTrue(tls.recv(100).startswith(b"HTTP/1.1 "))
        # The admin API, through a worker (plain HTTP on loopback).
        conn = http.client.HTTPConnection("127.0.0.1", int(match.group(1)), timeout=30)
        conn.request("GET", "/v1/users", headers={"Authorization": f"Bearer {token}"})
        response = conn.getresponse()
        self.assertEqual(response.status, 200)
        self.assertEqual(json.loads(response.read()), {"items": [], "next_cursor": None})
        conn.close()
        self.assertEqual(proxy.stop(), 0, proxy.output()[-3000:])


class ListenFailureTests(unittest.TestCase):
    def test_a_port_taken_is_one_line_and_status_1(self) -> None:
        taken = socket.socket()
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        proxy = ProxyProcess(self.mktemp(), "--workers", "2", port=taken.getsockname()[1]).start()
        assert proxy.process is not None
        self.assertEqual(proxy.process.wait(timeout=60), 1)
        output = proxy.output()
        self.assertIn("cocalcproxy: cannot listen: Address already in use", output)
        self.assertNotIn("Traceback", output)
        self.assertNotIn("worker 0 started", output)


class SystemdWorkerTests(unittest.TestCase):
    def test_ready_only_after_every_worker_listens(self) -> None:
        proxy = Activated(
            self,
            "--workers",
            "2",
            "--listen",
            "systemd:domain=INET:index=0",
            "--redirect-http",
            "systemd:domain=INET:index=1",
        )
        messages = proxy.messages(b"READY=1")
        output = proxy.output()
        self.assertEqual(len(serving(proxy)), 2, output[-3000:])
        self.assertIn("all 2 workers are serving", output)
        self.assertIn("one socket shared", output)
        self.assertEqual(sum(b"READY=1" in m.split(b"\n") for m in messages), 1)
        status, _ = proxy.https_get("/")
        self.assertLess(status, 500)
        status, location = proxy.http_get("/x")
        self.assertEqual(status, 308)
        proxy.process.send_signal(signal.SIGTERM)
        self.assertEqual(proxy.process.wait(timeout=60), 0, proxy.output()[-3000:])

    def test_hung_worker_is_killed_and_restarted(self) -> None:
        proxy = Activated(
            self,
            "--workers",
            "2",
            "--listen",
            "systemd:domain=INET:index=0",
            watchdog_usec=4_000_000,
        )
        proxy.messages(b"READY=1")
        pids = serving(proxy)
        os.kill(pids[1], signal.SIGSTOP)
        self.addCleanup(lambda: os.path.exists(f"/proc/{pids[1]}") and os.kill(pids[1], 9))
        wait_for(
            lambda: f"worker 1 (pid {pids[1]}) sent no heartbeat" in proxy.output(),
            30,
            "the supervisor to notice the hung worker",
        )
        wait_for(
            lambda: serving(proxy).get(1) not in (None, pids[1]),
            30,
            "worker 1 to be started again",
        )
        self.assertIn(b"WATCHDOG=1", b"\n".join(proxy.messages(b"WATCHDOG=1")))
        proxy.process.send_signal(signal.SIGTERM)
        self.assertEqual(proxy.process.wait(timeout=60), 0, proxy.output()[-3000:])


class DrainTests(unittest.TestCase):
    def test_requests_in_flight_on_every_worker_finish_after_sigterm(self) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        from tests.integration.test_shutdown import project_with_token, refused

        entered = threading.Semaphore(0)
        release = threading.Event()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                entered.release()
                release.wait(60)
                body = b"slow answer\n" * 1000
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        self.addCleanup(server.server_close)
        self.addCleanup(server.shutdown)
        self.addCleanup(release.set)

        state = str(Path(self.mktemp()).absolute())
        pid, token = project_with_token(state)
        proxy = ProxyProcess(state, "--workers", "2").start()
        self.addCleanup(
            lambda: proxy.stop() if proxy.process and proxy.process.poll() is None else 0
        )
        pids = wait_serving(proxy, 2)

        # Open connections until both workers hold at least one, then a slow request on each.
        held: list[ssl.SSLSocket] = []
        for _ in range(64):
            held.append(open_tls(proxy))
            counts = {i: established(p, proxy.port) for i, p in pids.items()}
            if len(held) >= 4 and all(counts.values()) and sum(counts.values()) == len(held):
                break
        self.assertTrue(all(counts.values()), counts)
        request = (
            f"GET /{pid}/server/{server.server_address[1]}/slow HTTP/1.1\r\n"
            f"Host: localhost\r\nAuthorization: Bearer {token}\r\n\r\n"
        ).encode()
        for sock in held:
            sock.sendall(request)
        for _ in held:
            self.assertTrue(entered.acquire(timeout=30), proxy.output()[-3000:])

        proxy.signal(signal.SIGTERM)
        wait_for(lambda: refused(proxy.port), 30, "the listeners to close")
        assert proxy.process is not None
        self.assertIsNone(proxy.process.poll())
        release.set()
        for sock in held:
            data = b""
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
            sock.close()
            head, _, body = data.partition(b"\r\n\r\n")
            self.assertTrue(head.startswith(b"HTTP/1.1 200"), head)
            self.assertIn(b"connection: close", head.lower())
            self.assertEqual(body, b"slow answer\n" * 1000)
        self.assertEqual(proxy.process.wait(timeout=60), 0, proxy.output()[-3000:])
        self.assertEqual(proxy.output().count("stopped cleanly"), 3)
