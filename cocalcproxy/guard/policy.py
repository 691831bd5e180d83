"""Pure rules for the sign-in pages: where ``next`` may lead, and whether a POST is same-origin."""

from __future__ import annotations

import re
from urllib.parse import quote

MAX_NEXT_LENGTH = 4096

# Paths that make no sense to return to after signing in.
_NOT_AFTER_SIGN_IN = ("/_/login", "/_/logout")


def safe_next(value: str | None) -> str:
    """``value`` when it is a path on this host, else ``/``.

    Refused: anything not starting with exactly one ``/`` (so no scheme and no ``//host``), any
    backslash (browsers read ``/\\host`` as ``//host``), any control character or space (browsers
    drop tabs and newlines, which turns ``/\\t/host`` into ``//host``), and over-long values.
    """
    if not value or len(value) > MAX_NEXT_LENGTH:
        return "/"
    if not value.startswith("/") or value.startswith("//"):
        return "/"
    if any(c == "\\" or c.isspace() or ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in value):
        return "/"
    path = value.split("?", 1)[0].split("#", 1)[0]
    if path in _NOT_AFTER_SIGN_IN:
        return "/"
    return value


def location(path: str) -> bytes:
    """A Location header value for a path from ``safe_next``: non-ASCII percent-encoded."""
    return quote(path, safe="/?=&;:@!$'()*+,-._~%#[]").encode("ascii")


def login_location(request_target: bytes) -> bytes:
    """``/_/login?next=...`` for the request-target a signed-out browser asked for."""
    target = request_target.decode("latin-1")
    if not target.startswith("/") or target.startswith("//"):
        target = "/"
    encoded = quote(target, safe="/?=&;:@!$'()*+,-._~%")
    if encoded == "/":
        return b"/_/login"
    return b"/_/login?next=" + quote(encoded, safe="").encode("ascii")


def same_origin_post(origin: bytes | None, fetch_site: bytes | None, host: bytes | None) -> bool:
    """False when the browser tells us a form POST came from another site.

    ``Sec-Fetch-Site`` (sent by current browsers) must be ``same-origin`` (or ``none`` for a
    user-initiated request); ``Origin``, when present, must be ``https://`` plus our Host.
    Clients that send neither (curl, scripts) still need the CSRF token.
    """
    if fetch_site is not None and fetch_site.strip().lower() not in (b"same-origin", b"none"):
        return False
    if origin is not None:
        if host is None:
            return False
        return origin.strip().lower() == b"https://" + host.strip().lower()
    return True


_PROJECT_ID = re.compile(r"\A[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\Z")
OPEN_FORMS = ("server", "port", "subdomain")


def open_port(
    project: str | None, port: str | None, form: str | None
) -> tuple[str, int, str] | None:
    """The start page's "open port N" form, checked: ``(project id, port, form)`` or None.

    The project id must be a canonical UUID, the port a decimal 1..65535 (spaces around it and
    leading zeros forgiven, as a person types), the form one of :data:`OPEN_FORMS`. The caller
    builds the URL from these values only, so it is always a path on this proxy or one of its
    project hosts, never an open redirect.
    """
    if project is None or port is None or form not in OPEN_FORMS:
        return None
    project = project.strip()
    port = port.strip()
    if not _PROJECT_ID.match(project) or not port.isascii() or not port.isdigit() or len(port) > 5:
        return None
    number = int(port)
    if not 1 <= number <= 65535:
        return None
    assert form is not None
    return project, number, form
