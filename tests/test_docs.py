"""The documentation builds cleanly and cannot drift from the code it describes."""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from twisted.python import usage
from twisted.trial import unittest

from cocalcproxy.ops.admin import build_parser
from cocalcproxy.ops.options import Options

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
REFERENCE = DOCS / "reference.rst"
PAGES = ("index", "user-guide", "operator-guide", "reference", "security")


def twistd_option_names() -> set[str]:
    """Every long option ``twistd cocalcproxy`` accepts, as ``--name``."""
    names = {parameter[0] for parameter in Options.optParameters}
    names |= {flag[0] for flag in getattr(Options, "optFlags", [])}
    inherited = set(dir(usage.Options))
    names |= {
        attribute[len("opt_") :].replace("_", "-")
        for attribute in dir(Options)
        if attribute.startswith("opt_") and attribute not in inherited
    }
    return {"--" + name for name in names}


def admin_commands() -> set[str]:
    """Every leaf command of the ``cocalcproxy`` admin parser, as ``"group [sub] action"``."""
    found: set[str] = set()

    def walk(parser: argparse.ArgumentParser, words: tuple[str, ...]) -> None:
        subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subparsers:
            found.add(" ".join(words))
        for action in subparsers:
            for name, child in action.choices.items():
                walk(child, (*words, name))

    walk(build_parser(), ())
    return found


def section(text: str, start_label: str, end_heading: str) -> str:
    start = text.index(start_label)
    end = text.index(end_heading, start)
    return text[start:end]


class SphinxBuildTests(unittest.TestCase):
    def test_builds_with_warnings_as_errors(self) -> None:
        """``sphinx -W`` (as CI runs it) succeeds and writes every page."""
        out = Path(self.mktemp())
        result = subprocess.run(
            [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html"]
            + [str(DOCS), str(out)],
            capture_output=True,
            text=True,
            timeout=240,
            env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
        )
        self.assertEqual(result.returncode, 0, f"sphinx failed:\n{result.stdout}\n{result.stderr}")
        self.assertEqual(result.stderr.strip(), "")
        for page in PAGES:
            self.assertTrue((out / f"{page}.html").is_file(), page)


class ReferenceMatchesCodeTests(unittest.TestCase):
    def setUp(self) -> None:
        self.reference = REFERENCE.read_text(encoding="utf-8")
        self.option_table = section(self.reference, ".. _options:", "Environment variables")

    def test_every_option_is_documented(self) -> None:
        """Each option of cocalcproxy.ops.options.Options has a row in the reference table."""
        documented = set(re.findall(r"^   \* - ``(--[a-z0-9-]+)", self.option_table, re.M))
        missing = twistd_option_names() - documented
        self.assertEqual(missing, set(), "options missing from docs/reference.rst")

    def test_no_documented_option_is_invented(self) -> None:
        """Each row of the reference table names an option that exists."""
        documented = set(re.findall(r"^   \* - ``(--[a-z0-9-]+)", self.option_table, re.M))
        self.assertGreater(len(documented), 10)
        invented = documented - twistd_option_names()
        self.assertEqual(invented, set(), "docs/reference.rst documents options that do not exist")

    def test_defaults_match(self) -> None:
        """The numeric defaults in the table are the ones options.py uses."""
        rows = dict(
            re.findall(
                r"^   \* - ``(--[a-z0-9-]+)[^`]*``\n     - ([^\n]*)", self.option_table, re.M
            )
        )
        for name, _short, default, *_rest in Options.optParameters:
            if isinstance(default, bool) or not isinstance(default, int | float):
                continue
            cell = rows["--" + name]
            numbers = [float(n) for n in re.findall(r"\d+(?:\.\d+)?", cell)]
            self.assertIn(float(default), numbers, f"--{name}: table says {cell!r}")

    def test_every_admin_command_is_documented(self) -> None:
        """Each command of the admin parser has a row in the table, and nothing else does."""
        table = section(self.reference, ".. _admin-commands:", ".. _url-reference:")
        documented = set(re.findall(r"^   \* - ``([a-z][a-z -]+?)(?: [A-Z[-]|``)", table, re.M))
        commands = admin_commands()
        self.assertGreaterEqual(len(commands), 12)
        self.assertEqual(documented, commands)


class MetricsDocumentedTests(unittest.TestCase):
    def test_metric_names_match(self) -> None:
        """The operator guide names exactly the metrics the proxy exports."""
        from prometheus_client import generate_latest

        from cocalcproxy.ops.metrics import Metrics

        exposition = generate_latest(Metrics().registry).decode()
        exported = {
            name
            for name in re.findall(r"^# TYPE (\S+)", exposition, re.M)
            if not name.endswith("_created")
        }
        guide = (DOCS / "operator-guide.rst").read_text(encoding="utf-8")
        documented = set(re.findall(r"``(cocalcproxy_[a-z_]+)", guide))
        self.assertGreater(len(exported), 5)
        self.assertEqual(documented, exported)


def documented_command_lines(marker: str) -> list[str]:
    """Shell lines in the README and the docs that run ``marker``, continuations joined."""
    lines: list[str] = []
    for path in [ROOT / "README.md", *sorted(DOCS.glob("*.rst"))]:
        text = path.read_text(encoding="utf-8").replace("\\\n", " ")
        for line in text.splitlines():
            if marker in line:
                lines.append(line.split(marker, 1)[1])
    return lines


class ExamplesParseTests(unittest.TestCase):
    """Every example command in the README and the docs is accepted by the real parsers."""

    def test_admin_examples(self) -> None:
        examples = documented_command_lines("bin/cocalcproxy ")
        self.assertGreaterEqual(len(examples), 6)
        for example in examples:
            words = shlex.split(re.split(r"[|)#]", example)[0])
            try:
                build_parser().parse_args(words)
            except SystemExit:
                self.fail(f"the admin command refuses a documented example: {example!r}")

    def test_twistd_examples(self) -> None:
        examples = [
            e for e in documented_command_lines("twistd -n cocalcproxy ") if e.startswith("--")
        ]
        self.assertGreaterEqual(len(examples), 3)
        for example in examples:
            words = [w for w in shlex.split(example.split("``")[0]) if w != "..."]
            options = Options()
            try:
                options.parseOptions(words)
            except usage.UsageError as e:
                self.fail(f"twistd cocalcproxy refuses a documented example {example!r}: {e}")
