"""The benchmark's pure parts: reading /proc text, the order of rounds, summaries and the table.

Nothing here starts a process or opens a socket, so all of it is unit-tested
(tests/test_bench.py); run.py does the I/O.
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

# -- /proc --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProcStat:
    """The fields of one /proc/<pid>/stat line that the benchmark uses."""

    pid: int
    ppid: int
    utime: int  # clock ticks
    stime: int
    cutime: int  # of waited-for children
    cstime: int


def parse_stat(text: str) -> ProcStat:
    """Parse /proc/<pid>/stat. The command name (field 2) is in parentheses and may itself
    contain spaces and parentheses, so the fields are counted from the last ')'."""
    head, _, rest = text.rpartition(")")
    pid = int(head.split("(", 1)[0])
    fields = rest.split()
    # fields[0] is field 3 (state); field n is fields[n - 3].
    return ProcStat(
        pid=pid,
        ppid=int(fields[1]),
        utime=int(fields[11]),
        stime=int(fields[12]),
        cutime=int(fields[13]),
        cstime=int(fields[14]),
    )


def cpu_ticks(stats: Iterable[ProcStat]) -> int:
    """User plus system time of a set of live processes (a process tree), in clock ticks.

    Only each process's own utime+stime is counted: a worker that is still alive is counted in
    its own entry, and children that already exited are not the service's steady cost (their
    time would show up in the parent's cutime/cstime only once waited for)."""
    return sum(s.utime + s.stime for s in stats)


def machine_ticks(proc_stat: str) -> tuple[int, int]:
    """(idle, total) clock ticks of all CPUs from /proc/stat's first (``cpu``) line: idle is
    idle plus iowait; total adds user, nice, system, irq, softirq and steal (guest time is
    already inside user and nice)."""
    line = proc_stat.splitlines()[0].split()
    if line[0] != "cpu":
        raise ValueError("not /proc/stat: its first line is not the 'cpu' line")
    values = [int(v) for v in line[1:9]]
    user, nice, system, idle, iowait, irq, softirq, steal = values + [0] * (8 - len(values))
    return idle + iowait, user + nice + system + idle + iowait + irq + softirq + steal


def descendants(root: int, stats: Iterable[ProcStat]) -> set[int]:
    """``root`` and every process below it, from a snapshot of all processes' stat lines."""
    children: dict[int, list[int]] = {}
    for s in stats:
        children.setdefault(s.ppid, []).append(s.pid)
    found = {root}
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def parse_rollup(text: str) -> dict[str, int]:
    """/proc/<pid>/smaps_rollup (or status): ``{"Rss": bytes, "Pss": bytes, ...}``."""
    values: dict[str, int] = {}
    for line in text.splitlines():
        m = re.match(r"^(\w+):\s+(\d+) kB$", line.strip())
        if m:
            values[m.group(1)] = int(m.group(2)) * 1024
    return values


# -- the order of measurements ------------------------------------------------------------------


def interleave(peers: Sequence[str], rounds: int) -> list[tuple[int, str]]:
    """(round, peer) in the order measured: A B C A B C ..., so that a change in the machine's
    load during the run hits every peer alike instead of whichever happened to run then."""
    return [(r, peer) for r in range(rounds) for peer in peers]


# -- summaries ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Summary:
    median: float
    low: float
    high: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Summary | None:
        if not values:
            return None
        return cls(statistics.median(values), min(values), max(values), len(values))


@dataclass
class Figure:
    """One row of the table: a measured quantity, per peer a list of values (one per round),
    or a reason it was not measured."""

    name: str
    unit: str
    better: str  # "lower" or "higher": only for the reader; ratios are always ours / theirs
    values: dict[str, list[float]] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)

    def add(self, peer: str, value: float) -> None:
        self.values.setdefault(peer, []).append(value)

    def summary(self, peer: str) -> Summary | None:
        return Summary.of(self.values.get(peer, []))


def fmt_number(x: float) -> str:
    """Three significant digits, thousands separated: 0.0123, 1.23, 123, 12,345."""
    if x == 0:
        return "0"
    magnitude = abs(x)
    if magnitude >= 100:
        return f"{x:,.0f}"
    if magnitude >= 10:
        return f"{x:.1f}"
    if magnitude >= 1:
        return f"{x:.2f}"
    return f"{x:.3g}"


def fmt_summary(s: Summary | None, missing: str | None = None) -> str:
    if s is None:
        return missing or "-"
    if s.n == 1 or s.low == s.high:
        return fmt_number(s.median)
    return f"{fmt_number(s.median)} ({fmt_number(s.low)}-{fmt_number(s.high)})"


def ratio(ours: Summary | None, theirs: Summary | None) -> str:
    if ours is None or theirs is None or theirs.median == 0:
        return "-"
    return f"{ours.median / theirs.median:.2f}x"


def table(
    figures: Sequence[Figure], subject: str, peers: Sequence[str], labels: Mapping[str, str]
) -> str:
    """A Markdown table: one row per figure, a column per peer (``subject`` first) with the
    median and range over rounds, and the ratio of ``subject``'s median to each peer's."""
    others = [p for p in peers if p != subject]
    header = ["figure", *(labels.get(p, p) for p in peers)]
    header += [f"{labels.get(subject, subject)} / {labels.get(p, p)}" for p in others]
    lines = [
        "| " + " | ".join(header) + " |",
        "| --- | " + " | ".join("---:" for _ in header[1:]) + " |",
    ]
    for f in figures:
        arrow = {"lower": "lower is better", "higher": "higher is better"}.get(f.better, "")
        name = f"{f.name} ({f.unit}{', ' + arrow if arrow else ''})"
        cells = [fmt_summary(f.summary(p), f.missing.get(p)) for p in peers]
        cells += [ratio(f.summary(subject), f.summary(p)) for p in others]
        lines.append("| " + " | ".join([name, *cells]) + " |")
    return "\n".join(lines)


# -- wrk ----------------------------------------------------------------------------------------

_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


@dataclass(frozen=True)
class WrkResult:
    requests: int
    seconds: float
    requests_per_second: float
    latency_ms: dict[str, float]
    errors: int
    non_2xx: int


def parse_wrk(out: str) -> WrkResult:
    """The parts of ``wrk --latency`` output the benchmark uses."""
    m = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", out)
    if m is None:
        raise ValueError(f"not wrk output: {out[-500:]!r}")
    unit = m.group(3)
    seconds = float(m.group(2)) * {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}[unit]
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    latency = {
        f"p{p}": float(v) * _UNITS_MS[u]
        for p, v, u in re.findall(r"^\s+(\d+)%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
    }
    errors = 0
    if e := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out):
        errors = sum(int(x) for x in e.groups())
    non_2xx = 0
    if n := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        non_2xx = int(n.group(1))
    return WrkResult(
        requests=int(m.group(1)),
        seconds=seconds,
        requests_per_second=float(rps.group(1)) if rps else 0.0,
        latency_ms=latency,
        errors=errors,
        non_2xx=non_2xx,
    )
