"""The raw file server: ``/<pid>/raw/<path>`` serves the project's home directory read-only.

The handler is thin glue over three pure or blocking-but-Twisted-free modules:

* ``rawpath`` turns the still-encoded URL path into checked name segments (decoded once);
* ``rawfs`` resolves them below the home in a worker thread, walking descriptors so that no
  symlink leads out and only regular files are opened, and lists folders;
* ``rawhttp`` holds the HTTP rules: validators, preconditions, ranges, negotiation.

File bodies are streamed by ``FileSender``, a push producer that reads one chunk at a time with
``os.pread`` in a worker thread and stops while the client's transport is full, so memory is
constant for any file size and a slow disk never stalls the reactor.

Every answer carries ``X-Content-Type-Options: nosniff`` and, on the main host,
``Content-Security-Policy: sandbox``: HTML, SVG or XML from a project opens as an inert document
with an opaque origin and can never act with the proxy's origin (its cookies, its pages).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import quote

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from cocalcproxy import pages
from cocalcproxy.handlers import rawfs, rawhttp, rawlisting, rawpath
from cocalcproxy.http import routing
from cocalcproxy.http.site import Access, ProxyRequest

# The namespace operators see in log lines (kept from before the package layout).
log = Logger(namespace="cocalcproxy.raw")

T = TypeVar("T")

CHUNK_SIZE = 256 * 1024
ALLOWED_METHODS = b"GET, HEAD"
FILE_CACHE_CONTROL = b"private, no-cache"
_LOCATION_SAFE = "/%!$&'()*+,;=:@-._~"
_QUERY_SAFE = _LOCATION_SAFE + "?"


def set_raw_headers(request: ProxyRequest, route: routing.Route) -> None:
    """The headers every raw answer carries (files, listings, redirects)."""
    request.setHeader(b"X-Content-Type-Options", b"nosniff")
    if not route.subdomain:
        request.setHeader(b"Content-Security-Policy", b"sandbox")


def set_page_headers(request: ProxyRequest, route: routing.Route) -> None:
    """Own-page headers (strict CSP, no-store, ...) plus ``sandbox`` on the main host."""
    pages.set_own_page_headers(request)
    if not route.subdomain:
        csp = dict(pages.OWN_PAGE_HEADERS)[b"Content-Security-Policy"]
        request.setHeader(b"Content-Security-Policy", csp + b"; sandbox")


def fail(request: ProxyRequest, route: routing.Route, status: int, title: str, detail: str) -> None:
    """An error page (HTML or JSON, escaped by pages) with the raw server's headers."""
    if request._disconnected or request.finished:
        return
    body = pages.error_body(request, status, title, detail)
    set_page_headers(request, route)
    request.setHeader(b"Content-Length", b"%d" % len(body))
    if request.method != b"HEAD":
        request.write(body)
    request.finish()


def _header(request: ProxyRequest, name: bytes, combine: bool = False) -> str | None:
    values = request.requestHeaders.getRawHeaders(name)
    if not values:
        return None
    value = b", ".join(values) if combine else values[-1]
    return value.decode("latin-1")


class RawHandler:
    """Serves files and listings of ``access.project.home``; see the module docstring."""

    def __init__(
        self,
        reactor: Any,
        threadpool: ThreadPool | None = None,
        *,
        chunk_size: int = CHUNK_SIZE,
        listing_limit: int = rawfs.LISTING_LIMIT,
    ) -> None:
        self.reactor = reactor
        self.threadpool = threadpool
        self.chunk_size = chunk_size
        self.listing_limit = listing_limit
        self.sender_factory: Callable[..., FileSender] = FileSender

    def run_blocking(self, f: Callable[..., T], *args: Any, **kwargs: Any) -> Deferred[T]:
        pool = self.threadpool if self.threadpool is not None else self.reactor.getThreadPool()
        return deferToThreadPool(self.reactor, pool, f, *args, **kwargs)

    def handle(self, request: ProxyRequest, route: routing.Route, access: Access) -> None:
        set_raw_headers(request, route)
        if request.method not in (b"GET", b"HEAD"):
            request.setHeader(b"Allow", ALLOWED_METHODS)
            fail(request, route, 405, "Method not allowed", "The raw file server is read-only.")
            return
        home = access.project.home
        if not home:
            fail(request, route, 404, "Not found", "This project has no home directory configured.")
            return
        path, has_query, query = route.backend_target.partition(b"?")
        if path == b"":
            self._redirect(request, route, b"/", has_query, query)
            return
        parsed = rawpath.parse(path)
        if isinstance(parsed, rawpath.BadPath):
            fail(request, route, 400, "Bad path", parsed.reason)
            return
        as_json = rawhttp.prefers_json(_header(request, b"accept", combine=True))
        d = self.run_blocking(
            _resolve_and_render,
            os.fsencode(home),
            parsed,
            as_json,
            self.listing_limit,
        )
        d.addCallback(self._answer, request, route, access, parsed, path, has_query, query, as_json)
        d.addErrback(self._failed, request, route)

    def _failed(self, failure: Failure, request: ProxyRequest, route: routing.Route) -> None:
        log.failure("raw request for {uri!r} failed", failure, uri=request.uri)
        fail(request, route, 500, "Internal error", "The file server failed; see the proxy's log.")

    def _answer(
        self,
        outcome: rawfs.Outcome | bytes,
        request: ProxyRequest,
        route: routing.Route,
        access: Access,
        parsed: rawpath.RawPath,
        path: bytes,
        has_query: bytes,
        query: bytes,
        as_json: bool,
    ) -> None:
        if isinstance(outcome, rawfs.OpenFile):
            try:
                if request._disconnected:
                    outcome.close()
                    return
                name = parsed.segments[-1] if parsed.segments else b""
                download = rawpath.has_query_flag(query, b"download")
                self._serve_file(request, route, access, outcome, name, download)
            except BaseException:
                outcome.close()
                raise
        elif request._disconnected:
            return
        elif isinstance(outcome, rawfs.Problem):
            fail(request, route, outcome.status, outcome.title, outcome.detail)
        elif isinstance(outcome, rawfs.Directory):
            self._redirect(request, route, path + b"/", has_query, query)
        else:
            self._listing(request, route, outcome, as_json)

    def _redirect(
        self,
        request: ProxyRequest,
        route: routing.Route,
        path: bytes,
        has_query: bytes,
        query: bytes,
    ) -> None:
        """A folder without its trailing slash: 301 to the slash form, query kept.

        ``path`` passed rawpath.parse (no empty segment, no backslash), so the Location can never
        begin with ``//`` or ``/\\`` and is always on this host.
        """
        location = route.prefix + quote(path, safe=_LOCATION_SAFE).encode("ascii")
        if has_query:
            location += b"?" + quote(query, safe=_QUERY_SAFE).encode("ascii")
        request.setResponseCode(301)
        set_page_headers(request, route)
        request.setHeader(b"Location", location)
        request.setHeader(b"Content-Length", b"0")
        request.finish()

    def _listing(
        self, request: ProxyRequest, route: routing.Route, body: bytes, as_json: bool
    ) -> None:
        request.setResponseCode(200)
        set_page_headers(request, route)
        request.setHeader(b"Vary", b"Accept")
        request.setHeader(
            b"Content-Type",
            b"application/json; charset=utf-8" if as_json else b"text/html; charset=utf-8",
        )
        request.setHeader(b"Content-Length", b"%d" % len(body))
        if request.method != b"HEAD":
            request.write(body)
        request.finish()

    def _serve_file(
        self,
        request: ProxyRequest,
        route: routing.Route,
        access: Access,
        opened: rawfs.OpenFile,
        name: bytes,
        download: bool,
    ) -> None:
        size = opened.size
        validators = rawhttp.Validators(
            rawhttp.etag_for(opened.inode, size, opened.mtime_ns), int(opened.mtime)
        )
        request.setHeader(b"ETag", validators.etag.encode("latin-1"))
        request.setHeader(b"Last-Modified", rawhttp.http_date(opened.mtime).encode("ascii"))
        request.setHeader(b"Cache-Control", FILE_CACHE_CONTROL)
        request.setHeader(b"Accept-Ranges", b"bytes")
        conditions = {
            "if-match": _header(request, b"if-match", combine=True),
            "if-none-match": _header(request, b"if-none-match", combine=True),
            "if-modified-since": _header(request, b"if-modified-since"),
            "if-unmodified-since": _header(request, b"if-unmodified-since"),
        }
        verdict = rawhttp.preconditions(request.method, conditions, validators)
        if verdict == 304:
            opened.close()
            request.setResponseCode(304)
            request.finish()
            return
        if verdict == 412:
            opened.close()
            fail(request, route, 412, "Precondition failed", "The file has changed.")
            return

        ctype = rawhttp.content_type(name)
        if download:
            request.setHeader(b"Content-Disposition", rawhttp.content_disposition(name))
        ranges: list[tuple[int, int]] | rawhttp.Unsatisfiable | None = None
        if request.method == b"GET" and rawhttp.if_range_allows(
            _header(request, b"if-range"), validators
        ):
            ranges = rawhttp.parse_ranges(_header(request, b"range", combine=True), size)
        if isinstance(ranges, rawhttp.Unsatisfiable):
            opened.close()
            request.setHeader(b"Content-Range", b"bytes */%d" % size)
            fail(request, route, 416, "Range not satisfiable", "No requested range is in the file.")
            return

        closing = b""
        if ranges is None:
            request.setResponseCode(200)
            request.setHeader(b"Content-Type", ctype)
            parts = [rawhttp.Part(b"", 0, size)]
            length = size
        elif len(ranges) == 1:
            first, last = ranges[0]
            request.setResponseCode(206)
            request.setHeader(b"Content-Type", ctype)
            request.setHeader(b"Content-Range", rawhttp.content_range(first, last, size))
            parts = [rawhttp.Part(b"", first, last - first + 1)]
            length = last - first + 1
        else:
            boundary = secrets.token_hex(16).encode("ascii")
            parts, closing, length = rawhttp.multipart_layout(ranges, size, ctype, boundary)
            request.setResponseCode(206)
            request.setHeader(b"Content-Type", b"multipart/byteranges; boundary=" + boundary)
        request.setHeader(b"Content-Length", b"%d" % length)
        if request.method == b"HEAD" or length == 0:
            opened.close()
            request.finish()
            return
        sender = self.sender_factory(
            request, opened, parts, closing, self.run_blocking, self.chunk_size
        )
        sender.start(access)


def _resolve_and_render(
    home: bytes, parsed: rawpath.RawPath, as_json: bool, limit: int
) -> rawfs.Outcome | bytes:
    """Worker-thread half of a request: resolve, and render a listing here rather than on the
    reactor (a large folder's page takes a while to build)."""
    outcome = rawfs.resolve(
        home, parsed.segments, listing=parsed.directory_form, listing_limit=limit
    )
    if isinstance(outcome, rawfs.Directory) and outcome.listing is not None:
        render = rawlisting.render_json if as_json else rawlisting.render_html
        return render(parsed.segments, outcome.listing)
    if isinstance(outcome, rawfs.OpenFile) and parsed.directory_form:
        outcome.close()
        return rawfs.MISSING  # "file.txt/": a file is not a folder
    return outcome


@implementer(IPushProducer)
class FileSender:
    """Streams byte ranges of an open file to a request, one chunk in flight at a time.

    Reads happen in worker threads (``os.pread`` needs no shared file offset); the next read
    starts only after the previous chunk was written and while the transport is not paused,
    so at most one chunk per response is held in memory. The file is closed exactly once,
    whether the response completes, the client disconnects or a read fails.
    """

    def __init__(
        self,
        request: ProxyRequest,
        opened: rawfs.OpenFile,
        parts: list[rawhttp.Part],
        closing: bytes,
        run_blocking: Callable[..., Deferred[Any]],
        chunk_size: int,
    ) -> None:
        self.request = request
        self.opened = opened
        self.parts = parts
        self.closing = closing
        self.run_blocking = run_blocking
        self.chunk_size = chunk_size
        self.index = 0
        self.sent_in_part = 0
        self.head_sent = False
        self.paused = False
        self.stopped = False
        self.reading = False
        self.done = False
        self._forget_access: Callable[[], None] = lambda: None

    def start(self, access: Access | None = None) -> None:
        """Start sending; a download still running when ``access`` is revoked is cut off."""
        self.request.registerProducer(self, True)
        self.request.notifyFinish().addErrback(self._lost)
        if access is not None:
            self._forget_access = access.on_revoked(self.revoked)
        self._pump()

    def revoked(self) -> None:
        if not (self.stopped or self.done):
            log.info("raw download cut: access withdrawn")
            self._abort()

    def _pump(self) -> None:
        while not (self.paused or self.stopped or self.reading or self.done):
            if self.index == len(self.parts):
                self._complete()
                return
            part = self.parts[self.index]
            if not self.head_sent:
                self.head_sent = True
                if part.head:
                    self.request.write(part.head)
                continue
            remaining = part.length - self.sent_in_part
            if remaining == 0:
                self.index += 1
                self.sent_in_part = 0
                self.head_sent = False
                continue
            self.reading = True
            d = self.run_blocking(
                os.pread,
                self.opened.fd,
                min(self.chunk_size, remaining),
                part.offset + self.sent_in_part,
            )
            d.addCallbacks(self._read, self._read_failed)

    def _read(self, data: bytes) -> None:
        self.reading = False
        if self.stopped:
            self.opened.close()
            return
        if not data:
            log.warn("raw file shrank while being sent; closing the connection")
            self._abort()
            return
        self.sent_in_part += len(data)
        self.request.write(data)
        self._pump()

    def _read_failed(self, failure: Failure) -> None:
        self.reading = False
        if self.stopped:
            self.opened.close()
            return
        log.failure("reading a raw file failed", failure)
        self._abort()

    def _complete(self) -> None:
        self.done = True
        self._forget_access()
        self.opened.close()
        if self.closing:
            self.request.write(self.closing)
        self.request.unregisterProducer()
        self.request.finish()

    def _abort(self) -> None:
        """The promised Content-Length cannot be kept: cut the connection, never send less."""
        self.stopped = True
        self._forget_access()
        if not self.reading:
            self.opened.close()
        channel = self.request.channel
        transport = getattr(channel, "transport", None)
        if channel is not None:
            self.request.unregisterProducer()
        if transport is not None:
            transport.abortConnection()

    def _lost(self, failure: Failure) -> None:
        self.stopProducing()

    # IPushProducer
    def pauseProducing(self) -> None:  # noqa: N802
        self.paused = True

    def resumeProducing(self) -> None:  # noqa: N802
        self.paused = False
        self._pump()

    def stopProducing(self) -> None:  # noqa: N802
        if self.stopped or self.done:
            return
        self.stopped = True
        self._forget_access()
        if not self.reading:
            self.opened.close()
