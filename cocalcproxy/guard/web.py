"""The guard's pages: ``/_/login``, ``/_/logout`` and ``/`` (the signed-in person's projects).

``OwnPages`` calls ``login``, ``logout`` and ``index`` by name. Every answer carries the own-page
security headers; everything reflected goes through twisted.web.template, which escapes it.
"""

from __future__ import annotations

import json
from html import escape
from importlib import resources
from typing import Any, cast
from urllib.parse import parse_qsl, urlencode, urlsplit

from twisted.internet.defer import inlineCallbacks
from twisted.logger import Logger
from twisted.web.iweb import IRenderable, IRequest, ITemplateLoader
from twisted.web.server import Request
from twisted.web.template import Element, Tag, XMLString, flattenString, renderer, tags

from cocalcproxy import pages
from cocalcproxy.directory import Account, IDirectory, Project, validate
from cocalcproxy.directory import operations as ops
from cocalcproxy.directory.model import InvalidInput, Share, Unavailable
from cocalcproxy.directory.operations import SharingPolicy
from cocalcproxy.guard import policy
from cocalcproxy.guard.checkers import Identity
from cocalcproxy.guard.core import (
    Authenticated,
    Clock,
    Guard,
    client_address,
    expire_cookie,
    expire_session_cookies,
)
from cocalcproxy.guard.credentials import (
    LEGACY_SESSION_COOKIE,
    MAX_NAME_LENGTH,
    MAX_SECRET_LENGTH,
    SESSION_COOKIE,
    SessionToken,
    cookie_values,
    has_legacy_cookie,
)
from cocalcproxy.guard.csrf import CSRF_COOKIE, CsrfTokens, new_presession, well_formed_presession
from cocalcproxy.guard.devices import DEVICE_COOKIE, DEVICE_LIFETIME
from cocalcproxy.guard.ratelimit import Attempt

log = Logger()

MAX_FORM_BYTES = 16 * 1024
FAILED = "The name or password is not right."
EXPIRED = "The sign-in form had expired or came from another site. Please sign in again."
MISSING = "Enter your name and password."
PASSWORD_OFF = "Signing in with a password is turned off here."  # noqa: S105 - a message


def _template(name: str) -> ITemplateLoader:
    text = resources.files("cocalcproxy.pages").joinpath(name).read_text("utf-8")
    return cast(ITemplateLoader, XMLString(text))


_LOGIN = _template("login.html")
_INDEX = _template("index.html")


class LoginPage(Element):
    loader = _LOGIN

    def __init__(
        self,
        csrf: str,
        next_path: str,
        name: str,
        message: str | None,
        signed_in_as: str | None = None,
        *,
        password_login: bool = True,
        provider_name: str | None = None,
        provider_logout_url: str | None = None,
    ) -> None:
        super().__init__()
        self.csrf = csrf
        self.next_path = next_path
        self.name = name
        self.message_text = message
        self.account = signed_in_as
        self.password_login = password_login
        self.provider_name = provider_name
        self.provider_logout_url = provider_logout_url

    @renderer
    def signed_in_as(self, request: IRequest | None, tag: Tag) -> Tag | str:
        if self.account is None:
            return ""
        return tags.p(
            "You are signed in as ",
            tags.strong(self.account),
            ". ",
            tags.a("Go to your projects", href="/"),
            ", or sign in as someone else below.",
            class_="notice",
            role="status",
        )

    @renderer
    def provider(self, request: IRequest | None, tag: Tag) -> Tag | str:
        """ "Sign in with <provider>" (--oidc-issuer): a link, so no form posts off-site."""
        if self.provider_name is None:
            return ""
        href = "/_/oidc/login?" + urlencode({"next": self.next_path})
        return tag.fillSlots(href=href, name=self.provider_name)

    @renderer
    def provider_logout(self, request: IRequest | None, tag: Tag) -> Tag | str:
        if self.provider_logout_url is None or self.provider_name is None:
            return ""
        return tags.p(
            "You are signed out of this proxy. ",
            tags.a(f"Also sign out of {self.provider_name}", href=self.provider_logout_url),
            class_="notice",
        )

    @renderer
    def message(self, request: IRequest | None, tag: Tag) -> Tag | str:
        if not self.message_text:
            return ""
        return tags.p(self.message_text, class_="error", role="alert")

    @renderer
    def form(self, request: IRequest | None, tag: Tag) -> Tag | str:
        if not self.password_login:
            return ""
        return tag.fillSlots(csrf=self.csrf, next=self.next_path, name=self.name)


class IndexPage(Element):
    loader = _INDEX

    def __init__(
        self,
        account: str,
        projects: list[Project],
        logout_csrf: str | None,
        project_domain: str | None,
        open_subdomain: bool = False,
        shares: dict[str, list[Share]] | None = None,
        share_csrf: str | None = None,
        sharing: SharingPolicy | None = None,
    ) -> None:
        super().__init__()
        self.open_subdomain = open_subdomain
        self.shares = shares or {}
        self.share_csrf = share_csrf
        self.sharing = sharing
        self.account = account
        self.project_list = projects
        self.logout_csrf = logout_csrf
        self.project_domain = project_domain

    @renderer
    def signed_in(self, request: IRequest | None, tag: Tag) -> Tag:
        return tag.fillSlots(account=self.account)

    @renderer
    def projects(self, request: IRequest | None, tag: Tag) -> Tag:
        if not self.project_list:
            return tags.p("You are not the owner or a collaborator of any project yet.")
        rows = []
        for p in self.project_list:
            role = (
                "owner" if p.owner_name == self.account else f"collaborator (owner {p.owner_name})"
            )
            rows.append(
                tags.tr(
                    tags.td(p.title or "Untitled"),
                    tags.td(tags.code(p.id)),
                    tags.td(role),
                    tags.td(tags.a("files", href=f"/{p.id}/raw/")),
                    tags.td(self._open_form(p)),
                    tags.td(*self._sharing(p)),
                )
            )
        return tags.table(
            tags.thead(
                tags.tr(
                    tags.th("Title", scope="col"),
                    tags.th("Id", scope="col"),
                    tags.th("You are", scope="col"),
                    tags.th("Raw files", scope="col"),
                    tags.th("Open a server", scope="col"),
                    tags.th("Shared ports", scope="col"),
                )
            ),
            tags.tbody(*rows),
        )

    def _sharing(self, project: Project) -> list[Tag | str]:
        """The project's shared ports (public ones marked, so members see what is exposed) and,
        where the operator allows sharing, a POST form to change a port's visibility."""
        out: list[Tag | str] = []
        shared = self.shares.get(project.id, [])
        if shared:
            items = []
            for share in shared:
                host = f"{project.id}-{share.port}.{self.project_domain}"
                label = "PUBLIC" if share.visibility == "public" else "link"
                items.append(
                    tags.li(
                        tags.strong(label) if share.visibility == "public" else label,
                        " ",
                        tags.a(f"port {share.port}", href=f"https://{host}/"),
                        class_=f"share-{share.visibility}",
                    )
                )
            out.append(tags.ul(*items, class_="shares"))
        else:
            out.append(tags.span("none", class_="shares-none"))
        sharing = self.sharing
        if self.share_csrf is None or sharing is None or sharing.project_domain is None:
            return out
        choices = [v for v in ("private", "link", "public") if sharing.allows(v)]
        if len(choices) < 2:
            return out
        field_id = f"share-port-{project.id}"
        out.append(
            tags.form(
                tags.input(type="hidden", name="share_csrf", value=self.share_csrf),
                tags.input(type="hidden", name="project", value=project.id),
                tags.label("Port", for_=field_id, class_="inline"),
                " ",
                tags.input(
                    type="number", id=field_id, name="port", min="1", max="65535",
                    required="required", class_="port",
                ),
                " ",
                tags.select(
                    *[tags.option(v, value=v) for v in choices], name="visibility"
                ),
                " ",
                tags.button("Share port", type="submit"),
                method="post",
                action="/_/share",
                class_="share-port",
            )
        )  # fmt: skip
        return out

    def _open_form(self, project: Project) -> Tag:
        """GET /_/open?project=...&port=N&form=...: the proxy builds the URL (no script)."""
        field_id = f"port-{project.id}"
        buttons = [
            tags.button("/server/", type="submit", name="form", value="server"),
            tags.button("/port/", type="submit", name="form", value="port"),
        ]
        if self.open_subdomain:
            buttons.append(tags.button("subdomain", type="submit", name="form", value="subdomain"))
        return tags.form(
            tags.input(type="hidden", name="project", value=project.id),
            tags.label("Port", for_=field_id, class_="inline"),
            " ",
            tags.input(
                type="number",
                id=field_id,
                name="port",
                min="1",
                max="65535",
                required="required",
                placeholder="8888",
                class_="port",
            ),
            " ",
            *buttons,
            method="get",
            action="/_/open",
            class_="open-port",
        )

    @renderer
    def patterns(self, request: IRequest | None, tag: Tag) -> Tag:
        items = [
            tags.li(
                tags.code("/<project id>/server/PORT/"),
                " (the server sees paths without this prefix)",
            ),
            tags.li(tags.code("/<project id>/port/PORT/"), " (the server sees the whole path)"),
        ]
        if self.project_domain:
            items.append(tags.li(tags.code(f"https://<project id>-PORT.{self.project_domain}/")))
        return tag(*items)

    @renderer
    def logout(self, request: IRequest | None, tag: Tag) -> Tag | str:
        if self.logout_csrf is None:
            return ""
        return tag.fillSlots(csrf=self.logout_csrf)


def shared_page(doc: dict[str, Any]) -> bytes:
    """What a share form did; a link share's link is shown here once."""
    port, visibility = int(doc["port"]), str(doc["visibility"])
    if visibility == "private":
        text = f"<p>Port {port} is private again: only members can reach it.</p>"
    elif visibility == "public":
        url = escape(str(doc.get("url", "")))
        text = (
            f"<p>Port {port} is <strong>public</strong>: anyone can open "
            f'<a href="{url}">{url}</a>.</p>'
        )
    else:
        link = escape(str(doc.get("link", "")))
        text = (
            f"<p>Port {port} is shared with whoever has this link. It is shown only now; "
            "sharing the port again makes a new one and this one stops working.</p>"
            f"<p><code>{link}</code></p>"
        )
    return pages.page("Shared port", text + '<p><a href="/">Back to your projects</a></p>')


def _send(
    request: Request, status: int, body: bytes, content_type: bytes, csp: bytes | None = None
) -> None:
    if request._disconnected:
        return
    request.setResponseCode(status)
    pages.set_own_page_headers(request)
    if csp is not None:
        request.setHeader(b"Content-Security-Policy", csp)
    request.setHeader(b"Content-Type", content_type)
    request.setHeader(b"Content-Length", str(len(body)).encode())
    if request.method != b"HEAD":
        request.write(body)
    request.finish()


def _redirect(request: Request, location: bytes, status: int = 303) -> None:
    if request._disconnected:
        return
    request.setResponseCode(status)
    request.setHeader(b"Location", location)
    pages.set_own_page_headers(request)
    request.setHeader(b"Content-Length", b"0")
    request.finish()


def _unavailable(request: Request) -> None:
    if not request._disconnected and not request.finished:
        pages.write_error(request, 503, "Service unavailable", "Please try again shortly.")


def _query_flag(request: Request, name: str) -> bool:
    query = urlsplit(request.uri.decode("latin-1")).query
    try:
        fields = parse_qsl(query, max_num_fields=20, errors="strict")
    except (ValueError, UnicodeDecodeError):
        return False
    return any(k == name for k, _ in fields)


def _query_next(request: Request) -> str:
    query = urlsplit(request.uri.decode("latin-1")).query
    try:
        fields = parse_qsl(query, max_num_fields=20, errors="strict")
    except (ValueError, UnicodeDecodeError):
        return "/"
    values = [v for k, v in fields if k == "next"]
    return policy.safe_next(values[0] if len(values) == 1 else None)


class FormError(Exception):
    def __init__(self, status: int, title: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.title = title
        self.detail = detail


def read_form(request: Request) -> dict[str, str]:
    """The urlencoded body as single-valued fields; 400/413/415 for anything else."""
    content_types = request.requestHeaders.getRawHeaders(b"content-type", [])
    content_type = content_types[0].split(b";")[0].strip().lower() if content_types else b""
    if len(content_types) != 1 or content_type != b"application/x-www-form-urlencoded":
        raise FormError(415, "Unsupported form", "Send the form as a browser would.")
    content = request.content
    if content is None:
        return {}
    content.seek(0)
    body = content.read(MAX_FORM_BYTES + 1)
    if len(body) > MAX_FORM_BYTES:
        raise FormError(413, "Form too large", "The form is larger than a sign-in needs.")
    try:
        fields = parse_qsl(
            body.decode("ascii"), keep_blank_values=True, max_num_fields=20, errors="strict"
        )
    except (ValueError, UnicodeDecodeError):
        raise FormError(400, "Bad form", "The form could not be read.") from None
    form: dict[str, str] = {}
    for key, value in fields:
        if key in form:
            raise FormError(400, "Bad form", "A field was sent twice.")
        form[key] = value
    return form


class GuardPages:
    def __init__(
        self,
        guard: Guard,
        directory: IDirectory,
        csrf: CsrfTokens,
        clock: Clock,
        *,
        session_lifetime: float,
        project_domain: str | None = None,
    ) -> None:
        self.guard = guard
        self.directory = directory
        self.csrf = csrf
        self.clock = clock
        self.session_lifetime = session_lifetime
        self.project_domain = project_domain
        # The sign-in hop for project subdomains (guard.hop.Hop), with --project-domain.
        self.hop_pages: Any = None
        # Shared ports (guard.shares.Shares), with --project-domain.
        self.shares: Any = None
        # Signing in with the OpenID provider (guard.oidcweb.OIDCPages), with --oidc-issuer.
        self.oidc_pages: Any = None
        # --password-login off: no password form, no POST /_/login (Basic is the portal's).
        self.password_login = True

    # -- /_/hop and its landing path on project subdomains (guard.hop) -------------------------

    def hop(self, request: Request) -> None:
        if self.hop_pages is None:
            pages.not_found(request)
        else:
            self.hop_pages.hop(request)

    def share_landing(self, request: Request, label: str) -> None:
        if self.shares is None:
            pages.not_found(request)
        else:
            self.shares.land(request, label)

    def hop_landing(self, request: Request, label: str) -> None:
        if self.hop_pages is None:
            pages.not_found(request)
        else:
            self.hop_pages.land(request, label)

    # -- /_/share: the start page's "share port N" form ----------------------------------------

    def share(self, request: Request) -> None:
        if request.method != b"POST":
            pages.method_not_allowed(request, b"POST")
            return
        d = self._share(request)
        d.addErrback(self._failed, request)

    @inlineCallbacks
    def _share(self, request: Request):  # type: ignore[no-untyped-def]
        try:
            form = read_form(request)
        except FormError as e:
            pages.write_error(request, e.status, e.title, e.detail)
            return
        outcome = yield self.guard.signed_in(request)
        if outcome is None:
            return
        credentials = outcome.presented.credentials
        session = credentials.token if isinstance(credentials, SessionToken) else None
        if not self._same_origin(request) or not self.csrf.check_share(
            session, form.get("share_csrf")
        ):
            pages.write_error(
                request,
                403,
                "Not shared",
                "The form had expired or came from another site. Reload the start page and "
                "try again.",
            )
            return
        if self.shares is None:
            pages.write_error(
                request,
                403,
                "Sharing is off",
                "Sharing needs project subdomains: a shared port is served only on its own "
                "subdomain, never on this host (it holds your session). The operator has not "
                "set --project-domain.",
            )
            return
        project_id, port_text = form.get("project", ""), form.get("port", "")
        visibility = form.get("visibility", "")
        if not (port_text.isdigit() and not port_text.startswith("0") and len(port_text) <= 5):
            pages.write_error(request, 400, "Cannot share that", "Give a port from 1 to 65535.")
            return
        account = outcome.identity.account
        project = (
            (yield self.directory.project_for(account.id, project_id))
            if validate.is_project_id(project_id)
            else None
        )
        if project is None:
            pages.not_found(request)
            return
        try:
            doc = yield self.directory.run(
                ops.share_set, self.shares.sharing, project.id, int(port_text), visibility
            )
        except ops.Forbidden as e:
            pages.write_error(request, 403, "Not allowed", str(e))
            return
        except InvalidInput as e:
            pages.write_error(request, 400, "Cannot share that", str(e))
            return
        log.info(
            "{name} set port {port} of {pid} to {visibility}",
            name=account.name, port=port_text, pid=project.id, visibility=doc["visibility"],
        )  # fmt: skip
        if request._disconnected:
            return
        body = shared_page(doc)
        request.setResponseCode(200)
        pages.set_own_page_headers(request)
        request.setHeader(b"Referrer-Policy", b"no-referrer")
        request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
        request.setHeader(b"Content-Length", str(len(body)).encode())
        request.write(body)
        request.finish()

    # -- /_/open: the start page's "open port N" form ----------------------------------------

    def open(self, request: Request) -> None:
        if request.method not in (b"GET", b"HEAD"):
            pages.method_not_allowed(request)
            return
        query = urlsplit(request.uri.decode("latin-1")).query
        try:
            fields = parse_qsl(query, max_num_fields=10, errors="strict")
        except (ValueError, UnicodeDecodeError):
            fields = []
        values: dict[str, list[str]] = {}
        for key, value in fields:
            values.setdefault(key, []).append(value)

        def one(name: str) -> str | None:
            found = values.get(name, [])
            return found[0] if len(found) == 1 else None

        chosen = policy.open_port(one("project"), one("port"), one("form"))
        if chosen is None or (chosen[2] == "subdomain" and self.hop_pages is None):
            pages.write_error(
                request,
                400,
                "Cannot open that",
                "Give a port from 1 to 65535 and choose one of the offered forms.",
            )
            return
        project_id, port, form = chosen
        if form == "subdomain":
            location = self.hop_pages.project_origin(f"{project_id}-{port}") + "/"
        else:
            location = f"/{project_id}/{form}/{port}/"
        _redirect(request, location.encode("ascii"))

    # -- /_/oidc/login and /_/oidc/callback (guard.oidcweb) -------------------------------------

    def oidc_login(self, request: Request) -> None:
        if self.oidc_pages is None:
            pages.not_found(request)
        else:
            self.oidc_pages.login(request)

    def oidc_callback(self, request: Request) -> None:
        if self.oidc_pages is None:
            pages.not_found(request)
        else:
            self.oidc_pages.callback(request)

    # -- /_/login -----------------------------------------------------------------------------

    def login(self, request: Request) -> None:
        if request.method in (b"GET", b"HEAD"):
            d = self._login_page(request)
            d.addErrback(self._failed, request)
        elif request.method == b"POST":
            d = self._sign_in(request)
            d.addErrback(self._failed, request)
        else:
            pages.method_not_allowed(request, b"GET, HEAD, POST")

    @inlineCallbacks
    def _login_page(self, request: Request):  # type: ignore[no-untyped-def]
        """Someone already signed in (by the session cookie) is sent on to a ``next`` they asked
        for, or told who they are above the form (to sign in as someone else)."""
        next_path = _query_next(request)
        account = None
        if self.guard.main_session(request) is not None:
            outcome = yield self.guard.authenticate(request)
            if isinstance(outcome, Authenticated) and not outcome.presented.from_authorization:
                account = outcome.identity.account.name
        if request._disconnected:
            return
        if account is not None and next_path != "/":
            _redirect(request, policy.location(next_path))
            return
        self._login_form(request, 200, next_path, "", None, signed_in_as=account)

    def _presession(self, request: Request) -> str:
        """The browser's pre-session value, or a new one set as the CSRF cookie."""
        values = cookie_values(request.requestHeaders.getRawHeaders(b"cookie", []), CSRF_COOKIE)
        if len(values) == 1 and well_formed_presession(values[0]):
            return values[0]
        value = new_presession()
        request.addCookie(
            CSRF_COOKIE.encode(),
            value.encode(),
            path=b"/",
            secure=True,
            httpOnly=True,
            sameSite="strict",
        )
        return value

    def _login_form(
        self,
        request: Request,
        status: int,
        next_path: str,
        name: str,
        message: str | None,
        signed_in_as: str | None = None,
    ) -> None:
        presession = self._presession(request)
        oidc = self.oidc_pages
        logout_url = None
        if (
            oidc is not None
            and request.method in (b"GET", b"HEAD")
            and _query_flag(request, "signed_out")
        ):
            logout_url = oidc.provider_logout_url()
        element = LoginPage(
            self.csrf.login_token(presession),
            next_path,
            name,
            message,
            password_login=self.password_login,
            provider_name=oidc.provider_name if oidc is not None else None,
            provider_logout_url=logout_url,
            signed_in_as=signed_in_as,
        )
        d = flattenString(None, cast(IRenderable, element))
        # With the sign-in hop, signing in may end on a project host (POST -> 303 /_/hop -> 302
        # https://<project host>/...): browsers check every hop of a form's redirects against
        # the form page's form-action, so project hosts must be allowed there.
        csp = self.hop_pages.login_csp() if self.hop_pages is not None else None
        d.addCallback(
            lambda html: _send(
                request, status, b"<!DOCTYPE html>\n" + html, b"text/html; charset=utf-8", csp
            )
        )
        d.addErrback(self._failed, request)

    @inlineCallbacks
    def _sign_in(self, request: Request):  # type: ignore[no-untyped-def]
        try:
            form = read_form(request)
        except FormError as e:
            pages.write_error(request, e.status, e.title, e.detail)
            return
        next_path = policy.safe_next(form.get("next"))
        if not self.password_login:
            self._login_form(request, 403, next_path, "", PASSWORD_OFF)
            return
        name = form.get("name", "")
        password = form.get("password", "")
        cookies = request.requestHeaders.getRawHeaders(b"cookie", [])
        presessions = cookie_values(cookies, CSRF_COOKIE)
        presession = presessions[0] if len(presessions) == 1 else None
        if not self._same_origin(request) or not self.csrf.check_login(
            presession, form.get("csrf")
        ):
            self._login_form(request, 403, next_path, "", EXPIRED)
            return
        if not name or not password:
            self._login_form(request, 400, next_path, name[:MAX_NAME_LENGTH], MISSING)
            return
        shown_name = name[:MAX_NAME_LENGTH]
        address = client_address(request)
        device = self.guard.device_for(request, name)
        attempt = yield self.guard.limiter.begin(address, name, device)
        if not isinstance(attempt, Attempt):
            wait = attempt
            log.info(
                "sign-in refused (rate limit) for {name!r} from {address}",
                name=name[:80],
                address=address,
            )
            request.setHeader(b"Retry-After", str(wait).encode())
            minutes = max(1, (wait + 59) // 60)
            self._login_form(
                request,
                429,
                next_path,
                shown_name,
                f"Too many failed sign-ins. Try again in {minutes} minute"
                + ("s." if minutes != 1 else "."),
            )
            return
        identity = None
        if len(name) <= MAX_NAME_LENGTH and len(password) <= MAX_SECRET_LENGTH:
            identity = yield self.guard.check_password(name, password)
        if identity is None:
            log.info("sign-in failed for {name!r} from {address}", name=name[:80], address=address)
            if self.guard.on_signin_failure is not None:
                self.guard.on_signin_failure()
            self._login_form(request, 403, next_path, shown_name, FAILED)
            return
        yield self.guard.limiter.succeeded(attempt)
        self._remember_device(request, identity.account.name)
        yield self.start_session(request, identity.account, next_path, "password")

    def _remember_device(self, request: Request, name: str) -> None:
        """After a right password: this browser is a known device for ``name`` from now on
        (guard/devices.py), so strangers' wrong guesses cannot lock it out."""
        devices = self.guard.devices
        if devices is None:
            return
        value = devices.issue(request.requestHeaders.getRawHeaders(b"cookie", []), name)
        request.addCookie(
            DEVICE_COOKIE.encode(),
            value.encode("ascii"),
            path=b"/",
            max_age=str(DEVICE_LIFETIME).encode(),
            secure=True,
            httpOnly=True,
            sameSite="lax",
        )

    @inlineCallbacks
    def start_session(  # type: ignore[no-untyped-def]
        self, request: Request, account: Account, next_path: str, how: str
    ):
        """Sign ``account`` in: end the browser's previous session, start a new one, set the
        cookie and send the browser on to ``next_path``. The one way every sign-in ends."""
        address = client_address(request)
        old = self.guard.main_session(request)
        if old is not None:
            self.guard.forget_session(old)
            try:
                yield self.directory.delete_session(old)
            except Exception:
                log.failure("could not end the previous session")
        token: str = yield self.directory.create_session(account.id, self.session_lifetime)
        self.guard.remember_session(
            token, Identity(account, "session", self.clock.seconds() + self.session_lifetime)
        )
        if request._disconnected:
            return
        request.addCookie(
            SESSION_COOKIE.encode(),
            token.encode("ascii"),
            path=b"/",
            max_age=str(int(self.session_lifetime)).encode(),
            secure=True,
            httpOnly=True,
            sameSite="lax",
        )
        if has_legacy_cookie(request.requestHeaders.getRawHeaders(b"cookie", [])):
            expire_cookie(request, LEGACY_SESSION_COOKIE)
        expire_cookie(request, CSRF_COOKIE)
        log.info(
            "{name} signed in from {address} ({how})", name=account.name, how=how, address=address
        )
        _redirect(request, policy.location(next_path))

    def _same_origin(self, request: Request) -> bool:
        headers = request.requestHeaders
        origins = headers.getRawHeaders(b"origin", [])
        sites = headers.getRawHeaders(b"sec-fetch-site", [])
        hosts = headers.getRawHeaders(b"host", [])
        if len(origins) > 1 or len(sites) > 1 or len(hosts) != 1:
            return False
        return policy.same_origin_post(
            origins[0] if origins else None, sites[0] if sites else None, hosts[0]
        )

    def _failed(self, failure: Any, request: Request) -> None:
        if failure.check(Unavailable):
            self.guard.directory_failed(failure)
            pages.directory_unavailable(request)
            return
        log.failure("guard page {uri!r} failed", failure, uri=request.uri)
        _unavailable(request)

    # -- /_/logout ----------------------------------------------------------------------------

    def logout(self, request: Request) -> None:
        if request.method in (b"GET", b"HEAD"):
            _redirect(request, b"/")
        elif request.method == b"POST":
            d = self._sign_out(request)
            d.addErrback(self._failed, request)
        else:
            pages.method_not_allowed(request, b"GET, HEAD, POST")

    @inlineCallbacks
    def _sign_out(self, request: Request):  # type: ignore[no-untyped-def]
        try:
            form = read_form(request)
        except FormError as e:
            pages.write_error(request, e.status, e.title, e.detail)
            return
        session = self.guard.main_session(request)
        if session is None:
            _redirect(request, b"/_/login")
            return
        if not self._same_origin(request) or not self.csrf.check_logout(session, form.get("csrf")):
            pages.write_error(
                request,
                403,
                "Not signed out",
                "The sign-out form had expired or came from "
                "another site. Go back, reload the page and try again.",
            )
            return
        self.guard.forget_session(session)
        account = yield self.directory.account_for_session(session)
        yield self.directory.delete_session(session)
        if account is not None:
            # The counterpart of the sign-in line: who ended which session, from where.
            log.info(
                "{name} signed out from {address}",
                name=account.name,
                address=client_address(request),
            )
        expire_session_cookies(request)
        if self.oidc_pages is not None and self.oidc_pages.provider_logout_url() is not None:
            _redirect(request, b"/_/login?signed_out=1")
        else:
            _redirect(request, b"/_/login")

    # -- / ------------------------------------------------------------------------------------

    def index(self, request: Request) -> None:
        if request.method not in (b"GET", b"HEAD"):
            pages.method_not_allowed(request, b"GET, HEAD")
            return
        d = self._index(request)
        d.addErrback(self._failed, request)

    @inlineCallbacks
    def _index(self, request: Request):  # type: ignore[no-untyped-def]
        outcome = yield self.guard.signed_in(request)
        if outcome is None:
            return
        account = outcome.identity.account
        projects: list[Project] = yield self.directory.projects_for(account.id)
        if request._disconnected:
            return
        shares: dict[str, list[Share]] = {}
        if self.shares is not None:
            for p in projects:
                shares[p.id] = yield self.directory.list_shares(p.id)
        if request._disconnected:
            return
        if not pages.wants_html(request):
            body = json.dumps(
                {
                    "account": account.name,
                    "projects": [
                        {
                            "id": p.id,
                            "title": p.title,
                            "owner": p.owner_name,
                            "raw": f"/{p.id}/raw/",
                            "server": f"/{p.id}/server/{{port}}/",
                            "port": f"/{p.id}/port/{{port}}/",
                            "shared_ports": [
                                {
                                    "port": sh.port,
                                    "visibility": sh.visibility,
                                    "expires": sh.expires,
                                }
                                for sh in shares.get(p.id, [])
                            ],
                        }
                        for p in projects
                    ],
                }
            ).encode()
            _send(request, 200, body + b"\n", b"application/json")
            return
        credentials = outcome.presented.credentials
        logout_csrf = (
            self.csrf.logout_token(credentials.token)
            if isinstance(credentials, SessionToken)
            else None
        )
        share_csrf = None
        if self.shares is not None and isinstance(credentials, SessionToken):
            share_csrf = self.csrf.share_token(credentials.token)
        if request._disconnected:
            return
        element = IndexPage(
            account.name,
            projects,
            logout_csrf,
            self.project_domain,
            open_subdomain=self.hop_pages is not None,
            shares=shares,
            share_csrf=share_csrf,
            sharing=None if self.shares is None else self.shares.sharing,
        )
        html = yield flattenString(None, cast(IRenderable, element))
        _send(request, 200, b"<!DOCTYPE html>\n" + html, b"text/html; charset=utf-8")
