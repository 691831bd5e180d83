"""Benchmark cocalcproxy on loopback against a direct connection to the same backend.

Starts bench/backend.py, a fresh proxy (``twistd -n cocalcproxy`` in a subprocess with its own
temporary state directory, a user, a project on 127.0.0.1 and an API token), then measures:

* small GETs: requests/s and latency percentiles, direct vs ``/<pid>/server/<port>/small``
  (keep-alive on both legs), with ``wrk`` when installed, else an asyncio client loop;
* large downloads (several sizes): throughput, and the proxy's peak resident memory during each,
  which should not grow with the size (bodies are streamed);
* a large upload: throughput and the proxy's peak resident memory, checking that the backend
  received every byte.

Everything is bounded in time and size and stays on loopback. Not part of the test suite:
run ``python3 bench/run.py --help``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def child_env() -> dict[str, str]:
    """The environment for the proxy and admin processes: this checkout first on sys.path, so
    its package and twistd plugin are used even when it is not installed."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


# -- helpers -------------------------------------------------------------------------------------


def parse_size(text: str) -> int:
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    for suffix, power in (("K", 1), ("M", 2), ("G", 3)):
        if text.endswith(suffix):
            return int(float(text[:-1]) * 1024**power)
    return int(text)


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(predicate: object, timeout: float, what: str) -> None:
    """Poll ``predicate()`` until true, at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise SystemExit(f"timed out waiting for {what}")


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak resident set) of a process, in bytes (Linux)."""
    values: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                values[name] = int(rest.split()[0]) * 1024
    return values


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time a process has used so far (Linux /proc/<pid>/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # fields[0] is the state (field 3); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class RSSSampler:
    """Samples a process's resident memory every 10 ms in a thread; keeps the maximum."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0
        self.start_rss = proc_status(pid)["VmRSS"]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(OSError, KeyError):
                self.peak = max(self.peak, proc_status(self.pid)["VmRSS"])
            self._stop.wait(0.01)

    def __enter__(self) -> RSSSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# -- the system under test -----------------------------------------------------------------------


@dataclass
class Setup:
    backend_port: int
    proxy_port: int
    proxy_pid: int
    project_id: str
    token: str
    cert: str

    def direct(self, path: str) -> str:
        return f"http://127.0.0.1:{self.backend_port}/{path}"

    def proxied(self, path: str) -> str:
        return (
            f"https://localhost:{self.proxy_port}/{self.project_id}/server/"
            f"{self.backend_port}/{path}"
        )

    @property
    def auth_header(self) -> str:
        return f"Authorization: Bearer {self.token}"


def start_backend(stack: contextlib.ExitStack) -> int:
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "backend.py")],
        stdout=subprocess.PIPE,
    )
    stack.callback(stop, process)
    assert process.stdout is not None
    line = process.stdout.readline().decode()
    if not line.startswith("PORT "):
        raise SystemExit("the benchmark backend did not start")
    return int(line.split()[1])


def admin(state_dir: str, *args: str, stdin: str | None = None) -> str:
    """Run the ``cocalcproxy`` admin command; return its last stdout line."""
    script = BIN / "cocalcproxy"
    command = (
        [str(script)]
        if script.exists()
        else [sys.executable, "-c", "from cocalcproxy.admin import main; raise SystemExit(main())"]
    )
    result = subprocess.run(
        [*command, "--state-dir", state_dir, *args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=child_env(),
        timeout=120,
    )
    if result.returncode != 0:
        raise SystemExit(f"cocalcproxy {' '.join(args)} failed: {result.stderr.strip()}")
    return result.stdout.strip().splitlines()[-1]


def start_proxy(
    stack: contextlib.ExitStack,
    state_dir: str,
    backend_port: int,
    extra: list[str],
    profile: str | None = None,
) -> Setup:
    password = "bench-password-not-secret\n"
    admin(state_dir, "user", "add", "bench", "--password-stdin", stdin=password)
    project_id = admin(state_dir, "project", "add", "--owner", "bench", "--host", "127.0.0.1")
    token = admin(state_dir, "token", "create", "bench")
    port = free_port()
    twistd = BIN / "twistd"
    command = (
        [str(twistd)]
        if twistd.exists()
        else [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]
    )
    log_path = Path(state_dir) / "proxy.log"
    log = open(log_path, "wb")  # noqa: SIM115
    stack.callback(log.close)
    process = subprocess.Popen(
        [
            *command,
            "-n",
            "--pidfile=",
            *(["--profile", profile, "--profiler", "cprofile", "--savestats"] if profile else []),
            "cocalcproxy",
            "--state-dir",
            state_dir,
            "--listen",
            f"tcp:{port}:interface=127.0.0.1",
            *extra,
        ],
        cwd=ROOT,
        env=child_env(),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    stack.callback(stop, process)
    cert = str(Path(state_dir) / "tls" / "cert.pem")

    def ready() -> bool:
        if process.poll() is not None:
            raise SystemExit(f"the proxy exited; its log:\n{log_path.read_text()[-4000:]}")
        if not os.path.exists(cert):
            return False
        return curl_status(f"https://localhost:{port}/_/health", cert, port) == 200

    wait_until(ready, 60, "the proxy to answer /_/health")
    return Setup(backend_port, port, process.pid, project_id, token, cert)


# -- clients -------------------------------------------------------------------------------------


def curl_base(cert: str | None, proxy_port: int | None) -> list[str]:
    command = ["curl", "-sS", "--http1.1", "-H", "Expect:"]
    if cert is not None:
        command += ["--cacert", cert, "--resolve", f"localhost:{proxy_port}:127.0.0.1"]
    return command


def curl_status(url: str, cert: str | None, port: int | None) -> int:
    result = subprocess.run(
        [*curl_base(cert, port), "-o", "/dev/null", "-w", "%{http_code}", url],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return int(result.stdout or 0)


@dataclass
class Load:
    tool: str
    requests_per_second: float
    latency_ms: dict[str, float]
    requests: int
    errors: int
    proxy_cpu_us_per_request: float | None = None


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def wrk_load(url: str, headers: list[str], connections: int, duration: float) -> Load:
    command = ["wrk", "-t1", f"-c{connections}", f"-d{duration:g}s", "--latency"]
    for header in headers:
        command += ["-H", header]
    out = subprocess.run(
        [*command, url], capture_output=True, text=True, timeout=duration + 60
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    latency = {
        f"p{p}": float(v) * _UNITS[u]
        for p, v, u in re.findall(r"^\s+(\d+)%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
    }
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    errors = 0
    if m := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        errors += int(m.group(1))
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out):
        errors += sum(int(x) for x in m.groups())
    return Load("wrk", rps, latency, total, errors)


async def _python_load(
    url: str, headers: list[str], connections: int, duration: float, cert: str | None
) -> Load:
    """Keep-alive GET loop on ``connections`` connections: the fallback when wrk is missing."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    tls = None
    if parts.scheme == "https":
        tls = ssl.create_default_context(cafile=cert)
    host_header = parts.netloc
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    request = (
        f"GET {target} HTTP/1.1\r\nHost: {host_header}\r\n"
        + "".join(f"{h}\r\n" for h in headers)
        + "\r\n"
    ).encode()
    latencies: list[float] = []
    errors = 0
    deadline = time.monotonic() + duration

    async def worker() -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", parts.port, ssl=tls, server_hostname=parts.hostname if tls else None
        )
        try:
            while time.monotonic() < deadline:
                started = time.perf_counter()
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                status = int(head.split(b" ", 2)[1])
                length = int(
                    re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head).group(1)  # type: ignore[union-attr]
                )
                await reader.readexactly(length)
                latencies.append((time.perf_counter() - started) * 1000)
                if not 200 <= status < 400:
                    errors += 1
        finally:
            writer.close()

    started = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(connections)))
    elapsed = time.monotonic() - started
    latencies.sort()

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(len(latencies) * p / 100))]

    return Load(
        "python-asyncio",
        len(latencies) / elapsed,
        {f"p{p}": pct(p) for p in (50, 75, 90, 99)},
        len(latencies),
        errors,
    )


def load(
    client: str, url: str, headers: list[str], connections: int, duration: float, cert: str | None
) -> Load:
    if client == "wrk":
        result = wrk_load(url, headers, connections, duration)
    else:
        result = asyncio.run(_python_load(url, headers, connections, duration, cert))
    if result.errors * 10 > result.requests:
        raise SystemExit(f"{url}: {result.errors} of {result.requests} requests failed")
    return result


@dataclass
class Transfer:
    direction: str
    size: int
    seconds: float
    mib_per_second: float
    proxy_rss_before: int = 0
    proxy_rss_peak: int = 0
    extra: dict[str, object] = field(default_factory=dict)


def download(
    url: str,
    size: int,
    headers: list[str],
    cert: str | None,
    port: int | None,
    pid: int | None,
    rate: int | None = None,
) -> Transfer:
    """GET ``size`` bytes with curl; ``rate`` (bytes/s) makes curl a slow reader."""
    command = [*curl_base(cert, port), "-o", "/dev/null", "-w", "%{http_code} %{size_download}"]
    if rate:
        command += ["--limit-rate", str(rate)]
    for header in headers:
        command += ["-H", header]
    sampler = RSSSampler(pid) if pid else None
    cpu_before = cpu_seconds(pid) if pid else 0.0
    started = time.perf_counter()
    with sampler or contextlib.nullcontext():
        result = subprocess.run(
            [*command, f"{url}?bytes={size}"], capture_output=True, text=True, timeout=600
        )
    seconds = time.perf_counter() - started
    status, got = result.stdout.split()
    if status != "200" or int(got) != size:
        raise SystemExit(f"download of {size} bytes from {url} failed: {status}, {got} bytes")
    transfer = Transfer(
        "download" if not rate else "slow download", size, seconds, size / seconds / 2**20
    )
    if pid:
        transfer.extra["proxy_cpu_seconds"] = round(cpu_seconds(pid) - cpu_before, 2)
    if sampler:
        transfer.proxy_rss_before, transfer.proxy_rss_peak = sampler.start_rss, sampler.peak
    return transfer


def upload(
    url: str,
    body_file: str,
    size: int,
    headers: list[str],
    cert: str | None,
    port: int | None,
    pid: int | None,
) -> Transfer:
    command = [*curl_base(cert, port), "-X", "POST", "-T", body_file]
    command += ["-H", "Content-Type: application/octet-stream", "-w", "\n%{http_code}"]
    for header in headers:
        command += ["-H", header]
    sampler = RSSSampler(pid) if pid else None
    cpu_before = cpu_seconds(pid) if pid else 0.0
    started = time.perf_counter()
    with sampler or contextlib.nullcontext():
        result = subprocess.run([*command, url], capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - started
    lines = result.stdout.strip().splitlines()
    if not lines or lines[-1] != "200" or json.loads(lines[0]).get("received") != size:
        raise SystemExit(f"upload of {size} bytes to {url} failed: {result.stdout[-500:]!r}")
    transfer = Transfer("upload", size, seconds, size / seconds / 2**20)
    if pid:
        transfer.extra["proxy_cpu_seconds"] = round(cpu_seconds(pid) - cpu_before, 2)
    if sampler:
        transfer.proxy_rss_before, transfer.proxy_rss_peak = sampler.start_rss, sampler.peak
    return transfer


# -- main ----------------------------------------------------------------------------------------


def environment() -> dict[str, object]:
    wrk_version = ""
    if shutil.which("wrk"):
        wrk_version = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout
        wrk_version = wrk_version.splitlines()[0] if wrk_version else ""
    return {
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "kernel": os.uname().release,
        "wrk": wrk_version,
        "load_average_before": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def report(results: dict[str, object]) -> str:
    lines = []
    env = results["environment"]
    lines.append(f"environment: {env}")
    lines.append("")
    lines.append(
        "| small GET | tool | req/s | p50 ms | p90 ms | p99 ms | errors | proxy CPU/request |"
    )
    lines.append("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name in ("small_direct", "small_proxied"):
        r = results[name]
        assert isinstance(r, Load)
        lat = r.latency_ms
        lines.append(
            f"| {name.split('_')[1]} | {r.tool} | {r.requests_per_second:,.0f} | "
            f"{lat.get('p50', 0):.2f} | {lat.get('p90', 0):.2f} | {lat.get('p99', 0):.2f} | "
            f"{r.errors} | "
            + (
                f"{r.proxy_cpu_us_per_request:.0f} µs |"
                if r.proxy_cpu_us_per_request is not None
                else "- |"
            )
        )
    lines.append("")
    lines.append(
        "| transfer | path | size | seconds | MiB/s | proxy CPU s "
        "| proxy RSS before | proxy RSS peak |"
    )
    lines.append("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for t in results["transfers"]:  # type: ignore[attr-defined]
        path = t.extra.get("path", "")
        before = human(t.proxy_rss_before) if t.proxy_rss_peak else "-"
        peak = human(t.proxy_rss_peak) if t.proxy_rss_peak else "-"
        lines.append(
            f"| {t.direction} | {path} | {human(t.size)} | {t.seconds:.2f} | "
            f"{t.mib_per_second:,.0f} | {t.extra.get('proxy_cpu_seconds', '-')} | "
            f"{before} | {peak} |"
        )
    lines.append("")
    lines.append(f"proxy peak RSS over the whole run (VmHWM): {human(results['proxy_hwm'])}")  # type: ignore[arg-type]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per load run [10]")
    parser.add_argument("--connections", type=int, default=16, help="keep-alive connections [16]")
    parser.add_argument(
        "--download-sizes", default="64M,1G", help="comma-separated download sizes [64M,1G]"
    )
    parser.add_argument("--upload-size", default="512M", help="upload size [512M]")
    parser.add_argument(
        "--slow-download",
        default="256M@32M",
        metavar="SIZE@RATE",
        help="a proxied download read slowly (RATE bytes/s), to see backpressure keep the "
        "proxy's memory flat; 'off' to skip [256M@32M]",
    )
    parser.add_argument("--client", choices=("auto", "wrk", "python"), default="auto")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument(
        "--profile",
        metavar="FILE",
        help="run the proxy under cProfile (twistd --profile) and write its stats to FILE; "
        "read them with python3 -m pstats FILE (profiling slows the proxy down)",
    )
    parser.add_argument(
        "--proxy-option",
        action="append",
        default=[],
        metavar="OPT",
        help="extra twistd option for the proxy (repeatable), e.g. --proxy-option=--metrics=...",
    )
    args = parser.parse_args()
    if args.duration > 120:
        parser.error("--duration is capped at 120 seconds")
    client = args.client
    if client == "auto":
        client = "wrk" if shutil.which("wrk") else "python"
    if client == "wrk" and not shutil.which("wrk"):
        parser.error("wrk is not installed (Debian: apt-get install wrk)")
    sizes = [parse_size(s) for s in args.download_sizes.split(",") if s]
    upload_size = parse_size(args.upload_size)
    slow: tuple[int, int] | None = None
    if args.slow_download != "off":
        slow_size, _, slow_rate = args.slow_download.partition("@")
        slow = (parse_size(slow_size), parse_size(slow_rate or "32M"))
        if slow[0] / slow[1] > 120:
            parser.error("--slow-download would take more than 120 seconds")
    if max([*sizes, upload_size]) > 8 * 2**30:
        parser.error("sizes are capped at 8 GiB")

    results: dict[str, object] = {"environment": environment(), "client": client}
    with contextlib.ExitStack() as stack:
        state_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="cocalcproxy-bench-"))
        backend_port = start_backend(stack)
        profile = str(Path(args.profile).absolute()) if args.profile else None
        setup = start_proxy(stack, state_dir, backend_port, args.proxy_option, profile)
        auth = [setup.auth_header]
        print(f"backend :{setup.backend_port}, proxy :{setup.proxy_port} (pid {setup.proxy_pid})")

        # Warm up both paths (connection pools, caches) before measuring.
        load(client, setup.direct("small"), [], 2, 1.0, None)
        load(client, setup.proxied("small"), auth, 2, 1.0, setup.cert)
        print("small GETs ...", flush=True)
        results["small_direct"] = load(
            client, setup.direct("small"), [], args.connections, args.duration, None
        )
        cpu_before = cpu_seconds(setup.proxy_pid)
        proxied = load(
            client, setup.proxied("small"), auth, args.connections, args.duration, setup.cert
        )
        proxied.proxy_cpu_us_per_request = (
            (cpu_seconds(setup.proxy_pid) - cpu_before) / max(1, proxied.requests) * 1e6
        )
        results["small_proxied"] = proxied

        transfers: list[Transfer] = []
        for size in sizes:
            print(f"download {human(size)} ...", flush=True)
            t = download(setup.direct("large"), size, [], None, None, None)
            t.extra["path"] = "direct"
            transfers.append(t)
            t = download(
                setup.proxied("large"), size, auth, setup.cert, setup.proxy_port, setup.proxy_pid
            )
            t.extra["path"] = "proxied"
            transfers.append(t)

        if slow is not None:
            print(f"slow download {human(slow[0])} at {human(slow[1])}/s ...", flush=True)
            t = download(
                setup.proxied("large"),
                slow[0],
                auth,
                setup.cert,
                setup.proxy_port,
                setup.proxy_pid,
                rate=slow[1],
            )
            t.extra["path"] = "proxied"
            transfers.append(t)

        print(f"upload {human(upload_size)} ...", flush=True)
        body = Path(state_dir) / "upload.bin"
        with open(body, "wb") as f:
            f.truncate(upload_size)  # sparse: costs no disk, reads as zeros
        t = upload(setup.direct("upload"), str(body), upload_size, [], None, None, None)
        t.extra["path"] = "direct"
        transfers.append(t)
        t = upload(
            setup.proxied("upload"),
            str(body),
            upload_size,
            auth,
            setup.cert,
            setup.proxy_port,
            setup.proxy_pid,
        )
        t.extra["path"] = "proxied"
        transfers.append(t)
        results["transfers"] = transfers
        results["proxy_hwm"] = proc_status(setup.proxy_pid)["VmHWM"]

    print()
    print(report(results))
    if args.json:
        serialisable = {
            k: (
                [asdict(t) for t in v]
                if k == "transfers"
                else asdict(v)
                if isinstance(v, Load)
                else v
            )
            for k, v in results.items()
        }
        Path(args.json).write_text(json.dumps(serialisable, indent=2) + "\n")


if __name__ == "__main__":
    main()
