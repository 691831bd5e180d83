"""A real `pip install .` into a fresh virtual environment: the plugin, the console script, and
`twistd -n cocalcproxy` with no options at all."""

from __future__ import annotations

import atexit
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from twisted.trial import unittest

from cocalcproxy.ops.options import Options

REPO = Path(__file__).resolve().parents[2]


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
        """`twistd -n cocalcproxy` alone: ./cocalcproxy-state, HTTPS on 8443, fingerprint logged.

        The README's walkthrough may have left a proxy on 8443, so the no-option start runs in a
        network namespace of its own (``unshare -rn``: its own loopback, its own port 8443), which
        still proves the default is 8443. Only where namespaces are unavailable does it use the
        machine's port, and then it needs that port free.
        """
        workdir = tempfile.mkdtemp(prefix="cocalcproxy-run-")
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("PYTHONPATH", "COCALCPROXY_STATE_DIR", "STATE_DIRECTORY")
        }
        namespaced = namespaces_work()
        if not namespaced and not port_is_free(8443):
            self.fail(
                "port 8443 is taken and this machine cannot make a network namespace "
                "(unshare -rn); stop the other proxy to run this test"
            )
        bin_dir = self.venv / "bin"
        command = [str(bin_dir / "python"), str(DRIVER), str(bin_dir / "twistd"), workdir]
        command.append("namespaced" if namespaced else "shared")
        if namespaced:
            command = ["unshare", "-rn", *command]
        result = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
        self.assertEqual(result.returncode, 0, result.stdout[-3000:] + result.stderr[-3000:])
        report = json.loads(result.stdout.strip().splitlines()[-1])
        self.assertEqual(report["health"]["status"], "ok", report)
        state = Path(workdir) / "cocalcproxy-state"
        self.assertTrue((state / "directory.sqlite3").exists())
        self.assertIn("SHA-256 fingerprint", report["log"])
        self.assertEqual(report["exit"], 0, report["log"])


DRIVER = Path(__file__).with_name("run_default.py")


def namespaces_work() -> bool:
    try:
        return subprocess.run(["unshare", "-rn", "true"], capture_output=True).returncode == 0
    except OSError:
        return False
