"""Blocking file system work for the raw file server; run it in a worker thread.

Resolution walks the checked segments one at a time from an open descriptor of the home
directory, the way the kernel's ``openat2(RESOLVE_IN_ROOT)`` would, but portably:

* each directory is opened with ``O_DIRECTORY | O_NOFOLLOW`` relative to its parent's descriptor,
  so swapping a component for a symlink between our check and our open fails instead of
  redirecting us (no time-of-check/time-of-use window as with ``realpath`` then ``open``);
* a symlink is read with ``readlink`` and its target resolved by the same walk: a relative
  target continues from the directory holding the link, ``..`` pops our own stack of
  descriptors (never the file system's ``..``), and may not climb above the home; an absolute
  target is accepted only when it lies inside the home's real path; more than
  ``MAX_SYMLINKS`` expansions is a loop;
* only a regular file is ever opened, with ``O_NONBLOCK | O_NOFOLLOW | O_NOCTTY`` and checked
  again with ``fstat`` afterwards, so a FIFO, socket or device swapped in at the last moment is
  neither blocked on nor served.

Nothing here raises for a user's path: every outcome is a value. No Twisted imports.
"""

from __future__ import annotations

import errno
import os
import stat
from collections import deque
from dataclasses import dataclass, field

MAX_SYMLINKS = 40
LISTING_LIMIT = 10_000

_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_NOCTTY = getattr(os, "O_NOCTTY", 0)
_O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_DIR_FLAGS = os.O_RDONLY | _O_DIRECTORY | os.O_NOFOLLOW | _O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | _O_NOCTTY | _O_CLOEXEC


@dataclass(eq=False)
class OpenFile:
    """An open regular file; ``close`` is idempotent, so every path may call it."""

    fd: int
    size: int
    inode: int
    mtime: float
    mtime_ns: int
    closed: bool = False

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            os.close(self.fd)


@dataclass(frozen=True)
class Entry:
    name: bytes
    kind: str  # "directory", "file", "symlink" or "other"
    size: int | None
    mtime: float | None


@dataclass(frozen=True)
class Listing:
    entries: tuple[Entry, ...]
    total: int  # entries in the directory; more than len(entries) when truncated


@dataclass(frozen=True)
class Directory:
    listing: Listing | None = None


@dataclass(frozen=True)
class Problem:
    """A refusal: ``status`` and fixed text safe to show (no server paths)."""

    status: int
    title: str
    detail: str
    facts: dict[str, object] = field(default_factory=dict)


NO_HOME = Problem(404, "Not found", "The project's home directory is not available.")
MISSING = Problem(404, "Not found", "There is no such file or folder.")
OUTSIDE = Problem(404, "Not found", "There is no such file or folder.")
LOOP = Problem(404, "Not found", "Too many levels of symbolic links.")
UNREADABLE = Problem(403, "Forbidden", "The file or folder cannot be read.")
NOT_REGULAR = Problem(403, "Forbidden", "This is not a regular file or folder.")

Outcome = OpenFile | Directory | Problem


def _problem_for(error: OSError) -> Problem:
    if error.errno in (errno.EACCES, errno.EPERM):
        return UNREADABLE
    if error.errno == errno.ELOOP:
        return LOOP
    return MISSING


def resolve(
    home: bytes,
    segments: tuple[bytes, ...],
    *,
    listing: bool = False,
    listing_limit: int = LISTING_LIMIT,
) -> Outcome:
    """Find ``segments`` below ``home``; open a regular file or (optionally) list a folder."""
    try:
        root = os.open(home, os.O_RDONLY | _O_DIRECTORY | _O_CLOEXEC)
    except OSError:
        return NO_HOME
    stack = [root]
    try:
        return _walk(home, stack, deque(segments), listing, listing_limit)
    except OSError as e:
        return _problem_for(e)
    finally:
        for fd in stack:
            os.close(fd)


def _walk(
    home: bytes, stack: list[int], pending: deque[bytes], listing: bool, limit: int
) -> Outcome:
    links = 0
    home_real: bytes | None = None
    while pending:
        name = pending.popleft()
        if name in (b"", b"."):
            continue  # only reachable through a symlink target such as "a//b" or "./b"
        if name == b"..":
            if len(stack) == 1:
                return OUTSIDE
            os.close(stack.pop())
            continue
        here = stack[-1]
        st = os.stat(name, dir_fd=here, follow_symlinks=False)
        if stat.S_ISLNK(st.st_mode):
            links += 1
            if links > MAX_SYMLINKS:
                return LOOP
            target = os.readlink(name, dir_fd=here)
            if target.startswith(b"/"):
                if home_real is None:
                    home_real = os.path.realpath(home)
                inside = _below(target, home_real)
                if inside is None:
                    inside = _below(target, os.path.abspath(home))
                if inside is None:
                    return OUTSIDE
                while len(stack) > 1:
                    os.close(stack.pop())
                target = inside
            pending.extendleft(reversed(target.split(b"/")))
            continue
        if stat.S_ISDIR(st.st_mode):
            stack.append(os.open(name, _DIR_FLAGS, dir_fd=here))
            continue
        if pending:
            return MISSING  # a file used as a folder ("a.txt/b", or "a.txt/" via a link)
        if not stat.S_ISREG(st.st_mode):
            return NOT_REGULAR  # FIFO, socket, device: never opened
        return _open_regular(name, here)
    if listing:
        return Directory(list_directory(stack[-1], limit))
    return Directory()


def _below(target: bytes, home_real: bytes) -> bytes | None:
    """The part of an absolute symlink target below the home, or None if it is outside."""
    normal = os.path.normpath(target)
    if normal == home_real:
        return b""
    prefix = home_real.rstrip(b"/") + b"/"
    if normal.startswith(prefix):
        # Resolve the original (un-normalised) remainder: its ".." must be walked, not folded.
        return target[len(prefix) :] if target.startswith(prefix) else normal[len(prefix) :]
    return None


def _open_regular(name: bytes, directory: int) -> Outcome:
    fd = os.open(name, _FILE_FLAGS, dir_fd=directory)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            return NOT_REGULAR
        os.set_blocking(fd, True)
    except OSError:
        os.close(fd)
        raise
    return OpenFile(fd, st.st_size, st.st_ino, st.st_mtime, st.st_mtime_ns)


def list_directory(fd: int, limit: int = LISTING_LIMIT) -> Listing:
    """Entries of an open directory: folders first, then by name; at most ``limit`` stat'ed.

    Symlinks are shown as links (their own lstat), never followed: a listing must not reveal
    the size or time of something outside the home.
    """
    with os.scandir(fd) as it:
        found = [(entry.name, entry.is_dir(follow_symlinks=False)) for entry in it]
    found.sort(key=lambda item: (not item[1], item[0].lower(), item[0]))
    entries = []
    for name, _is_dir in found[:limit]:
        name_b = os.fsencode(name)
        try:
            st = os.stat(name_b, dir_fd=fd, follow_symlinks=False)
        except OSError:
            continue  # vanished while listing
        mode = st.st_mode
        if stat.S_ISDIR(mode):
            entries.append(Entry(name_b, "directory", None, st.st_mtime))
        elif stat.S_ISREG(mode):
            entries.append(Entry(name_b, "file", st.st_size, st.st_mtime))
        elif stat.S_ISLNK(mode):
            entries.append(Entry(name_b, "symlink", None, st.st_mtime))
        else:
            entries.append(Entry(name_b, "other", None, st.st_mtime))
    return Listing(tuple(entries), len(found))
