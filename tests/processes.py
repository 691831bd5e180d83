"""Running the real proxy as a separate process (``twistd -n cocalcproxy``) for end-to-end tests.

Everything waits on events with a deadline (polling), never on fixed sleeps.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

REPO = Path(__file__).resolve().parents[1]


class GiveUp(AssertionError):
    """Raised by a predicate when waiting longer cannot help (the process died)."""


def wait_for(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.05) -> T:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            result = predicate()
            if result:
                return result
        except GiveUp:
            raise
        except Exception as e:  # noqa: BLE001 - any failure means "not yet"
            last_error = e
        time.sleep(interval)
    raise AssertionError(
        f"timed out after {timeout}s waiting for {what}; last error: {last_error!r}"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def child_environment(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("COCALCPROXY_STATE_DIR", "STATE_DIRECTORY", "NOTIFY_SOCKET", "LISTEN_FDS")
    }
    env["PYTHONPATH"] = str(REPO) + (
        os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""
    )
    env.update(extra)
    return env


class ProxyProcess:
    """``twistd -n cocalcproxy`` in a subprocess, its output in ``log_path``."""

    def __init__(
        self, state_dir: str, *args: str, port: int | None = None, interface: str = "127.0.0.1"
    ) -> None:
        self.state_dir = state_dir = os.path.abspath(state_dir)
        self.port = port or free_port()
        self.interface = interface
        self.log_path = Path(state_dir) / "twistd-output.log"
        Path(state_dir).mkdir(parents=True, exist_ok=True)
        self.argv = [
            str(Path(sys.executable).parent / "twistd"), "-n",
            "--pidfile=", "cocalcproxy",
            "--state-dir", state_dir,
            "--listen", f"tcp:{self.port}:interface={interface}",
            *args,
        ]  # fmt: skip
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> ProxyProcess:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.argv, cwd=self.state_dir, env=child_environment(), stdout=log, stderr=log
            )
        return self

    @property
    def url(self) -> str:
        return f"https://localhost:{self.port}"

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_listening(self, timeout: float = 60) -> None:
        def connects() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                raise GiveUp(f"proxy exited early:\n{self.output()[-3000:]}")
            with socket.create_connection((self.interface, self.port), timeout=1):
                return True

        wait_for(connects, timeout, "the proxy to listen")

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM and wait; returns the exit status."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise


def admin(state_dir: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run the admin command as its own process against ``state_dir``.

    Admin commands never create a database; where ``state_dir`` holds none yet, ``init``
    creates it first (as an operator would before adding the first user).
    """
    if args[:1] != ("init",) and not (Path(state_dir) / "directory.sqlite3").exists():
        created = admin(state_dir, "init")
        assert created.returncode == 0, created.stderr
    return subprocess.run(
        [sys.executable, "-m", "cocalcproxy.ops.admin", "--state-dir", state_dir, *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=child_environment(),
        timeout=120,
    )
