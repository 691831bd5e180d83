"""The proxy's own pages: errors for people (HTML) and programs (JSON), and security headers."""

from __future__ import annotations

import json
from html import escape

from twisted.web.server import Request

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


def not_found(request: Request) -> None:
    write_error(request, 404, "Not found", "There is nothing here, or you may not see it.")


def page(title: str, body_html: str) -> bytes:
    """A full page around body_html, which the caller has already escaped."""
    return _page(title, body_html)
