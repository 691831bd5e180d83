"""The plain-HTTP listener: every request gets a 308 to the same path on https. Nothing proxied."""

from __future__ import annotations

from twisted.web import resource, server

from cocalcproxy import pages


class RedirectResource(resource.Resource):
    isLeaf = True

    def __init__(self, hostname: str, https_port: int | None) -> None:
        super().__init__()
        authority = hostname if ":" not in hostname else f"[{hostname}]"
        if https_port is not None:
            authority += f":{https_port}"
        self.base = b"https://" + authority.encode("idna")

    def render(self, request: server.Request) -> bytes:
        target = request.uri
        if not target.startswith(b"/") or target.startswith(b"//"):
            # Absolute-form or odd targets: never echo a foreign authority back.
            target = b"/"
        request.responseHeaders.removeHeader(b"server")
        request.setResponseCode(308)
        request.setHeader(b"Location", self.base + target)
        pages.set_own_page_headers(request)
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        return b"This proxy only answers over HTTPS.\n"
