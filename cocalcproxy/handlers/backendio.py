"""The Twisted side of the backend policy (handlers.backends): where decisions meet sockets.

* :class:`Backends` holds the operator's :class:`~.backends.Policy`, makes the one
  decision for a route (``decide``) and the client endpoint for its target (``endpoint``):
  TCP through :class:`_ScreenedTCPEndpoint`, which judges every address a host name resolves to
  and connects only to those very addresses (no second lookup, so a name cannot resolve to a
  harmless address for the check and to 127.0.0.1 for the connection); Unix sockets through
  :class:`.socketdir.SocketEndpoint`, which checks the folder and the socket first.
* :class:`PolicyGuard` wraps the guard, so a route the policy refuses is answered with the same
  404 as an unknown project, before any request body is read.
* :func:`is_local_address`: is an IP address one of this machine's?
"""

from __future__ import annotations

import socket
import weakref
from collections.abc import Callable
from ipaddress import IPv4Address
from typing import Any

from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint
from twisted.internet.interfaces import (
    IHostnameResolver,
    IReactorPluggableNameResolver,
    IResolutionReceiver,
    IStreamClientEndpoint,
)
from twisted.logger import Logger
from zope.interface import implementer

from cocalcproxy import pages
from cocalcproxy.directory.addresses import always_local, ip_of, unmapped
from cocalcproxy.directory.model import Project
from cocalcproxy.handlers import backends, socketdir
from cocalcproxy.http import routing

# The namespace operators see in log lines (kept from before the package layout).
log = Logger(namespace="cocalcproxy.backendio")

#: Endpoints kept for reuse (building one costs an IDNA encoding); emptied when full.
ENDPOINT_CACHE_SIZE = 4096
#: Seconds an answer of is_local_address is reused (an address may be added to an interface).
LOCAL_ANSWER_SECONDS = 10.0


def is_local_address(ip: str) -> bool:
    """Is ``ip`` an address of this machine? Only a local address can be bound, so bind a UDP
    socket to it (port 0, nothing is sent). Loopback and unspecified addresses always count."""
    if always_local(ip):
        return True
    parsed = ip_of(ip)
    if parsed is None:
        return False
    parsed = unmapped(parsed)
    family = socket.AF_INET6 if parsed.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.bind((str(parsed), 0))
    except OSError:
        return False
    return True


class BackendRefused(Exception):
    """The policy refused the backend (answered 404, like an unknown project)."""

    def __init__(self, refusal: backends.Refused) -> None:
        super().__init__(refusal.detail)
        self.refusal = refusal


@implementer(IStreamClientEndpoint)
class _Refusing:
    def __init__(self, refusal: backends.Refused) -> None:
        self.refusal = refusal

    def connect(self, factory: Any) -> defer.Deferred[Any]:
        return defer.fail(BackendRefused(self.refusal))


@implementer(IResolutionReceiver)
class _ScreeningReceiver:
    """Collects every resolved address; passes them on only when none is refused."""

    def __init__(self, receiver: Any, judge: Callable[[str], backends.Refused | None]) -> None:
        self.receiver = receiver
        self.judge = judge
        self.addresses: list[Any] = []
        self.refusal: backends.Refused | None = None

    def resolutionBegan(self, resolution: Any) -> None:  # noqa: N802
        self.receiver.resolutionBegan(resolution)

    def addressResolved(self, address: Any) -> None:  # noqa: N802
        self.addresses.append(address)

    def resolutionComplete(self) -> None:  # noqa: N802
        for address in self.addresses:
            self.refusal = self.judge(str(getattr(address, "host", "")))
            if self.refusal is not None:
                break
        if self.refusal is None:
            for address in self.addresses:
                self.receiver.addressResolved(address)
        self.receiver.resolutionComplete()


@implementer(IHostnameResolver)
class _ScreeningResolver:
    def __init__(self, real: Any, judge: Callable[[str], backends.Refused | None]) -> None:
        self.real = real
        self.judge = judge
        self.last: _ScreeningReceiver | None = None

    def resolveHostName(  # noqa: N802
        self,
        resolutionReceiver: Any,  # noqa: N803
        hostName: str,  # noqa: N803
        portNumber: int = 0,  # noqa: N803
        addressTypes: Any = None,  # noqa: N803
        transportSemantics: str = "TCP",  # noqa: N803
    ) -> Any:
        screening = _ScreeningReceiver(resolutionReceiver, self.judge)
        self.last = screening
        return self.real.resolveHostName(
            screening, hostName, portNumber, addressTypes, transportSemantics
        )


@implementer(IReactorPluggableNameResolver)
class _ReactorResolvingVia:
    """The reactor, with another name resolver (HostnameEndpoint asks the reactor for it)."""

    def __init__(self, reactor: Any, resolver: _ScreeningResolver) -> None:
        self._reactor = reactor
        self.nameResolver = resolver

    def installNameResolver(self, resolver: Any) -> Any:  # noqa: N802
        raise NotImplementedError("a screening reactor's resolver is fixed")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)


@implementer(IStreamClientEndpoint)
class _ScreenedTCPEndpoint:
    """HostnameEndpoint to a host name whose resolved addresses are judged first."""

    def __init__(self, owner: Backends, host: str, port: int, remote_only: bool = False) -> None:
        self.owner = owner
        self.host = host
        self.port = port
        self.remote_only = remote_only

    def judge(self, ip: str) -> backends.Refused | None:
        refusal = self.owner.screen(ip, self.port)
        if refusal is None and self.remote_only and self.owner.is_local(ip):
            refusal = backends.on_this_machine_refused(self.host, ip)
        return refusal

    def connect(self, factory: Any) -> defer.Deferred[Any]:
        owner = self.owner
        resolver = _ScreeningResolver(owner.reactor.nameResolver, self.judge)
        endpoint = HostnameEndpoint(
            _ReactorResolvingVia(owner.reactor, resolver),
            self.host,
            self.port,
            timeout=owner.connect_timeout,
        )
        d: defer.Deferred[Any] = endpoint.connect(factory)

        def refused(failure: Any) -> Any:
            screening = resolver.last
            if screening is not None and screening.refusal is not None:
                raise BackendRefused(screening.refusal)
            return failure

        return d.addErrback(refused)


class Backends:
    """The policy in force and the endpoints it allows; one per proxy."""

    def __init__(
        self,
        reactor: Any,
        policy: backends.Policy | None = None,
        *,
        connect_timeout: float = 10.0,
        is_local: backends.IsLocal = is_local_address,
        socket_endpoint: Callable[[backends.UnixTarget], Any] | None = None,
    ) -> None:
        self.reactor = reactor
        self.policy = policy if policy is not None else backends.Policy()
        self.connect_timeout = connect_timeout
        self._is_local = is_local
        self._local_answers: dict[str, tuple[bool, float]] = {}
        self._socket_endpoint = socket_endpoint
        self._endpoints: dict[tuple[str, int, bool], Any] = {}

    def is_local(self, ip: str) -> bool:
        """``is_local_address``, its answers kept for a few seconds (it makes a socket)."""
        if always_local(ip):
            return True
        now = self.reactor.seconds()
        found = self._local_answers.get(ip)
        if found is not None and found[1] > now:
            return found[0]
        if len(self._local_answers) >= ENDPOINT_CACHE_SIZE:
            self._local_answers.clear()
        answer = self._is_local(ip)
        self._local_answers[ip] = (answer, now + LOCAL_ANSWER_SECONDS)
        return answer

    def decide(self, route: routing.Route, project: Project) -> backends.Target | backends.Refused:
        return backends.decide(route, project, self.policy, self.is_local)

    def screen(self, ip: str, port: int) -> backends.Refused | None:
        return backends.screen(ip, port, self.policy, self.is_local)

    def endpoint(self, target: backends.Target) -> Any:
        """The client endpoint for a target the policy allowed; connecting may still fail with
        :class:`BackendRefused` (a host name that resolves to a refused address)."""
        if isinstance(target, backends.UnixTarget):
            if self._socket_endpoint is not None:
                return self._socket_endpoint(target)
            return socketdir.SocketEndpoint(
                self.reactor,
                target,
                timeout=self.connect_timeout,
                own_paths=self.policy.own.paths(),
            )
        if ip_of(target.host) is not None:
            refusal = self.screen(target.host, target.port)
            if refusal is not None:
                return _Refusing(refusal)
        key = (target.host, target.port, target.remote_only)
        found = self._endpoints.get(key)
        if found is None:
            if len(self._endpoints) >= ENDPOINT_CACHE_SIZE:
                self._endpoints.clear()
            literal = ip_of(target.host)
            if isinstance(literal, IPv4Address) and str(literal) == target.host:
                # An IPv4 literal needs no name resolution: HostnameEndpoint would still send
                # it through getaddrinfo in the reactor's thread pool for every new connection.
                found = TCP4ClientEndpoint(
                    self.reactor, target.host, target.port, timeout=self.connect_timeout
                )
            elif literal is not None:
                found = HostnameEndpoint(
                    self.reactor, target.host, target.port, timeout=self.connect_timeout
                )
            else:
                found = _ScreenedTCPEndpoint(self, target.host, target.port, target.remote_only)
            self._endpoints[key] = found
        return found


def refuse(request: Any, refusal: backends.Refused) -> None:
    """Answer a refused route exactly like an unknown project, with one log line."""
    request.log_info.extra["backend"] = refusal.reason
    log.info("route refused ({reason}): {detail}", reason=refusal.reason, detail=refusal.detail)
    if not request.finished and not request.startedWriting and not request._disconnected:
        pages.not_found(request)


class PolicyGuard:
    """The guard, then the backend policy: a refused route gets the unknown project's 404.

    Everything else (the guard's caches, sign-in helpers) is the wrapped guard's.
    """

    def __init__(self, guard: Any, backends_: Backends) -> None:
        self._guard = guard
        self.backends = backends_
        # What each granted Access was allowed to reach, so a change to the project (its port
        # set, socket folder or host) cuts open WebSocket relays that no longer fit.
        self._granted: weakref.WeakKeyDictionary[Any, tuple[routing.Route, backends.Target]] = (
            weakref.WeakKeyDictionary()
        )
        if hasattr(guard, "still_allowed"):
            guard.still_allowed = self.still_allowed

    def still_allowed(self, access: Any, project: Project) -> bool:
        granted = self._granted.get(access)
        if granted is None:
            return True
        route, target = granted
        return self.backends.decide(route, project) == target

    def authorize(self, request: Any, route: routing.Route) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = self._guard.authorize(request, route)
        return d.addCallback(self._judge, request, route)

    def lane_access(self, request: Any, route: routing.Route) -> Any:
        """The fast lane's decision (cocalcproxy.http.lane): an Access when the guard's caches
        say yes and the policy allows the route (the target is kept on the request for the
        forwarder), else None, with nothing counted or answered."""
        peek = getattr(self._guard, "lane_peek", None)
        if peek is None:
            return None
        peeked = peek(request, route)
        if peeked is None:
            return None
        decision = self.backends.decide(route, peeked[1].value)
        if isinstance(decision, backends.Refused):
            return None
        access = self._guard.lane_grant(request, peeked)
        # Not entered in _granted: still_allowed is asked only for watched accesses, and the
        # lane's are never watched (see Guard.lane_grant).
        request.lane_target = decision
        return access

    def _judge(self, access: Any, request: Any, route: routing.Route) -> Any:
        if access is None or route.kind == "raw":
            return access
        decision = self.backends.decide(route, access.project)
        if isinstance(decision, backends.Refused):
            refuse(request, decision)
            return None
        self._granted[access] = (route, decision)
        return access

    def __getattr__(self, name: str) -> Any:
        return getattr(self._guard, name)
