"""A real, small filesystem that the tests can fill up: a 64 KiB tmpfs mounted on a temporary
directory (the tests run as root; mounting needs CAP_SYS_ADMIN)."""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

from twisted.trial import unittest

SIZE = "64k"


class SmallDisk:
    """A tmpfs of ``SIZE`` at ``path``; ``fill()`` takes every free block, ``free()`` gives them
    back. Unmounted (lazily, in case a process still holds a file there) at cleanup."""

    def __init__(self, case: unittest.TestCase) -> None:
        self.path = Path(case.mktemp()).absolute()
        self.path.mkdir(parents=True)
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={SIZE},mode=0755", "tmpfs", str(self.path)],
            capture_output=True,
            text=True,
        )
        assert mounted.returncode == 0, (
            "this test needs a real full filesystem: mounting a tmpfs (as root) failed: "
            + mounted.stderr
        )
        case.addCleanup(subprocess.run, ["umount", "-l", str(self.path)], check=False)
        self.filler = self.path / "filler"

    def fill(self) -> None:
        """Write to a filler file until the filesystem says it is full."""
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            for chunk in (65536, 4096, 512, 64, 1):
                while True:
                    try:
                        os.write(fd, b"\0" * chunk)
                    except OSError as e:
                        assert e.errno == errno.ENOSPC, e
                        break
        finally:
            os.close(fd)

    def free(self) -> None:
        self.filler.unlink()
