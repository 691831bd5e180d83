"""Instructions cocalcproxy executes per small proxied request, counted by callgrind.

The CPU figures of ``run.py`` move with whatever else the machine does (on the shared build
machine, a peer's figure moved by a quarter between two days): right for comparing with CHP and
nginx in one run, too coarse to tell whether a change of a few per cent helped. This counts the
instructions the proxy process executes in user space (its Python, the interpreter, OpenSSL;
not the kernel's side of its system calls) while serving a fixed number of small GETs (TLS,
``Authorization: Bearer``, keep-alive) through the fast lane: the same figure on a busy machine
as on a quiet one, so a before/after of one change is one run each.

    .venv/bin/python bench/instructions.py [--requests 2000] [--connections 4]

It starts the benchmark's backend and a fresh proxy under ``valgrind --tool=callgrind`` with
instrumentation off, warms it up, switches counting on for exactly the measured requests
(``callgrind_control``), and prints instructions per request. Needs valgrind (a Debian package).
"""

from __future__ import annotations

import argparse
import http.client
import re
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import peers  # noqa: E402


def control(pid: int, *args: str) -> None:
    subprocess.run(["callgrind_control", *args, str(pid)], check=True, capture_output=True)


def total_instructions(dump: Path) -> int:
    """The ``summary:`` (or ``totals:``) line of a callgrind dump: instructions executed."""
    text = dump.read_text(errors="replace")
    found = re.search(r"^(?:summary|totals):\s+(\d+)", text, re.MULTILINE)
    if found is None:
        raise SystemExit(f"{dump}: no summary line")
    return int(found.group(1))


def requests(proxy: peers.CocalcProxy, count: int, connections: int) -> None:
    """``count`` GETs of the backend's small answer over ``connections`` kept-alive connections,
    taken in turn; each answer must be 200."""
    context = ssl.create_default_context(cafile=proxy.cert)
    clients = [
        http.client.HTTPSConnection("localhost", proxy.port, context=context, timeout=600)
        for _ in range(connections)
    ]
    path = proxy.path("small")
    try:
        for i in range(count):
            client = clients[i % connections]
            client.request("GET", path, headers=proxy.headers)
            response = client.getresponse()
            response.read()
            if response.status != 200:
                raise SystemExit(f"request {i}: status {response.status}")
    finally:
        for client in clients:
            client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--warm-up", type=int, default=300)
    args = parser.parse_args()
    peers.compile_checkout()
    with tempfile.TemporaryDirectory(prefix="cocalcproxy-instructions-") as work:
        out = Path(work) / "callgrind.out"
        # Instrumentation off until the warm-up: start-up runs at valgrind's plain speed.
        callgrind = ["valgrind", "--tool=callgrind", "--instr-atstart=no"]
        backend = peers.start_backend(None)
        proxy = None
        try:
            proxy = peers.start_cocalcproxy(
                Path(work) / "state",
                backend,
                None,
                [],
                launcher=[*callgrind, f"--callgrind-out-file={out}"],
            )
            control(proxy.pid, "--instr=on")
            requests(proxy, args.warm_up, args.connections)
            control(proxy.pid, "--zero")
            started = time.monotonic()
            requests(proxy, args.requests, args.connections)
            control(proxy.pid, "--dump")
            seconds = time.monotonic() - started
            dumps = sorted(Path(work).glob("callgrind.out*"), key=lambda p: p.stat().st_mtime)
            if not dumps:
                raise SystemExit("callgrind wrote no dump")
            per_request = total_instructions(dumps[-1]) / args.requests
            print(
                f"{per_request:,.0f} instructions per request "
                f"({args.requests} small GETs over {args.connections} connections, "
                f"{seconds:.0f} s under callgrind)"
            )
        finally:
            if proxy is not None:
                proxy.stop()
            peers.stop_process(backend.process)


if __name__ == "__main__":
    main()
