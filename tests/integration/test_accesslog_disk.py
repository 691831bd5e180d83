"""The access log of a running ``twistd -n cocalcproxy`` through a full disk, a rotation and
SIGHUP: it comes back in the new file, the lost lines are counted in the metrics, and the service
log says once that writing failed and once that it works again."""

from __future__ import annotations

import json
import os
import re
import signal
import urllib.request

from twisted.trial import unittest

from tests.fullfs import SmallDisk
from tests.integration.test_shutdown import request
from tests.processes import ProxyProcess, free_port, wait_for

FAILED = "cannot write (No space left on device)"
RECOVERED = "writing again"


class AccessLogDiskTests(unittest.TestCase):
    def setUp(self) -> None:
        self.disk = SmallDisk(self)
        self.log_path = self.disk.path / "access.log"
        self.metrics_port = free_port()
        self.proxy = ProxyProcess(
            self.mktemp(),
            "--access-log",
            str(self.log_path),
            "--metrics",
            f"tcp:{self.metrics_port}:interface=127.0.0.1",
        ).start()
        self.addCleanup(self.proxy.stop)
        self.proxy.wait_listening()

    def lost(self) -> float:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=30) as response:
            text = response.read().decode()
        match = re.search(r"^cocalcproxy_access_log_lines_lost_total (\S+)$", text, re.M)
        assert match is not None, text
        return float(match.group(1))

    def health(self, n: int = 1) -> None:
        for _ in range(n):
            self.assertEqual(request(self.proxy, "GET", "/_/health")[0], 200)

    def statuses(self, path: os.PathLike[str] | str) -> list[int]:
        with open(path) as f:
            return [json.loads(line)["status"] for line in f if line.startswith("{")]

    def whole_lines(self, path: os.PathLike[str] | str) -> int:
        count = 0
        with open(path) as f:
            for line in f:
                try:
                    json.loads(line)
                    count += 1
                except ValueError:
                    pass  # the line a full disk cut short
        return count

    def test_full_disk_rotation_and_sighup(self) -> None:
        # Lines reach the file (and lost lines the metric) within 100 ms: polled, not assumed.
        self.health(2)
        wait_for(lambda: len(self.statuses(self.log_path)) == 2, 30, "two lines in the log")
        self.assertEqual(self.lost(), 0)

        self.disk.fill()
        # The file's last page may still take a few lines; then every line is lost.
        made = 2
        for _ in range(200):
            self.health()
            made += 1
            if self.lost() > 0:
                break
        wait_for(lambda: self.lost() > 0, 30, "a lost line counted")
        # Every request is accounted for: a whole line in the file or a lost line.
        wait_for(
            lambda: self.whole_lines(self.log_path) + self.lost() == made,
            30,
            f"{made} lines written or lost",
        )
        before = self.lost()
        self.health(5)
        wait_for(lambda: self.lost() >= before + 5, 30, "five more lost lines")
        self.assertEqual(self.lost(), before + 5)

        # logrotate: move the file away and send SIGHUP, while the disk is still full.
        rotated = self.disk.path / "access.log.1"
        os.rename(self.log_path, rotated)
        self.proxy.signal(signal.SIGHUP)
        wait_for(self.log_path.exists, 30, "the new access log file")
        self.health(3)
        wait_for(lambda: self.lost() >= before + 8, 30, "three more lost lines")
        self.assertEqual(self.lost(), before + 8)

        # The old file compressed away, say: space again. The next line lands in the new file.
        self.disk.free()
        self.health(4)
        wait_for(lambda: len(self.statuses(self.log_path)) == 4, 30, "four lines in the new log")
        self.assertEqual(self.lost(), before + 8)

        output = self.proxy.output()
        self.assertEqual(output.count(FAILED), 1, output[-4000:])
        self.assertEqual(output.count(RECOVERED), 1, output[-4000:])
        self.assertLess(output.index(FAILED), output.index(RECOVERED))
        self.assertNotIn("closed file", output)
        self.assertNotIn("Traceback", output)
