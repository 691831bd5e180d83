"""SIGTERM to a real ``twistd -n cocalcproxy`` (alone and with ``--workers 2``): every request's
access-log line is out, whole, when the process has ended, although lines wait up to 100 ms in
memory while it runs."""

from __future__ import annotations

import http.client
import json
import signal
from pathlib import Path
from typing import Any

from twisted.trial import unittest

from tests.integration.test_shutdown import (
    open_tls,
    read_until_closed,
    refused,
    start_upload,
    tls_context,
)
from tests.integration.test_workers import start, wait_serving
from tests.processes import ProxyProcess, wait_for

REQUESTS = 60


def health_requests(proxy: ProxyProcess, count: int, tag: str) -> None:
    """``count`` requests on fresh connections (so with workers every worker gets some)."""
    for n in range(count):
        conn = http.client.HTTPSConnection(
            "localhost", proxy.port, context=tls_context(proxy), timeout=30
        )
        try:
            conn.request("GET", f"/_/health?{tag}{n}")
            response = conn.getresponse()
            response.read()
            assert response.status == 200, response.status
        finally:
            conn.close()


def records(text: str) -> list[dict[str, Any]]:
    """Every access-log line in ``text``; a torn or interleaved line fails json.loads here."""
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


class ShutdownFlushTests(unittest.TestCase):
    def test_sigterm_writes_every_waiting_line(self) -> None:
        state = Path(self.mktemp()).absolute()
        log_path = state / "requests.log"
        proxy = ProxyProcess(str(state), "--access-log", str(log_path)).start()
        self.addCleanup(
            lambda: proxy.stop() if proxy.process and proxy.process.poll() is None else 0
        )
        proxy.wait_listening()
        # While running, the lines come without any shutdown (the 100 ms timer)...
        health_requests(proxy, REQUESTS, "a")
        wait_for(lambda: len(records(log_path.read_text())) == REQUESTS, 30, "the first lines")
        # ... and lines still waiting when SIGTERM comes are written before the process ends,
        # the line of a request that finishes during the drain (just before the end) too.
        health_requests(proxy, REQUESTS, "b")
        slow = open_tls(proxy)
        self.addCleanup(slow.close)
        start_upload(slow, b"12345")
        proxy.signal(signal.SIGTERM)
        wait_for(lambda: refused(proxy.port), 30, "the listener to close")
        slow.sendall(b"67890")
        self.assertTrue(read_until_closed(slow).startswith(b"HTTP/1.1 403 "))
        assert proxy.process is not None
        self.assertEqual(proxy.process.wait(timeout=60), 0, proxy.output()[-3000:])
        text = log_path.read_text()
        self.assertTrue(text.endswith("\n"))
        self.assertEqual(len(text.splitlines()), 2 * REQUESTS + 1)
        found = records(text)
        self.assertEqual([r["path"] for r in found[:-1]], ["/_/health"] * (2 * REQUESTS))
        self.assertEqual(
            (found[-1]["method"], found[-1]["path"], found[-1]["status"]),
            ("POST", "/_/login", 403),
        )

    def test_sigterm_with_workers_writes_every_waiting_line_to_standard_output(self) -> None:
        proxy = start(self, "--access-log", "-")
        wait_serving(proxy, 2)
        health_requests(proxy, REQUESTS, "c")
        self.assertEqual(proxy.stop(), 0, proxy.output()[-3000:])
        found = records(proxy.output())
        self.assertEqual(len(found), REQUESTS, proxy.output()[-3000:])
        self.assertTrue(all(r["status"] == 200 for r in found), found)

    def test_sigterm_with_workers_writes_every_waiting_line_to_the_file(self) -> None:
        log_path = Path(self.mktemp()).absolute()
        proxy = start(self, "--access-log", str(log_path))
        wait_serving(proxy, 2)
        health_requests(proxy, REQUESTS, "d")
        self.assertEqual(proxy.stop(), 0, proxy.output()[-3000:])
        text = log_path.read_text()
        self.assertEqual(len(text.splitlines()), REQUESTS)
        self.assertEqual(len(records(text)), REQUESTS)
