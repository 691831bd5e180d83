"""The Request class of every listener (HTTPS, redirect, metrics): no Twisted banner, and the
proxy's own answer to ``OPTIONS *``.

Twisted's ``Request.process`` sets ``Server: TwistedWeb/<version>`` on every request and answers
a request whose target is ``*`` itself (an empty 200 for OPTIONS, else a 405), before any
resource sees it. A banner helps only attackers, and such an answer would carry none of the
proxy's security headers. Proxied answers carry the backend's own ``Server`` header, if any.
"""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import unquote_to_bytes

from twisted.python import failure
from twisted.web import http, resource, server

from cocalcproxy import pages

#: What ``OPTIONS *`` is told: the methods the proxy forwards.
ASTERISK_ALLOW = b"GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"


class _HttpDate:
    """The ``Date`` header's value, formatted once a second instead of once a request."""

    __slots__ = ("second", "value")

    def __init__(self) -> None:
        self.second = -1
        self.value = b""

    def now(self) -> bytes:
        second = int(time.time())
        if second != self.second:
            self.value = http.datetimeToString(second)
            self.second = second
        return self.value


http_date = _HttpDate()


class BannerlessRequest(server.Request):
    """``process`` is Twisted's, less what the proxy does not want or need per request: no
    ``Server`` banner set (to be removed again), ``Date`` formatted once a second, and
    ``postpath`` (every segment of the path percent-decoded, which only a resource tree needs;
    every resource of the proxy is a leaf) computed only when something reads it."""

    _postpath: list[bytes] | None = None

    @property
    def postpath(self) -> list[bytes]:
        if self._postpath is None:
            self._postpath = [unquote_to_bytes(part) for part in self.path[1:].split(b"/")]
        return self._postpath

    @postpath.setter
    def postpath(self, value: list[bytes]) -> None:
        self._postpath = value

    def process(self) -> None:
        site: Any = getattr(self.channel, "site", None)
        self.site = site
        if self.path == b"*":
            answer_asterisk(self)
            return
        self.responseHeaders.setRawHeaders(b"Date", [http_date.now()])
        self.prepath = []
        try:
            found = site.getResourceFor(self)
            if resource._IEncodingResource.providedBy(found):
                encoder = found.getEncoder(self)
                if encoder is not None:
                    self._encoder = encoder
            self.render(found)
        except BaseException:
            self.processingFailed(failure.Failure())


def answer_asterisk(request: server.Request) -> None:
    """``OPTIONS *``: 200, ``Allow`` and the own-page headers; any other method with the
    asterisk-form target (RFC 9112 section 3.2.4 allows it for OPTIONS only): 400."""
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
