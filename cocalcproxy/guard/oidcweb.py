"""The pages of signing in with the OpenID provider: ``/_/oidc/login`` and ``/_/oidc/callback``.

The protocol is ``guard.oidc``'s; the account policy is the directory's (``oidc_sign_in``); the
session starts through ``GuardPages.start_session`` like every sign-in. Every refusal is a page
with constant text (``SignInError.public``) and a link back to the sign-in page, one log line
with the details, and no session: nothing the provider or the query string says is shown.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from html import escape
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from twisted.internet.defer import inlineCallbacks
from twisted.logger import Logger
from twisted.web.server import Request

from cocalcproxy import pages
from cocalcproxy.directory import (
    Account,
    Conflict,
    DirectoryError,
    InvalidInput,
    Unavailable,
    validate,
)
from cocalcproxy.guard import policy
from cocalcproxy.guard.core import client_address, expire_cookie
from cocalcproxy.guard.credentials import cookie_values
from cocalcproxy.guard.hopkeys import public_authority as authority
from cocalcproxy.guard.oidc import (
    STATE_LIFETIME,
    STATE_PURPOSE,
    FlowState,
    ProviderClient,
    SignInError,
    StateSealer,
    identity_from_claims,
)
from cocalcproxy.http import headers

log = Logger()

STATE_COOKIE = headers.OIDC_STATE_COOKIE.decode("ascii")
MAX_QUERY_FIELDS = 20


def _fields(request: Request) -> dict[str, str] | None:
    """The query as single-valued fields, or None when it is malformed or repeats a field."""
    query = urlsplit(request.uri.decode("latin-1")).query
    try:
        pairs = parse_qsl(query, keep_blank_values=True, max_num_fields=MAX_QUERY_FIELDS)
    except ValueError:
        return None
    fields: dict[str, str] = {}
    for key, value in pairs:
        if key in fields:
            return None
        fields[key] = value
    return fields


class OIDCPages:
    def __init__(
        self,
        guard_pages: Any,
        client: ProviderClient,
        sealer: StateSealer,
        clock: Any,
        *,
        hostname: str,
        public_port: Callable[[], int | None],
    ) -> None:
        self.guard_pages = guard_pages
        self.client = client
        self.sealer = sealer
        self.clock = clock
        self.hostname = hostname
        self.public_port = public_port
        self.provider_name = client.settings.name

    def install(self, guard_pages: Any) -> None:
        guard_pages.oidc_pages = self

    def origin(self) -> str:
        return "https://" + authority(self.hostname, self.public_port())

    def redirect_uri(self) -> str:
        return self.origin() + "/_/oidc/callback"

    def provider_logout_url(self) -> str | None:
        """RP-initiated logout at the provider, when its discovery document offers it."""
        metadata = self.client.last_metadata
        if metadata is None:
            return None
        return self.client.end_session_url(metadata, self.origin() + "/_/login")

    # -- answers ------------------------------------------------------------------------------

    def refuse(self, request: Request, error: SignInError) -> None:
        on_failure = getattr(self.guard_pages.guard, "on_signin_failure", None)
        if on_failure is not None and error.status in (400, 403):
            on_failure()
        log.warn(
            "OpenID sign-in refused from {address}: {detail!r}",
            address=client_address(request),
            detail=error.detail[:500],
        )
        if request._disconnected or request.finished:
            return
        title = f"Not signed in with {self.provider_name}"
        body = pages.error_body(request, error.status, title, error.public)
        if pages.wants_html(request):
            body = pages.page(
                title,
                f"<p>{escape(error.public)}</p>"
                '<p><a href="/_/login">Back to the sign-in page</a></p>',
            )
        request.setHeader(b"Content-Length", str(len(body)).encode())
        if request.method != b"HEAD":
            request.write(body)
        request.finish()

    # -- /_/oidc/login ------------------------------------------------------------------------

    def login(self, request: Request) -> None:
        if request.method not in (b"GET", b"HEAD"):
            pages.method_not_allowed(request)
            return
        fields = _fields(request) or {}
        next_path = policy.safe_next(fields.get("next"))
        d = self._login(request, next_path)
        d.addErrback(self._failed, request)

    @inlineCallbacks
    def _login(self, request: Request, next_path: str):  # type: ignore[no-untyped-def]
        try:
            metadata = yield self.client.metadata()
        except SignInError as e:
            self.refuse(request, e)
            return
        if request._disconnected:
            return
        flow = self.sealer.new(next_path, self.clock.seconds())
        request.addCookie(
            STATE_COOKIE.encode(),
            self.sealer.seal(flow).encode("ascii"),
            path=b"/",
            max_age=str(int(STATE_LIFETIME)).encode(),
            secure=True,
            httpOnly=True,
            sameSite="lax",
        )
        location = self.client.authorization_url(metadata, flow, self.redirect_uri())
        request.setResponseCode(302)
        request.setHeader(b"Location", location.encode("ascii"))
        pages.set_own_page_headers(request)
        request.setHeader(b"Content-Length", b"0")
        request.finish()

    # -- /_/oidc/callback ---------------------------------------------------------------------

    def callback(self, request: Request) -> None:
        if request.method not in (b"GET", b"HEAD"):
            pages.method_not_allowed(request)
            return
        d = self._callback(request)
        d.addErrback(self._failed, request)

    def _flow(self, request: Request, fields: dict[str, str]) -> FlowState:
        """The browser's own flow, checked against the answer's ``state``; used up here."""
        now = self.clock.seconds()
        values = cookie_values(request.requestHeaders.getRawHeaders(b"cookie", []), STATE_COOKIE)
        flow = self.sealer.open(values[0], now) if len(values) == 1 else None
        if flow is None:
            raise SignInError(
                400,
                "This sign-in was not started in this browser, or took longer than ten minutes. "
                "Start again from the sign-in page.",
                f"no valid state cookie ({len(values)} sent)",
            )
        state = fields.get("state", "")
        if not hmac.compare_digest(state.encode("utf-8"), flow.state.encode("ascii")):
            raise SignInError(
                403,
                "The answer from the identity provider does not belong to the sign-in this "
                "browser started. Start again from the sign-in page.",
                "state does not match the browser's",
            )
        return flow

    @inlineCallbacks
    def _claim(self, flow: FlowState):  # type: ignore[no-untyped-def]
        """Use the flow's state up, once across every worker and machine on the directory."""
        first = yield self.guard_pages.directory.use_once(STATE_PURPOSE, flow.state, flow.expires)
        if not first:
            raise SignInError(
                403,
                "This answer from the identity provider was already used. Start again from the "
                "sign-in page.",
                "state replayed",
            )

    @inlineCallbacks
    def _callback(self, request: Request):  # type: ignore[no-untyped-def]
        expire_cookie(request, STATE_COOKIE)
        try:
            fields = _fields(request)
            if fields is None:
                raise SignInError(400, "The answer could not be read.", "malformed query")
            flow = self._flow(request, fields)
            yield self._claim(flow)
            if "error" in fields:
                raise SignInError(
                    403,
                    f"{self.provider_name} did not sign you in. Start again from the sign-in "
                    "page, or ask the operator if it keeps happening.",
                    f"provider error {fields['error'][:100]!r}: "
                    f"{fields.get('error_description', '')[:300]!r}",
                )
            code = fields.get("code", "")
            if not code or len(code) > 4096:
                raise SignInError(400, "The answer has no authorization code.", "no code")
            claims = yield self.client.sign_in(code, flow, self.redirect_uri())
            settings = self.client.settings
            who = identity_from_claims(
                claims, settings.username_claim, settings.allowed_domains, validate.is_name
            )
            try:
                account: Account = yield self.guard_pages.directory.oidc_sign_in(
                    who.subject, who.username, who.email
                )
            except Conflict as e:
                raise SignInError(
                    403,
                    "An account with your user name already exists here and is not linked to "
                    f"your identity at {self.provider_name}. Ask the operator to link it "
                    "(cocalcproxy user link).",
                    f"subject {who.subject!r}: {e}",
                ) from None
            except InvalidInput as e:
                raise SignInError(
                    403, "The identity provider's answer cannot be used here.", str(e)
                ) from None
        except SignInError as e:
            self.refuse(request, e)
            return
        except (Unavailable, DirectoryError) as e:
            self.refuse(request, SignInError(503, "Please try again shortly.", f"directory: {e}"))
            return
        if request._disconnected:
            return
        yield self.guard_pages.start_session(request, account, flow.next_path, "openid")

    def _failed(self, failure: Any, request: Request) -> None:
        log.failure("OpenID sign-in page {uri!r} failed", failure, uri=request.uri)
        if not request._disconnected and not request.finished:
            pages.write_error(request, 503, "Service unavailable", "Please try again shortly.")
