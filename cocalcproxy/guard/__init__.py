"""The guard: only a project's owner and collaborators get in.

* ``credentials``: which proxy credentials a request carries (pure) and their cred types.
* ``checkers``: twisted.cred checkers over the directory, the realm and the portal.
* ``core.Guard``: ``authorize(request, route)`` for ``site.Root``, with cached decisions and
  revocation when the directory's change counter moves.
* ``web.GuardPages``: ``/_/login``, ``/_/logout`` and ``/``.
* ``csrf``, ``ratelimit``, ``policy``, ``cache``: the small rules those rest on.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application import service
from twisted.internet.defer import Deferred

from cocalcproxy.directory import IDirectory
from cocalcproxy.guard.core import Clock, Guard
from cocalcproxy.guard.csrf import CsrfTokens, load_or_create_key
from cocalcproxy.guard.hop import Hop
from cocalcproxy.guard.hopkeys import HopKeys
from cocalcproxy.guard.web import GuardPages
from cocalcproxy.metrics import Metrics

__all__ = ["Guard", "GuardPages", "GuardService", "build_guard"]

SECONDS_PER_DAY = 86400.0


class GuardService(service.Service):
    """Polls the directory's change counter while the proxy runs."""

    def __init__(self, guard: Guard) -> None:
        self.guard = guard

    def startService(self) -> None:  # noqa: N802
        super().startService()
        self.guard.start()

    def stopService(self) -> Deferred[Any]:  # noqa: N802
        super().stopService()
        return self.guard.stop()


def build_guard(
    directory: IDirectory,
    clock: Clock,
    *,
    state_dir: str,
    session_lifetime_days: float,
    project_domain: str | None = None,
    metrics: Metrics | None = None,
    hostname: str = "localhost",
    public_port: Callable[[], int | None] = lambda: None,
) -> tuple[Guard, GuardPages, GuardService]:
    guard = Guard(directory, clock)
    if metrics is not None:
        guard.identities.observer = metrics
        guard.projects.observer = metrics
        guard.on_signin_failure = metrics.signin_failure
    key = load_or_create_key(state_dir)
    session_lifetime = session_lifetime_days * SECONDS_PER_DAY
    guard_pages = GuardPages(
        guard,
        directory,
        CsrfTokens(key),
        clock,
        session_lifetime=session_lifetime,
        project_domain=project_domain,
    )
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
    return guard, guard_pages, GuardService(guard)
