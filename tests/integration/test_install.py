"""A real `pip install .` into a fresh virtual environment: the plugin, the console script, and
`twistd -n cocalcproxy` with no options at all."""

from __future__ import annotations

import atexit
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from twisted.trial import unittest

from cocalcproxy.options import Options

REPO = Path(__file__).resolve().parents[2]


def wait_for(predicate, timeout: float, what: str):  # type: ignore[no-untyped-def]
    """Poll predicate() until it returns something truthy or the deadline passes."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = predicate()
            if result:
                return result
        except Exception as e:  # noqa: BLE001 - any failure means "not yet"
            last_error = e
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}: {last_error!r}")


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


_installed: dict[str, Path] = {}


def installed_venv() -> Path:
    """Build the fresh virtual environment once per test process (trial has no setUpClass)."""
    if "venv" not in _installed:
        holder = tempfile.TemporaryDirectory(prefix="cocalcproxy-install-")
        atexit.register(holder.cleanup)
        venv = Path(holder.name) / "venv"
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        result = subprocess.run(
            [str(venv / "bin" / "pip"), "install", "-q", str(REPO)],
            capture_output=True,
            text=True,
            timeout=600,
        )
        if result.returncode != 0:
            raise AssertionError(f"pip install failed:\n{result.stderr[-3000:]}")
        _installed["venv"] = venv
    return _installed["venv"]


class InstalledPackageTests(unittest.TestCase):
    """A real `pip install .` (built once for all these tests: installing is the slow part)."""

    def setUp(self) -> None:
        self.venv = installed_venv()

    def run_tool(self, *args: str, cwd: str | None = None) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
        return subprocess.run(
            [str(self.venv / "bin" / args[0]), *args[1:]],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=cwd or tempfile.gettempdir(),
            env=env,
        )

    def test_twistd_lists_the_plugin(self) -> None:
        result = self.run_tool("twistd", "--help")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("cocalcproxy", result.stdout)

    def test_plugin_help_documents_every_option(self) -> None:
        result = self.run_tool("twistd", "cocalcproxy", "--help")
        self.assertEqual(result.returncode, 0, result.stderr)
        names = ["listen"] + [p[0] for p in Options.optParameters]
        for name in names:
            self.assertIn(f"--{name}", result.stdout)
        for contract_option in (
            "--state-dir", "--database", "--listen", "--tls-cert", "--tls-key",
            "--redirect-http", "--hostname", "--project-domain", "--metrics",
        ):  # fmt: skip
            self.assertIn(contract_option, result.stdout)

    def test_installed_code_is_not_the_checkout(self) -> None:
        result = self.run_tool(
            "python", "-c", "import cocalcproxy, twisted.plugins.cocalcproxy_plugin as p; "
            "print(cocalcproxy.__file__); print(p.__file__)"
        )  # fmt: skip
        self.assertEqual(result.returncode, 0, result.stderr)
        for line in result.stdout.splitlines():
            self.assertIn(str(self.venv), line)

    def test_admin_console_script(self) -> None:
        result = self.run_tool("cocalcproxy", "--help")
        self.assertEqual(result.returncode, 0, result.stderr)
        for command in ("user", "token", "project"):
            self.assertIn(command, result.stdout)

    def test_runs_with_no_options(self) -> None:
        """`twistd -n cocalcproxy` alone: ./cocalcproxy-state, HTTPS on 8443, fingerprint logged."""
        if not port_is_free(8443):
            self.fail("port 8443 is taken on this machine; this test needs the contract's default")
        workdir = tempfile.mkdtemp(prefix="cocalcproxy-run-")
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("PYTHONPATH", "COCALCPROXY_STATE_DIR", "STATE_DIRECTORY")
        }
        log_path = Path(workdir) / "twistd.log"
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                [str(self.venv / "bin" / "twistd"), "-n", "cocalcproxy"],
                cwd=workdir,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            state = Path(workdir) / "cocalcproxy-state"
            cert = wait_for(
                lambda: (state / "tls" / "cert.pem").exists() and state / "tls" / "cert.pem",
                60,
                "the generated certificate",
            )

            def health() -> dict[str, object]:
                import ssl

                context = ssl.create_default_context(cafile=str(cert))
                with urllib.request.urlopen(  # noqa: S310
                    "https://localhost:8443/_/health", context=context, timeout=5
                ) as response:
                    return json.loads(response.read())  # type: ignore[no-any-return]

            self.assertEqual(wait_for(health, 60, "/_/health on 8443")["status"], "ok")
            self.assertTrue((state / "directory.sqlite3").exists())
            self.assertIn("SHA-256 fingerprint", log_path.read_text())
        finally:
            process.send_signal(signal.SIGTERM)
            code = process.wait(timeout=60)
        self.assertEqual(code, 0, log_path.read_text()[-3000:])
