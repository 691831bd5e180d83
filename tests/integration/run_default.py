"""Run ``twistd -n cocalcproxy`` with no options and report what it did, as one JSON line.

Used by test_install inside a fresh network namespace (``unshare -rn``), so the contract's
default port 8443 is free there even when a proxy from the README's walkthrough holds it on the
machine. Usage: ``python run_default.py TWISTD WORKDIR``.
"""

from __future__ import annotations

import fcntl
import json
import signal
import socket
import ssl
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

SIOCSIFFLAGS = 0x8914
IFF_UP, IFF_RUNNING = 0x1, 0x40


def loopback_up() -> None:
    """A new network namespace has its loopback down; bring it up (no ``ip`` needed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", IFF_UP | IFF_RUNNING))


def wait_for(predicate, timeout: float, process: subprocess.Popen[bytes]):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline and process.poll() is None:
        try:
            result = predicate()
            if result:
                return result
        except Exception as e:  # noqa: BLE001 - any failure means "not yet"
            last = e
        time.sleep(0.1)
    raise TimeoutError(f"twistd exited ({process.poll()}) or timed out: {last!r}")


def main(twistd: str, workdir: str, namespaced: bool) -> None:
    if namespaced:
        loopback_up()
    log_path = Path(workdir) / "twistd.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [twistd, "-n", "cocalcproxy"], cwd=workdir, stdout=log, stderr=subprocess.STDOUT
        )
    report: dict[str, object] = {"health": None}
    try:
        cert = Path(workdir) / "cocalcproxy-state" / "tls" / "cert.pem"
        wait_for(cert.exists, 60, process)

        def health() -> object:
            context = ssl.create_default_context(cafile=str(cert))
            with urllib.request.urlopen(  # noqa: S310
                "https://localhost:8443/_/health", context=context, timeout=5
            ) as response:
                return json.loads(response.read())

        report["health"] = wait_for(health, 60, process)
    except TimeoutError as e:
        report["error"] = str(e)
    finally:
        process.send_signal(signal.SIGTERM)
        report["exit"] = process.wait(timeout=60)
        report["log"] = log_path.read_text(errors="replace")[-3000:]
    print(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3] == "namespaced")
