"""The systemd units in docs/systemd/: ``systemd-analyze verify`` accepts them without a single
warning, and what they pass to the proxy is what the proxy understands.

``systemd-analyze verify`` works without a running systemd (it loads the units into a test
manager), but it insists that ExecStart's program exists; the test verifies a copy whose
``/opt/cocalcproxy/bin/twistd`` is replaced by this environment's twistd. Debian package: systemd.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

from twisted.trial import unittest

from cocalcproxy.ops.options import Options

UNITS = Path(__file__).resolve().parent.parent / "docs" / "systemd"
NAMES = ("cocalcproxy.service", "cocalcproxy.socket", "cocalcproxy-redirect.socket")
INSTALLED_TWISTD = "/opt/cocalcproxy/bin/twistd"


Unit = dict[str, dict[str, list[str]]]


def read_unit(name: str) -> Unit:
    """A unit file as section -> key -> values (systemd keys may repeat)."""
    text = (UNITS / name).read_text().replace("\\\n", " ")  # join continuations
    unit: Unit = {}
    section: dict[str, list[str]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = unit.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        section.setdefault(key.strip(), []).append(value.strip())
    return unit


def values(unit: Unit, section: str, key: str) -> list[str]:
    return unit.get(section, {}).get(key, [])


class VerifyTests(unittest.TestCase):
    def copy_units(self) -> Path:
        target = Path(self.mktemp()).absolute()
        target.mkdir(parents=True)
        twistd = Path(sys.executable).parent / "twistd"
        self.assertTrue(twistd.exists(), twistd)
        for name in NAMES:
            text = (UNITS / name).read_text()
            (target / name).write_text(text.replace(INSTALLED_TWISTD, str(twistd)))
        return target

    def verify(self, directory: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["systemd-analyze", "verify", "--man=no", *NAMES],
            cwd=directory,
            capture_output=True,
            text=True,
            timeout=120,
        )

    def test_verify_accepts_all_units_without_warnings(self) -> None:
        result = self.verify(self.copy_units())
        self.assertEqual(result.returncode, 0, result.stderr + result.stdout)
        self.assertEqual(result.stderr.strip(), "")
        self.assertEqual(result.stdout.strip(), "")

    def test_verify_really_checks(self) -> None:
        """A misspelt setting is reported, so the clean run above means something."""
        directory = self.copy_units()
        service = directory / "cocalcproxy.service"
        service.write_text(service.read_text().replace("Type=notify", "Type=notfy"))
        result = self.verify(directory)
        self.assertIn("notfy", result.stderr)


class ContentTests(unittest.TestCase):
    def setUp(self) -> None:
        self.service = read_unit("cocalcproxy.service")
        self.https = read_unit("cocalcproxy.socket")
        self.http = read_unit("cocalcproxy-redirect.socket")

    def exec_start(self) -> list[str]:
        (line,) = values(self.service, "Service", "ExecStart")
        return shlex.split(line)

    def test_the_proxy_accepts_the_command_line(self) -> None:
        argv = self.exec_start()
        self.assertEqual(argv[0], INSTALLED_TWISTD)
        self.assertIn("--nodaemon", argv)
        self.assertIn("--pidfile=", argv)
        options = Options()
        options.parseOptions(argv[argv.index("cocalcproxy") + 1 :])
        self.assertEqual(options["listen"], ["systemd:domain=INET6:name=https"])
        self.assertEqual(options["redirect-http"], "systemd:domain=INET6:name=http")

    def test_descriptor_names_match_the_sockets(self) -> None:
        self.assertEqual(values(self.https, "Socket", "FileDescriptorName"), ["https"])
        self.assertEqual(values(self.https, "Socket", "ListenStream"), ["443"])
        self.assertEqual(values(self.http, "Socket", "FileDescriptorName"), ["http"])
        self.assertEqual(values(self.http, "Socket", "ListenStream"), ["80"])
        sockets = values(self.service, "Service", "Sockets")[0].split()
        self.assertEqual(sorted(sockets), ["cocalcproxy-redirect.socket", "cocalcproxy.socket"])
        for unit in (self.https, self.http):
            # INET6 in the endpoint string needs a dual-stack IPv6 socket.
            self.assertEqual(values(unit, "Socket", "BindIPv6Only"), ["both"])
            self.assertEqual(values(unit, "Socket", "Service"), ["cocalcproxy.service"])

    def test_notify_reload_restart_and_state(self) -> None:
        expected = {
            "Type": "notify",
            "NotifyAccess": "main",
            "ExecReload": "/bin/kill -HUP $MAINPID",
            "Restart": "on-failure",
            "StateDirectory": "cocalcproxy",
        }
        for key, value in expected.items():
            self.assertEqual(values(self.service, "Service", key), [value], key)
        watchdog = int(values(self.service, "Service", "WatchdogSec")[0])
        self.assertGreater(watchdog, 2)
        # The stop timeout leaves room for --shutdown-timeout (30 s by default) to drain.
        self.assertGreater(int(values(self.service, "Service", "TimeoutStopSec")[0]), 30)

    def test_hardening(self) -> None:
        expected = {
            "NoNewPrivileges": "yes",
            "ProtectSystem": "strict",
            "ProtectHome": "read-only",  # homes under /home stay readable for the raw view
            "PrivateTmp": "yes",
            "PrivateDevices": "yes",
            "ProtectKernelTunables": "yes",
            "ProtectKernelModules": "yes",
            "ProtectControlGroups": "yes",
            "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
            "CapabilityBoundingSet": "",
            "User": "cocalcproxy",
        }
        for key, value in expected.items():
            self.assertEqual(values(self.service, "Service", key), [value], key)
        self.assertIn("@system-service", values(self.service, "Service", "SystemCallFilter"))
