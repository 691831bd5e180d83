"""Every bad configuration is one line on stderr naming the option, and exit status 1.

Each case runs the real ``twistd -n cocalcproxy`` (or the admin command) as a subprocess. The
table of numeric options is read from ``Options.optParameters``, so an option added later with one
of the shared coercions is covered without touching this file.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from twisted.trial import unittest

from cocalcproxy.ops import options as options_module
from tests.processes import child_environment

TWISTD = str(Path(sys.executable).parent / "twistd")

# Values every numeric option must refuse, whatever its unit.
BAD_NUMBERS = ["inf", "-inf", "nan", "-1", "0", "abc", "1e999", ""]
# Extra refusals by kind (e.g. a fractional count).
BAD_BY_KIND = {
    "_positive_int": ["1.5"],
    "_non_negative_int": ["1.5", "inf"],
    "_size": ["1.5M", "10X"],
    "_positive_float": [],
    "_non_negative_float": [],
}


def numeric_options() -> list[tuple[str, str]]:
    """(option, coercion name) for every option parsed by one of the shared coercions."""
    found = []
    for row in options_module.Options.optParameters:
        coerce = row[4] if len(row) > 4 else None
        name = getattr(coerce, "__name__", "")
        if name in BAD_BY_KIND:
            found.append((row[0], name))
    return found


def bad_values(kind: str) -> list[str]:
    values = BAD_NUMBERS + BAD_BY_KIND[kind]
    if kind in ("_non_negative_int", "_non_negative_float"):
        values = [v for v in values if v != "0"]  # 0 is meaningful there (off)
    return values


class StartupErrorTests(unittest.TestCase):
    def setUp(self) -> None:
        self.cwd = Path(self.mktemp()).absolute()
        self.cwd.mkdir(parents=True)

    def twistd(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                TWISTD,
                "-n",
                "--pidfile=",
                "cocalcproxy",
                "--listen",
                "tcp:0:interface=127.0.0.1",
                *args,
            ],
            cwd=self.cwd,
            env=child_environment(),
            capture_output=True,
            text=True,
            timeout=60,
        )

    def assert_one_line(self, result: subprocess.CompletedProcess[str], *words: str) -> None:
        where = f"stdout={result.stdout[-2000:]!r} stderr={result.stderr[-2000:]!r}"
        self.assertEqual(result.returncode, 1, where)
        lines = result.stderr.splitlines()
        self.assertEqual(len(lines), 1, where)
        self.assertNotIn("Traceback", result.stderr)
        self.assertNotIn("Usage", result.stdout + result.stderr)
        for word in words:
            self.assertIn(word, lines[0])

    def test_table_of_numeric_options(self) -> None:
        table = numeric_options()
        names = {name for name, _ in table}
        # The table really covers the durations and sizes (it is read from the options).
        for expected in (
            "backend-connect-timeout",
            "backend-response-timeout",
            "websocket-idle-timeout",
            "shutdown-timeout",
            "session-lifetime",
            "max-body-size",
            "backend-pool-size",
            "hsts-max-age",
            "directory-grace",
        ):
            self.assertIn(expected, names)
        for name, kind in table:
            for value in bad_values(kind):
                with self.subTest(option=name, value=value):
                    self.assert_one_line(self.twistd(f"--{name}", value), f"--{name}")

    def test_missing_value_and_unknown_option(self) -> None:
        self.assert_one_line(
            self.twistd("--state-dir", "s", "--shutdown-timeout"), "--shutdown-timeout"
        )
        self.assert_one_line(self.twistd("--no-such-option"), "--no-such-option")

    def test_state_dir_through_a_regular_file(self) -> None:
        afile = self.cwd / "afile"
        afile.write_text("x")
        self.assert_one_line(self.twistd("--state-dir", str(afile / "state")), "--state-dir")
        self.assert_one_line(
            self.twistd("--state-dir", str(afile)), "--state-dir", "not a directory"
        )

    def test_unreadable_state_dir(self) -> None:
        state = self.cwd / "locked"
        state.mkdir(mode=0o000)
        self.addCleanup(state.chmod, 0o700)
        argv = [
            TWISTD,
            "-n",
            "--pidfile=",
            "cocalcproxy",
            "--listen",
            "tcp:0",
            "--state-dir",
            str(state),
        ]
        result = subprocess.run(
            _without_root_override(argv),
            cwd=self.cwd,
            env=child_environment(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        self.assert_one_line(result, "--state-dir", "not readable")

    def test_admin_bad_values_are_one_line(self) -> None:
        state = str(self.cwd / "state")
        for argv in (
            ["token", "create", "alice", "--expires-in", "inf"],
            ["token", "create", "alice", "--expires-in", "-1"],
            ["token", "create", "alice", "--expires-in", "nan"],
            ["project", "add", "--owner"],
            ["frobnicate"],
        ):
            with self.subTest(argv=argv):
                result = subprocess.run(
                    [sys.executable, "-m", "cocalcproxy.ops.admin", "--state-dir", state, *argv],
                    cwd=self.cwd,
                    env=child_environment(),
                    capture_output=True,
                    text=True,
                    timeout=60,
                )
                self.assert_one_line(result)


def _without_root_override(argv: list[str]) -> list[str]:
    """Run ``argv`` without the power to ignore file permissions: as root (tests run as root in
    CI) drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from the bounding set, so a mode-000
    directory is really unreadable to the child."""
    if os.geteuid() != 0:
        return argv
    setpriv = shutil.which("setpriv")
    assert setpriv is not None, "setpriv (util-linux) is needed to test permissions as root"
    return [setpriv, "--bounding-set", "-dac_override,-dac_read_search", *argv]
