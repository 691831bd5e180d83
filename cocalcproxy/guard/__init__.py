"""The guard: who is asking, and may they reach this project?

PLACEHOLDER until the guard issue lands: Basic (name and password) and Bearer (API token) only,
no sessions, no cache. It already keeps the contract's answers: 302 to sign in for browser
navigations without credentials, 401 otherwise, and one 404 for unknown and forbidden projects.
"""

from __future__ import annotations

import base64
import binascii
from urllib.parse import quote

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.web.server import Request

from cocalcproxy import pages, routing
from cocalcproxy.directory import Account, IDirectory
from cocalcproxy.site import Access, ProxyRequest


def is_navigation(request: Request) -> bool:
    return request.method in (b"GET", b"HEAD") and pages.wants_html(request)


def login_redirect(request: Request) -> None:
    target = quote(request.uri.decode("latin-1"), safe="/?=&;:@!$'()*+,-._~%")
    request.setResponseCode(302)
    request.setHeader(b"Location", b"/_/login?next=" + quote(target, safe="").encode())
    pages.set_own_page_headers(request)
    request.setHeader(b"Content-Length", b"0")
    request.finish()


def unauthorized(request: Request) -> None:
    request.setHeader(b"WWW-Authenticate", b'Basic realm="cocalcproxy", charset="UTF-8"')
    pages.write_error(
        request, 401, "Sign-in required", "Send a session cookie, API token or Basic credentials."
    )


class SimpleGuard:
    def __init__(self, directory: IDirectory) -> None:
        self.directory = directory

    @inlineCallbacks
    def _account(self, request: Request):  # type: ignore[no-untyped-def]
        header = request.getHeader(b"authorization")
        if not header:
            return None
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer":
            account = yield self.directory.account_for_token(value.strip())
            return account
        if scheme.lower() == "basic":
            try:
                name, _, secret = (
                    base64.b64decode(value.strip(), validate=True).decode().partition(":")
                )
            except (binascii.Error, UnicodeDecodeError):
                return None
            account = yield self.directory.check_password(name, secret)
            if account is None:
                account = yield self.directory.account_for_token(secret)
                if account is not None and account.name != name:
                    account = None
            return account
        return None

    @inlineCallbacks
    def authorize(self, request: ProxyRequest, route: routing.Route):  # type: ignore[no-untyped-def]
        account: Account | None = yield self._account(request)
        if account is None:
            if is_navigation(request):
                login_redirect(request)
            else:
                unauthorized(request)
            return None
        project = yield self.directory.project_for(account.id, route.project_id)
        if project is None:
            pages.not_found(request)
            return None
        return Access(account, project)
