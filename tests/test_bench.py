"""The benchmark (bench/): its pure parts as unit tests, and one short smoke run end to end.

The smoke run (``bench/run.py --quick`` with two peers, two scenarios, tiny counts) only checks
that the benchmark still works against this checkout: every figure gets a number for each peer.
Its numbers are never looked at.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from twisted.trial import unittest

from bench import measure
from bench.measure import Figure, ProcStat, Summary

REPO = Path(__file__).resolve().parents[1]

# A real /proc/<pid>/stat line, with a command name made to look like more fields.
STAT = (
    "4242 (we ird) (name) S 4200 4242 4242 0 -1 4194560 1234 0 0 0 "
    "731 92 5 3 20 0 3 0 9876543 123456789 4321 18446744073709551615 1 1 0 0 0 0 0 "
    "16781312 2 0 0 0 17 1 0 0 0 0 0 0 0 0 0 0 0 0 0"
)

WRK = """\
Running 10s test @ https://localhost:8443/small
  1 threads and 16 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     8.12ms    2.01ms  30.22ms   80.00%
    Req/Sec     1.97k   120.00     2.20k    70.00%
  Latency Distribution
     50%    7.97ms
     75%    9.01ms
     90%   10.98ms
     99%   20.29ms
  19662 requests in 10.01s, 3.10MB read
  Socket errors: connect 0, read 3, write 0, timeout 1
  Non-2xx or 3xx responses: 7
Requests/sec:   1964.29
Transfer/sec:    317.12KB
"""


class ProcParsing(unittest.TestCase):
    def test_stat_fields_counted_from_the_last_parenthesis(self) -> None:
        s = measure.parse_stat(STAT)
        self.assertEqual((s.pid, s.ppid), (4242, 4200))
        self.assertEqual((s.utime, s.stime, s.cutime, s.cstime), (731, 92, 5, 3))

    def test_cpu_of_a_tree_is_the_sum_of_its_live_processes(self) -> None:
        master = ProcStat(10, 1, 100, 50, 999, 999)
        worker = ProcStat(11, 10, 300, 20, 0, 0)
        # Children's cutime/cstime are not added: live workers count in their own entries.
        self.assertEqual(measure.cpu_ticks([master, worker]), 470)

    def test_descendants(self) -> None:
        stats = [
            ProcStat(1, 0, 0, 0, 0, 0),
            ProcStat(10, 1, 0, 0, 0, 0),  # nginx master
            ProcStat(11, 10, 0, 0, 0, 0),  # worker
            ProcStat(12, 10, 0, 0, 0, 0),  # worker
            ProcStat(13, 12, 0, 0, 0, 0),  # a worker's child
            ProcStat(20, 1, 0, 0, 0, 0),  # unrelated
        ]
        self.assertEqual(measure.descendants(10, stats), {10, 11, 12, 13})
        self.assertEqual(measure.descendants(20, stats), {20})

    def test_rollup(self) -> None:
        text = (
            "55d0c0a00000-7ffd3b5fe000 ---p 00000000 00:00 0      [rollup]\n"
            "Rss:               64512 kB\nPss:               60000 kB\nPss_Anon: 1 kB\n"
        )
        values = measure.parse_rollup(text)
        self.assertEqual(values["Rss"], 64512 * 1024)
        self.assertEqual(values["Pss"], 60000 * 1024)


class Order(unittest.TestCase):
    def test_rounds_are_interleaved(self) -> None:
        self.assertEqual(
            measure.interleave(["a", "b", "c"], 2),
            [(0, "a"), (0, "b"), (0, "c"), (1, "a"), (1, "b"), (1, "c")],
        )

    def test_no_rounds(self) -> None:
        self.assertEqual(measure.interleave(["a"], 0), [])


class Table(unittest.TestCase):
    def test_summary(self) -> None:
        self.assertEqual(Summary.of([3.0, 1.0, 2.0, 10.0]), Summary(2.5, 1.0, 10.0, 4))
        self.assertIsNone(Summary.of([]))

    def test_numbers(self) -> None:
        self.assertEqual(
            [measure.fmt_number(x) for x in (0, 0.01234, 1.234, 12.34, 1234.5, 12345)],
            ["0", "0.0123", "1.23", "12.3", "1,234", "12,345"],
        )

    def test_one_row_per_figure_with_ratios_to_each_peer(self) -> None:
        cpu = Figure("small GET, 16 conns: proxy CPU per request", "µs", "lower")
        for ours, chp, nginx in ((330, 220, 21), (338, 237, 22), (329, 219, 21)):
            cpu.add("cocalcproxy", ours)
            cpu.add("chp", chp)
            cpu.add("nginx", nginx)
        revocation = Figure("revocation", "ms", "lower")
        revocation.add("cocalcproxy", 12.0)
        revocation.missing["chp"] = "n/a (no authentication)"
        workers = Figure("--workers 2 / --workers 1", "x", "higher")
        workers.missing["cocalcproxy"] = "n/a (no --workers option)"
        text = measure.table(
            [cpu, revocation, workers],
            "cocalcproxy",
            ["cocalcproxy", "chp", "nginx"],
            {"chp": "CHP 5.3.0", "nginx": "nginx 1.22.1"},
        )
        lines = text.splitlines()
        self.assertEqual(
            lines[0],
            "| figure | cocalcproxy | CHP 5.3.0 | nginx 1.22.1 "
            "| cocalcproxy / CHP 5.3.0 | cocalcproxy / nginx 1.22.1 |",
        )
        self.assertEqual(lines[1], "| --- | ---: | ---: | ---: | ---: | ---: |")
        self.assertEqual(
            lines[2],
            "| small GET, 16 conns: proxy CPU per request (µs, lower is better) "
            "| 330 (329-338) | 220 (219-237) | 21.0 (21.0-22.0) | 1.50x | 15.71x |",
        )
        self.assertEqual(
            lines[3],
            "| revocation (ms, lower is better) | 12.0 | n/a (no authentication) | - | - | - |",
        )
        self.assertIn("| n/a (no --workers option) | - | - | - | - |", lines[4])
        self.assertEqual(len(lines), 5)


class WrkOutput(unittest.TestCase):
    def test_parse(self) -> None:
        r = measure.parse_wrk(WRK)
        self.assertEqual(r.requests, 19662)
        self.assertAlmostEqual(r.seconds, 10.01)
        self.assertAlmostEqual(r.requests_per_second, 1964.29)
        self.assertEqual(r.latency_ms, {"p50": 7.97, "p75": 9.01, "p90": 10.98, "p99": 20.29})
        self.assertEqual((r.errors, r.non_2xx), (4, 7))

    def test_not_wrk(self) -> None:
        with self.assertRaises(ValueError):
            measure.parse_wrk("Usage: wrk <options> <url>")


def run_bench_script(
    case: unittest.TestCase, script: str, *args: str, timeout: float
) -> subprocess.CompletedProcess[str]:
    """``bench/<script> args`` against this checkout; it must exit 0 (else its output shows)."""
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    case.assertEqual(result.returncode, 0, result.stdout[-3000:] + result.stderr[-3000:])
    return result


class QuickSmokeRun(unittest.TestCase):
    """``bench/run.py --quick`` end to end, cocalcproxy and nginx, two scenarios (about 10 s)."""

    timeout = 120

    def test_every_figure_has_a_number_for_each_peer(self) -> None:
        for tool in ("wrk", "nginx", "curl", "taskset"):
            self.assertIsNotNone(shutil.which(tool), f"{tool} is needed by the benchmark")
        out = Path(self.mktemp()).absolute()
        result = run_bench_script(
            self, "run.py", "--quick",
            "--peers", "cocalcproxy,nginx", "--scenarios", "small,websocket",
            "--connections", "4", "--ws-connections", "2", "--json", str(out),
            timeout=110,
        )  # fmt: skip
        self.assertIn("QUICK SMOKE RUN: these numbers are not measurements.", result.stdout)
        self.assertIn("| cocalcproxy / nginx ", result.stdout)
        data = json.loads(out.read_text())
        names = [f["name"] for f in data["figures"]]
        self.assertEqual(
            names,
            [
                "memory at rest after start-up and warm-up (RSS)",
                "small GET, 4 conns: proxy CPU per request",
                "small GET, 4 conns: requests/s",
                "small GET, 4 conns: p50 latency",
                "small GET, 4 conns: p99 latency",
                "WebSocket echo, 2 conns: round trips/s",
                "WebSocket echo, 2 conns: proxy CPU per round trip",
            ],
        )
        for f in data["figures"]:
            self.assertEqual(sorted(f["values"]), ["cocalcproxy", "nginx"], f)
            self.assertEqual([len(v) for v in f["values"].values()], [1, 1], f)
        throughput = [f for f in data["figures"] if f["name"].endswith("requests/s")][0]
        self.assertGreater(min(throughput["values"]["cocalcproxy"]), 0)


class InstructionCount(unittest.TestCase):
    """``bench/instructions.py``: callgrind's count of the proxy's instructions per request."""

    timeout = 180

    def test_reads_the_summary_of_a_dump(self) -> None:
        from bench import instructions

        dump = Path(self.mktemp())
        dump.write_text("version: 1\ncreator: callgrind-3.19.0\nevents: Ir\nsummary: 1234567\n")
        self.assertEqual(instructions.total_instructions(dump), 1234567)
        dump.write_text("events: Ir\ntotals: 42\n")
        self.assertEqual(instructions.total_instructions(dump), 42)
        dump.write_text("events: Ir\n")
        with self.assertRaises(SystemExit):
            instructions.total_instructions(dump)

    def test_counts_a_real_proxy_under_callgrind(self) -> None:
        for tool in ("valgrind", "callgrind_control"):
            self.assertIsNotNone(shutil.which(tool), f"{tool} is needed by bench/instructions.py")
        result = run_bench_script(
            self, "instructions.py", "--requests", "60", "--warm-up", "20", "--connections", "2",
            timeout=170,
        )  # fmt: skip
        line = r"^([\d,]+) instructions per request \(60 small GETs"
        found = re.search(line, result.stdout, re.MULTILINE)
        self.assertIsNotNone(found, result.stdout)
        assert found is not None
        # A proxied request over TLS is hundreds of thousands of instructions; far outside this
        # range, the count did not cover (only) the measured requests.
        self.assertTrue(100_000 < int(found.group(1).replace(",", "")) < 20_000_000, found.group(0))


class MachineTicks(unittest.TestCase):
    def test_idle_and_total_from_the_cpu_line(self) -> None:
        text = "cpu  100 5 50 800 20 1 9 15 7 0\ncpu0 50 2 25 400 10 0 4 7 3 0\nintr 1 2\n"
        # idle + iowait; user + nice + system + idle + iowait + irq + softirq + steal
        self.assertEqual(measure.machine_ticks(text), (820, 1000))

    def test_not_proc_stat(self) -> None:
        with self.assertRaises(ValueError):
            measure.machine_ticks("intr 1 2\n")
