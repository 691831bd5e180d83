"""The guard: who is asking (twisted.cred portal, cached), may they reach this project (cached),
and withdrawing both when the directory changes.

Caches hold decisions, positive and negative, keyed by a BLAKE2b MAC of the credentials under a
per-process key, so neither a secret nor a plain hash of one is kept. Every entry carries the time
it stops being trusted: the credential's own expiry when known (sessions this proxy created),
else ``credential_ttl`` (10 s), so an expired session or token is refused from the cache too, at
most that long after its expiry. (The directory's lookups return the account, not the expiry;
returning the expiry too would make this exact.)

Once a second the guard reads the directory's change counter, and at once when the directory
announces a change (PostgreSQL's NOTIFY calls ``wake``; the poll is the fallback). When it moved
(any admin change, sign-in or sign-out anywhere), every cache is dropped and every live ``Access``
that somebody watches (WebSocket relays register ``on_revoked``) is checked again; those no
longer allowed are revoked. A generation number tells lookups that began before a change not to
fill the new cache with old answers, and marks grants made from such answers for checking again.
"""

from __future__ import annotations

import secrets
import weakref
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar, cast

from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import Portal
from twisted.internet.defer import Deferred, fail, gatherResults, inlineCallbacks, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Request

from cocalcproxy import pages
from cocalcproxy.directory import IDirectory, Project
from cocalcproxy.directory.model import Gone, Unavailable
from cocalcproxy.guard import policy
from cocalcproxy.guard.cache import ExpiringCache
from cocalcproxy.guard.checkers import IAccountAvatar, Identity, identity_of, make_portal
from cocalcproxy.guard.credentials import (
    LEGACY_SESSION_COOKIE,
    MAX_SECRET_LENGTH,
    SESSION_COOKIE,
    Credential,
    Malformed,
    NameAndSecret,
    Presented,
    SessionToken,
    cache_key,
    cookie_values,
    extract,
    form_password,
    has_legacy_cookie,
    session_cookie,
)
from cocalcproxy.guard.devices import DeviceCookies
from cocalcproxy.guard.hopkeys import HopKeys, label_for
from cocalcproxy.guard.ratelimit import Attempt, Limiter, MemoryLimiter, SignInLimits
from cocalcproxy.http import routing
from cocalcproxy.http.site import Access, ProxyRequest, is_websocket_upgrade

if TYPE_CHECKING:
    from cocalcproxy.guard.shares import ShareGrant, Shares

log = Logger()

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Clock(Protocol):
    """What the guard needs of time: the reactor, or ``task.Clock`` in tests."""

    def seconds(self) -> float: ...


@dataclass(frozen=True)
class Authenticated:
    identity: Identity
    presented: Presented
    generation: int
    valid_until: float


@dataclass(frozen=True)
class SignedOut:
    """No credentials, or a session cookie that is no longer (or never was) valid."""

    stale_session: bool = False


@dataclass(frozen=True)
class Rejected:
    """Basic or Bearer credentials that did not authenticate: 401, never forwarded."""

    reason: str


@dataclass(frozen=True)
class Limited:
    retry_after: int


Outcome = Authenticated | SignedOut | Rejected | Limited


@dataclass(frozen=True)
class Looked(Generic[V]):
    value: V
    generation: int
    valid_until: float


class CacheObserver(Protocol):
    def cache_hit(self, cache: str) -> None: ...

    def cache_miss(self, cache: str) -> None: ...


class CachedLookups(Generic[K, V]):
    """A cache in front of a Deferred-returning lookup, with concurrent misses for one key
    sharing a single lookup, and answers from an older generation never stored."""

    def __init__(
        self,
        clock: Clock,
        generation: Callable[[], int],
        ttl: Callable[[V], float],
        max_entries: int,
        name: str = "cache",
    ) -> None:
        self.clock = clock
        self.generation = generation
        self.ttl = ttl
        self.name = name
        # Told of every hit and miss of get() (the proxy's Metrics); None counts nothing.
        self.observer: CacheObserver | None = None
        self.cache: ExpiringCache[K, V] = ExpiringCache(max_entries)
        self._pending: dict[tuple[int, K], list[Deferred[Looked[V]]]] = {}
        # Set by the guard: while the directory is unreachable, ``outage()`` says until when a
        # stale answer may stand in (None: not in an outage, or past the grace), and
        # ``failed(failure)`` is told of every lookup that failed.
        self.outage: Callable[[], Outage | None] = lambda: None
        self.failed: Callable[[Failure], None] = lambda failure: None

    def count(self, hit: bool) -> None:
        if self.observer is not None:
            if hit:
                self.observer.cache_hit(self.name)
            else:
                self.observer.cache_miss(self.name)

    def cached(self, key: K) -> Looked[V] | None:
        entry = self.cache.get(key, self.clock.seconds())
        if entry is None:
            return None
        return Looked(entry.value, self.generation(), entry.expires_at)

    def _stale(self, key: K, outage: Outage | None) -> Looked[V] | None:
        """A decision taken while the directory still answered, during an outage's grace."""
        if outage is None or outage.serve_until is None:
            return None
        entry = self.cache.stale(key)
        if entry is None or entry.expires_at < outage.last_contact:
            return None
        return Looked(entry.value, self.generation(), outage.serve_until)

    def get(self, key: K, fetch: Callable[[], Deferred[V]]) -> Deferred[Looked[V]]:
        hit = self.cached(key)
        if hit is not None:
            self.count(hit=True)
            return succeed(hit)
        self.count(hit=False)
        outage = self.outage()
        if outage is not None:
            # Known to be unreachable: no query (each would wait for the failure, a connect
            # timeout on a dead network); a stale decision within the grace, or a fast refusal.
            stale = self._stale(key, outage)
            if stale is not None:
                return succeed(stale)
            return fail(outage.error())
        generation = self.generation()
        slot = (generation, key)
        mine: Deferred[Looked[V]] = Deferred()
        waiters = self._pending.get(slot)
        if waiters is not None:
            waiters.append(mine)
            return mine
        self._pending[slot] = [mine]

        def settle(result: V | Failure) -> None:
            waiting = self._pending.pop(slot, [])
            if isinstance(result, Failure):
                self.failed(result)
                stale = self._stale(key, self.outage()) if result.check(Unavailable) else None
                for d in waiting:
                    if stale is not None:
                        d.callback(stale)
                    else:
                        d.errback(result)
                return
            valid_until = self.clock.seconds() + self.ttl(result)
            if generation == self.generation():
                self.cache.put(key, result, valid_until)
            for d in waiting:
                d.callback(Looked(result, generation, valid_until))

        fetch().addBoth(settle)
        return mine

    def put(self, key: K, value: V, valid_until: float) -> None:
        self.cache.put(key, value, valid_until)

    def discard(self, key: K) -> None:
        self.cache.discard(key)

    def clear(self) -> None:
        self.cache.clear()


#: How long cached decisions keep being used while the directory is unreachable (the default of
#: --directory-grace). Revocations cannot reach the proxy meanwhile, so this bounds how long a
#: withdrawn credential or membership may still work: long enough for a database restart or a
#: managed failover (seconds to a minute or two), short against a session's 14 days.
DEFAULT_OUTAGE_GRACE = 300.0


@dataclass
class Outage:
    """The directory stopped answering (``since``); decisions it gave until ``last_contact``
    may be used until ``serve_until`` (None: not at all, the grace is over or the directory's
    file is gone)."""

    since: float
    last_contact: float
    serve_until: float | None
    reason: str
    gone: bool = False

    def error(self) -> Unavailable:
        return Unavailable(f"the directory is unreachable: {self.reason}")


@dataclass(slots=True)
class Grant:
    """What an issued Access rests on, kept (weakly, with the Access) to check it again."""

    credentials: Credential
    account_id: int
    project_id: str
    generation: int
    valid_until: float


def is_navigation(request: Request) -> bool:
    """A browser loading a page (worth a redirect to sign in), not a script or a WebSocket."""
    return (
        request.method in (b"GET", b"HEAD")
        and pages.wants_html(request)
        and not is_websocket_upgrade(request)
    )


class Guard:
    """Implements ``site.Guard``; also answers the sign-in pages' questions."""

    #: Seconds between polls woken by change notifications (see ``wake``).
    wake_spacing = 0.05

    def __init__(
        self,
        directory: IDirectory,
        clock: Clock,
        *,
        portal: Portal | None = None,
        limits: SignInLimits | None = None,
        poll_interval: float = 1.0,
        credential_ttl: float = 10.0,
        negative_ttl: float = 30.0,
        access_ttl: float = 300.0,
        max_entries: int = 10_000,
        outage_grace: float = DEFAULT_OUTAGE_GRACE,
    ) -> None:
        self.directory = directory
        self.outage_grace = outage_grace
        # When the directory last answered, and the outage in progress (None while it answers).
        self.last_contact: float | None = None
        self.outage: Outage | None = None
        self.clock = clock
        self.portal = portal if portal is not None else make_portal(directory)
        # Failed password sign-ins (ratelimit.py): counted in this process unless build_guard
        # hands in a DirectoryLimiter (every process on the directory counting together).
        self.limiter: Limiter = MemoryLimiter(
            limits if limits is not None else SignInLimits.default(), clock
        )
        self.poll_interval = poll_interval
        self.credential_ttl = credential_ttl
        self.negative_ttl = negative_ttl
        self.generation = 0
        # Called for each credential that failed to authenticate (the proxy's Metrics).
        self.on_signin_failure: Callable[[], None] | None = None
        self._key = secrets.token_bytes(32)
        # Project subdomains (set by build_guard with --project-domain): session cookies there
        # must carry a tag bound to their host (hopkeys.HopKeys), and signed-out navigations
        # are sent to the sign-in hop on the main host (hop.Hop.send_to_main_host).
        self.hop_keys: HopKeys | None = None
        # Shared ports (guard.shares.Shares, set by build_guard with --project-domain).
        self.shares: Shares | None = None
        # Whether the main host still reads sessions under the cookie's old name (see
        # credentials.session_cookie); build_guard turns it off where project subdomains could
        # have tossed such a cookie (credentials.legacy_cookie_safe).
        self.legacy_session_cookie = True
        # Device cookies for password sign-ins (guard/devices.py), set by build_guard.
        self.devices: DeviceCookies | None = None
        self.send_to_hop: Callable[[Request, str, SignedOut], None] | None = None
        self.identities: CachedLookups[bytes, Identity | None] = CachedLookups(
            clock, lambda: self.generation, self._identity_ttl, max_entries, name="credentials"
        )
        self.projects: CachedLookups[tuple[int, str], Project | None] = CachedLookups(
            clock,
            lambda: self.generation,
            lambda p: access_ttl if p is not None else negative_ttl,
            max_entries,
            name="access",
        )
        for lookups in (self.identities, self.projects):
            lookups.outage = self._current_outage
            lookups.failed = self.directory_failed
        self.grants: weakref.WeakKeyDictionary[Access, Grant | ShareGrant] = (
            weakref.WeakKeyDictionary()
        )
        # Set by the backend policy (backendio.PolicyGuard): does an open connection's route
        # still go where it went, now that the project changed? False revokes it.
        self.still_allowed: Callable[[Access, Project], bool] | None = None
        self.last_counter: int | None = None
        self._loop: LoopingCall | None = None
        self._loop_done: Deferred[Any] | None = None
        self._woken: Deferred[None] | None = None
        self._wake_again = False
        self._wake_call: Any = None
        self._polls_started = 0
        self._polls_applied = 0
        self._last_wake = float("-inf")

    def _identity_ttl(self, identity: Identity | None) -> float:
        if identity is None:
            return self.negative_ttl
        ttl = self.credential_ttl
        if identity.expires_at is not None:
            ttl = min(ttl, identity.expires_at - self.clock.seconds())
        return ttl

    # -- who is asking ------------------------------------------------------------------------

    def authenticate(self, request: Request, host_label: str | None = None) -> Deferred[Outcome]:
        """Who is asking. On a project subdomain (``host_label``) a session cookie counts only
        when it is bound to that host (see hopkeys); other cookie values are passed over."""
        known = self._known_outcome(request, host_label)
        if not isinstance(known, tuple):
            return succeed(known)
        return self._look_up(request, *known)

    def _known_outcome(
        self, request: Request, host_label: str | None, count: bool = True
    ) -> Outcome | tuple[Presented, bytes]:
        """The outcome when it needs no lookup (nothing presented, malformed, a stale subdomain
        cookie, or a cache hit); else what was presented and its cache key, to look up."""
        cookies = request.requestHeaders.getRawHeaders(b"cookie", [])
        presented = extract(
            request.requestHeaders.getRawHeaders(b"authorization", []),
            cookies,
            legacy=self.legacy_session_cookie and host_label is None,
        )
        if presented is None:
            return SignedOut()
        if isinstance(presented, Malformed):
            return Rejected(presented.reason)
        if host_label is not None and not presented.from_authorization:
            token = None
            if self.hop_keys is not None:
                token = self.hop_keys.first_bound(
                    host_label, cookie_values(cookies, SESSION_COOKIE)
                )
            if token is None:
                return SignedOut(stale_session=True)
            presented = Presented(SessionToken(token), from_authorization=False)
        key = cache_key(self._key, presented.credentials)
        hit = self.identities.cached(key)
        if hit is not None:
            if count:
                self.identities.count(hit=True)
            return self._outcome(presented, hit)
        return presented, key

    def _look_up(self, request: Request, presented: Presented, key: bytes) -> Deferred[Outcome]:
        credentials = presented.credentials
        if isinstance(credentials, NameAndSecret):
            return self._name_and_secret(request, presented, key, credentials)
        d = self.identities.get(key, lambda: self._login(credentials))

        def decided(looked: Looked[Identity | None]) -> Outcome:
            if looked.value is None and self.on_signin_failure is not None:
                self.on_signin_failure()
            return self._outcome(presented, looked)

        return d.addCallback(decided)

    def device_for(self, request: Request, name: str) -> str | None:
        """The known device (guard/devices.py) a password attempt for ``name`` comes from."""
        if self.devices is None:
            return None
        return self.devices.device_for(request.requestHeaders.getRawHeaders(b"cookie", []), name)

    @inlineCallbacks
    def _name_and_secret(  # type: ignore[no-untyped-def]
        self, request: Request, presented: Presented, key: bytes, credentials: NameAndSecret
    ):
        """Basic credentials: an API token of the named account is never limited (tokens are
        not guessable); a password follows the sign-in form's limits (ratelimit.py)."""
        account = None
        if 0 < len(credentials.secret) <= MAX_SECRET_LENGTH:
            account = yield self.directory.account_for_token(credentials.secret)
        if account is not None and account.name == credentials.name:
            identity = Identity(account, "token")
            looked = yield self.identities.get(key, lambda: succeed(identity))
            return self._outcome(presented, looked)
        address = client_address(request)
        device = self.device_for(request, credentials.name)
        attempt = yield self.limiter.begin(address, credentials.name, device)
        if not isinstance(attempt, Attempt):
            return Limited(attempt)
        looked = yield self.identities.get(key, lambda: self._login(credentials))
        if looked.value is not None:
            yield self.limiter.succeeded(attempt)
        elif self.on_signin_failure is not None:
            self.on_signin_failure()
        return self._outcome(presented, looked)

    def _login(self, credentials: Any) -> Deferred[Identity | None]:
        d = self.portal.login(credentials, None, IAccountAvatar)

        def refused(failure: Failure) -> None:
            failure.trap(UnauthorizedLogin)
            return None

        return d.addCallbacks(identity_of, refused)

    def _outcome(self, presented: Presented, looked: Looked[Identity | None]) -> Outcome:
        if looked.value is None:
            if presented.from_authorization:
                return Rejected("credentials not accepted")
            return SignedOut(stale_session=True)
        return Authenticated(looked.value, presented, looked.generation, looked.valid_until)

    def signed_in(self, request: Request) -> Deferred[Authenticated | None]:
        """For the proxy's own signed-in pages: who is asking, or None once the request has been
        refused as the contract says (or the client has gone)."""

        def decide(outcome: Outcome) -> Authenticated | None:
            if request._disconnected:
                return None
            if not isinstance(outcome, Authenticated):
                refuse(request, outcome)
                return None
            return outcome

        return self.authenticate(request).addCallback(decide)

    def main_session(self, request: Request) -> str | None:
        """The session token of the main host's session cookie (credentials.session_cookie)."""
        cookies = request.requestHeaders.getRawHeaders(b"cookie", [])
        return session_cookie(cookies, self.legacy_session_cookie)

    def check_password(self, name: str, password: str) -> Deferred[Identity | None]:
        """For the sign-in form: never cached, never an API token in place of the password.
        While the directory is known to be unreachable it is not asked (a fast 503)."""
        outage = self._current_outage()
        if outage is not None:
            return fail(outage.error())
        return self._login(form_password(name, password)).addErrback(self._login_failed)

    def _login_failed(self, failure: Failure) -> Failure:
        self.directory_failed(failure)
        return failure

    def remember_session(self, token: str, identity: Identity) -> None:
        """Prime the cache with a session just created here, whose expiry we know exactly."""
        key = cache_key(self._key, SessionToken(token))
        self.identities.put(key, identity, self.clock.seconds() + self._identity_ttl(identity))

    def forget_session(self, token: str) -> None:
        self.identities.discard(cache_key(self._key, SessionToken(token)))

    # -- may they reach this project ----------------------------------------------------------

    def authorize(self, request: ProxyRequest, route: routing.Route) -> Deferred[Access | None]:
        if self.shares is not None and self.shares.applies(route):
            try:
                shared = self.shares.decide(request, route)
            except Exception:
                return fail()

            def through_share(access: Access | None) -> Deferred[Access | None] | Access | None:
                if access is not None or request._disconnected:
                    return access
                return self._authorize_member(request, route)

            return shared.addCallback(through_share)
        return self._authorize_member(request, route)

    def _authorize_member(
        self, request: ProxyRequest, route: routing.Route
    ) -> Deferred[Access | None]:
        # When both caches hit (the common case) the decision is taken here without a Deferred
        # per step: the chain of already-fired Deferreds cost more than the lookups themselves.
        try:
            label = hop_label(route) if route.subdomain else None
            known = self._known_outcome(request, label)
            if isinstance(known, tuple):
                d = self._look_up(request, *known)
                return d.addCallback(self._authenticated, request, route, label)
            decided = self._authenticated(known, request, route, label)
        except Exception:
            return fail()
        if isinstance(decided, Deferred):
            return decided
        return succeed(decided)

    def _authenticated(
        self, outcome: Outcome, request: ProxyRequest, route: routing.Route, label: str | None
    ) -> Deferred[Access | None] | Access | None:
        if request._disconnected:
            return None
        if not isinstance(outcome, Authenticated):
            # A project subdomain has no sign-in page of its own (its paths are the backend's):
            # browsers go through the sign-in hop on the main host (else the Basic challenge).
            if (
                label is not None
                and isinstance(outcome, SignedOut)
                and self.send_to_hop is not None
                and is_navigation(request)
            ):
                self.send_to_hop(request, label, outcome)
            else:
                refuse(request, outcome, may_redirect=not route.subdomain)
            return None
        if outcome.presented.from_authorization:
            request.authorization_is_proxy_credential = True
        account = outcome.identity.account
        projects = self.projects
        key = (account.id, route.project_id)
        hit = projects.cached(key)
        if hit is not None:
            projects.count(hit=True)
            return self._granted(hit, request, outcome)
        looking = projects.get(key, lambda: self.directory.project_for(*key))
        return looking.addCallback(self._granted, request, outcome)

    def lane_peek(
        self, request: ProxyRequest, route: routing.Route
    ) -> tuple[Authenticated, Looked[Project | None]] | None:
        """For the fast lane (cocalcproxy.http.lane): the member's decision when both caches
        hold it and it is yes, without counting, registering or answering anything; None when
        ``authorize`` must decide (a share's port, nothing or something unknown presented, a
        cache miss, a refusal: each answered on the ordinary path)."""
        if self.shares is not None and self.shares.applies(route):
            return None
        label = hop_label(route) if route.subdomain else None
        known = self._known_outcome(request, label, count=False)
        if not isinstance(known, Authenticated):
            return None
        looked = self.projects.cached((known.identity.account.id, route.project_id))
        if looked is None or looked.value is None:
            return None
        return known, looked

    def lane_grant(
        self, request: ProxyRequest, peeked: tuple[Authenticated, Looked[Project | None]]
    ) -> Access:
        """Take the decision ``lane_peek`` found, counted as ``authorize`` counts it (two
        cache hits). It is not entered in ``grants``: revocation acts only on watched
        accesses (relays, raw streams), and the lane's are for one plain HTTP exchange that
        nothing watches; the next request meets the dropped caches, as on the ordinary path."""
        outcome, looked = peeked
        self.identities.count(hit=True)
        self.projects.count(hit=True)
        if outcome.presented.from_authorization:
            request.authorization_is_proxy_credential = True
        project = looked.value
        assert project is not None
        return Access(outcome.identity.account, project)

    def _granted(
        self, looked: Looked[Project | None], request: ProxyRequest, outcome: Authenticated
    ) -> Access | None:
        if request._disconnected:
            return None
        account = outcome.identity.account
        project = looked.value
        if project is None:
            request.log_info.account = account.name
            pages.not_found(request)
            return None
        access = Access(account, project)
        self.grants[access] = Grant(
            outcome.presented.credentials,
            account.id,
            project.id,
            min(outcome.generation, looked.generation),
            min(outcome.valid_until, looked.valid_until),
        )
        return access

    # -- noticing changes ---------------------------------------------------------------------

    def start(self) -> None:
        if self._loop is not None:
            return
        self._loop = LoopingCall(self.poll)
        self._loop.clock = cast(IReactorTime, self.clock)
        self._loop_done = self._loop.start(self.poll_interval, now=True)
        self._loop_done.addErrback(lambda f: log.failure("guard polling stopped", f))

    def stop(self) -> Deferred[Any]:
        if self._wake_call is not None and self._wake_call.active():
            self._wake_call.cancel()
        self._wake_call = None
        loop, done = self._loop, self._loop_done
        self._loop = self._loop_done = None
        if loop is None or done is None:
            return succeed(None)
        if loop.running:
            loop.stop()
        return done

    def wake(self) -> None:
        """The directory announced a change: poll soon rather than at the next tick.

        A poll woken this way starts at once, or ``wake_spacing`` after the previous one: a
        burst of changes (a class signing in at once; every sign-in is a change) then drops the
        caches at most 20 times a second, not once per change, and a revocation still applies
        within about 50 ms. A wake while such a poll is due changes nothing (that poll reads the
        counter after this change); a wake while one runs makes one more after it (the change
        may have been committed after it read the counter): never a pile of polls."""
        if self._wake_call is not None:
            return
        if self._woken is not None:
            self._wake_again = True
            return
        delay = self._last_wake + self.wake_spacing - self.clock.seconds()
        if delay > 0:
            clock: Any = self.clock  # the reactor, or task.Clock in tests
            self._wake_call = clock.callLater(delay, self._wake_now)
            return
        self._wake_now()

    def _wake_now(self) -> None:
        self._wake_call = None
        self._wake_again = False
        self._last_wake = self.clock.seconds()
        polled = self.poll()
        if polled.called:
            self._after_wake(None)
            return
        self._woken = polled
        polled.addBoth(self._after_wake)

    def _after_wake(self, _: object) -> None:
        self._woken = None
        if self._wake_again:
            self._wake_again = False
            self.wake()

    def invalidate(self) -> None:
        """Forget every cached decision; grants made before now get checked again."""
        self.generation += 1
        self.identities.clear()
        self.projects.clear()
        if self.shares is not None:
            self.shares.clear()

    def poll(self) -> Deferred[None]:
        """Read the change counter; on a change drop caches and re-check watched grants; on a
        failure, an outage (see ``directory_failed``). Never fails, so the LoopingCall goes on."""
        self._polls_started += 1
        d: Deferred[Any] = self.directory.change_counter()
        d.addCallbacks(self._counter_read, self._counter_failed, (self._polls_started,))
        d.addErrback(lambda f: log.failure("guard poll failed", f))
        return d.addCallback(lambda _: None)

    def _counter_read(self, counter: int, started: int = 0) -> Deferred[None]:
        now = self.clock.seconds()
        self.last_contact = now
        if self.outage is not None:
            log.info(
                "directory reachable again after {seconds:.0f} s; changes made meanwhile apply now",
                seconds=now - self.outage.since,
            )
            self.outage = None
        # A notification's poll may overtake the periodic one: an answer older than one already
        # applied is stale (the newer one saw everything it saw), and would look like a change.
        if started and started < self._polls_applied:
            return succeed(None)
        self._polls_applied = max(self._polls_applied, started)
        previous, self.last_counter = self.last_counter, counter
        if previous is not None and counter != previous:
            self.invalidate()
        return self.recheck_watched()

    def _counter_failed(self, failure: Failure) -> None:
        self.directory_failed(failure)
        self._current_outage()

    def _current_outage(self) -> Outage | None:
        """The outage in progress, after ending its grace if that time has come."""
        outage = self.outage
        if outage is None or outage.serve_until is None:
            return outage
        if self.clock.seconds() > outage.serve_until:
            log.warn(
                "directory still unreachable after {grace:.0f} s: cached decisions are no "
                "longer used; every request that needs the directory gets 503",
                grace=self.outage_grace,
            )
            self._end_grace(outage)
        return outage

    def _end_grace(self, outage: Outage) -> None:
        outage.serve_until = None
        self.invalidate()
        # Open WebSocket relays rest on decisions that can no longer be checked: close them.
        for access in list(self.grants):
            if access.watched and not access.revoked:
                access.revoke()

    def directory_failed(self, failure: Failure) -> None:
        """A directory call failed. The first failure of an outage logs one line and starts the
        grace: decisions the directory gave until it last answered stay usable for
        ``outage_grace`` seconds (revocations cannot reach us meanwhile, hence the bound). A
        deleted or replaced directory file (Gone) gets no grace."""
        if not failure.check(Unavailable):
            return
        gone = bool(failure.check(Gone))
        if self.outage is not None:
            if gone and not self.outage.gone:
                # The file was deleted or replaced during an outage that began as something
                # else (a call failed halfway through the deletion): no grace for it either.
                self.outage.gone = True
                self.outage.reason = str(failure.value)
                if self.outage.serve_until is not None:
                    log.error(
                        "directory unusable: {why}; every request that needs it gets 503",
                        why=failure.value,
                    )
                    self._end_grace(self.outage)
            return
        now = self.clock.seconds()
        last = self.last_contact if self.last_contact is not None else now
        grace = 0.0 if gone else self.outage_grace
        serve_until = last + grace if grace > 0 and now <= last + grace else None
        self.outage = Outage(now, last, serve_until, str(failure.value), gone)
        if serve_until is None:
            log.error(
                "directory unusable: {why}; every request that needs it gets 503",
                why=failure.value,
            )
            self._end_grace(self.outage)
        else:
            log.warn(
                "directory unreachable: {why}; serving decisions cached until then for up to "
                "{grace:.0f} s, new sign-ins and undecided requests get 503",
                why=failure.value,
                grace=grace,
            )

    def directory_status(self) -> str:
        """``ok``, ``degraded`` (unreachable, cached decisions still used) or ``unavailable``."""
        outage = self._current_outage()
        if outage is None:
            return "ok"
        return "degraded" if outage.serve_until is not None else "unavailable"

    def recheck_watched(self) -> Deferred[None]:
        now = self.clock.seconds()
        due = []
        for access, grant in list(self.grants.items()):
            if access.revoked:
                self.grants.pop(access, None)
            elif access.watched and (
                grant.generation < self.generation or grant.valid_until <= now
            ):
                if isinstance(grant, Grant):
                    due.append(self._recheck(access, grant))
                elif self.shares is not None:
                    due.append(self.shares.recheck(access, grant))
        if not due:
            return succeed(None)
        return gatherResults(due).addCallback(lambda _: None)

    @inlineCallbacks
    def _recheck(self, access: Access, grant: Grant):  # type: ignore[no-untyped-def]
        credentials = grant.credentials
        try:
            who: Looked[Identity | None] = yield self.identities.get(
                cache_key(self._key, credentials), lambda: self._login(credentials)
            )
            if who.value is None or who.value.account.id != grant.account_id:
                log.info("access to {pid} withdrawn: credentials", pid=grant.project_id)
                access.revoke()
                return
            what: Looked[Project | None] = yield self.projects.get(
                (grant.account_id, grant.project_id),
                lambda: self.directory.project_for(grant.account_id, grant.project_id),
            )
            if what.value is None:
                log.info("access to {pid} withdrawn: not a member", pid=grant.project_id)
                access.revoke()
                return
            if self.still_allowed is not None and not self.still_allowed(access, what.value):
                log.info("access to {pid} withdrawn: route no longer allowed", pid=grant.project_id)
                access.revoke()
                return
            grant.generation = min(who.generation, what.generation)
            grant.valid_until = min(who.valid_until, what.valid_until)
        except Exception:
            log.failure("re-checking access to {pid} failed; will retry", pid=grant.project_id)


def hop_label(route: routing.Route) -> str:
    """The host label of a subdomain route: ``<pid>-<port>`` or ``<pid>-raw``."""
    return label_for(route.project_id, route.port if route.kind != "raw" else None)


def client_address(request: Request) -> str:
    address = request.getClientAddress()
    return str(getattr(address, "host", "") or "unknown")


def refuse(
    request: Request, outcome: SignedOut | Rejected | Limited, may_redirect: bool = True
) -> None:
    """Answer a request that did not authenticate, as the contract says."""
    if isinstance(outcome, Limited):
        request.setHeader(b"Retry-After", str(outcome.retry_after).encode())
        pages.write_error(
            request,
            429,
            "Too many attempts",
            "Too many failed sign-ins. Try again later.",
            retry_after=outcome.retry_after,
        )
        return
    if isinstance(outcome, SignedOut) and outcome.stale_session:
        expire_session_cookies(request)
    if isinstance(outcome, SignedOut) and may_redirect and is_navigation(request):
        request.setResponseCode(302)
        request.setHeader(b"Location", policy.login_location(request.uri))
        pages.set_own_page_headers(request)
        request.setHeader(b"Content-Length", b"0")
        request.finish()
        return
    request.setHeader(b"WWW-Authenticate", b'Basic realm="cocalcproxy", charset="UTF-8"')
    pages.write_error(
        request,
        401,
        "Sign-in required",
        "Sign in, or send an API token (Authorization: Bearer) or Basic credentials.",
    )


def expire_session_cookies(request: Request) -> None:
    """Expire the session cookie, and the old-name one when the request carries it."""
    expire_cookie(request, SESSION_COOKIE)
    if has_legacy_cookie(request.requestHeaders.getRawHeaders(b"cookie", [])):
        expire_cookie(request, LEGACY_SESSION_COOKIE)


def expire_cookie(request: Request, name: str) -> None:
    request.addCookie(
        name.encode(), b"", max_age=b"0", path=b"/", secure=True, httpOnly=True, sameSite="lax"
    )
