"""The proxy's own pages under /_/ (health, static) and the index.

Sign-in, sign-out and the project list are the guard's; this module dispatches to it.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Protocol

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from cocalcproxy import pages
from cocalcproxy.directory import IDirectory
from cocalcproxy.http import routing
from cocalcproxy.http.site import ProxyRequest

# The namespace operators see in log lines (kept from before the package layout).
log = Logger(namespace="cocalcproxy.ownpages")

_STATIC_TYPES = {
    ".css": b"text/css; charset=utf-8",
    ".svg": b"image/svg+xml",
    ".png": b"image/png",
    ".ico": b"image/x-icon",
}
#: /favicon.ico changes only with a release: browsers may keep it for a day.
FAVICON_MAX_AGE = 86400


class PublicKeys(Protocol):
    """The identity assertions' public keys (``guard.identity.IdentityAssertions`` is one)."""

    @property
    def jwks_body(self) -> bytes: ...


class OwnPages:
    def __init__(
        self,
        directory: IDirectory,
        guard_pages: object | None = None,
        identity: PublicKeys | None = None,
    ) -> None:
        self.directory = directory
        self.guard_pages = guard_pages
        # --identity-assertion: its public keys are served at /_/jwks.json.
        self.identity = identity

    def handle(self, request: ProxyRequest, page: routing.OwnPage) -> None:
        request.log_info.form = "own"
        if page.name == "health":
            self.health(request)
        elif page.name == "static":
            self.static(request, page.rest)
        elif page.name == "jwks":
            self.jwks(request)
        elif page.name == "favicon":
            self.static(request, b"favicon.ico", max_age=FAVICON_MAX_AGE)
        elif page.name == "share_landing" and hasattr(self.guard_pages, "share_landing"):
            getattr(self.guard_pages, "share_landing")(request, page.rest.decode("ascii"))  # noqa: B009
        elif page.name == "hop_landing" and hasattr(self.guard_pages, "hop_landing"):
            getattr(self.guard_pages, "hop_landing")(request, page.rest.decode("ascii"))  # noqa: B009
        elif self.guard_pages is not None and hasattr(self.guard_pages, page.name):
            getattr(self.guard_pages, page.name)(request)
        else:
            pages.not_found(request)

    def health(self, request: ProxyRequest) -> None:
        if request.method not in (b"GET", b"HEAD"):
            pages.method_not_allowed(request)
            return
        guard = getattr(self.guard_pages, "guard", None)

        def answer_status(status: str) -> None:
            if request._disconnected:
                return
            ok = status == "ok"
            body = json.dumps({"status": status, "directory": ok}).encode()
            # Degraded still serves what it decided before the outage (for a bounded grace): a
            # load balancer should keep sending traffic; monitoring reads "status".
            request.setResponseCode(503 if status == "unavailable" else 200)
            pages.set_own_page_headers(request)
            request.setHeader(b"Content-Type", b"application/json")
            request.setHeader(b"Content-Length", str(len(body)).encode())
            if request.method != b"HEAD":
                request.write(body)
            request.finish()

        def failed(failure: Failure) -> None:
            # No line per check (a load balancer asks every second): the guard logs once when
            # the directory becomes unreachable, and once when it is back.
            if guard is None:
                answer_status("unavailable")
                return
            guard.directory_failed(failure)
            answer_status(guard.directory_status())

        if guard is not None and guard.outage is not None:
            # A known outage: the guard's poll finds the directory back within a second; a
            # ping here would only wait for the same failure (a connect timeout, on a dead
            # network) once per check.
            answer_status(guard.directory_status())
            return
        d: Deferred[None] = self.directory.ping()
        d.addCallbacks(lambda _: answer_status("ok"), failed)

    def jwks(self, request: ProxyRequest) -> None:
        """The identity assertions' public keys, for anyone (backends fetch them unsigned-in)."""
        if self.identity is None:
            pages.not_found(request)
            return
        if request.method not in (b"GET", b"HEAD"):
            pages.method_not_allowed(request)
            return
        body = self.identity.jwks_body
        request.setResponseCode(200)
        pages.set_own_page_headers(request)
        request.setHeader(b"Content-Type", b"application/jwk-set+json")
        request.setHeader(b"Cache-Control", b"public, max-age=60")
        request.setHeader(b"Access-Control-Allow-Origin", b"*")
        request.setHeader(b"Cross-Origin-Resource-Policy", b"cross-origin")
        request.setHeader(b"Content-Length", str(len(body)).encode())
        if request.method != b"HEAD":
            request.write(body)
        request.finish()

    def static(self, request: ProxyRequest, name: bytes, max_age: int = 3600) -> None:
        text = name.decode("ascii", "replace")
        suffix = "." + text.rsplit(".", 1)[-1] if "." in text else ""
        if (
            request.method not in (b"GET", b"HEAD")
            or "/" in text
            or text.startswith(".")
            or suffix not in _STATIC_TYPES
        ):
            pages.not_found(request)
            return
        try:
            data = resources.files("cocalcproxy.pages").joinpath("static", text).read_bytes()
        except (FileNotFoundError, IsADirectoryError, OSError):
            pages.not_found(request)
            return
        request.setHeader(b"Content-Type", _STATIC_TYPES[suffix])
        request.setHeader(b"Cache-Control", b"public, max-age=%d" % max_age)
        request.setHeader(b"X-Content-Type-Options", b"nosniff")
        request.setHeader(b"Content-Length", str(len(data)).encode())
        if request.method != b"HEAD":
            request.write(data)
        request.finish()
