"""The fast lane: the proxy's most common request, without Twisted's HTTP server machinery.

Nearly every request a proxy sees is the same: a body-less ``GET`` (or ``HEAD``) over a kept-alive
connection, for a project's server, from someone whose credentials and membership the guard has
cached. For that request Twisted's ``HTTPChannel`` and ``Request`` (a line parser called per
header line, a ``Headers`` object per direction, a Deferred per step, about 40 attributes set up
and torn down) cost more than all the proxy's own work. :class:`LaneChannel` is the first protocol
of every connection of the HTTPS site. It reads request heads itself, parsed by llhttp through
httptools (strict: invalid bytes in the method, the target or a header are parse errors), and
takes a request only when every one of these holds:

* the head is complete and holds nothing the lane does not handle: ``GET`` or ``HEAD``,
  ``HTTP/1.1``, an origin-form target (``/...``), exactly one ``Host``, no ``Content-Length``,
  ``Transfer-Encoding``, ``Upgrade`` or ``Expect``, at most :data:`MAX_HEADERS` header lines, no
  pipelined bytes behind it, no bare CR or LF and no folded lines;
* the root (``site.Root.lane_take``) routes it to a project's server (``port`` or ``server``
  form) and the guard decides it from its caches alone, with nothing to answer itself
  (``PolicyGuard.lane_access``).

Anything else, at any of these steps, is **handed over**: a ``ProxyChannel`` (Twisted's, with every
rule of the ordinary path) takes the lane's place on the transport and is given every byte the
lane had received, exactly as if it had been there from the start. Until a request is taken
nothing has been written, sent to a backend or counted, so the handover is invisible; after it,
the connection stays on the ordinary path. So the lane adds no rule of its own: every refusal,
page, challenge, sign-in hop, body, WebSocket and malformed request is the ordinary path's.

A taken request is answered through :class:`LaneRequest`, which offers the part of Twisted's
``Request`` that the forwarder, the error pages, the access log and the shutdown drain use, and
writes the answer's head in one piece: the status line, the backend's headers as the header policy
let them through, ``Date``, ``Strict-Transport-Security``, ``Connection: close`` when the
connection closes after it, and Twisted's framing rule (``Content-Length`` when known, else
chunked; no body for ``HEAD``, 204 and 304).

Timeouts are the ordinary path's: a request head must be whole within ``request_head_timeout``
seconds of its first byte (of the connection's start for the first one; else a 408 and the
connection closes), and a kept-alive connection with no request closes after ``site.timeOut``
seconds (75), on one lazily moved deadline per connection (``site._Deadline``).
"""

from __future__ import annotations

from typing import Any

import httptools
from twisted.internet.interfaces import IPushProducer, ISSLTransport, ITCPTransport
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import NO_BODY_CODES, RESPONSES
from twisted.web.http_headers import Headers
from zope.interface import implementer

from cocalcproxy.http.bannerless import http_date
from cocalcproxy.http.headers import connection_tokens
from cocalcproxy.http.site import LogInfo, _Deadline, _timeout_answer
from cocalcproxy.http.takeover import TakeoverUnsupported, protocol_holder

log = Logger(namespace="cocalcproxy.site")

#: A head longer than this is left to the ordinary path (which applies the real limits).
MAX_HEAD_BYTES = 16 * 1024
#: As many header lines as the lane takes; more go the ordinary way.
MAX_HEADERS = 64
#: Bytes kept from a client while its request is answered before reading pauses.
MAX_PENDING = 64 * 1024
#: Seconds a connection closed for idling may take to close cleanly before it is aborted.
ABORT_TIMEOUT = 15.0

_TAKEN_METHODS = frozenset((b"GET", b"HEAD"))
#: Request headers that make a request the ordinary path's (body, upgrade, 100-continue).
_NOT_TAKEN = frozenset((b"content-length", b"transfer-encoding", b"upgrade", b"expect"))
_ABSENT: list[bytes] = []


class _HandOver(Exception):
    """The lane does not take this request: the ordinary path gets the connection."""


class LaneHeaders:
    """A request's headers as received (``raw``, in order) and by lower-case name, with the
    reading half of Twisted's ``Headers`` API (what the guard and the pages ask)."""

    __slots__ = ("raw", "_by_name")

    def __init__(self, raw: list[tuple[bytes, bytes]], by_name: dict[bytes, list[bytes]]) -> None:
        self.raw = raw
        self._by_name = by_name

    def getRawHeaders(self, name: bytes | str, default: Any = None) -> Any:  # noqa: N802
        key = name.lower() if isinstance(name, bytes) else name.lower().encode("ascii")
        found = self._by_name.get(key)
        return list(found) if found is not None else default


class LaneRequest:
    """One request taken by the lane; see the module's description for what it offers."""

    def __init__(
        self,
        channel: LaneChannel,
        method: bytes,
        uri: bytes,
        headers: LaneHeaders,
        host: bytes,
    ) -> None:
        self.channel: LaneChannel | None = channel
        self.site = channel.site
        # Kept: the access log asks for it after the connection is gone.
        self.peer = channel.peer
        self.method = method
        self.uri = uri
        self.requestHeaders = headers  # noqa: N815
        self.host = host
        self.log_info = LogInfo()
        self.authorization_is_proxy_credential = False
        self.identity_assertion: bytes | None = None
        # Set by the backend policy with the lane's access: where the request goes.
        self.lane_target: Any = None
        self.code = 200
        self.code_message = b"OK"
        self.finished = False
        self.startedWriting = False  # noqa: N815
        self.sentLength = 0  # noqa: N815
        self._disconnected = False
        self.chunked = False
        self.producer: Any = None
        # The forwarder's head (code set apart): the backend's headers after the policy.
        self.proxied_headers: list[tuple[bytes, bytes]] | None = None
        self._response_headers: Headers | None = None
        self._body_allowed = True
        # Told of the connection's loss while the request is open (the forwarder's cancel).
        self.on_lost: Any = None

    # --- what the guard, the pages and the access log read --------------------------------

    def getClientAddress(self) -> Any:  # noqa: N802
        return self.peer

    # --- the answer ---------------------------------------------------------------------------

    @property
    def responseHeaders(self) -> Headers:  # noqa: N802
        """Headers set one by one (the error pages, the drain); created when first asked for."""
        if self._response_headers is None:
            self._response_headers = Headers()
        return self._response_headers

    @responseHeaders.setter
    def responseHeaders(self, value: Headers) -> None:  # noqa: N802
        self._response_headers = value

    def setResponseCode(self, code: int, message: bytes | None = None) -> None:  # noqa: N802
        self.code = code
        self.code_message = message if message else RESPONSES.get(code, b"Unknown Status")

    def setHeader(self, name: bytes | str, value: bytes | str) -> None:  # noqa: N802
        self.responseHeaders.setRawHeaders(name, [value])

    def set_proxied_head(
        self, code: int, phrase: bytes | None, headers: list[tuple[bytes, bytes]]
    ) -> None:
        """The forwarder's answer head: the status and the headers to send, as they are."""
        self.setResponseCode(code, phrase)
        self.proxied_headers = headers

    def registerProducer(self, producer: Any, streaming: bool) -> None:  # noqa: N802
        """The answer's producer (the forwarder's, streaming), paused and resumed by the channel
        as the transport fills and drains (the channel is the transport's producer)."""
        if not streaming:
            raise ValueError("the lane takes only streaming producers")
        self.producer = producer
        channel = self.channel
        if channel is not None:
            channel.set_request_producer(producer)

    def unregisterProducer(self) -> None:  # noqa: N802
        if self.producer is None:
            return
        self.producer = None
        channel = self.channel
        if channel is not None:
            channel.set_request_producer(None)

    def _head(self) -> bytes:
        """The answer's head, framing decided as Twisted's ``Request.write`` does."""
        channel = self.channel
        assert channel is not None
        code = self.code
        lines = [b"HTTP/1.1 %d %s" % (code, self.code_message)]
        has_length = has_date = False
        for source in (self.proxied_headers, self._extra_headers()):
            for name, value in source or ():
                lname = name.lower()
                if lname == b"content-length":
                    has_length = True
                elif lname == b"date":
                    has_date = True
                elif lname in (b"strict-transport-security", b"connection", b"transfer-encoding"):
                    continue  # the proxy's own, below
                lines.append(name + b": " + value)
        if not has_date:
            lines.append(b"Date: " + http_date.now())
        hsts = channel.hsts
        if hsts is not None:
            lines.append(hsts)
        if not channel.persistent:
            lines.append(b"Connection: close")
        bodiless = self.method == b"HEAD" or code in NO_BODY_CODES
        if not has_length and not bodiless:
            lines.append(b"Transfer-Encoding: chunked")
            self.chunked = True
        self._body_allowed = not bodiless
        lines.append(b"\r\n")
        head = b"\r\n".join(lines)
        # Every line ends with CRLF and no value holds a CR or LF of its own: a header value
        # with one (a backend's, after rewriting) would split the answer (response splitting).
        if head.count(b"\n") != len(lines) or head.count(b"\r") != len(lines):
            raise ValueError("a response header holds a line break")
        return head

    def _extra_headers(self) -> list[tuple[bytes, bytes]]:
        found = self._response_headers
        if found is None:
            return []
        return [(name, value) for name, values in found.getAllRawHeaders() for value in values]

    def write(self, data: bytes) -> None:
        if self.finished:
            raise RuntimeError("write after finish")
        channel = self.channel
        if self._disconnected or channel is None:
            return
        transport: Any = channel.transport
        if not self.startedWriting:
            self.startedWriting = True
            try:
                head = self._head()
            except ValueError as e:
                log.warn("answer for {uri!r} not sent: {why}", uri=self.uri, why=str(e))
                self.log_info.extra["backend"] = "bad-response-header"
                channel.abort()
                return
            if not self._body_allowed or not data:
                transport.write(head)
                return
            self.sentLength += len(data)
            if self.chunked:
                transport.write(b"%s%x\r\n%s\r\n" % (head, len(data), data))
            else:
                transport.write(head + data)
            return
        if not self._body_allowed or not data:
            return
        self.sentLength += len(data)
        if self.chunked:
            transport.write(b"%x\r\n%s\r\n" % (len(data), data))
        else:
            transport.write(data)

    def finish(self) -> None:
        if self._disconnected or self.finished:
            return
        if not self.startedWriting:
            self.write(b"")
        channel = self.channel
        if channel is None or self._disconnected:
            return
        if self.chunked:
            wire: Any = channel.transport
            wire.write(b"0\r\n\r\n")
        self.finished = True
        self.on_lost = None  # the forwarder's: it refers back to this request
        if self.producer is not None:
            self.unregisterProducer()
        self._end()
        channel.request_done(self)

    def _end(self) -> None:
        self.site.lane_done(self)

    def connection_lost(self, reason: Failure) -> None:
        """The client went away before the answer was whole."""
        if self.finished or self._disconnected:
            return
        self._disconnected = True
        self.channel = None
        on_lost, self.on_lost = self.on_lost, None
        if on_lost is not None:
            try:
                on_lost(reason)
            except Exception:
                log.failure("cancelling a request whose client went away failed")
        self._end()


@implementer(IPushProducer)
class LaneChannel(Protocol):
    """The first protocol of each HTTPS connection; see the module's description.

    As Twisted's ``HTTPChannel``, it is its transport's producer for as long as it is the
    connection's protocol: when the transport's send buffer is full, the answer's producer is
    paused, and between requests the connection is not read, so a client that sends requests
    and never reads the answers cannot make the proxy hold answers without bound."""

    def __init__(self, site: Any, address: Any) -> None:
        self.site = site
        self.address = address
        self.buffer = b""
        self.pending: list[bytes] = []
        self.pending_size = 0
        self.paused = False
        # The transport's send buffer is full (it paused us), and the answer's producer.
        self.waiting_for_transport = False
        self._request_producer: Any = None
        self._producing = False
        self.persistent = True
        # The shutdown drain's view (as HTTPChannel's): the request being answered, if any.
        self.requests: list[LaneRequest] = []
        self.peer: Any = None
        self.secure = False
        self.hsts: bytes | None = None
        self.closing = False
        self.handed_over = False
        self._deadline = _Deadline(self._due)
        # The forwarder's response timeout, on one lazily moved deadline per connection.
        self._response_clock = _Deadline(self._response_due)
        self._on_response_due: Any = None
        self._in_head = True
        self._abort_call: Any = None
        self._parser: Any = None
        # What llhttp reports for the head being parsed.
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_done = False

    # --- the connection -----------------------------------------------------------------------

    def connectionMade(self) -> None:  # noqa: N802
        transport: Any = self.transport
        if ITCPTransport.providedBy(transport):
            transport.setTcpNoDelay(True)  # as Twisted's HTTPChannel: answers leave at once
        self.peer = transport.getPeer()
        self.secure = ISSLTransport(transport, None) is not None
        transport.registerProducer(self, True)
        self._producing = True
        max_age = getattr(self.site, "hsts_max_age", 0)
        if self.secure and max_age > 0:
            self.hsts = b"Strict-Transport-Security: max-age=%d" % (max_age,)
        self._arm_head_clock()

    def _head_timeout(self) -> float | None:
        value = getattr(self.site, "request_head_timeout", None)
        return float(value) if value else None

    def _arm_head_clock(self) -> None:
        timeout = self._head_timeout()
        self._in_head = True
        if timeout is not None:
            self._deadline.set(timeout, self.site.reactor.callLater)
        else:
            self._deadline.clear()

    def idle(self) -> None:
        """Between two requests (the ordinary path has just given the connection back)."""
        self._arm_idle_clock()

    def _arm_idle_clock(self) -> None:
        self._in_head = False
        idle = getattr(self.site, "timeOut", None)
        if idle:
            self._deadline.set(float(idle), self.site.reactor.callLater)
        else:
            self._deadline.clear()

    def _due(self) -> None:
        transport: Any = self.transport
        if transport is None or self.requests or self.closing or self.handed_over:
            return
        self.closing = True
        if self._in_head and self.buffer:
            timeout = self._head_timeout() or 0.0
            detail = f"The request head did not arrive within {timeout:g} seconds."
            log.info(
                "closing a connection from {peer}: {detail}",
                peer=getattr(self.peer, "host", "?"),
                detail=detail,
            )
            transport.write(_timeout_answer(detail))
        self.loseConnection()

    def response_deadline(self, delay: float, on_due: Any) -> None:
        """Call ``on_due`` in ``delay`` seconds unless moved again or cleared first."""
        self._on_response_due = on_due
        self._response_clock.set(delay, self.site.reactor.callLater)

    def response_deadline_clear(self) -> None:
        self._on_response_due = None
        self._response_clock.clear()

    def _response_due(self) -> None:
        on_due, self._on_response_due = self._on_response_due, None
        if on_due is not None:
            on_due()

    def loseConnection(self) -> None:  # noqa: N802
        """Close (idle, timed out, or the shutdown drain); aborted if it takes too long."""
        transport: Any = self.transport
        if transport is None:
            return
        self.closing = True
        self._deadline.stop()
        if self._abort_call is None:
            self._abort_call = self.site.reactor.callLater(ABORT_TIMEOUT, self.abort)
        # TLS closes only once no producer is registered (as HTTPChannel.loseConnection).
        self._stop_being_producer()
        transport.loseConnection()

    def _stop_being_producer(self) -> None:
        transport: Any = self.transport
        if self._producing and transport is not None:
            self._producing = False
            transport.unregisterProducer()

    # --- the transport's producer -------------------------------------------------------------

    def pauseProducing(self) -> None:  # noqa: N802
        """The send buffer is full: pause the answer; between requests, stop reading."""
        self.waiting_for_transport = True
        producer = self._request_producer
        if producer is not None:
            producer.pauseProducing()
        if not self.requests:
            self._stop_reading()

    def resumeProducing(self) -> None:  # noqa: N802
        self.waiting_for_transport = False
        producer = self._request_producer
        if producer is not None:
            producer.resumeProducing()
        if not self.requests:
            self._read_on()

    def stopProducing(self) -> None:  # noqa: N802
        producer = self._request_producer
        if producer is not None:
            producer.stopProducing()

    def set_request_producer(self, producer: Any) -> None:
        self._request_producer = producer
        if producer is not None and self.waiting_for_transport:
            producer.pauseProducing()

    def _stop_reading(self) -> None:
        transport: Any = self.transport
        if not self.paused and transport is not None:
            self.paused = True
            transport.pauseProducing()

    def _read_on(self) -> None:
        """No request is being answered and the transport takes more: read again, starting
        with what arrived meanwhile."""
        transport: Any = self.transport
        if transport is None or self.closing or self.handed_over:
            return
        if self.paused:
            self.paused = False
            transport.resumeProducing()
        if self.pending:
            self.site.reactor.callLater(0, self._read_pending)

    def abort(self) -> None:
        self._abort_call = None
        transport: Any = self.transport
        if transport is not None:
            transport.abortConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:  # noqa: N802
        # Nothing that refers back to the channel is kept (deadlines, the parser): its end frees
        # it at once, without waiting for the cyclic collector.
        self._deadline.release()
        self._response_clock.release()
        self._parser = None
        self._on_response_due = None
        self._request_producer = None
        self._producing = False
        call, self._abort_call = self._abort_call, None
        if call is not None and call.active():
            call.cancel()
        requests, self.requests = self.requests, []
        for request in requests:
            request.connection_lost(reason)
        self.transport = None

    # --- reading ------------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        if self.closing:
            return
        if self.requests or self.pending or self.waiting_for_transport:
            # A request is being answered, or the client has not read the last answer yet (or
            # what came after one of these waits its turn).
            self.pending.append(data)
            self.pending_size += len(data)
            if self.pending_size > MAX_PENDING:
                self._stop_reading()
            return
        if self.buffer:
            data = self.buffer + data
        elif not self._in_head:
            self._arm_head_clock()
        end = data.find(b"\r\n\r\n")
        if end < 0:
            if len(data) > MAX_HEAD_BYTES:
                self.hand_over(data)
                return
            self.buffer = data
            return
        self.buffer = b""
        if end + 4 != len(data) or end + 4 > MAX_HEAD_BYTES:
            self.hand_over(data)  # pipelined requests or a body: the ordinary path's
            return
        try:
            request = self._parse(data)
            if not self.site.resource.lane_take(request):
                raise _HandOver()
        except _HandOver:
            self.hand_over(data)
            return
        except Exception:
            log.failure("the fast lane failed on a request head; handing it over")
            self.hand_over(data)
            return

    def _parse(self, head: bytes) -> LaneRequest:
        # CRs and LFs only in pairs, and no folded (obsolete) header lines.
        if head.count(b"\r") != head.count(b"\n") or b"\n " in head or b"\n\t" in head:
            raise _HandOver()
        parser = self._parser
        if parser is None:
            parser = self._parser = httptools.HttpRequestParser(self)
        self._url = b""
        self._headers = []
        self._head_done = False
        try:
            parser.feed_data(head)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            self._parser = None
            raise _HandOver() from None
        if not self._head_done or parser.get_http_version() != "1.1":
            self._parser = None
            raise _HandOver()
        method = parser.get_method()
        url = self._url
        if method not in _TAKEN_METHODS or not url.startswith(b"/"):
            raise _HandOver()
        raw = self._headers
        if len(raw) > MAX_HEADERS:
            raise _HandOver()
        by_name: dict[bytes, list[bytes]] = {}
        for name, value in raw:
            lname = name.lower()
            if lname in _NOT_TAKEN:
                raise _HandOver()
            found = by_name.get(lname)
            if found is None:
                by_name[lname] = [value]
            else:
                found.append(value)
        hosts = by_name.get(b"host", _ABSENT)
        if len(hosts) != 1:
            raise _HandOver()
        if b"close" in connection_tokens(raw):
            self.persistent = False
        return LaneRequest(self, method, url, LaneHeaders(raw, by_name), hosts[0])

    # llhttp's callbacks
    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        # llhttp drops the whitespace before a value, not after it: neither is part of it
        # (RFC 9110 section 5.5), and the ordinary path strips both.
        self._headers.append((name, value.rstrip(b" \t")))

    def on_headers_complete(self) -> None:
        self._head_done = True

    # --- what the root and the request call ---------------------------------------------------

    def start(self, request: LaneRequest) -> None:
        """The root took the request: it is being answered from now on."""
        self._deadline.clear()
        self._in_head = False
        self.requests = [request]
        self.site.lane_started(request)

    def request_done(self, request: LaneRequest) -> None:
        if self.requests and self.requests[0] is request:
            self.requests = []
        request.channel = None
        if not self.persistent:
            self.loseConnection()
            return
        self._arm_idle_clock()
        if self.waiting_for_transport:
            self._stop_reading()  # until the client has read the answer (resumeProducing)
        else:
            self._read_on()

    def _read_pending(self) -> None:
        if (
            self.transport is None
            or self.requests
            or self.handed_over
            or self.closing
            or self.waiting_for_transport
            or not self.pending
        ):
            return  # gone, or not yet: resumeProducing or the next request_done reads it
        pending, self.pending = self.pending, []
        self.pending_size = 0
        self.dataReceived(b"".join(pending))

    # --- handing over -------------------------------------------------------------------------

    def hand_over(self, data: bytes) -> None:
        """Put the ordinary path's protocol in the lane's place and give it ``data`` (every
        byte of the connection the lane has not answered)."""
        transport: Any = self.transport
        self._deadline.release()
        self._response_clock.release()
        self.handed_over = True
        self.buffer = b""
        self._parser = None
        if transport is None:
            return
        try:
            holder, attribute = protocol_holder(transport, self)
        except TakeoverUnsupported:
            log.error("cannot hand a connection over: the transport does not hold the lane")
            transport.abortConnection()
            return
        # The ordinary path's channel becomes the transport's producer, and reads for itself.
        self._stop_being_producer()
        if self.paused:
            self.paused = False
            transport.resumeProducing()
        protocol = self.site.build_channel(self.address)
        setattr(holder, attribute, protocol)
        self.transport = None
        protocol.makeConnection(transport)
        if data:
            protocol.dataReceived(data)
