"""Which backend a project route may reach: the one pure decision. No Twisted imports.

A route names a project and a port; the directory says where the project's servers run (a host,
or a folder of Unix sockets) and which ports it may use. :func:`decide` turns (route, project,
policy) into a :class:`TcpTarget`, a :class:`UnixTarget` or a :class:`Refused`; a refusal is
answered exactly like an unknown project (404), so it tells nothing. It is called by the guard's
wrapper (before any body is read) and again by the forwarder and the relay (before they
connect), so no path reaches a backend without it.

The rules, in order (the reasons are in docs/security.rst):

1. The port must be in the project's port set: its own (``project set --ports``) or else the
   operator's ``--default-ports``. The default ``auto`` is every unprivileged port (1024-65535)
   for a project alone on its host, and *no port at all* for a project that may share its host
   with another project: two projects with the same host, or a project on this machine while
   the directory holds any other project (another project's host may name this machine as a
   LAN address or a name that resolves here; a host name is judged once it resolves). On a
   shared host one project's members could otherwise reach the other's servers. Such a project needs
   its own ``--ports`` or a ``--socket-dir``. A project with a socket folder gets every port
   name (its folder is its own).
2. TCP only: never a port on the operator's deny list (``--deny-ports``; infrastructure such as
   databases, caches, the Docker API and the kubelet).
3. TCP only: never one of the proxy's own listeners (:class:`OwnListeners`: the HTTPS, redirect
   and metrics listeners, the directory's database, and whatever else registers) on an address
   of this machine. Host names are judged by the addresses they resolve to, after resolution
   and before connecting (:func:`screen`), so a name that resolves to 127.0.0.1 counts as local.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

from cocalcproxy.directory.addresses import always_local, ip_of, same_ip, unmapped
from cocalcproxy.directory.model import Project
from cocalcproxy.directory.ports import ALL, NONE, UNPRIVILEGED, PortSet, parse_ports
from cocalcproxy.http import routing

#: Infrastructure that must never be reached through a project route, whatever its port set.
#: Each is a service whose protocol or HTTP API gives control over the machine, the cluster or
#: its data; see docs/security.rst for the list with names.
DEFAULT_DENY_PORTS = (
    "22,23,25,53,111,135,139,445,465,587,1883,2049,2181,2375-2376,2379-2380,3306,4222,5432,"
    "5672,5984,6379,6443,8200,8500,9042,9092,9200,9300,10250,10255,11211,15672,26379,27017"
)
DEFAULT_DENY = parse_ports(DEFAULT_DENY_PORTS)

#: Answers "is this IP address one of this machine's?" for an IP literal.
IsLocal = Callable[[str], bool]


@dataclass(frozen=True)
class TcpTarget:
    """``host:port``. ``remote_only``: the port was allowed only because the project seems alone
    on its host, which for a host *name* is known only once it resolves: if it resolves to this
    machine while the directory holds other projects, the connection is refused."""

    host: str
    port: int
    remote_only: bool = False


@dataclass(frozen=True)
class UnixTarget:
    """The socket ``<directory>/<port>``; ``owner`` is the required owner uid (None: the
    folder's owner)."""

    directory: str
    port: int
    owner: int | None

    @property
    def path(self) -> str:
        return f"{self.directory.rstrip('/') or ''}/{self.port}"


@dataclass(frozen=True)
class Refused:
    """``reason`` is a word for the access log; ``detail`` one line for the operator."""

    reason: str
    detail: str


Target = TcpTarget | UnixTarget


@dataclass(frozen=True)
class _Own:
    label: str
    port: int | None
    address: str | None  # None: every address of this machine
    path: str | None


class OwnListeners:
    """The one registry of the proxy's own endpoints, which no project route may reach.

    Listeners add themselves when they are bound (the service does this for HTTPS, redirect and
    metrics; an admin API or worker listener does the same) and remove themselves when they
    stop. A TCP entry without an address is protected on every address of this machine; one
    with an address (a remote database) only there.
    """

    def __init__(self) -> None:
        self._entries: dict[int, _Own] = {}
        self._ids = itertools.count(1)

    def add(
        self,
        label: str,
        *,
        port: int | None = None,
        address: str | None = None,
        path: str | None = None,
    ) -> Callable[[], None]:
        """Register an endpoint; returns the function that removes it again."""
        key = next(self._ids)
        self._entries[key] = _Own(label, port, address, path)

        def remove() -> None:
            self._entries.pop(key, None)

        return remove

    def entries(self) -> list[tuple[str, int | None, str | None, str | None]]:
        return [(e.label, e.port, e.address, e.path) for e in self._entries.values()]

    def local_ports(self) -> frozenset[int]:
        return frozenset(
            e.port for e in self._entries.values() if e.port is not None and e.address is None
        )

    def paths(self) -> frozenset[str]:
        return frozenset(e.path for e in self._entries.values() if e.path is not None)

    def owner_of(self, ip: str, port: int, local: bool) -> str | None:
        """The label of the own endpoint at ``ip:port`` (``local``: ip is this machine's)."""
        for e in self._entries.values():
            if e.port != port:
                continue
            if e.address is None and local:
                return e.label
            if e.address is not None and same_ip(e.address, ip):
                return e.label
        return None


@dataclass(frozen=True)
class Policy:
    """The operator's rules. ``default_ports`` None means ``auto`` (see the module doc)."""

    default_ports: PortSet | None = None
    deny_ports: PortSet = DEFAULT_DENY
    own: OwnListeners = field(default_factory=OwnListeners)


# --- addresses -----------------------------------------------------------------------------------


def host_is_local(host: str, is_local: IsLocal) -> bool | None:
    """True/False for a local name or an IP literal; None for other names (resolve first)."""
    if always_local(host):
        return True
    ip = ip_of(host)
    if ip is None:
        return None
    return is_local(str(unmapped(ip)))


# --- the decision --------------------------------------------------------------------------------


AUTO_ALONE = "the default for a project alone on its host"


def ports_for(project: Project, policy: Policy, is_local: IsLocal) -> tuple[PortSet, str]:
    """The project's port set and where it comes from (for messages)."""
    if project.ports is not None:
        return project.ports, "the project's own port set"
    if policy.default_ports is not None:
        return policy.default_ports, "--default-ports"
    if project.socket_dir is not None:
        return ALL, "the default for a project with a socket folder"
    if is_shared(project, is_local):
        return NONE, "the default for a project that shares its host"
    return UNPRIVILEGED, AUTO_ALONE


def is_shared(project: Project, is_local: IsLocal) -> bool:
    """May another project run on the same host? Same host text; or the host is this machine
    and the directory holds any other project. Another project's host can name this machine in
    a spelling that cannot be matched here (a LAN address beside 127.0.0.1, a name that
    resolves here), so on this machine only a directory's single project counts as alone."""
    if project.shares_host:
        return True
    return project.other_projects > 0 and host_is_local(project.host, is_local) is True


def on_this_machine_refused(host: str, address: str) -> Refused:
    """A host name that resolved to this machine, for a project given ports as if alone."""
    return Refused(
        "port-not-allowed",
        f"host {host} resolves to this machine ({address}), which other "
        "projects may share, so it has no default ports; give it its own port set "
        "(cocalcproxy project set PID --ports LIST) or a socket folder (--socket-dir DIR)",
    )


def decide(
    route: routing.Route, project: Project, policy: Policy, is_local: IsLocal
) -> Target | Refused:
    """Where this route of this project goes, or why it goes nowhere."""
    port = route.port
    if port is None or route.kind == "raw":
        return Refused("not-a-port-route", "raw routes have no backend")
    allowed, source = ports_for(project, policy, is_local)
    if port not in allowed:
        hint = ""
        if not allowed and source.endswith("shares its host"):
            hint = (
                f"; another project may run on its host {project.host} (the same host, or this "
                "machine, which other projects may name differently), so it needs its own "
                "port set (cocalcproxy project set PID --ports LIST) or a socket folder "
                "(--socket-dir DIR)"
            )
        return Refused(
            "port-not-allowed",
            f"project {project.id}: port {port} is not in {source} ({allowed}){hint}",
        )
    if project.socket_dir is not None:
        return UnixTarget(project.socket_dir, port, project.socket_owner)
    if port in policy.deny_ports:
        return Refused(
            "port-denied", f"project {project.id}: port {port} is on the deny list (--deny-ports)"
        )
    label = policy.own.owner_of("127.0.0.1", port, True)
    if label is not None and host_is_local(project.host, is_local):
        return Refused(
            "own-listener",
            f"project {project.id}: port {port} on {project.host} is the proxy's own {label}",
        )
    remote_only = (
        source == AUTO_ALONE
        and project.other_projects > 0
        and host_is_local(project.host, is_local) is None
    )
    return TcpTarget(project.host, port, remote_only)


def screen(ip: str, port: int, policy: Policy, is_local: IsLocal) -> Refused | None:
    """Judge one resolved address of a TCP target just before connecting to it."""
    parsed = ip_of(ip)
    if parsed is None:
        return Refused("own-listener", f"{ip!r} is not an IP address")
    address = str(unmapped(parsed))
    if port in policy.deny_ports:
        return Refused("port-denied", f"port {port} is on the deny list (--deny-ports)")
    local = always_local(address) or is_local(address)
    label = policy.own.owner_of(address, port, local)
    if label is not None:
        return Refused("own-listener", f"{address}:{port} is the proxy's own {label}")
    return None
