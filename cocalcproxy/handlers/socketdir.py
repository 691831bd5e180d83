"""Unix-socket backends: a project's servers listen on ``<socket folder>/<port>``.

On a shared Unix host this is the isolation that works without containers: file permissions
decide who can listen and who can connect. Before each connection the proxy

1. opens the folder one component at a time from ``/`` with ``O_NOFOLLOW`` (a symbolic link
   anywhere on the way is refused) and checks every folder on the way: each must belong to root
   or the owner account and must not be writable by anyone else (a sticky folder such as /tmp
   is fine: nobody can rename another's entry in it);
2. checks the socket folder: it must not be writable by group or others (or another local user
   could put a socket there);
3. ``lstat``s the socket *inside the opened folder* (``fstatat``): it must be a socket (not a
   regular file, not a symbolic link), owned by the owner account (``--socket-owner``, else the
   folder's owner), and not connectable by other users (write permission on the socket together
   with permission to pass through the folder);
4. connects through ``/proc/self/fd/<folder>/<port>``, so the folder checked is the folder used:
   nobody can swap a folder on the way between the check and the connection. Only the owner
   (and root) can change the socket inside the checked folder, and they are trusted with it.

:func:`judge` is the pure rule, tested exhaustively; :func:`open_checked` gathers the facts.
"""

from __future__ import annotations

import os
import socket
import stat
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer, error
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.logger import Logger
from zope.interface import implementer

from cocalcproxy import pages
from cocalcproxy.handlers.backends import UnixTarget

# The namespace operators see in log lines (kept from before the package layout).
log = Logger(namespace="cocalcproxy.socketdir")

_O_PATH = getattr(os, "O_PATH", os.O_RDONLY)
_OPEN_FLAGS = _O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass(frozen=True)
class Facts:
    """What ``lstat`` says about one file."""

    mode: int
    uid: int
    gid: int
    dev: int = 0
    ino: int = 0

    @classmethod
    def of(cls, st: os.stat_result) -> Facts:
        return cls(st.st_mode, st.st_uid, st.st_gid, st.st_dev, st.st_ino)


class SocketRefused(Exception):
    """The socket (or its folder) may not be used; answered 502 with ``why``."""

    def __init__(self, target: UnixTarget, why: str) -> None:
        super().__init__(f"{target.path}: {why}")
        self.target = target
        self.why = why


class SocketMissing(error.ConnectError):
    """Nothing listens at the socket path (no such file): answered 502 with how to listen."""

    def __init__(self, target: UnixTarget) -> None:
        super().__init__(string=f"no socket at {target.path}")
        self.target = target


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISREG(mode):
        return "a regular file"
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a named pipe"
    return "not a socket"


def judge(
    ancestors: Sequence[tuple[str, Facts]],
    folder_path: str,
    folder: Facts,
    name: str,
    sock: Facts | None,
    required_owner: int | None,
    proxy_gid: int,
    own_sockets: frozenset[tuple[int, int]] = frozenset(),
) -> str | None:
    """Why the socket ``folder_path/name`` must not be used, or None when it may be.

    ``sock`` None means there is no such file (nothing listens): the caller answers that itself.
    ``own_sockets`` holds (device, inode) of the proxy's own Unix listeners.
    """
    owner = folder.uid if required_owner is None else required_owner
    for path, facts in ancestors:
        if not stat.S_ISDIR(facts.mode):
            return f"{path} is not a folder"
        if facts.uid not in (0, owner):
            return (
                f"the folder {path} on the way belongs to uid {facts.uid}: every folder on the "
                f"way must belong to root or the owner (uid {owner})"
            )
        if facts.mode & 0o022 and not facts.mode & stat.S_ISVTX:
            return (
                f"the folder {path} on the way is writable by group or others (and not sticky): "
                "someone else could swap the folders below it"
            )
    if not stat.S_ISDIR(folder.mode):
        return f"{folder_path} is not a folder"
    if folder.uid not in (0, owner):
        return f"the socket folder {folder_path} belongs to uid {folder.uid}, not uid {owner}"
    if folder.mode & 0o022:
        return (
            f"the socket folder {folder_path} is writable by group or others: another user "
            "could put a socket there (chmod go-w)"
        )
    if sock is None:
        return None
    path = f"{folder_path.rstrip('/')}/{name}"
    if not stat.S_ISSOCK(sock.mode):
        return f"{path} is {_kind(sock.mode)}, not a socket"
    if sock.uid != owner:
        return f"the socket {path} belongs to uid {sock.uid}, not to the owner (uid {owner})"
    if (sock.dev, sock.ino) in own_sockets:
        return f"{path} is one of the proxy's own listeners"
    pass_others = bool(folder.mode & 0o001)
    pass_group = bool(folder.mode & 0o010) and folder.gid != proxy_gid
    if sock.mode & 0o002 and (pass_others or pass_group):
        return (
            f"any local user can connect to {path}: take write permission from others on the "
            "socket, or search permission on the folder (chmod o-x)"
        )
    if sock.mode & 0o020 and sock.gid != proxy_gid and (pass_others or pass_group):
        return (
            f"members of group {sock.gid} can connect to {path}: make the folder's or the "
            "socket's group the proxy's, or take their permissions away"
        )
    return None


def open_checked(target: UnixTarget, own_paths: frozenset[str] = frozenset()) -> tuple[int, str]:
    """Open the target's folder safely and check it and the socket (see the module doc).

    Returns (folder descriptor, socket name); the caller closes the descriptor. Raises
    :class:`SocketRefused` or :class:`SocketMissing`.
    """
    parts = [part for part in target.directory.split("/") if part]
    name = str(target.port)
    fd = os.open("/", _OPEN_FLAGS)
    try:
        ancestors: list[tuple[str, Facts]] = []
        path = ""
        for part in parts:
            ancestors.append((path or "/", Facts.of(os.fstat(fd))))
            path += "/" + part
            try:
                child = os.open(part, _OPEN_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                raise SocketRefused(target, f"the folder {path} does not exist") from None
            except PermissionError:
                raise SocketRefused(
                    target,
                    f"the proxy may not reach {path}: give it search permission on the "
                    "folders on the way (chmod g+x, with the proxy's group)",
                ) from None
            except OSError as e:
                raise SocketRefused(
                    target, f"{path} is not a folder or is a symbolic link ({e.strerror})"
                ) from None
            os.close(fd)
            fd = child
        folder = Facts.of(os.fstat(fd))
        try:
            sock: Facts | None = Facts.of(os.stat(name, dir_fd=fd, follow_symlinks=False))
        except FileNotFoundError:
            sock = None
        except PermissionError:
            raise SocketRefused(
                target,
                f"the proxy may not look into {path or '/'}: give it search permission there "
                "(chmod g+x, with the proxy's group)",
            ) from None
        own: set[tuple[int, int]] = set()
        for own_path in own_paths:
            try:
                st = os.stat(own_path)
            except OSError:
                continue
            own.add((st.st_dev, st.st_ino))
        why = judge(
            ancestors,
            path or "/",
            folder,
            name,
            sock,
            target.owner,
            os.getegid(),
            frozenset(own),
        )
        if why is not None:
            raise SocketRefused(target, why)
        if sock is None:
            raise SocketMissing(target)
        return fd, name
    except BaseException:
        os.close(fd)
        raise


@implementer(IStreamClientEndpoint)
class SocketEndpoint:
    """Connects to a project's Unix socket after :func:`open_checked`, through the opened
    folder (``/proc/self/fd/N/<port>``), so what was checked is what is used."""

    def __init__(
        self,
        reactor: Any,
        target: UnixTarget,
        *,
        timeout: float = 10.0,
        own_paths: frozenset[str] = frozenset(),
    ) -> None:
        self.reactor = reactor
        self.target = target
        self.timeout = timeout
        self.own_paths = own_paths

    def connect(self, factory: Any) -> defer.Deferred[Any]:
        try:
            fd, name = open_checked(self.target, self.own_paths)
        except SocketRefused as e:
            log.warn("socket backend refused: {why}", why=str(e))
            return defer.fail(e)
        except SocketMissing as e:
            return defer.fail(e)
        except OSError as e:
            return defer.fail(SocketRefused(self.target, f"cannot inspect it ({e.strerror})"))
        via = f"/proc/self/fd/{fd}/{name}" if os.path.isdir("/proc/self/fd") else self.target.path
        try:
            owner = self.target.owner if self.target.owner is not None else os.fstat(fd).st_uid
            d: defer.Deferred[Any] = UNIXClientEndpoint(
                self.reactor, via, timeout=int(max(1, self.timeout))
            ).connect(factory)
        except BaseException:
            os.close(fd)
            raise

        def close(result: Any) -> Any:
            os.close(fd)
            return result

        return d.addBoth(close).addCallback(self._verify_peer, owner)

    def _verify_peer(self, protocol: Any, owner: int) -> Any:
        """The server that accepted must run as the owner (or root, who may create sockets
        for others, as systemd's socket units do).

        The owner can swap the socket for a symbolic link between the check and the
        connection (connect follows links): without this, a folder's owner could race the
        proxy into another user's socket, which only the proxy may reach. The kernel's
        record of the listening process (SO_PEERCRED) cannot be swapped."""
        transport = getattr(protocol, "transport", None)
        peercred = getattr(socket, "SO_PEERCRED", None)
        if peercred is None or transport is None:
            return protocol
        handle = transport.getHandle()
        size = struct.calcsize("3i")
        _pid, uid, _gid = struct.unpack("3i", handle.getsockopt(socket.SOL_SOCKET, peercred, size))
        if uid in (0, owner):
            return protocol
        transport.abortConnection()
        refused = SocketRefused(
            self.target,
            f"the server that answered runs as uid {uid}, not as the owner (uid {owner}): the "
            "socket was replaced while the proxy connected",
        )
        log.warn("socket backend refused: {why}", why=str(refused))
        raise refused


HOW_TO_LISTEN = (
    "Jupyter: jupyter lab --ServerApp.sock={path} --ServerApp.sock_mode=0660; "
    "uvicorn (FastAPI): uvicorn app:app --uds {path}; "
    "gunicorn (Flask): gunicorn --bind unix:{path} app:app."
)


def write_refused(request: Any, refused: SocketRefused, **facts: object) -> None:
    """502 for a socket the proxy will not use: which path, why, and what would be accepted."""
    request.log_info.extra["backend"] = "socket-refused"
    pages.write_error(
        request,
        502,
        "The project's socket was refused",
        f"The proxy tried the socket {refused.target.path} and refused it: {refused.why}. "
        "The socket folder must belong to the project's owner and be writable by nobody else, "
        "and the socket must be a socket owned by that account.",
        socket=refused.target.path,
        **facts,
    )


def write_not_listening(request: Any, target: UnixTarget, **facts: object) -> None:
    """502 when nothing listens on the socket: which path, and how to make an app listen."""
    request.log_info.extra["backend"] = "refused"
    pages.write_error(
        request,
        502,
        "Nothing is answering",
        f"Nothing listens on the socket {target.path}, which this project's port "
        f"{target.port} is served from. Start the server in the project listening there: "
        + HOW_TO_LISTEN.format(path=target.path),
        socket=target.path,
        **facts,
    )
