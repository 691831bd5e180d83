"""The Request class of every listener (HTTPS, redirect, metrics): no Twisted banner, and the
proxy's own answer to ``OPTIONS *``.

Twisted's ``Request.process`` sets ``Server: TwistedWeb/<version>`` on every request and answers
a request whose target is ``*`` itself (an empty 200 for OPTIONS, else a 405), before any
resource sees it. A banner helps only attackers, and such an answer would carry none of the
proxy's security headers. Proxied answers carry the backend's own ``Server`` header, if any.
"""

from __future__ import annotations

from typing import Any

from twisted.web import server

from cocalcproxy import pages

#: What ``OPTIONS *`` is told: the methods the proxy forwards.
ASTERISK_ALLOW = b"GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"


class BannerlessRequest(server.Request):
    def process(self) -> None:
        if self.path == b"*":
            self.site = getattr(self.channel, "site", None)
            answer_asterisk(self)
            return
        super().process()

    def render(self, resrc: Any) -> None:
        self.responseHeaders.removeHeader(b"server")
        super().render(resrc)

    def processingFailed(self, reason: Any) -> Any:  # noqa: N802
        self.responseHeaders.removeHeader(b"server")
        return super().processingFailed(reason)


def answer_asterisk(request: server.Request) -> None:
    """``OPTIONS *``: 200, ``Allow`` and the own-page headers; any other method with the
    asterisk-form target (RFC 9112 section 3.2.4 allows it for OPTIONS only): 400."""
    request.responseHeaders.removeHeader(b"server")
    if request.method != b"OPTIONS":
        pages.write_error(
            request, 400, "Bad request", "The request target * is only for OPTIONS requests."
        )
        return
    request.setResponseCode(200)
    request.setHeader(b"Allow", ASTERISK_ALLOW)
    pages.set_own_page_headers(request)
    request.setHeader(b"Content-Length", b"0")
    request.finish()
