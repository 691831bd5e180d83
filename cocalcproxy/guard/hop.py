"""The sign-in hop: how a browser gets a session cookie of its own on a project subdomain.

A project host (``https://<pid>-<port>.<domain>/``) has no sign-in page (its paths are the
backend's) and must never see the main host's cookie. So:

1. A signed-out browser navigation on a project host gets a 302 to the main host:
   ``https://<hostname>[:port]/_/hop?to=<https://<project host>/<path and query>>&state=<s>``,
   where ``s`` is a random value the project host also sets in this browser's host-only
   ``__Host-cocalcproxy_hop`` cookie (reused while the browser still has one).
2. ``/_/hop`` needs the main host's session (else the usual 302 to ``/_/login?next=...``),
   accepts only a ``to`` that is a path on one of this proxy's project hosts
   (:func:`hopkeys.parse_target`; anything else is a 400, never a redirect), and only for the
   project's owner and collaborators (else the usual 404). Without a well-formed ``state`` it
   sends the browser to ``to`` itself, which starts the hop again with one. It creates a
   one-time directory session of :data:`hopkeys.TICKET_LIFETIME` seconds, seals it for that
   host and that state, and sends the browser to
   ``https://<project host>/.cocalcproxy/hop?ticket=<sealed>&next=<path>``.
3. The proxy answers that reserved path itself: it opens the ticket with the state in this
   browser's cookie (so a landing link used by any other browser -- a member's own link sent to
   someone else, login CSRF -- is refused with a page saying so), claims the ticket in the
   directory (``use_once``: redeemed once across every worker and machine), ends the one-time
   session, checks the account still belongs to the project, creates a normal session and sets it
   as a host-only cookie (no Domain attribute) bound to that host by a tag, then 302s to
   ``next``.

Every answer of the hop carries ``Referrer-Policy: no-referrer`` and ``Cache-Control: no-store``.
"""

from __future__ import annotations

from collections.abc import Callable
from html import escape
from urllib.parse import parse_qsl, quote, urlsplit

from twisted.internet.defer import inlineCallbacks
from twisted.logger import Logger
from twisted.web.server import Request

from cocalcproxy import pages
from cocalcproxy.directory import IDirectory, NotFound
from cocalcproxy.guard import hopkeys, policy
from cocalcproxy.guard.checkers import Identity
from cocalcproxy.guard.core import Clock, Guard, SignedOut, expire_cookie, refuse
from cocalcproxy.guard.credentials import (
    HOP_STATE_COOKIE,
    SESSION_COOKIE,
    SessionToken,
    cookie_values,
)

log = Logger()

#: The ``used_once`` purpose of hop tickets (directory.use_once).
TICKET_PURPOSE = "hop-ticket"


def _query_values(request: Request, name: str) -> list[str] | None:
    """Every value of ``name`` in the query, or None when the query cannot be read."""
    query = urlsplit(request.uri.decode("latin-1")).query
    try:
        fields = parse_qsl(query, max_num_fields=20, errors="strict")
    except (ValueError, UnicodeDecodeError):
        return None
    return [v for k, v in fields if k == name]


def _hop_state(request: Request) -> str | None:
    """The hop state in this browser's cookie on this host, if there is exactly one."""
    values = cookie_values(request.requestHeaders.getRawHeaders(b"cookie", []), HOP_STATE_COOKIE)
    if len(values) == 1 and hopkeys.well_formed_state(values[0]):
        return values[0]
    return None


def _hop_headers(request: Request) -> None:
    pages.set_own_page_headers(request)
    request.setHeader(b"Referrer-Policy", b"no-referrer")
    request.setHeader(b"Cache-Control", b"no-store")


def _redirect(request: Request, location: bytes) -> None:
    if request._disconnected or request.finished:
        return
    request.setResponseCode(302)
    request.setHeader(b"Location", location)
    _hop_headers(request)
    request.setHeader(b"Content-Length", b"0")
    request.finish()


def _page(request: Request, status: int, title: str, text: str, link: str | None = None) -> None:
    if request._disconnected or request.finished:
        return
    body_html = f"<p>{escape(text)}</p>"
    if link is not None:
        body_html += f'<p><a href="{escape(link, quote=True)}">Sign in again</a></p>'
    body = pages.page(title, body_html)
    request.setResponseCode(status)
    _hop_headers(request)
    request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
    request.setHeader(b"Content-Length", str(len(body)).encode())
    if request.method != b"HEAD":
        request.write(body)
    request.finish()


class Hop:
    """``/_/hop`` on the main host, the landing path on project hosts, and the redirect there."""

    def __init__(
        self,
        guard: Guard,
        directory: IDirectory,
        keys: hopkeys.HopKeys,
        clock: Clock,
        *,
        hostname: str,
        public_port: Callable[[], int | None],
        project_domain: str,
        session_lifetime: float,
    ) -> None:
        self.guard = guard
        self.directory = directory
        self.keys = keys
        self.clock = clock
        self.hostname = hostname
        self.public_port = public_port
        self.project_domain = project_domain.strip(".").lower()
        self.session_lifetime = session_lifetime

    def install(self, guard_pages: object) -> None:
        """Wire the hop into the guard (cookie binding, redirect) and the guard's pages."""
        self.guard.hop_keys = self.keys
        self.guard.send_to_hop = self.send_to_main_host
        guard_pages.hop_pages = self  # type: ignore[attr-defined]

    # -- URLs ---------------------------------------------------------------------------------

    def main_origin(self) -> str:
        host = self.hostname.encode("idna").decode("ascii")
        return "https://" + hopkeys.authority(host, self.public_port())

    def project_origin(self, label: str) -> str:
        return "https://" + hopkeys.authority(f"{label}.{self.project_domain}", self.public_port())

    def login_csp(self) -> bytes:
        """The own pages' CSP with the project hosts added to ``form-action``."""
        policy_text = dict(pages.OWN_PAGE_HEADERS)[b"Content-Security-Policy"].decode("ascii")
        hosts = "https://" + hopkeys.authority("*." + self.project_domain, self.public_port())
        relaxed = policy_text.replace("form-action 'self'", f"form-action 'self' {hosts}", 1)
        return relaxed.encode("ascii")

    def start_location(self, label: str, target: str, state: str) -> str:
        """The main host's ``/_/hop`` URL that leads back to ``target`` on host ``label``."""
        to = self.project_origin(label) + target
        return self.main_origin() + "/_/hop?to=" + quote(to, safe="") + "&state=" + state

    # -- 1. a signed-out navigation on a project host -----------------------------------------

    def send_to_main_host(self, request: Request, label: str, outcome: SignedOut) -> None:
        if outcome.stale_session:
            expire_cookie(request, SESSION_COOKIE)
        target = request.uri.decode("latin-1")
        if not target.startswith("/") or policy.safe_next(target) != target:
            target = "/"
        state = _hop_state(request)
        if state is None:
            state = hopkeys.new_state()
            request.addCookie(
                HOP_STATE_COOKIE.encode(),
                state.encode("ascii"),
                path=b"/",
                max_age=str(hopkeys.STATE_LIFETIME).encode(),
                secure=True,
                httpOnly=True,
                sameSite="lax",
            )
        _redirect(request, self.start_location(label, target, state).encode("ascii"))

    # -- 2. /_/hop on the main host -----------------------------------------------------------

    def hop(self, request: Request) -> None:
        if request.method not in (b"GET", b"HEAD"):
            pages.method_not_allowed(request)
            return
        d = self._hop(request)
        d.addErrback(self._failed, request)

    @inlineCallbacks
    def _hop(self, request: Request):  # type: ignore[no-untyped-def]
        outcome = yield self.guard.signed_in(request)
        if outcome is None:
            return
        main_session = outcome.presented.credentials
        if outcome.presented.from_authorization or not isinstance(main_session, SessionToken):
            # Project-host sessions are derived from the main host's session so that signing
            # out ends them too; Basic or Bearer credentials have no sign-out, so no hop.
            refuse(request, SignedOut())
            return
        values = _query_values(request, "to")
        target = None
        if values is not None and len(values) == 1:
            target = hopkeys.parse_target(values[0], self.project_domain, self.public_port())
        if target is None:
            _page(
                request,
                400,
                "Bad sign-in link",
                "This sign-in link does not lead to a project on this proxy.",
            )
            return
        states = _query_values(request, "state") or []
        state = states[0] if len(states) == 1 else None
        if not hopkeys.well_formed_state(state):
            # Not started by a project host (an old link, a bookmark): let the project host
            # start it, so that the ticket is bound to this browser.
            _redirect(request, (self.project_origin(target.label) + target.path).encode("ascii"))
            return
        assert state is not None
        account = outcome.identity.account
        project = yield self.directory.project_for(account.id, target.project_id)
        if request._disconnected:
            return
        if project is None:
            request.log_info.account = account.name  # type: ignore[attr-defined]
            pages.not_found(request)
            return
        try:
            one_time: str = yield self.directory.create_session(
                account.id, hopkeys.TICKET_LIFETIME, parent=main_session.token
            )
        except NotFound:  # signed out in the meantime
            refuse(request, SignedOut(stale_session=True))
            return
        ticket = self.keys.seal(target.label, one_time, state)
        location = (
            self.project_origin(target.label)
            + hopkeys.LANDING_PATH
            + "?ticket="
            + ticket
            + "&next="
            + quote(target.path, safe="")
        )
        _redirect(request, location.encode("ascii"))

    # -- 3. the landing path on a project host ------------------------------------------------

    def land(self, request: Request, label: str) -> None:
        if request.method not in (b"GET", b"HEAD"):
            pages.method_not_allowed(request)
            return
        d = self._land(request, label)
        d.addErrback(self._failed, request)

    @inlineCallbacks
    def _land(self, request: Request, label: str):  # type: ignore[no-untyped-def]
        nexts = _query_values(request, "next") or []
        next_path = policy.safe_next(nexts[0] if len(nexts) == 1 else None)
        # Start again from this host, so that the new hop is bound to this browser.
        again = self.project_origin(label) + next_path
        tickets = _query_values(request, "ticket") or []
        token = (
            self.keys.open(label, tickets[0], _hop_state(request)) if len(tickets) == 1 else None
        )
        if token is None:
            self._refused(request, again)
            return
        # One use only, across every worker and machine on the directory: the first to insert
        # the ticket's session into ``used_once`` redeems it, every other attempt (a second tab,
        # a replay through another proxy behind the load balancer, a race) is refused.
        first: bool = yield self.directory.use_once(
            TICKET_PURPOSE, token, self.clock.seconds() + 2 * hopkeys.TICKET_LIFETIME
        )
        if not first:
            self._refused(request, again)
            return
        session: str | None = None
        account = yield self.directory.account_for_session(token)
        if account is not None:
            # The host's session joins the family of the main host's session the ticket was
            # made from (signing out there ends it); then the ticket's session goes.
            try:
                session = yield self.directory.create_session(
                    account.id, self.session_lifetime, parent=token
                )
            except NotFound:
                session = None
        yield self.directory.delete_session(token)
        if account is None or session is None:
            self._refused(request, again)
            return
        project_id = label.rsplit("-", 1)[0]
        project = yield self.directory.project_for(account.id, project_id)
        if project is None:
            yield self.directory.delete_session(session)
            if not request._disconnected:
                pages.not_found(request)
            return
        old = self._old_session(request, label)
        if old is not None:
            self.guard.forget_session(old)
            yield self.directory.delete_session(old)
        self.guard.remember_session(
            session, Identity(account, "session", self.clock.seconds() + self.session_lifetime)
        )
        if request._disconnected:
            return
        request.addCookie(
            SESSION_COOKIE.encode(),
            self.keys.bind(label, session).encode("ascii"),
            path=b"/",
            max_age=str(int(self.session_lifetime)).encode(),
            secure=True,
            httpOnly=True,
            sameSite="lax",
        )
        log.info("{name} signed in on {label}", name=account.name, label=label)
        _redirect(request, policy.location(next_path))

    def _old_session(self, request: Request, label: str) -> str | None:
        values = cookie_values(request.requestHeaders.getRawHeaders(b"cookie", []), SESSION_COOKIE)
        return self.keys.first_bound(label, values)

    def _refused(self, request: Request, again: str) -> None:
        _page(
            request,
            403,
            "Sign-in link not valid here",
            "This sign-in link has expired, was already used, or was started in another "
            "browser: a sign-in link works only in the browser that asked for it. "
            "Nobody has been signed in.",
            link=again,
        )

    def _failed(self, failure: object, request: Request) -> None:
        log.failure("sign-in hop {uri!r} failed", failure, uri=request.uri)  # type: ignore[arg-type]
        if not request._disconnected and not request.finished:
            pages.write_error(request, 503, "Service unavailable", "Please try again shortly.")
