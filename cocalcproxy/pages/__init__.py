"""The proxy's own pages: errors for people (HTML) and programs (JSON), and security headers.

Owns the templates and static files (``*.html``, ``static/``) and the functions every room uses
to answer with them. A leaf: it imports no other room (one type, ``http.routing.AbsoluteUrl``,
under TYPE_CHECKING only; an exception named in tests/test_layout.py).
"""

from __future__ import annotations

import json
from html import escape
from typing import TYPE_CHECKING

from twisted.web.server import Request

if TYPE_CHECKING:
    from cocalcproxy.http.routing import AbsoluteUrl

# Sent on every page the proxy itself produces (not on proxied answers).
OWN_PAGE_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (
        b"Content-Security-Policy",
        b"default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
        b"frame-ancestors 'none'; base-uri 'none'",
    ),
    (b"X-Content-Type-Options", b"nosniff"),
    (b"X-Frame-Options", b"DENY"),
    (b"Referrer-Policy", b"same-origin"),
    (b"Cache-Control", b"no-store"),
    (b"Cross-Origin-Opener-Policy", b"same-origin"),
    (b"Cross-Origin-Resource-Policy", b"same-origin"),
    (b"Permissions-Policy", b"camera=(), microphone=(), geolocation=(), payment=(), usb=()"),
)


def set_own_page_headers(request: Request) -> None:
    for name, value in OWN_PAGE_HEADERS:
        request.setHeader(name, value)


def wants_html(request: Request) -> bool:
    accept = b",".join(request.requestHeaders.getRawHeaders(b"accept", []))
    return b"text/html" in accept.lower()


# Sec-Fetch-Dest values for which a browser reads the body as text or data of its own kind, never
# as a page: errors for these are plain text (JSON makes the console blame its MIME type).
_DOCUMENT_DESTS = (b"", b"document", b"empty", b"iframe", b"frame", b"report")


def wants_text(request: Request) -> bool:
    """A browser subresource (script, style, image, font, worker, ...), by ``Sec-Fetch-Dest``."""
    dests = request.requestHeaders.getRawHeaders(b"sec-fetch-dest", [])
    return len(dests) == 1 and dests[0].strip().lower() not in _DOCUMENT_DESTS


def _page(title: str, body_html: str) -> bytes:
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)} · cocalcproxy</title>"
        '<link rel="stylesheet" href="/_/static/style.css"></head>'
        f"<body><main><h1>{escape(title)}</h1>{body_html}</main></body></html>\n"
    ).encode()


def error_body(request: Request, status: int, title: str, detail: str, **facts: object) -> bytes:
    """Set status and headers for an error answer and return its body (HTML or JSON).

    ``title`` and ``detail`` are plain text: they are escaped here, never trusted.
    """
    request.setResponseCode(status)
    set_own_page_headers(request)
    if wants_html(request):
        request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
        return _page(title, f"<p>{escape(detail)}</p>")
    if wants_text(request):
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        return f"{status} {title}\n{detail}\n".encode()
    request.setHeader(b"Content-Type", b"application/json")
    document: dict[str, object] = {"status": status, "error": title, "detail": detail}
    document.update(facts)
    return json.dumps(document).encode() + b"\n"


def write_error(request: Request, status: int, title: str, detail: str, **facts: object) -> None:
    """Write a complete error answer and finish the request (no-op if the client is gone)."""
    body = error_body(request, status, title, detail, **facts)
    request.setHeader(b"Content-Length", str(len(body)).encode())
    if request.method != b"HEAD":
        request.write(body)
    request.finish()


def method_not_allowed(request: Request, allow: bytes = b"GET, HEAD") -> None:
    """405 with the methods the page does take in ``Allow``."""
    request.setHeader(b"Allow", allow)
    write_error(request, 405, "Method not allowed", "This page does not take that method.")


def directory_unavailable(request: Request) -> None:
    """503 for a request the proxy cannot decide because its directory does not answer (the
    outage itself is logged once, by the guard, not once per request)."""
    if request.finished or request.startedWriting or getattr(request, "_disconnected", False):
        return
    request.setHeader(b"Retry-After", b"30")
    write_error(
        request,
        503,
        "Account directory unreachable",
        "The proxy cannot reach its account directory right now, so it cannot check who may "
        "open this page or sign anybody in. Please try again in a few minutes.",
    )


def not_found(request: Request) -> None:
    write_error(request, 404, "Not found", "There is nothing here, or you may not see it.")


def page(title: str, body_html: str) -> bytes:
    """A full page around body_html, which the caller has already escaped."""
    return _page(title, body_html)


def absolute_url_not_found(
    request: Request, found: AbsoluteUrl, host: bytes | None, project_domain: str | None
) -> None:
    """The 404 for an app's absolute URL that is not redirected (a WebSocket, or the redirect is
    off): what happened and what fixes it, as HTML for browsers and plain text otherwise (never
    JSON: this often answers a script or style tag). Everything reflected is escaped."""
    origin = "https://" + (host or b"").decode("ascii", "replace").strip()
    target = found.target.decode("ascii", "replace")
    lines: list[tuple[str, str | None]] = [(f"Nothing on this proxy answers {target}.", None)]
    websocket = request.requestHeaders.hasHeader(b"upgrade")
    if found.prefix is None:
        lines.append(
            (
                "If it comes from an app opened at /<project id>/server/<port>/, the app uses "
                "absolute URLs, which cannot work there (browsers send no Referer with a "
                "WebSocket, so the proxy cannot tell which app it is).",
                None,
            )
        )
        pid, port = "<project id>", "<port>"
    else:
        prefix = found.prefix.decode("ascii")
        _, pid, _, port = prefix.split("/")
        lines.append(
            (
                f"It looks like an absolute URL written by the app at {origin}{prefix}/: the app "
                "believes it is at the root of the site. It meant:",
                origin + prefix + target,
            )
        )
        if websocket:
            lines.append(("A WebSocket cannot follow a redirect: the proxy cannot fix it.", None))
    lines.append(
        (
            "Fix: open the app in the port form, with the app's base-URL option set to "
            f"/{pid}/port/{port}/ (see the user guide's recipes for each app), at:",
            f"{origin}/{pid}/port/{port}/",
        )
    )
    if project_domain:
        authority = (host or b"").decode("ascii", "replace").strip()
        _, colon, tail = authority.rpartition(":")
        port_part = ":" + tail if colon and tail.isdigit() else ""
        lines.append(
            (
                "Or open it on the project's own host, where absolute URLs work unchanged:",
                f"https://{pid}-{port}.{project_domain}{port_part}/",
            )
        )
    request.setResponseCode(404)
    set_own_page_headers(request)
    if wants_html(request) and not websocket:
        html = ""
        for text, url in lines:
            html += f"<p>{escape(text)}"
            if url is not None:
                html += f"<br><code>{escape(url)}</code>"
            html += "</p>"
        body = _page("Not found: an absolute URL?", html)
        request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
    else:
        text = "404 Not found: an absolute URL?\n" + "".join(
            t + "\n" + (f"  {u}\n" if u is not None else "") for t, u in lines
        )
        body = text.encode("utf-8")
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
    request.setHeader(b"Content-Length", str(len(body)).encode())
    if request.method != b"HEAD":
        request.write(body)
    request.finish()
