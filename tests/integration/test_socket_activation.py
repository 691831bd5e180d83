"""Socket activation as systemd does it, with TLS on top, and the sd_notify conversation.

The test plays systemd: it binds the listening sockets itself, starts ``twistd -n cocalcproxy``
with them as descriptors 3 and 4 (``LISTEN_FDS``, ``LISTEN_PID`` = the child's own pid,
``LISTEN_FDNAMES``), binds a datagram socket for ``NOTIFY_SOCKET``, and asks for the watchdog.
A tiny exec wrapper puts the sockets at 3 and 4 and sets ``LISTEN_PID`` to its own pid, which
``exec`` keeps for twistd.
"""

from __future__ import annotations

import http.client
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from twisted.trial import unittest

from tests.processes import child_environment, wait_for

# Runs in the child: move the inherited sockets to 3, 4, ... and exec twistd with LISTEN_PID.
EXEC_WRAPPER = """
import fcntl, os, sys
count = int(sys.argv[1])
fds = [int(x) for x in sys.argv[2:2 + count]]
# First out of the way (above 100), so that moving one cannot overwrite another.
moved = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 100) for fd in fds]
for fd in fds:
    os.close(fd)
for index, fd in enumerate(moved):
    os.dup2(fd, 3 + index)
    os.close(fd)
os.environ["LISTEN_FDS"] = str(count)
os.environ["LISTEN_PID"] = str(os.getpid())
argv = sys.argv[2 + count:]
os.execv(argv[0], argv)
"""


def listening_socket(host: str = "127.0.0.1") -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    sock.listen(64)
    return sock


class Activated:
    """The proxy under a pretend systemd."""

    def __init__(
        self, case: unittest.TestCase, *args: str, watchdog_usec: int = 0, host: str = "127.0.0.1"
    ) -> None:
        self.state_dir = Path(case.mktemp()).absolute()
        self.state_dir.mkdir(parents=True)
        self.host = host
        self.https = listening_socket(host)
        self.http = listening_socket(host)
        case.addCleanup(self.https.close)
        case.addCleanup(self.http.close)
        self.https_port = self.https.getsockname()[1]
        self.http_port = self.http.getsockname()[1]

        notify_dir = tempfile.mkdtemp(prefix="cp-sd-")
        case.addCleanup(shutil.rmtree, notify_dir, True)
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        case.addCleanup(self.notify.close)
        notify_path = os.path.join(notify_dir, "notify")
        self.notify.bind(notify_path)

        env = child_environment(NOTIFY_SOCKET=notify_path, LISTEN_FDNAMES="https:http")
        if watchdog_usec:
            env["WATCHDOG_USEC"] = str(watchdog_usec)
        self.log_path = self.state_dir / "output.log"
        twistd = str(Path(sys.executable).parent / "twistd")
        fds = [self.https.fileno(), self.http.fileno()]
        argv = [
            sys.executable, "-c", EXEC_WRAPPER, str(len(fds)), *map(str, fds),
            twistd, "-n", "--pidfile=", "cocalcproxy",
            "--state-dir", str(self.state_dir),
            *args,
        ]  # fmt: skip
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                argv, cwd=self.state_dir, env=env, stdout=log, stderr=log, pass_fds=fds
            )
        case.addCleanup(self.kill)
        # The supervisor keeps its copies open (as systemd does), but must not accept on them.

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def messages(self, until: bytes, timeout: float = 60) -> list[bytes]:
        """Notification datagrams, until one containing ``until`` arrives (or fail)."""
        got: list[bytes] = []
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.process.poll() is not None and not got:
                raise AssertionError(f"no {until!r} from the proxy; got {got}:\n{self.output()}")
            self.notify.settimeout(min(remaining, 1.0))
            try:
                message = self.notify.recv(4096)
            except TimeoutError:
                continue
            got.append(message)
            if until in message.split(b"\n"):
                return got

    def https_get(self, path: str) -> tuple[int, bytes]:
        context = ssl.create_default_context(cafile=str(self.state_dir / "tls" / "cert.pem"))
        name = "localhost" if self.host == "127.0.0.1" else self.host
        conn = http.client.HTTPSConnection(name, self.https_port, context=context, timeout=30)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def http_get(self, path: str) -> tuple[int, str | None]:
        conn = http.client.HTTPConnection(self.host, self.http_port, timeout=30)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            response.read()
            return response.status, response.getheader("Location")
        finally:
            conn.close()


class SocketActivationTests(unittest.TestCase):
    def test_inherited_sockets_serve_tls_and_redirect(self) -> None:
        proxy = Activated(
            self,
            "--listen", "systemd:domain=INET:index=0",
            "--redirect-http", "systemd:domain=INET:name=http",
            "--hostname", "localhost",
        )  # fmt: skip
        messages = proxy.messages(b"READY=1")
        self.assertEqual(len([m for m in messages if b"READY=1" in m]), 1)

        status, body = proxy.https_get("/_/health")
        self.assertEqual(status, 200, body)
        self.assertIn(b'"ok"', body)
        status, location = proxy.http_get("/some/path?q=1")
        self.assertEqual(status, 308)
        self.assertEqual(location, "https://localhost/some/path?q=1")

        proxy.process.send_signal(signal.SIGTERM)
        proxy.messages(b"STOPPING=1")
        self.assertEqual(proxy.process.wait(timeout=60), 0, proxy.output()[-3000:])
        # A clean run: nothing went wrong on the way.
        self.assertNotIn("Traceback", proxy.output())

    def test_ipv6_descriptors_by_name_as_the_shipped_units_use_them(self) -> None:
        proxy = Activated(
            self,
            "--listen", "systemd:domain=INET6:name=https",
            "--redirect-http", "systemd:domain=INET6:name=http",
            host="::1",
        )  # fmt: skip
        proxy.messages(b"READY=1")
        status, body = proxy.https_get("/_/health")
        self.assertEqual(status, 200, body)
        status, location = proxy.http_get("/x")
        self.assertEqual((status, location), (308, "https://localhost/x"))
        proxy.process.send_signal(signal.SIGTERM)
        self.assertEqual(proxy.process.wait(timeout=60), 0, proxy.output()[-3000:])

    def test_watchdog_pings_at_half_the_interval(self) -> None:
        proxy = Activated(
            self, "--listen", "systemd:domain=INET:name=https", watchdog_usec=1_000_000
        )
        proxy.messages(b"READY=1")
        started = time.monotonic()
        proxy.messages(b"WATCHDOG=1")
        proxy.messages(b"WATCHDOG=1")
        proxy.messages(b"WATCHDOG=1")
        # Three pings at 0.5 s need about 1 s (at least one full period between first and last).
        self.assertGreater(time.monotonic() - started, 0.4)
        proxy.process.send_signal(signal.SIGTERM)
        proxy.messages(b"STOPPING=1")
        self.assertEqual(proxy.process.wait(timeout=60), 0, proxy.output()[-3000:])

    def test_not_ready_when_a_listener_fails(self) -> None:
        """A descriptor name that was not passed: no READY=1, a clear error, a failing exit."""
        proxy = Activated(self, "--listen", "systemd:domain=INET:name=nonesuch")
        code = proxy.process.wait(timeout=60)
        self.assertNotEqual(code, 0)
        wait_for(lambda: proxy.output(), 5, "some output")
        proxy.notify.setblocking(False)
        seen = []
        while True:
            try:
                seen.append(proxy.notify.recv(4096))
            except BlockingIOError:
                break
        self.assertFalse(any(b"READY=1" in m for m in seen), seen)
