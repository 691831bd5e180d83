"""The guard: only a project's owner and collaborators get in.

* ``credentials``: which proxy credentials a request carries (pure) and their cred types.
* ``checkers``: twisted.cred checkers over the directory, the realm and the portal.
* ``core.Guard``: ``authorize(request, route)`` for ``site.Root``, with cached decisions and
  revocation when the directory's change counter moves.
* ``web.GuardPages``: ``/_/login``, ``/_/logout`` and ``/``.
* ``csrf``, ``ratelimit``, ``policy``, ``cache``: the small rules those rest on.
* ``hop``, ``hopkeys``, ``devices``, ``oidc``/``oidcweb``, ``shares``: hops to project
  subdomains, device cookies, OpenID sign-in, shared ports.
* ``identity``: the signed identity assertions backends receive (and their public keys).

May import: ``http`` (the request, Access, routing, headers), ``directory`` and ``pages``.
Never ``handlers`` or ``ops``: what it needs from the operations room (the metrics) it names as
a Protocol here (:class:`GuardMetrics`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from twisted.application import service
from twisted.internet.defer import Deferred, gatherResults

from cocalcproxy.directory import IDirectory
from cocalcproxy.directory.operations import SharingPolicy
from cocalcproxy.guard.checkers import make_portal
from cocalcproxy.guard.core import DEFAULT_OUTAGE_GRACE, CacheObserver, Clock, Guard
from cocalcproxy.guard.credentials import legacy_cookie_safe
from cocalcproxy.guard.csrf import CsrfTokens
from cocalcproxy.guard.devices import DeviceCookies
from cocalcproxy.guard.hop import Hop
from cocalcproxy.guard.hopkeys import HopKeys
from cocalcproxy.guard.ratelimit import DirectoryLimiter
from cocalcproxy.guard.shares import Shares
from cocalcproxy.guard.web import GuardPages

if TYPE_CHECKING:
    from cocalcproxy.guard.oidc import OIDCSettings

__all__ = ["Guard", "GuardPages", "GuardService", "build_guard"]

SECONDS_PER_DAY = 86400.0


class GuardMetrics(CacheObserver, Protocol):
    """What the guard reports to the proxy's metrics (``ops.metrics.Metrics`` is one): the guard
    names what it needs here rather than importing the operations room above it."""

    def signin_failure(self) -> None: ...

    def set_directory_notifications(self, up: Callable[[], bool]) -> None: ...

    def set_directory_up(self, up: Callable[[], bool]) -> None: ...


class ChangeNotifications(Protocol):
    """Calls its ``on_change`` when the directory announces a change (``directory.notify``)."""

    @property
    def listening(self) -> bool: ...

    def start(self) -> None: ...

    def stop(self) -> Deferred[None]: ...


class GuardService(service.Service):
    """Polls the directory's change counter while the proxy runs, and listens for the
    directory's change notifications where it has them (PostgreSQL)."""

    def __init__(self, guard: Guard, notifications: ChangeNotifications | None = None) -> None:
        self.guard = guard
        self.notifications = notifications

    def startService(self) -> None:  # noqa: N802
        super().startService()
        self.guard.start()
        if self.notifications is not None:
            self.notifications.start()

    def stopService(self) -> Deferred[Any]:  # noqa: N802
        super().stopService()
        stopped = [self.guard.stop()]
        if self.notifications is not None:
            stopped.append(self.notifications.stop())
        return gatherResults(stopped)


def build_guard(
    directory: IDirectory,
    clock: Clock,
    *,
    key: bytes,
    session_lifetime_days: float,
    project_domain: str | None = None,
    metrics: GuardMetrics | None = None,
    hostname: str = "localhost",
    public_port: Callable[[], int | None] = lambda: None,
    change_listener: Callable[[Callable[[], object]], ChangeNotifications | None] | None = None,
    password_login: bool = True,
    oidc: OIDCSettings | None = None,
    http: Any = None,
    outage_grace: float = DEFAULT_OUTAGE_GRACE,
    sharing: SharingPolicy | None = None,
) -> tuple[Guard, GuardPages, GuardService]:
    """The guard, its pages and the service that keeps it current. ``change_listener`` makes
    the directory's change notifications (``Directory.change_listener``; None where it has
    none) wake the guard's poll at once. ``password_login`` False refuses every password (form
    and Basic); ``oidc`` adds signing in with the OpenID provider, talking to it with ``http``
    (a treq HTTPClient). ``key`` is the form key every process on the directory shares
    (``csrf.shared_key``): CSRF tokens, device cookies, subdomain cookie tags, hop tickets and
    the OpenID state cookie are all made with it."""
    guard = Guard(
        directory, clock, portal=make_portal(directory, password_login), outage_grace=outage_grace
    )
    guard.legacy_session_cookie = legacy_cookie_safe(hostname, project_domain)
    notifications = change_listener(guard.wake) if change_listener is not None else None
    if notifications is not None and metrics is not None:
        metrics.set_directory_notifications(lambda: notifications.listening)
    if metrics is not None:
        guard.identities.observer = metrics
        guard.projects.observer = metrics
        guard.on_signin_failure = metrics.signin_failure
        metrics.set_directory_up(lambda: guard.outage is None)
    guard.devices = DeviceCookies(key)
    guard.limiter = DirectoryLimiter(directory)
    session_lifetime = session_lifetime_days * SECONDS_PER_DAY
    guard_pages = GuardPages(
        guard,
        directory,
        CsrfTokens(key),
        clock,
        session_lifetime=session_lifetime,
        project_domain=project_domain,
    )
    guard_pages.password_login = password_login
    if oidc is not None:
        # Imported here: treq and joserfc stay out of the memory of a proxy without OpenID.
        from cocalcproxy.guard.oidc import ProviderClient, StateSealer
        from cocalcproxy.guard.oidcweb import OIDCPages

        OIDCPages(
            guard_pages,
            ProviderClient(oidc, clock, http),
            StateSealer(key),
            clock,
            hostname=hostname,
            public_port=public_port,
        ).install(guard_pages)
    if project_domain:
        Hop(
            guard,
            directory,
            HopKeys(key),
            clock,
            hostname=hostname,
            public_port=public_port,
            project_domain=project_domain,
            session_lifetime=session_lifetime,
        ).install(guard_pages)
        if sharing is not None and sharing.project_domain is not None:
            guard.shares = Shares(guard, directory, key, sharing)
            guard_pages.shares = guard.shares
            if metrics is not None:
                guard.shares.lookups.observer = metrics
    return guard, guard_pages, GuardService(guard, notifications)
