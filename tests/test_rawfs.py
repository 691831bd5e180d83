"""rawfs: resolution below the home never leaves it, never opens anything but a regular file."""

from __future__ import annotations

import errno
import itertools
import os
import shutil
import socket
import stat
import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from cocalcproxy.handlers import rawfs
from cocalcproxy.handlers.rawfs import (
    LOOP,
    MISSING,
    NO_HOME,
    NOT_REGULAR,
    OUTSIDE,
    UNREADABLE,
    Directory,
    OpenFile,
    resolve,
)


def seg(path: str) -> tuple[bytes, ...]:
    return tuple(os.fsencode(p) for p in path.split("/") if p)


class Tree(unittest.TestCase):
    """A home with files, folders and every kind of symlink, next to a secret outside it."""

    def setUp(self) -> None:
        base = os.path.abspath(self.mktemp())
        self.home = os.path.join(base, "home")
        self.outside = os.path.join(base, "outside")
        os.makedirs(os.path.join(self.home, "docs", "deep"))
        os.makedirs(self.outside)
        self.write("outside/secret.txt", b"TOP SECRET", base)
        self.write("home/hello.txt", b"hello")
        self.write("home/docs/deep/a.txt", b"deep")
        self.base = base

    def write(self, rel: str, data: bytes, base: str | None = None) -> str:
        path = os.path.join(base or os.path.dirname(self.home), rel)
        with open(path, "wb") as f:
            f.write(data)
        return path

    def link(self, target: str, name: str) -> None:
        os.symlink(target, os.path.join(self.home, name))

    def resolve(self, path: str, **kw: object) -> rawfs.Outcome:
        outcome = resolve(os.fsencode(self.home), seg(path), **kw)  # type: ignore[arg-type]
        if isinstance(outcome, OpenFile):
            self.addCleanup(outcome.close)
        return outcome

    def read(self, path: str) -> bytes:
        outcome = self.resolve(path)
        assert isinstance(outcome, OpenFile), outcome
        return os.pread(outcome.fd, 1 << 20, 0)


class Files(Tree):
    def test_plain_file(self) -> None:
        outcome = self.resolve("hello.txt")
        assert isinstance(outcome, OpenFile)
        st = os.stat(os.path.join(self.home, "hello.txt"))
        self.assertEqual(
            (outcome.size, outcome.inode, outcome.mtime_ns), (5, st.st_ino, st.st_mtime_ns)
        )
        self.assertEqual(self.read("docs/deep/a.txt"), b"deep")

    def test_descriptor_is_blocking_and_closed_once(self) -> None:
        outcome = self.resolve("hello.txt")
        assert isinstance(outcome, OpenFile)
        self.assertTrue(os.get_blocking(outcome.fd))
        fd = outcome.fd
        outcome.close()
        outcome.close()
        with self.assertRaises(OSError) as caught:
            os.fstat(fd)
        self.assertEqual(caught.exception.errno, errno.EBADF)

    def test_missing_and_file_as_folder(self) -> None:
        self.assertIs(self.resolve("nope.txt"), MISSING)
        self.assertIs(self.resolve("nope/x"), MISSING)
        self.assertIs(self.resolve("hello.txt/x"), MISSING)
        self.assertIs(self.resolve("x" * 300), MISSING)  # ENAMETOOLONG

    def test_folders(self) -> None:
        self.assertEqual(self.resolve(""), Directory())
        self.assertEqual(self.resolve("docs/deep"), Directory())

    def test_no_descriptor_leaks(self) -> None:
        before = len(os.listdir("/proc/self/fd"))
        for path in ("hello.txt", "docs/deep/a.txt", "nope", "docs", "docs/deep/nope"):
            outcome = resolve(os.fsencode(self.home), seg(path), listing=True)
            if isinstance(outcome, OpenFile):
                outcome.close()
        self.assertEqual(len(os.listdir("/proc/self/fd")), before)

    def test_home_missing_or_not_a_folder(self) -> None:
        self.assertIs(resolve(os.fsencode(self.home + "-gone"), ()), NO_HOME)
        self.assertIs(resolve(os.fsencode(os.path.join(self.home, "hello.txt")), ()), NO_HOME)

    def test_home_given_through_a_symlink(self) -> None:
        alias = os.path.join(self.base, "alias")
        os.symlink(self.home, alias)
        outcome = resolve(os.fsencode(alias), seg("hello.txt"))
        assert isinstance(outcome, OpenFile)
        outcome.close()

    def test_error_mapping(self) -> None:
        self.assertIs(rawfs._problem_for(PermissionError(errno.EACCES, "x")), UNREADABLE)
        self.assertIs(rawfs._problem_for(OSError(errno.EPERM, "x")), UNREADABLE)
        self.assertIs(rawfs._problem_for(OSError(errno.ELOOP, "x")), LOOP)
        self.assertIs(rawfs._problem_for(OSError(errno.ENOENT, "x")), MISSING)
        for problem in (NO_HOME, MISSING, OUTSIDE, LOOP, UNREADABLE, NOT_REGULAR):
            self.assertNotIn("/", problem.detail)


class Symlinks(Tree):
    def test_to_file_outside_refused(self) -> None:
        self.link(os.path.join(self.outside, "secret.txt"), "abs-secret")
        self.link("../outside/secret.txt", "rel-secret")
        self.assertIs(self.resolve("abs-secret"), OUTSIDE)
        self.assertIs(self.resolve("rel-secret"), OUTSIDE)

    def test_to_folder_outside_refused(self) -> None:
        self.link(self.outside, "abs-dir")
        self.link("../outside", "rel-dir")
        self.link("/", "root")
        for path in ("abs-dir/secret.txt", "rel-dir/secret.txt", "root/etc/passwd", "abs-dir"):
            with self.subTest(path=path):
                self.assertIs(self.resolve(path), OUTSIDE)

    def test_deep_relative_link_climbing_out_refused(self) -> None:
        os.symlink("../../../outside/secret.txt", os.path.join(self.home, "docs", "deep", "up"))
        self.assertIs(self.resolve("docs/deep/up"), OUTSIDE)

    def test_absolute_target_normalising_outside_refused(self) -> None:
        self.link(self.home + "/../outside/secret.txt", "sneaky")
        self.assertIs(self.resolve("sneaky"), OUTSIDE)

    def test_links_inside_followed(self) -> None:
        self.link("hello.txt", "rel")
        self.link(os.path.join(self.home, "hello.txt"), "abs")
        self.link(os.path.realpath(os.path.join(self.home, "docs")), "abs-dir")
        os.symlink("../../hello.txt", os.path.join(self.home, "docs", "deep", "back"))
        os.symlink("../deep/./a.txt", os.path.join(self.home, "docs", "deep", "dots"))
        self.assertEqual(self.read("rel"), b"hello")
        self.assertEqual(self.read("abs"), b"hello")
        self.assertEqual(self.read("abs-dir/deep/a.txt"), b"deep")
        self.assertEqual(self.read("docs/deep/back"), b"hello")
        self.assertEqual(self.read("docs/deep/dots"), b"deep")
        self.assertEqual(self.resolve("abs-dir"), Directory())

    def test_link_to_home_itself(self) -> None:
        self.link(self.home, "self")
        self.link(".", "dot")
        self.assertEqual(self.read("self/hello.txt"), b"hello")
        self.assertEqual(self.read("dot/dot/hello.txt"), b"hello")

    def test_loops_are_clean_refusals(self) -> None:
        self.link("loop-b", "loop-a")
        self.link("loop-a", "loop-b")
        self.link("me", "me")
        self.link("spin/x", "spin")
        for path in ("loop-a", "loop-b", "me", "me/x", "spin"):
            with self.subTest(path=path):
                self.assertIs(self.resolve(path), LOOP)

    def test_long_chain_inside_is_a_loop(self) -> None:
        self.link("hello.txt", "c0")
        for i in range(1, rawfs.MAX_SYMLINKS + 1):
            self.link(f"c{i - 1}", f"c{i}")
        self.assertEqual(self.read(f"c{rawfs.MAX_SYMLINKS - 1}"), b"hello")
        self.assertIs(self.resolve(f"c{rawfs.MAX_SYMLINKS}"), LOOP)

    def test_dangling(self) -> None:
        self.link("nothing-here", "dangling")
        self.assertIs(self.resolve("dangling"), MISSING)


class SpecialFiles(Tree):
    timeout = 10

    def test_fifo_is_never_opened(self) -> None:
        os.mkfifo(os.path.join(self.home, "pipe"))
        started = time.monotonic()
        self.assertIs(self.resolve("pipe"), NOT_REGULAR)
        self.link("pipe", "to-pipe")
        self.assertIs(self.resolve("to-pipe"), NOT_REGULAR)
        self.assertLess(time.monotonic() - started, 2)

    def test_fifo_swapped_in_after_the_check_is_refused_without_blocking(self) -> None:
        """The last line of defence: open with O_NONBLOCK, then fstat."""
        os.mkfifo(os.path.join(self.home, "pipe"))
        home_fd = os.open(self.home, os.O_RDONLY | os.O_DIRECTORY)
        self.addCleanup(os.close, home_fd)
        before = len(os.listdir("/proc/self/fd"))
        self.assertIs(rawfs._open_regular(b"pipe", home_fd), NOT_REGULAR)
        self.assertEqual(len(os.listdir("/proc/self/fd")), before)

    def test_symlink_swapped_in_after_the_check_is_refused(self) -> None:
        self.link(os.path.join(self.outside, "secret.txt"), "swapped")
        home_fd = os.open(self.home, os.O_RDONLY | os.O_DIRECTORY)
        self.addCleanup(os.close, home_fd)
        with self.assertRaises(OSError) as caught:
            rawfs._open_regular(b"swapped", home_fd)
        self.assertEqual(caught.exception.errno, errno.ELOOP)

    def test_socket_is_never_opened(self) -> None:
        # AF_UNIX names are limited to about 100 bytes and the home's path may be longer (it
        # depends on where the checkout lives): bind through a short descriptor path instead.
        home_fd = os.open(self.home, os.O_RDONLY | os.O_DIRECTORY)
        self.addCleanup(os.close, home_fd)
        s = socket.socket(socket.AF_UNIX)
        self.addCleanup(s.close)
        s.bind(f"/proc/self/fd/{home_fd}/sock")
        self.assertTrue(stat.S_ISSOCK(os.lstat(os.path.join(self.home, "sock")).st_mode))
        self.assertIs(self.resolve("sock"), NOT_REGULAR)

    def test_device_is_never_opened(self) -> None:
        self.link("/dev/zero", "zero")  # a symlink to a device outside: refused as outside
        self.assertIs(self.resolve("zero"), OUTSIDE)
        os.mknod(os.path.join(self.home, "null"), stat.S_IFCHR | 0o600, os.makedev(1, 3))
        self.assertIs(self.resolve("null"), NOT_REGULAR)


class Listings(Tree):
    def listing(self, path: str = "", **kw: object) -> rawfs.Listing:
        outcome = self.resolve(path, listing=True, **kw)
        assert isinstance(outcome, Directory) and outcome.listing is not None, outcome
        return outcome.listing

    def test_folders_first_then_names(self) -> None:
        for name in ("b.txt", "A.txt", "c.txt"):
            self.write("home/" + name, b"12")
        os.mkdir(os.path.join(self.home, "zeta"))
        os.mkdir(os.path.join(self.home, "Alpha"))
        names = [e.name for e in self.listing().entries]
        self.assertEqual(
            names, [b"Alpha", b"docs", b"zeta", b"A.txt", b"b.txt", b"c.txt", b"hello.txt"]
        )

    def test_kinds_sizes_and_links_not_followed(self) -> None:
        self.link(os.path.join(self.outside, "secret.txt"), "secret-link")
        os.mkfifo(os.path.join(self.home, "pipe"))
        entries = {e.name: e for e in self.listing().entries}
        self.assertEqual(entries[b"hello.txt"].kind, "file")
        self.assertEqual(entries[b"hello.txt"].size, 5)
        self.assertEqual(entries[b"docs"].kind, "directory")
        self.assertIsNone(entries[b"docs"].size)
        # The link's own metadata only: nothing about the secret's size leaks.
        self.assertEqual(entries[b"secret-link"].kind, "symlink")
        self.assertIsNone(entries[b"secret-link"].size)
        self.assertEqual(entries[b"pipe"].kind, "other")
        self.assertAlmostEqual(
            entries[b"hello.txt"].mtime or 0, os.stat(os.path.join(self.home, "hello.txt")).st_mtime
        )

    def test_odd_names(self) -> None:
        names = [
            b"with space",
            "Ünïcødé ✓".encode(),
            b"<script>alert(1)<\\script>",
            b"\x22 onmouseover=\x22x",
            b"\xff\xfe",
        ]
        for name in names:
            with open(os.path.join(os.fsencode(self.home), name), "wb"):
                pass
        listed = {e.name for e in self.listing().entries}
        self.assertTrue(set(names) <= listed)

    def test_limit(self) -> None:
        for i in range(30):
            self.write(f"home/f{i:02}", b"")
        listing = self.listing(listing_limit=10)
        self.assertEqual(len(listing.entries), 10)
        self.assertEqual(listing.total, 32)
        self.assertEqual(listing.entries[0].name, b"docs")


# Names a generated tree may use; link targets also climb and jump out.
NAMES = ["a", "b", "f.txt"]
TARGETS = st.sampled_from(
    ["a", "b", "f.txt", "a/f.txt", "../a", "..", "../..", "../../outside", ".", "./b",
     "a/../b", "a/../../outside/s.txt", "/", "@home", "@home/a", "@home/..", "@home/../outside",
     "@outside", "@outside/s.txt", "../outside/s.txt"]
)  # fmt: skip
TREES = st.lists(
    st.tuples(
        st.lists(st.sampled_from(NAMES), min_size=1, max_size=2),
        st.sampled_from(["dir", "file", "link", "link"]),
        TARGETS,
    ),
    max_size=10,
)
# Every request path up to three names deep is tried against every generated tree.
REQUESTS = [()] + [tuple(p) for n in (1, 2, 3) for p in itertools.product(NAMES, repeat=n)]


def make_entry(home: str, parts: list[str], kind: str, target: str) -> None:
    """Create one generated entry without ever following a symlink: the generated links point
    outside, so building the tree through them would write outside the test's directory."""
    fds = [os.open(home, os.O_RDONLY | os.O_DIRECTORY)]
    try:
        for name in parts[:-1]:
            try:
                os.mkdir(name, dir_fd=fds[-1])
            except FileExistsError:
                pass
            fds.append(os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fds[-1]))
        last = parts[-1]
        if kind == "dir":
            os.mkdir(last, dir_fd=fds[-1])
        elif kind == "file":
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
            fd = os.open(last, flags, 0o644, dir_fd=fds[-1])
            os.write(fd, b"ok")
            os.close(fd)
        else:
            os.symlink(target, last, dir_fd=fds[-1])
    except OSError:
        pass  # the generated tree collides with itself (a name already taken, a link as folder)
    finally:
        for fd in fds:
            os.close(fd)


class Property(unittest.TestCase):
    """Whatever the tree and the links, an opened file is inside the home's real path."""

    @settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(TREES)
    def test_opened_files_are_inside_the_home(self, tree) -> None:  # type: ignore[no-untyped-def]
        base = os.path.abspath(self.mktemp())
        self.addCleanup(shutil.rmtree, base, True)
        home = os.path.join(base, "home")
        outside = os.path.join(base, "outside")
        os.makedirs(home)
        os.makedirs(outside)
        with open(os.path.join(outside, "s.txt"), "w") as f:
            f.write("secret")
        with open(os.path.join(home, "f.txt"), "w") as f:
            f.write("ok")
        for parts, kind, target in tree:
            target = target.replace("@home", home).replace("@outside", outside)
            make_entry(home, parts, kind, target)
        home_real = os.path.realpath(home)
        for request in REQUESTS:
            outcome = resolve(os.fsencode(home), tuple(n.encode() for n in request), listing=True)
            if isinstance(outcome, OpenFile):
                try:
                    real = os.readlink(f"/proc/self/fd/{outcome.fd}")
                    self.assertTrue(real.startswith(home_real + os.sep), (tree, request, real))
                    self.assertEqual(os.pread(outcome.fd, 100, 0), b"ok")
                finally:
                    outcome.close()
            elif isinstance(outcome, Directory):
                assert outcome.listing is not None
                names = {e.name for e in outcome.listing.entries}
                self.assertNotIn(b"s.txt", names, (tree, request))
            else:
                self.assertIsInstance(outcome, rawfs.Problem)
