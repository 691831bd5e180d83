"""Memory at rest (issue 10: <= 64 MiB per worker): what a started proxy carries.

``test_rest_modules`` starts the real service in a separate Python process (the twistd
plugin's ``makeService`` and ``startService`` on the real reactor, a TLS listener, an SQLite
state directory), makes one HTTPS request to it, and reads that process's ``sys.modules``.
Modules that only an option needs (PostgreSQL, OpenID, identity assertions, the admin API,
Prometheus metrics) must not be there. ``IdleTrim`` gives glibc's free heap back after a burst.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from typing import Any

from twisted.internet.task import Clock
from twisted.trial import unittest

from cocalcproxy.ops import memory
from tests.processes import REPO, child_environment

#: Runs in the child: start the proxy from its command line (argv), fetch /_/login once over
#: TLS, print the module names it holds as one JSON line, stop.
CHILD = r"""
import json, ssl, sys, urllib.error, urllib.request
from twisted.internet import reactor, threads
from twisted.plugins.cocalcproxy_plugin import serviceMaker

options = serviceMaker.options()
options.parseOptions(sys.argv[1:])
proxy = serviceMaker.makeService(options)
proxy.startService()
out = {}

def fetch(port):
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with urllib.request.urlopen(
            f"https://127.0.0.1:{port}/_/login", context=context, timeout=60
        ) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code

def listening(ports):
    return threads.deferToThread(fetch, ports[0].getHost().port)

def done(status):
    out["status"] = status
    out["modules"] = sorted(sys.modules)

def failed(failure):
    out["error"] = str(failure.value)

def stop(_):
    d = proxy.stopService()
    d.addBoth(lambda _: reactor.stop())

proxy.all_listening().addCallback(listening).addCallbacks(done, failed).addBoth(stop)
reactor.run()
print(json.dumps(out))
"""

#: Imported only when an option asks for them: never by a proxy at rest on SQLite.
HEAVY_AT_REST = (
    "psycopg",
    "prometheus_client",
    "joserfc",
    "treq",
    "hypothesis",
    "cocalcproxy.guard.oidc",
    "cocalcproxy.guard.oidcweb",
    "cocalcproxy.guard.identity",
    "cocalcproxy.ops.adminapi",
    "cocalcproxy.ops.openapi",
)


def started_proxy_modules(*options: str) -> dict[str, Any]:
    """The JSON the child prints: the status of its one request and its module names."""
    with tempfile.TemporaryDirectory() as state:
        env = child_environment()
        admin = subprocess.run(
            [sys.executable, "-m", "cocalcproxy.ops.admin", "--state-dir", state, "init"],
            env=env, cwd=REPO, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert admin.returncode == 0, admin.stderr
        command = [
            sys.executable, "-c", CHILD, "--state-dir", state,
            "--listen", "tcp:0:interface=127.0.0.1", "--access-log", "off", *options,
        ]  # fmt: skip
        child = subprocess.run(
            command, env=env, cwd=REPO, capture_output=True, text=True, timeout=180
        )
    assert child.returncode == 0, child.stderr[-3000:]
    lines = child.stdout.strip().splitlines()
    assert lines, child.stderr[-3000:]
    result: dict[str, Any] = json.loads(lines[-1])
    assert "error" not in result, result.get("error")
    return result


def heavy(modules: list[str]) -> list[str]:
    return sorted(m for m in modules for h in HEAVY_AT_REST if m == h or m.startswith(h + "."))


class RestModulesTests(unittest.TestCase):
    def test_rest_modules(self) -> None:
        """A started SQLite proxy that served a request holds none of the optional modules."""
        result = started_proxy_modules()
        self.assertEqual(result["status"], 200)
        # The list is the serving process's: the handlers and the TLS stack are in it.
        self.assertIn("cocalcproxy.handlers.forward", result["modules"])
        self.assertIn("OpenSSL.SSL", result["modules"])
        self.assertEqual(heavy(result["modules"]), [])

    def test_option_brings_its_modules(self) -> None:
        """The check sees an optional module when the option is on (so it can fail)."""
        result = started_proxy_modules(
            "--identity-assertion", "--metrics", "tcp:0:interface=127.0.0.1"
        )
        self.assertEqual(result["status"], 200)
        self.assertIn("joserfc", heavy(result["modules"]))
        self.assertIn("cocalcproxy.guard.identity", heavy(result["modules"]))
        self.assertIn("prometheus_client", heavy(result["modules"]))


class IdleTrimTests(unittest.TestCase):
    def make(self) -> tuple[memory.IdleTrim, Clock, list[float], list[int]]:
        """Trims are recorded as 1, collections as 0: a trim must follow a collection."""
        clock = Clock()
        cpu = [0.0]
        trims: list[int] = []
        trim = memory.IdleTrim(
            clock,
            trim=lambda: trims.append(1),
            collect=lambda: trims.append(0),
            cpu_time=lambda: cpu[0],
            interval=1.0,
        )
        trim.startService()
        self.addCleanup(trim.stopService)
        return trim, clock, cpu, trims

    def test_quiet_after_busy_trims_once(self) -> None:
        _, clock, cpu, trims = self.make()
        cpu[0] += 0.9
        clock.advance(1)
        self.assertEqual(trims, [])  # busy: no trim during the burst
        clock.advance(1)
        self.assertEqual(trims, [0, 1])  # the first quiet second after it: collect, then trim
        clock.advance(1)
        clock.advance(1)
        self.assertEqual(trims, [0, 1])  # quiet stays quiet: no more trims

    def test_quiet_process_trims_once_a_period(self) -> None:
        trim, clock, cpu, trims = self.make()
        for _ in range(59):
            cpu[0] += 0.01
            clock.advance(1)
        self.assertEqual(trims, [])
        clock.advance(1)
        self.assertEqual(trims, [0, 1])
        for _ in range(59):
            clock.advance(1)
        self.assertEqual(trims, [0, 1])
        clock.advance(1)
        self.assertEqual(trims, [0, 1, 0, 1])
        self.assertEqual(trim.trims, 2)

    def test_no_periodic_trim_under_load(self) -> None:
        _, clock, cpu, trims = self.make()
        for _ in range(120):
            cpu[0] += 0.1  # between quiet and busy, all along
            clock.advance(1)
        self.assertEqual(trims, [])

    def test_moderate_load_does_not_trim(self) -> None:
        """Between the thresholds (neither busy nor quiet) it waits for a quiet second."""
        _, clock, cpu, trims = self.make()
        cpu[0] += 0.5
        clock.advance(1)
        cpu[0] += 0.1
        clock.advance(1)
        self.assertEqual(trims, [])
        clock.advance(1)
        self.assertEqual(trims, [0, 1])

    def test_glibc_trim_is_callable(self) -> None:
        trim = memory.malloc_trim()
        if trim is None:
            raise unittest.SkipTest("no malloc_trim in this C library")
        self.assertIn(trim(), (0, 1))
