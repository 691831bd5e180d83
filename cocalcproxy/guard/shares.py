"""Shared ports: who besides members may reach ``https://<pid>-<port>.<project domain>/``.

A port is private (no share: members only), ``link`` (anyone who opened the share link) or
``public`` (anyone). Only the port host of a project subdomain is ever shared: never the main
host (whose origin holds members' sessions), never ``<pid>-raw`` (files), never another port.

A link carries its secret once, to ``/.cocalcproxy/share?s=SECRET`` on the shared host. The
proxy compares SHA-256(secret) with the stored hash in constant time, then sets a host-only
cookie (``__Host-`` prefix: Secure, Path=/, no Domain; HttpOnly, SameSite=Lax) whose value is an
HMAC of the host label and the share's secret hash under the proxy's key, so the cookie is good
for that one host and that one link only (sharing again makes a new secret; unsharing drops the
row), and redirects to the path without the secret (``Referrer-Policy: no-referrer``).

A visitor through a share gets an ``Access`` marked with the visibility and no account: no
session is made, no proxy cookie but the share cookie is set, no identity assertion is sent,
members' credentials (the session cookie, an Authorization header that authenticates with the
proxy) are removed before anything goes to the backend. Relays through a share are re-checked
whenever the directory changes and when the share expires, so unsharing or expiry cuts them
within the guard's polling interval.
"""

from __future__ import annotations

import base64
import hmac
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web.server import Request

from cocalcproxy import pages
from cocalcproxy.directory import Account, IDirectory, Project
from cocalcproxy.directory.hashing import token_hash
from cocalcproxy.directory.model import Share
from cocalcproxy.directory.operations import SHARE_SECRET_PARAMETER, SharingPolicy
from cocalcproxy.guard import policy
from cocalcproxy.http import headers, routing
from cocalcproxy.http.site import Access, ProxyRequest

log = Logger()

SHARE_COOKIE = headers.SHARE_COOKIE.decode("ascii")
#: Whom the access log names for a visit through a share (no account).
SHARE_VISITOR = Account(0, "")
#: A share's decision is trusted this long without an expiry of its own (the change counter
#: drops it sooner on any change).
SHARE_TTL = 300.0
NEGATIVE_TTL = 30.0


@dataclass
class ShareGrant:
    project_id: str
    port: int
    visibility: str
    secret_hash: str | None
    generation: int
    valid_until: float


def cookie_value(key: bytes, label: str, secret_hash: str) -> str:
    digest = hmac.new(
        key, b"share\0" + label.encode("ascii") + b"\0" + secret_hash.encode("ascii"), "sha256"
    ).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def secret_matches(secret: str, secret_hash: str | None) -> bool:
    """Constant-time comparison of SHA-256(secret) with the stored hash."""
    if secret_hash is None or not secret or len(secret) > 512:
        return False
    return hmac.compare_digest(token_hash(secret).encode("ascii"), secret_hash.encode("ascii"))


class Shares:
    """Decides visits through shares for the guard, and answers the share landing path."""

    def __init__(
        self, guard: Any, directory: IDirectory, key: bytes, sharing: SharingPolicy
    ) -> None:
        from cocalcproxy.guard.core import CachedLookups

        self.guard = guard
        self.directory = directory
        self.key = key
        self.sharing = sharing
        self.lookups: CachedLookups[tuple[str, int], tuple[Share, Project] | None] = CachedLookups(
            guard.clock,
            lambda: guard.generation,
            self._ttl,
            10_000,
            name="shares",
        )

    def _ttl(self, found: tuple[Share, Project] | None) -> float:
        if found is None:
            return NEGATIVE_TTL
        share = found[0]
        if share.expires is None:
            return SHARE_TTL
        now: float = self.guard.clock.seconds()
        return max(0.0, min(SHARE_TTL, share.expires - now))

    def clear(self) -> None:
        self.lookups.clear()

    def applies(self, route: routing.Route) -> bool:
        return (
            route.subdomain
            and route.kind == "port"
            and route.port is not None
            and self.sharing.project_domain is not None
            and self.sharing.allow != "none"
        )

    def _look(self, project_id: str, port: int) -> Deferred[Any]:
        return self.lookups.get(
            (project_id, port), lambda: self.directory.share_for(project_id, port)
        )

    def _usable(self, share: Share) -> bool:
        return share.live(self.guard.clock.seconds()) and self.sharing.allows(share.visibility)

    # -- requests for a shared host -------------------------------------------------------------

    def decide(self, request: ProxyRequest, route: routing.Route) -> Deferred[Access | None]:
        """An Access through the share, or None when the request is not let in by a share (the
        member flow decides then). Never answers the request itself."""
        assert route.port is not None
        label = f"{route.project_id}-{route.port}"
        d = self._look(route.project_id, route.port)

        def decided(looked: Any) -> Deferred[Access | None] | Access | None:
            found = looked.value
            if found is None:
                return None
            share, project = found
            if not self._usable(share):
                return None
            if share.visibility == "link" and not self._has_cookie(request, label, share):
                return None
            access = Access(SHARE_VISITOR, project, share=share.visibility)
            valid_until = looked.valid_until
            if share.expires is not None:
                valid_until = min(valid_until, share.expires)
            self.guard.grants[access] = ShareGrant(
                share.project_id,
                share.port,
                share.visibility,
                share.secret_hash,
                looked.generation,
                valid_until,
            )
            return self._strip_member_credentials(request, label, access)

        return d.addCallback(decided)

    def _has_cookie(self, request: Request, label: str, share: Share) -> bool:
        if share.secret_hash is None:
            return False
        from cocalcproxy.guard.credentials import cookie_values

        expected = cookie_value(self.key, label, share.secret_hash).encode("ascii")
        values = cookie_values(request.requestHeaders.getRawHeaders(b"cookie", []), SHARE_COOKIE)
        return any(hmac.compare_digest(expected, v.encode("utf-8", "replace")) for v in values)

    def _strip_member_credentials(
        self, request: ProxyRequest, label: str, access: Access
    ) -> Deferred[Access | None] | Access:
        """An Authorization header that authenticates with the proxy is a member's credential:
        it is removed before forwarding, as on a private host. One that does not (the backend's
        own Basic auth, say) passes."""
        if not request.requestHeaders.hasHeader(b"authorization"):
            return access
        d: Deferred[Any] = self.guard.authenticate(request, label)

        def judged(outcome: Any) -> Access:
            from cocalcproxy.guard.core import Authenticated, Rejected

            if isinstance(outcome, Authenticated) and outcome.presented.from_authorization:
                request.authorization_is_proxy_credential = True
            elif not isinstance(outcome, Rejected):
                # Limited (rate limit) or anything unclear: do not pass it on.
                request.authorization_is_proxy_credential = True
            return access

        return d.addCallback(judged)

    def recheck(self, access: Access, grant: ShareGrant) -> Deferred[None]:
        d = self._look(grant.project_id, grant.port)

        def checked(looked: Any) -> None:
            found = looked.value
            share = None if found is None else found[0]
            still_allowed = self.guard.still_allowed
            if (
                found is None
                or share is None
                or not self._usable(share)
                or share.visibility != grant.visibility
                or share.secret_hash != grant.secret_hash
                or (still_allowed is not None and not still_allowed(access, found[1]))
            ):
                log.info(
                    "share of {pid} port {port} withdrawn: closing",
                    pid=grant.project_id,
                    port=grant.port,
                )
                access.revoke()
                return
            grant.generation = looked.generation
            grant.valid_until = looked.valid_until
            if share.expires is not None:
                grant.valid_until = min(grant.valid_until, share.expires)

        def failed(failure: Any) -> None:
            log.failure(
                "re-checking the share of {pid} port {port} failed; will retry",
                failure,
                pid=grant.project_id,
                port=grant.port,
            )

        return d.addCallbacks(checked, failed)

    # -- /.cocalcproxy/share?s=SECRET&next=PATH on a shared host --------------------------------

    def land(self, request: Request, label: str) -> None:
        if request.method not in (b"GET", b"HEAD"):
            pages.method_not_allowed(request)
            return
        pid, _, port_text = label.rpartition("-")
        if not port_text.isdigit() or self.sharing.project_domain is None:
            _gone(request)
            return
        query = urlsplit(request.uri.decode("latin-1")).query
        try:
            fields = parse_qsl(query, max_num_fields=5, errors="strict")
        except (ValueError, UnicodeDecodeError):
            fields = []
        secrets_given = [v for k, v in fields if k == SHARE_SECRET_PARAMETER]
        nexts = [v for k, v in fields if k == "next"]
        next_path = policy.safe_next(nexts[0] if len(nexts) == 1 else None)
        if len(secrets_given) != 1:
            _gone(request)
            return
        secret = secrets_given[0]
        d = self._look(pid, int(port_text))

        def answer(looked: Any) -> None:
            if request._disconnected:
                return
            found = looked.value
            share = None if found is None else found[0]
            if (
                share is None
                or share.visibility != "link"
                or not self._usable(share)
                or not secret_matches(secret, share.secret_hash)
            ):
                log.info("share link refused for {label}", label=label)
                _gone(request)
                return
            assert share.secret_hash is not None
            now = self.guard.clock.seconds()
            max_age = None if share.expires is None else max(1, int(share.expires - now))
            request.addCookie(
                SHARE_COOKIE.encode(),
                cookie_value(self.key, label, share.secret_hash).encode("ascii"),
                path=b"/",
                max_age=None if max_age is None else str(max_age).encode(),
                secure=True,
                httpOnly=True,
                sameSite="lax",
            )
            request.setResponseCode(303)
            request.setHeader(b"Location", policy.location(next_path))
            pages.set_own_page_headers(request)
            request.setHeader(b"Referrer-Policy", b"no-referrer")
            request.setHeader(b"Content-Length", b"0")
            request.finish()

        def failed(failure: Any) -> None:
            log.failure("share landing failed", failure)
            if not request._disconnected and not request.finished:
                pages.write_error(request, 503, "Service unavailable", "Please try again shortly.")

        d.addCallbacks(answer, failed)


def _gone(request: Request) -> None:
    body = pages.error_body(
        request,
        404,
        "Share link not valid",
        "This share link is not valid: it may have expired or been withdrawn. Ask for a new one.",
    )
    request.setHeader(b"Referrer-Policy", b"no-referrer")
    request.setHeader(b"Content-Length", str(len(body)).encode())
    if request.method != b"HEAD":
        request.write(body)
    request.finish()
