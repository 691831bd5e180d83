"""Benchmark cocalcproxy against configurable-http-proxy and nginx, side by side, in one run.

All three proxies run at once, each terminating TLS with the same certificate in front of the same
backend (bench/backend.py), pinned to the same CPU; the load generators and the backend are pinned
to another. Every scenario measures the peers in interleaved rounds (A B C A B C ...) and reports
the median and range over rounds, the proxy's CPU time per request from /proc (the whole process
tree: nginx's master and workers), and the ratio of cocalcproxy's median to each peer's.

Run ``python3 bench/run.py --help``; ``--quick`` is a smoke run of every scenario in about a
minute (its numbers mean nothing). See bench/README.md for what each figure means.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import secrets
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import measure  # noqa: E402
import peers as peers_module  # noqa: E402
import wsload  # noqa: E402
from measure import Figure  # noqa: E402
from peers import Backend, Peer  # noqa: E402

SUBJECT = "cocalcproxy"
PEER_NAMES = ("cocalcproxy", "chp", "nginx")
SCENARIOS = (
    "small",
    "close",
    "download",
    "upload",
    "websocket",
    "idle-websockets",
    "workers",
    "revocation",
)
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass
class Settings:
    rounds: int = 5
    duration: float = 10.0
    connections: tuple[int, ...] = (1, 16, 128, 512)
    close_connections: int = 16
    transfer_size: int = 2**30
    ws_connections: tuple[int, ...] = (1, 50)
    idle_websockets: int = 2000
    revocation_trials: int = 10
    warmup: float = 2.0
    settle: float = 2.0

    @classmethod
    def quick(cls) -> Settings:
        return cls(
            rounds=1,
            duration=1.0,
            connections=(1, 16, 128, 512),
            transfer_size=16 * 2**20,
            idle_websockets=50,
            revocation_trials=2,
            warmup=1.0,
            settle=0.3,
        )


@dataclass
class Run:
    """Everything a scenario needs."""

    settings: Settings
    peers: dict[str, Peer]
    backend: Backend
    work: Path
    proxy_cpus: str | None
    client_cpus: str | None
    args: argparse.Namespace
    figures: list[Figure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # Every CPU the benchmark may use (its affinity before it pinned itself to client_cpus);
    # None when nothing is pinned.
    all_cpus: str | None = None

    def figure(self, name: str, unit: str, better: str) -> Figure:
        f = Figure(name, unit, better)
        self.figures.append(f)
        return f

    def order(self) -> list[tuple[int, str]]:
        return measure.interleave(list(self.peers), self.settings.rounds)


# -- measuring a process tree -------------------------------------------------------------------


def tree_cpu_seconds(pids: set[int]) -> float:
    stats = []
    for pid in pids:
        with contextlib.suppress(OSError):
            stats.append(measure.parse_stat(Path(f"/proc/{pid}/stat").read_text()))
    return measure.cpu_ticks(stats) / CLK_TCK


def tree_memory(pids: set[int]) -> dict[str, int]:
    """Summed Rss and Pss (bytes) of a process tree, from /proc/<pid>/smaps_rollup."""
    total = {"Rss": 0, "Pss": 0}
    for pid in pids:
        with contextlib.suppress(OSError):
            values = measure.parse_rollup(Path(f"/proc/{pid}/smaps_rollup").read_text())
            for key in total:
                total[key] += values.get(key, 0)
    return total


class CpuWindow:
    """CPU seconds a peer's process tree uses between ``with`` entry and exit."""

    def __init__(self, peer: Peer) -> None:
        self.peer = peer
        self.seconds = 0.0

    def __enter__(self) -> CpuWindow:
        self.pids = self.peer.pids()
        self.before = tree_cpu_seconds(self.pids)
        return self

    def __exit__(self, *exc: object) -> None:
        # Workers started during the window (a restarted one) count from zero.
        self.pids |= self.peer.pids()
        self.seconds = tree_cpu_seconds(self.pids) - self.before


class MachineIdle:
    """The share (%) of all CPUs' time left idle between ``with`` entry and exit."""

    def __init__(self) -> None:
        self.percent = 0.0

    @staticmethod
    def _ticks() -> tuple[int, int]:
        return measure.machine_ticks(Path("/proc/stat").read_text())

    def __enter__(self) -> MachineIdle:
        self.before = self._ticks()
        return self

    def __exit__(self, *exc: object) -> None:
        idle, total = self._ticks()
        idle, total = idle - self.before[0], total - self.before[1]
        self.percent = 100 * idle / total if total > 0 else 0.0


class PeakRss:
    """Samples a process tree's resident memory every 20 ms; keeps the first and the peak."""

    def __init__(self, peer: Peer) -> None:
        self.pids = peer.pids()
        self.start = tree_memory(self.pids)["Rss"]
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, tree_memory(self.pids)["Rss"])

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# -- load generators ----------------------------------------------------------------------------


def wrk(
    run: Run,
    url: str,
    headers: list[str],
    connections: int,
    duration: float,
    cpus: str | None = None,
) -> measure.WrkResult:
    """wrk on ``cpus`` (by default the client CPUs)."""
    seconds = max(1, round(duration))  # wrk takes whole seconds
    command = [
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{seconds}s",
        "--latency",
        "--timeout",
        "10s",
    ]
    for header in headers:
        command += ["-H", header]
    out = subprocess.run(
        peers_module.pinned(cpus or run.client_cpus, [*command, url]),
        capture_output=True,
        text=True,
        timeout=duration + 120,
    ).stdout
    return measure.parse_wrk(out)


def curl(run: Run, peer: Peer, extra: list[str], url: str) -> str:
    command = ["curl", "-sS", "--http1.1", "-H", "Expect:", "--cacert", peer.cert]
    command += ["--resolve", f"localhost:{peer.port}:127.0.0.1"]
    for header in peer.header_lines():
        command += ["-H", header]
    result = subprocess.run(
        peers_module.pinned(run.client_cpus, [*command, *extra, url]),
        capture_output=True,
        text=True,
        timeout=900,
    )
    if result.returncode != 0:
        raise SystemExit(f"curl {url} failed: {result.stderr.strip()}")
    return result.stdout


def tls_context(peer: Peer) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=peer.cert)


def warm_up(run: Run) -> None:
    """Each peer's first connections, TLS session setup, backend pools and caches, unmeasured."""
    for peer in run.peers.values():
        wrk(run, peer.url("small"), peer.header_lines(), 16, run.settings.warmup)
    # Memory at rest of a started, warmed-up proxy (the "per worker at rest"): measured
    # here, before the scenarios, as well as after them (idle-websockets' "before" figure).
    time.sleep(run.settings.settle)
    fresh = run.figure("memory at rest after start-up and warm-up (RSS)", "MiB", "lower")
    for name, peer in run.peers.items():
        fresh.add(name, tree_memory(peer.pids())["Rss"] / 2**20)


# -- scenarios ----------------------------------------------------------------------------------


def scenario_small(run: Run) -> None:
    for connections in run.settings.connections:
        print(f"small GET, {connections} keep-alive connections ...", flush=True)
        cpu = run.figure(f"small GET, {connections} conns: proxy CPU per request", "µs", "lower")
        rps = run.figure(f"small GET, {connections} conns: requests/s", "req/s", "higher")
        p50 = run.figure(f"small GET, {connections} conns: p50 latency", "ms", "lower")
        p99 = run.figure(f"small GET, {connections} conns: p99 latency", "ms", "lower")
        for _, name in run.order():
            headers = run.peers[name].header_lines()
            what = f"small GET at {connections}"
            result = wrk_turn(run, name, headers, connections, what, cpu, rps, p50, [p99])
            if result is not None:
                p99.add(name, result.latency_ms.get("p99", 0.0))


def wrk_turn(
    run: Run,
    name: str,
    headers: list[str],
    connections: int,
    what: str,
    cpu: Figure,
    rate: Figure,
    p50: Figure,
    others: list[Figure],
) -> measure.WrkResult | None:
    """One peer's turn in a wrk scenario on ``/small``: wrk inside a CPU window, its errors
    noted, and the proxy's CPU per request, requests/s and p50 added. The result, for the
    scenario's ``others`` figures; None when no request completed (all figures marked)."""
    peer = run.peers[name]
    with CpuWindow(peer) as window:
        result = wrk(run, peer.url("small"), headers, connections, run.settings.duration)
    if not check_wrk(run, name, what, result, [cpu, rate, p50, *others]):
        return None
    cpu.add(name, window.seconds / max(1, result.requests) * 1e6)
    rate.add(name, result.requests_per_second)
    p50.add(name, result.latency_ms.get("p50", 0.0))
    return result


def check_wrk(
    run: Run, peer: str, what: str, result: measure.WrkResult, figures: list[Figure]
) -> bool:
    """Note errors; False (and the figures marked) when no request completed at all (a proxy
    still busy with hundreds of TLS handshakes when a short run ends)."""
    bad = result.errors + result.non_2xx
    if result.requests == 0:
        run.notes.append(f"{peer}, {what}: no request completed ({result.errors} socket errors)")
        for f in figures:
            if not f.values.get(peer):
                f.missing[peer] = "none completed"
        return False
    if bad:
        run.notes.append(
            f"{peer}, {what}: {result.errors} socket errors and {result.non_2xx} non-2xx "
            f"answers in {result.requests} requests"
        )
    return True


def scenario_close(run: Run) -> None:
    """A new TLS connection for every request, at 1 and at ``close_connections`` at a time.

    wrk's latency runs from writing the request to the end of the answer: the connect and the
    handshake are outside it. With many connections cycling on one pinned core, other
    connections' accepts and handshakes are handled inside that window, so its p50 depends on
    where the waiting falls as much as on the proxy's speed (a proxy that makes handshakes
    cheaper completes more connections and can show a longer p50). Two figures keep it honest:
    the p50 at 1 connection (no queue: one request's own latency), and the whole time per
    connection at N, connect to close (N divided by the connections completed per second)."""
    counts = sorted({1, run.settings.close_connections})
    for n in counts:
        print(f"new TLS connection per request ({n} at a time) ...", flush=True)
        label = f"new connection per request, {n} conns"
        cpu = run.figure(f"{label}: proxy CPU per request", "µs", "lower")
        rate = run.figure(f"{label}: requests/s", "req/s", "higher")
        p50 = run.figure(f"{label}: p50 latency", "ms", "lower")
        whole = run.figure(f"{label}: time per connection, connect to close", "ms", "lower")
        for _, name in run.order():
            headers = [*run.peers[name].header_lines(), "Connection: close"]
            what = "connection per request"
            result = wrk_turn(run, name, headers, n, what, cpu, rate, p50, [whole])
            if result is not None:
                whole.add(name, n / max(result.requests_per_second, 1e-9) * 1000)


def scenario_download(run: Run) -> None:
    size = run.settings.transfer_size
    label = measure_size(size)
    print(f"download {label} ...", flush=True)
    speed = run.figure(f"download {label}: throughput", "MiB/s", "higher")
    cpu = run.figure(f"download {label}: proxy CPU per GiB", "s", "lower")
    growth = run.figure(f"download {label}: proxy RSS growth at peak", "MiB", "lower")
    for _, name in run.order():
        peer = run.peers[name]
        started = time.perf_counter()
        with CpuWindow(peer) as window, PeakRss(peer) as rss:
            out = curl(run, peer, ["-o", "/dev/null", "-w", "%{http_code} %{size_download}"],
                       f"{peer.url('large')}?bytes={size}")  # fmt: skip
        seconds = time.perf_counter() - started
        if out.split() != ["200", str(size)]:
            raise SystemExit(f"{name}: download of {size} bytes failed: {out!r}")
        speed.add(name, size / seconds / 2**20)
        cpu.add(name, window.seconds / (size / 2**30))
        growth.add(name, (rss.peak - rss.start) / 2**20)


def scenario_upload(run: Run) -> None:
    size = run.settings.transfer_size
    label = measure_size(size)
    print(f"upload {label} ...", flush=True)
    body = run.work / "upload.bin"
    with open(body, "wb") as f:
        f.truncate(size)  # sparse: costs no disk, reads as zeros
    speed = run.figure(f"upload {label}: throughput", "MiB/s", "higher")
    cpu = run.figure(f"upload {label}: proxy CPU per GiB", "s", "lower")
    for _, name in run.order():
        peer = run.peers[name]
        started = time.perf_counter()
        with CpuWindow(peer) as window:
            out = curl(
                run,
                peer,
                ["-X", "POST", "-T", str(body), "-H", "Content-Type: application/octet-stream",
                 "-w", "\n%{http_code}"],
                peer.url("upload"),
            )  # fmt: skip
        seconds = time.perf_counter() - started
        lines = out.strip().splitlines()
        if not lines or lines[-1] != "200" or json.loads(lines[0]).get("received") != size:
            raise SystemExit(f"{name}: upload of {size} bytes failed: {out[-300:]!r}")
        speed.add(name, size / seconds / 2**20)
        cpu.add(name, window.seconds / (size / 2**30))


def scenario_websocket(run: Run) -> None:
    for connections in run.settings.ws_connections:
        print(f"WebSocket echo, {connections} connections ...", flush=True)
        rate = run.figure(f"WebSocket echo, {connections} conns: round trips/s", "1/s", "higher")
        cpu = run.figure(
            f"WebSocket echo, {connections} conns: proxy CPU per round trip", "µs", "lower"
        )
        for _, name in run.order():
            peer = run.peers[name]
            with CpuWindow(peer) as window:
                result = wsload.echo_load(
                    peer.ws_url(), peer.headers, tls_context(peer), connections,
                    run.settings.duration,
                )  # fmt: skip
            if result.round_trips == 0:
                raise SystemExit(f"{name}: no WebSocket round trip completed")
            if result.errors:
                run.notes.append(f"{name}, WebSocket echo at {connections}: {result.errors} errors")
            rate.add(name, result.round_trips / result.seconds)
            cpu.add(name, window.seconds / result.round_trips * 1e6)


def scenario_idle_websockets(run: Run) -> None:
    n = run.settings.idle_websockets
    print(f"{n} idle WebSockets ...", flush=True)
    rest = run.figure(
        "memory at rest after the load scenarios, before the WebSockets (RSS)", "MiB", "lower"
    )
    rss = run.figure(f"memory per idle WebSocket, {n} open (RSS)", "KiB", "lower")
    pss = run.figure(f"memory per idle WebSocket, {n} open (PSS)", "KiB", "lower")
    # Once per peer (opening thousands of TLS WebSockets is slow), in the same order.
    for name in run.peers:
        peer = run.peers[name]
        pids = peer.pids()
        before = tree_memory(pids)
        after = wsload.hold_idle(
            peer.ws_url(), peer.headers, tls_context(peer), n,
            lambda pids=pids: tree_memory(pids), settle=run.settings.settle,
        )  # fmt: skip
        assert isinstance(after, dict)
        rest.add(name, before["Rss"] / 2**20)
        rss.add(name, (after["Rss"] - before["Rss"]) / n / 1024)
        pss.add(name, (after["Pss"] - before["Pss"]) / n / 1024)


def worker_cpu(proxy: Peer) -> dict[int, float]:
    """CPU seconds so far of each worker process (the supervisor's children; with
    ``--workers 1``, the one process)."""
    pids = proxy.pids() - {proxy.pid} or {proxy.pid}
    return {pid: tree_cpu_seconds({pid}) for pid in pids}


def scenario_workers(run: Run) -> None:
    """``--workers 1`` against ``--workers 2`` (cocalcproxy only): requests/s and proxy CPU per
    request at 128 connections, and how evenly two workers share the work at 16 and 128.

    Everything runs on every CPU (the scheduler places it, for both proxies alike): two workers
    need two cores. The backend is a static nginx location (microseconds per request), not
    bench/backend.py: on two cores the Python backend took about a third of the CPU the proxy
    needs and capped the second worker's gain. wrk and the static backend share the cores too:
    with two workers at 128 connections they took about 45 % of one core (top: wrk 25 %, nginx
    20 %, at some 7,300 requests/s) and no CPU was left idle, so the gain is bounded by about
    2 x c / (c + x), with c the proxy's CPU per request and x theirs: the cheaper the proxy,
    the lower that bound. The issue's target is 1.7x; the figure "the machine's CPU left idle"
    shows whether the second worker had every cycle they left."""
    one = run.figure("--workers 1, 128 conns: requests/s", "req/s", "higher")
    two = run.figure("--workers 2, 128 conns: requests/s", "req/s", "higher")
    gain = run.figure("--workers 2 / --workers 1, 128 conns: requests/s", "x", "higher")
    cpu_one = run.figure("--workers 1, 128 conns: proxy CPU per request", "µs", "lower")
    cpu_two = run.figure("--workers 2, 128 conns: proxy CPU per request", "µs", "lower")
    busy = {
        w: run.figure(f"--workers {w}, 128 conns: proxy CPU used (cores)", "cores", "higher")
        for w in (1, 2)
    }
    # Whether the second worker had every cycle the load generator and the backend left: at 0,
    # the machine was saturated and the gain is bounded by what they need, not by the proxy.
    idle = run.figure("--workers 2, 128 conns: the machine's CPU left idle", "%", "lower")
    rate_16 = run.figure("--workers 2, 16 conns: requests/s", "req/s", "higher")
    split = {
        c: run.figure(
            f"--workers 2, {c} conns: busiest worker's share of the workers' CPU (50% is even)",
            "%",
            "lower",
        )
        for c in (16, 128)
    }
    figures = [one, two, gain, cpu_one, cpu_two, *busy.values(), idle, rate_16, *split.values()]
    if not peers_module.has_workers_option():
        for f in figures:
            f.missing[SUBJECT] = "n/a (no --workers option)"
        print("--workers: n/a (no --workers option)", flush=True)
        return
    print("--workers 1 and 2, 16 and 128 connections, static nginx backend ...", flush=True)
    cpus = run.all_cpus
    proxies: dict[int, peers_module.CocalcProxy] = {}
    backend = peers_module.start_static_backend(
        run.work / "workers-backend", run.backend.ws_port, cpus
    )
    try:
        for workers in (1, 2):
            proxies[workers] = peers_module.start_cocalcproxy(
                run.work / f"workers-{workers}", backend, cpus,
                [*run.args.proxy_option, "--workers", str(workers)],
                label=f"cocalcproxy --workers {workers}",
            )  # fmt: skip
        for proxy in proxies.values():
            wrk(run, proxy.url("small"), proxy.header_lines(), 128, run.settings.warmup, cpus)
        runs = [(1, 128), (2, 128), (2, 16)]
        for _ in range(run.settings.rounds):
            got: dict[int, float] = {}
            for workers, connections in runs:
                proxy = proxies[workers]
                before = worker_cpu(proxy)
                with CpuWindow(proxy) as window, MachineIdle() as machine:
                    result = wrk(
                        run, proxy.url("small"), proxy.header_lines(), connections,
                        run.settings.duration, cpus,
                    )  # fmt: skip
                after = worker_cpu(proxy)
                what = f"--workers {workers} at {connections}"
                if connections == 16:
                    figs = [rate_16, split[16]]
                else:
                    figs = [one, cpu_one] if workers == 1 else [two, cpu_two, split[128], idle]
                    figs.append(busy[workers])
                if not check_wrk(run, SUBJECT, what, result, figs):
                    continue
                figs[0].add(SUBJECT, result.requests_per_second)
                if connections == 128:
                    got[workers] = result.requests_per_second
                    figs[1].add(SUBJECT, window.seconds / max(1, result.requests) * 1e6)
                    wall = result.seconds or run.settings.duration
                    busy[workers].add(SUBJECT, window.seconds / wall)
                    if workers == 2:
                        idle.add(SUBJECT, machine.percent)
                if workers == 2:
                    used = [after[pid] - before.get(pid, 0.0) for pid in after]
                    if len(used) < 2:
                        run.notes.append(f"{what}: {len(used)} worker process(es) found")
                    elif sum(used) > 0:
                        split[connections].add(SUBJECT, 100 * max(used) / sum(used))
            if got.get(1) and got.get(2):
                gain.add(SUBJECT, got[2] / got[1])
    finally:
        for proxy in proxies.values():
            proxy.stop()
        peers_module.stop_process(backend.process)


def scenario_revocation(run: Run) -> None:
    """Two cocalcproxy processes on one PostgreSQL database. Each trial makes a change with the
    admin command (alternately: revoke a token; remove a collaborator) after both proxies have
    the credential's answer in their caches, and measures from the commit (seen by our own
    LISTEN connection) until each proxy refuses."""
    token_figure = run.figure(
        "revocation on PostgreSQL, two proxies: token revoked, commit to refusal", "ms", "lower"
    )
    member_figure = run.figure(
        "revocation on PostgreSQL, two proxies: collaborator removed, commit to refusal",
        "ms",
        "lower",
    )
    figures = (token_figure, member_figure)
    for f in figures:
        for name in run.peers:
            if name != SUBJECT:
                f.missing[name] = "n/a (no authentication)"
    try:
        import psycopg
    except ImportError:
        for f in figures:
            f.missing[SUBJECT] = "n/a (psycopg not installed)"
        return
    maintenance = run.args.postgres
    database = f"cocalcproxy_bench_{os.getpid()}_{secrets.token_hex(4)}"
    try:
        with psycopg.connect(maintenance, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'CREATE DATABASE "{database}"')
    except psycopg.Error as e:
        for f in figures:
            f.missing[SUBJECT] = f"n/a (PostgreSQL: {str(e).strip().splitlines()[0]})"
        return
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    params = conninfo_to_dict(maintenance)
    params["dbname"] = database
    url = make_conninfo(**params)
    url_for_proxy = (
        f"postgresql://{params.get('user', 'postgres')}@{params.get('host', '127.0.0.1')}:"
        f"{params.get('port', '5432')}/{database}"
    )
    print(f"revocation on PostgreSQL ({run.settings.revocation_trials} trials) ...", flush=True)
    proxies: list[peers_module.CocalcProxy] = []
    try:
        where = ["--database", url_for_proxy]
        peers_module.admin(*where, "init")
        peers_module.admin(*where, "user", "add", "bench", "--password-stdin", stdin="pw\n")
        peers_module.admin(*where, "user", "add", "member", "--password-stdin", stdin="pw\n")
        member_token = peers_module.admin(*where, "token", "create", "member")
        project_id = peers_module.admin(*where, "project", "add", "--owner", "bench")
        for i in (1, 2):
            proxies.append(
                peers_module.start_cocalcproxy(
                    run.work / f"revocation-{i}",
                    run.backend,
                    run.proxy_cpus,
                    [
                        *run.args.proxy_option,
                        "--metrics",
                        f"tcp:{peers_module.free_port()}:interface=127.0.0.1",
                    ],
                    database=url_for_proxy,
                    project_id=project_id,
                    label=f"cocalcproxy {i} on PostgreSQL",
                )  # fmt: skip
            )
        with psycopg.connect(url, autocommit=True) as listen:
            listen.execute("LISTEN cocalcproxy_changes")
            for trial in range(run.settings.revocation_trials):
                if trial % 2 == 0:
                    created = json.loads(
                        peers_module.admin_output(*where, "--json", "token", "create", "bench")
                    )
                    headers = {"Authorization": f"Bearer {created['token']}"}
                    change = ["token", "revoke", created["id"]]
                    figure, refusal = token_figure, 401
                else:
                    peers_module.admin_output(
                        *where, "project", "collaborator", "add", project_id, "member"
                    )
                    headers = {"Authorization": f"Bearer {member_token}"}
                    change = ["project", "collaborator", "remove", project_id, "member"]
                    figure, refusal = member_figure, 404
                for latency in revocation_trial(where, proxies, listen, headers, change, refusal):
                    figure.add(SUBJECT, latency * 1000)
    finally:
        for proxy in proxies:
            proxy.stop()
        with (
            contextlib.suppress(psycopg.Error),
            psycopg.connect(maintenance, autocommit=True) as conn,
        ):
            conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


def credential_lookups(proxy: peers_module.CocalcProxy) -> float:
    """The proxy's credential-cache misses so far (from its --metrics listener)."""
    import re
    import urllib.request

    port = proxy.metrics_port()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:  # noqa: S310
        text = response.read().decode()
    m = re.search(r'^cocalcproxy_cache_misses_total\{cache="credentials"\} (\S+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


def revocation_trial(
    where: list[str],
    proxies: list[peers_module.CocalcProxy],
    listen: object,
    headers: dict[str, str],
    change: list[str],
    refusal: int,
) -> list[float]:
    """Seconds from the commit of ``change`` until each proxy answers ``refusal``. Before the
    change, each proxy must have answered the credential from its cache (its previous answer may
    have been dropped by the change that made the credential: then ask again), so that only a
    dropped cache can make it refuse."""
    import http.client

    clients = []
    for proxy in proxies:
        conn = http.client.HTTPSConnection(
            "localhost", proxy.port, context=ssl.create_default_context(cafile=proxy.cert),
            timeout=10,
        )  # fmt: skip
        clients.append(conn)

    def status(i: int) -> int:
        clients[i].request("GET", proxies[i].path("small"), headers=headers)
        response = clients[i].getresponse()
        response.read()
        return response.status

    for i, proxy in enumerate(proxies):
        for _ in range(50):
            before = credential_lookups(proxy)
            if status(i) != 200:
                raise SystemExit(f"revocation: allowed credentials refused before {change}")
            if credential_lookups(proxy) == before:
                break
        else:
            raise SystemExit("revocation: the proxy never answered from its cache")
    counter_row = listen.execute("SELECT value FROM change_counter WHERE id = 1").fetchone()  # type: ignore[attr-defined]
    counter = int(counter_row[0])
    heard: list[float] = []

    def wait_for_commit() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            for notify in listen.notifies(timeout=deadline - time.monotonic(), stop_after=1):  # type: ignore[attr-defined]
                if int(notify.payload) > counter:
                    heard.append(time.monotonic())
                    return

    waiter = threading.Thread(target=wait_for_commit)
    waiter.start()
    admin = subprocess.Popen(
        [sys.executable, "-m", "cocalcproxy.ops.admin", *where, *change],
        env=peers_module.child_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    refused: dict[int, float] = {}
    deadline = time.monotonic() + 30
    while len(refused) < len(proxies) and time.monotonic() < deadline:
        for i in range(len(proxies)):
            if i not in refused and status(i) == refusal:
                refused[i] = time.monotonic()
    _, stderr = admin.communicate(timeout=60)
    waiter.join(60)
    for conn in clients:
        conn.close()
    if admin.returncode != 0:
        raise SystemExit(f"revocation: cocalcproxy {' '.join(change)} failed: {stderr!r}")
    if len(refused) < len(proxies) or not heard:
        raise SystemExit(f"revocation: a proxy never refused after {' '.join(change)}")
    return [max(0.0, refused[i] - heard[0]) for i in range(len(proxies))]


RUNNERS: dict[str, Callable[[Run], None]] = {
    "small": scenario_small,
    "close": scenario_close,
    "download": scenario_download,
    "upload": scenario_upload,
    "websocket": scenario_websocket,
    "idle-websockets": scenario_idle_websockets,
    "workers": scenario_workers,
    "revocation": scenario_revocation,
}


# -- main ---------------------------------------------------------------------------------------


def measure_size(size: int) -> str:
    for unit, power in (("GiB", 3), ("MiB", 2), ("KiB", 1)):
        if size >= 1024**power:
            return f"{size / 1024**power:g} {unit}"
    return f"{size} B"


def parse_size(text: str) -> int:
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    for suffix, power in (("K", 1), ("M", 2), ("G", 3)):
        if text.endswith(suffix):
            return int(float(text[:-1]) * 1024**power)
    return int(text)


def choose_cpus(args: argparse.Namespace) -> tuple[str | None, str | None, str]:
    """(proxy CPUs, client CPUs, a sentence saying so)."""
    if args.no_pin:
        return None, None, "not pinned (--no-pin)"
    available = sorted(os.sched_getaffinity(0))
    if len(available) < 2:
        return None, None, f"not pinned: only CPU {available} available"
    proxy = args.proxy_cpu if args.proxy_cpu is not None else str(available[0])
    client = (
        args.client_cpus
        if args.client_cpus is not None
        else ",".join(str(c) for c in available if str(c) != proxy)
    )
    return (
        proxy,
        client,
        (
            f"proxies pinned to CPU {proxy}; load generators, the backend and this script to "
            f"CPU {client} (taskset)"
        ),
    )


def raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(needed, soft)), hard))


def environment(labels: dict[str, str], pinning: str) -> dict[str, object]:
    wrk_version = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout
    return {
        "cpus": os.cpu_count(),
        "pinning": pinning,
        "kernel": os.uname().release,
        "python": sys.version.split()[0],
        "wrk": wrk_version.splitlines()[0] if wrk_version else "",
        "peers": labels,
        "load_average_before": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: every scenario, 1 round of 1 s, tiny sizes and counts; "
                             "checks that the benchmark works, measures nothing")  # fmt: skip
    parser.add_argument("--rounds", type=int, help="rounds per scenario [5; quick: 1]")
    parser.add_argument("--duration", type=float, help="seconds per load run [10; quick: 1]")
    parser.add_argument(
        "--peers",
        default=",".join(PEER_NAMES),
        help="which proxies, comma-separated (cocalcproxy always runs)",
    )
    parser.add_argument("--scenarios", default=",".join(SCENARIOS),
                        help="which scenarios, comma-separated")  # fmt: skip
    parser.add_argument("--connections", help="small GET connection counts [1,16,128,512]")
    parser.add_argument("--ws-connections", help="WebSocket echo connection counts [1,50]")
    parser.add_argument("--transfer-size", help="download and upload size [1G; quick: 16M]")
    parser.add_argument("--idle-websockets", type=int, help="[2000; quick: 50]")
    parser.add_argument("--revocation-trials", type=int, help="[10; quick: 2]")
    parser.add_argument("--postgres", default=os.environ.get(
        "COCALCPROXY_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres"),
        help="PostgreSQL maintenance URL for the revocation scenario (a database is created "
             "and dropped)")  # fmt: skip
    parser.add_argument("--proxy-cpu", help="CPU(s) for the proxies [the first usable]")
    parser.add_argument("--client-cpus", help="CPU(s) for clients and backend [the others]")
    parser.add_argument("--no-pin", action="store_true", help="do not pin anything")
    parser.add_argument("--proxy-option", action="append", default=[], metavar="OPT",
                        help="extra twistd option for cocalcproxy (repeatable)")  # fmt: skip
    parser.add_argument(
        "--profile",
        metavar="FILE",
        help="run cocalcproxy under cProfile and write its stats to FILE",
    )
    parser.add_argument("--json", metavar="FILE", help="also write every value as JSON")
    args = parser.parse_args()

    settings = Settings.quick() if args.quick else Settings()
    if args.rounds is not None:
        settings.rounds = args.rounds
    if args.duration is not None:
        if args.duration > 120:
            parser.error("--duration is capped at 120 seconds")
        settings.duration = args.duration
    if args.transfer_size:
        settings.transfer_size = parse_size(args.transfer_size)
        if settings.transfer_size > 8 * 2**30:
            parser.error("--transfer-size is capped at 8 GiB")
    try:
        if args.connections:
            settings.connections = tuple(int(c) for c in args.connections.split(","))
        if args.ws_connections:
            settings.ws_connections = tuple(int(c) for c in args.ws_connections.split(","))
    except ValueError:
        parser.error("connection counts are comma-separated whole numbers")
    if args.idle_websockets is not None:
        settings.idle_websockets = args.idle_websockets
    if args.revocation_trials is not None:
        settings.revocation_trials = args.revocation_trials
    chosen = [p for p in args.peers.split(",") if p]
    unknown = set(chosen) - set(PEER_NAMES)
    if unknown:
        parser.error(f"unknown peers: {', '.join(sorted(unknown))}")
    names = [SUBJECT, *(p for p in PEER_NAMES if p in chosen and p != SUBJECT)]
    scenarios = [s for s in args.scenarios.split(",") if s]
    if set(scenarios) - set(SCENARIOS):
        parser.error(f"unknown scenarios: {', '.join(sorted(set(scenarios) - set(SCENARIOS)))}")
    for tool in ("wrk", "curl", *(["taskset"] if not args.no_pin else [])):
        if not shutil.which(tool):
            parser.error(f"{tool} is not installed")
    if "chp" in names and not (shutil.which("node") and shutil.which("npm")):
        parser.error("configurable-http-proxy needs node and npm (or --peers without chp)")
    if "nginx" in names and not shutil.which("nginx"):
        parser.error("nginx is not installed (Debian: apt-get install nginx-light)")

    proxy_cpus, client_cpus, pinning = choose_cpus(args)
    all_cpus = ",".join(str(c) for c in sorted(os.sched_getaffinity(0))) if client_cpus else None
    if client_cpus:
        os.sched_setaffinity(0, {int(c) for c in client_cpus.split(",")})
    raise_fd_limit(4 * settings.idle_websockets + 1024)
    labels = {SUBJECT: "cocalcproxy"}
    peers_module.compile_checkout()
    chp_version = peers_module.install_chp() if "chp" in names else ""

    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="cocalcproxy-bench-")))
        backend = peers_module.start_backend(client_cpus)
        stack.callback(peers_module.stop_process, backend.process)
        peers: dict[str, Peer] = {}
        subject = peers_module.start_cocalcproxy(
            work / "cocalcproxy", backend, proxy_cpus, args.proxy_option,
            profile=str(Path(args.profile).absolute()) if args.profile else None,
        )  # fmt: skip
        stack.callback(subject.stop)
        peers[SUBJECT] = subject
        key = str(Path(subject.cert).with_name("key.pem"))
        if "chp" in names:
            peers["chp"] = peers_module.start_chp(
                work, backend, proxy_cpus, subject.cert, key, chp_version
            )
            stack.callback(peers["chp"].stop)
        if "nginx" in names:
            peers["nginx"] = peers_module.start_nginx(
                work / "nginx", backend, proxy_cpus, subject.cert, key,
                peers_module.nginx_version(),
            )  # fmt: skip
            stack.callback(peers["nginx"].stop)
        for name, peer in peers.items():
            labels[name] = peer.label
        env = environment(labels, pinning)
        print(f"environment: {json.dumps(env)}", flush=True)
        run = Run(settings, peers, backend, work, proxy_cpus, client_cpus, args, all_cpus=all_cpus)
        warm_up(run)
        for scenario in scenarios:
            RUNNERS[scenario](run)
            for peer in peers.values():
                peer.check_alive()
    env["load_average_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    env["seconds"] = round(time.monotonic() - started)

    print()
    print(f"environment: {json.dumps(env)}")
    print(
        f"{settings.rounds} round(s) of {settings.duration:g} s per figure, interleaved; "
        "median (range over rounds); ratios are cocalcproxy's median over the peer's."
    )
    if args.quick:
        print("QUICK SMOKE RUN: these numbers are not measurements.")
    print()
    print(measure.table(run.figures, SUBJECT, list(peers), labels))
    for note in run.notes:
        print(f"note: {note}")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "environment": env,
                    "settings": asdict(settings),
                    "figures": [asdict(f) for f in run.figures],
                    "notes": run.notes,
                    "medians": {
                        f.name: {p: statistics.median(v) for p, v in f.values.items()}
                        for f in run.figures
                    },
                },
                indent=2,
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
