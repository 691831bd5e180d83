"""The forwarder's HTTP/1.1 client: a pool of backend connections, parsed by httptools.

Twisted's Agent, its connection pool and ``_newclient`` cost about a third of the proxy's CPU per
small request (several Deferred chains, two header objects and a line parser per exchange, a
timer per pooled connection). This client does one thing: send one request head (and a spooled
body) on a kept-alive connection and hand back the response, parsed by llhttp through httptools.

* :class:`BackendPool` keeps idle connections per key (host and port, or Unix socket and owner).
  It grows with demand: it keeps every released connection up to the larger of ``pool_size`` and
  the most connections that were busy at once since the last sweep (at most ``IDLE_CEILING``),
  and a sweep closes those idle for more than ``idle_timeout`` seconds. One timer serves the
  whole pool, armed only while something is idle.
* :class:`BackendConnection` carries one exchange at a time. A reused connection that fails
  before any byte of the answer arrived is tried once more on a fresh connection, any method,
  with the spooled body sent again from its start (the backend never saw the request).
* :class:`BackendResponse` is the answer: status, reason, every header as received and the body
  length if the framing says it, and ``deliverBody(protocol)`` with Twisted's body protocol
  contract: ``makeConnection`` (the transport pauses, resumes and stops reading the backend),
  ``dataReceived``, ``connectionLost`` with :class:`ResponseDone`, :class:`PotentialDataLoss`
  (a body delimited by the connection's close) or :class:`ResponseFailed`.
* The response head is bounded by :class:`~cocalcproxy.http.headlimit.HeadLimit` before the
  parser sees a byte; a head over the bound fails with ``ResponseFailed([HeadTooLarge])``.
* The answer to HEAD has no body whatever its framing says, and its connection is not reused
  (llhttp cannot be told that the request was HEAD, so nothing it parses after it is trusted).
"""

from __future__ import annotations

import re
from typing import Any

import httptools
from twisted.internet import error
from twisted.internet.defer import AlreadyCalledError, CancelledError, Deferred, succeed
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import (
    RequestTransmissionFailed,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http import PotentialDataLoss

from cocalcproxy.http.eagerwrite import eager_write
from cocalcproxy.http.headlimit import HeadLimit, HeadTooLarge

log = Logger(namespace="cocalcproxy.forward")

#: Bytes read from a spooled request body per write to the backend; a body up to this size goes
#: out in the same write as the head.
BODY_CHUNK = 64 * 1024
#: Idle connections are closed after this many seconds (servers close them anyway).
IDLE_TIMEOUT = 60.0
#: However many were busy at once, at most this many idle connections are kept per backend
#: beyond the configured pool size (a burst must not leave thousands of sockets open).
IDLE_CEILING = 1024

_METHOD = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
# What a request target may hold: printable ASCII without spaces (as Twisted's client checks).
_TARGET = re.compile(rb"[\x21-\x7e]+\Z")
_NO_BODY_STATUS = frozenset((204, 304))
# Methods whose body-less request still says Content-Length: 0 (what Twisted's client sent).
_ZERO_LENGTH_METHODS = frozenset((b"POST", b"PUT", b"PATCH"))


#: The end of every whole answer: one Failure for all (building one costs more than the
#: rest of ending an answer); nothing holds on to it or changes it.
_RESPONSE_DONE = Failure(ResponseDone("Response body fully received"))


class BadRequestForBackend(ValueError):
    """A method or target that must not be written into a request line."""


class BackendResponse:
    """One answer: see the module's description."""

    __slots__ = ("code", "phrase", "headers", "length", "_connection", "_protocol", "_early")

    def __init__(
        self,
        connection: BackendConnection,
        code: int,
        phrase: bytes,
        headers: list[tuple[bytes, bytes]],
        length: int | None,
    ) -> None:
        self.code = code
        self.phrase = phrase
        self.headers = headers
        self.length = length
        self._connection = connection
        self._protocol: Any = None
        # Body chunks (and the end) that arrived before deliverBody was called.
        self._early: list[Any] | None = []

    def deliverBody(self, protocol: Any) -> None:  # noqa: N802
        self._protocol = protocol
        protocol.makeConnection(_BodyTransport(self._connection, self))
        early, self._early = self._early, None
        for item in early or ():
            if isinstance(item, Failure):
                self._protocol = None
                protocol.connectionLost(item)
            else:
                protocol.dataReceived(item)

    def _data(self, data: bytes) -> None:
        if self._early is not None:
            self._early.append(data)
        else:
            self._protocol.dataReceived(data)

    def _end(self, reason: Failure) -> None:
        if self._early is not None:
            self._early.append(reason)
        else:
            # Let go of the body protocol: it refers back to this response (its transport).
            protocol, self._protocol = self._protocol, None
            protocol.connectionLost(reason)


class _BodyTransport:
    """What the body protocol sees as its transport: flow control of this one response."""

    __slots__ = ("_connection", "_response")

    def __init__(self, connection: BackendConnection, response: BackendResponse) -> None:
        self._connection = connection
        self._response = response

    def _mine(self) -> bool:
        return self._connection.response is self._response

    def pauseProducing(self) -> None:  # noqa: N802
        if self._mine() and self._connection.transport is not None:
            self._connection.transport.pauseProducing()

    def resumeProducing(self) -> None:  # noqa: N802
        if self._mine() and self._connection.transport is not None:
            self._connection.transport.resumeProducing()

    def stopProducing(self) -> None:  # noqa: N802
        """Nobody wants the rest: close the backend connection mid-body."""
        if self._mine():
            self._connection.abandon()


class _Call:
    """One request on its way: what to send, and where the answer goes."""

    __slots__ = (
        "key",
        "endpoint",
        "head",
        "content",
        "length",
        "progress",
        "head_only",
        "deferred",
        "connecting",
        "connection",
        "retried",
        "done",
        "sink",
    )

    def __init__(
        self,
        key: Any,
        endpoint: Any,
        head: bytes,
        content: Any,
        length: int,
        progress: Any,
        head_only: bool,
        receiver: tuple[Any, Any] | None = None,
    ) -> None:
        self.key = key
        self.endpoint = endpoint
        self.head = head
        self.content = content
        self.length = length
        self.progress = progress
        self.head_only = head_only
        self.deferred: Any = (
            Deferred(self._cancel) if receiver is None else _Direct(self, *receiver)
        )
        self.connecting: Deferred[Any] | None = None
        self.connection: BackendConnection | None = None
        self.retried = False
        self.done = False
        # The client's transport, when it can hold writes (cork/uncork): everything one backend
        # read makes the proxy write to the client then leaves at once.
        self.sink: Any = None

    def _cancel(self, d: Any) -> None:
        self.done = True
        if self.connecting is not None:
            connecting, self.connecting = self.connecting, None
            connecting.cancel()
        connection, self.connection = self.connection, None
        if connection is not None:
            connection.abandon()
            connection.call = None

    def settle(self) -> Any:
        """The Deferred (or _Direct) to fire, once; None when it was fired or cancelled
        already."""
        if self.done:
            return None
        self.done = True
        return self.deferred


class _Direct:
    """What a caller of ``BackendPool.request`` gets when it passes ``receiver``: the answer
    (or the failure) goes straight to the receiver's two functions, with a Deferred's
    ``callback``/``errback``/``cancel`` semantics (once; ``cancel`` stops the call and fails
    with :class:`CancelledError`), without a Deferred's callback chain on every request."""

    __slots__ = ("_call", "_on_result", "_on_failure", "called")

    def __init__(self, call: _Call, on_result: Any, on_failure: Any) -> None:
        self._call: _Call | None = call
        self._on_result = on_result
        self._on_failure = on_failure
        self.called = False

    def _fired(self) -> tuple[Any, Any]:
        """Once: the receiver's two functions, let go of here (they and the call refer back to
        what holds this, cycles the collector would otherwise have to free)."""
        if self.called:
            raise AlreadyCalledError()
        self.called = True
        functions = (self._on_result, self._on_failure)
        self._on_result = self._on_failure = self._call = None
        return functions

    def callback(self, result: Any) -> None:
        on_result, _ = self._fired()
        try:
            on_result(result)
        except Exception:
            log.failure("handling a backend's answer failed")

    def errback(self, failure: Any = None) -> None:
        if not isinstance(failure, Failure):
            failure = Failure(failure) if failure is not None else Failure()
        _, on_failure = self._fired()
        try:
            on_failure(failure)
        except Exception:
            log.failure("handling a backend request's failure failed")

    def cancel(self) -> None:
        if self.called or self._call is None:
            return
        self._call._cancel(self)
        if not self.called:
            self.errback(Failure(CancelledError()))


class _BodySender:
    """Streams a spooled body over ``BODY_CHUNK`` to the backend as its transport drains."""

    def __init__(self, connection: BackendConnection, call: _Call) -> None:
        self.connection = connection
        self.call = call
        self.left = call.length
        self.stopped = False

    def resumeProducing(self) -> None:  # noqa: N802
        if self.stopped:
            return
        transport = self.connection.transport
        data = self.call.content.read(min(BODY_CHUNK, self.left))
        if not data:
            # The spool is shorter than it said: never leave the backend waiting for the rest.
            self.stopped = True
            transport.unregisterProducer()
            self.connection.abandon()
            return
        self.left -= len(data)
        self.call.progress()
        transport.write(data)
        if self.left <= 0:
            self.stopped = True
            transport.unregisterProducer()
            self.connection.body_sent()

    def pauseProducing(self) -> None:  # noqa: N802
        pass

    def stopProducing(self) -> None:  # noqa: N802
        self.stopped = True


class BackendConnection(Protocol):
    """One connection to a backend, one exchange at a time (no pipelining)."""

    transport: Any

    def __init__(self, pool: BackendPool, key: Any) -> None:
        self.pool = pool
        self.key = key
        self.call: _Call | None = None
        self.response: BackendResponse | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.limit: HeadLimit | None = None
        self.answered = False
        self.reused = False
        self.complete = False
        self.reusable = True
        self.gone = False
        self.idle_since = 0.0
        self.sender: _BodySender | None = None
        self._phrase = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._close_delimited = False
        self._interim = False

    # --- sending ------------------------------------------------------------------------------

    def send(self, call: _Call) -> None:
        self.call = call
        call.connection = self
        self.response = None
        self.limit = HeadLimit()
        self.answered = False
        self.complete = False
        self.reusable = not call.head_only
        self._headers = []
        transport = self.transport
        assert transport is not None
        call.progress()
        if call.content is None:
            eager_write(transport, call.head)
            return
        call.content.seek(0)
        if call.length <= BODY_CHUNK:
            eager_write(transport, call.head + call.content.read(call.length))
            return
        transport.write(call.head)
        self.sender = _BodySender(self, call)
        transport.registerProducer(self.sender, False)

    @property
    def sending(self) -> bool:
        """A body larger than one write is still going out."""
        return self.sender is not None

    def body_sent(self) -> None:
        # The answer cannot be complete yet: completing stops the sender before its last chunk.
        self.sender = None

    # --- parser callbacks (httptools) ---------------------------------------------------------

    def on_message_begin(self) -> None:
        self._headers = []
        self._phrase = b""

    def on_status(self, phrase: bytes) -> None:
        self._phrase += phrase

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        code: int = self.parser.get_status_code()
        if code < 200:
            # 100 Continue, 103 Early Hints: skipped (they count in the head limit).
            self._interim = True
            return
        self._interim = False
        call = self.call
        if call is None:
            raise _Unsolicited()
        length: int | None = None
        chunked = False
        for name, value in self._headers:
            lname = name.lower()
            if lname == b"content-length":
                length = _content_length(value, length)
            elif lname == b"transfer-encoding":
                chunked = True
        if chunked:
            length = None
        bodiless = call.head_only or code in _NO_BODY_STATUS
        self._close_delimited = not bodiless and not chunked and length is None
        if self._close_delimited or not self.parser.should_keep_alive():
            self.reusable = False
        response = BackendResponse(self, code, self._phrase, self._headers, length)
        self.response = response
        self._headers = []
        d = call.settle()
        call.connection = None
        if d is not None:
            d.callback(response)
        if bodiless and call.head_only:
            # llhttp would wait for the body the head announces; the answer ends here.
            self._message_complete()

    def on_body(self, data: bytes) -> None:
        response = self.response
        if response is not None and not self.complete and data:
            response._data(data)

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        if not self.complete:
            self._message_complete()

    # --- receiving ----------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        if self.gone:
            return
        if self.call is None and self.response is None:
            # Bytes nobody asked for (an idle connection, or after a complete answer).
            self.abandon()
            return
        if data:
            self.answered = True
        limit = self.limit
        if limit is not None:
            try:
                if limit.feed(data):
                    self.limit = None
            except HeadTooLarge as e:
                self.limit = None
                self._fail(ResponseFailed([Failure(e)]))
                return
        if self.complete:
            if not self.reusable:
                return  # after a HEAD's head: nothing more is read
            self.abandon()
            return
        sink = self.call.sink if self.call is not None else None
        if sink is not None:
            sink.cork()
        try:
            self._parse(data)
        finally:
            if sink is not None:
                sink.uncork()

    def _parse(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(ResponseFailed([Failure(_BadResponse("an unrequested protocol switch"))]))
        except httptools.HttpParserError as e:
            cause = e.__context__
            if isinstance(cause, _Unsolicited):
                self.abandon()
                return
            if cause is not None and not isinstance(cause, ValueError):
                # Not the backend's fault: code of ours failed inside a parser callback.
                log.failure(
                    "handling a backend's answer failed",
                    Failure(cause, type(cause), cause.__traceback__),
                )
            why = str(cause) if isinstance(cause, ValueError) else (str(e) or type(e).__name__)
            self._fail(ResponseFailed([Failure(_BadResponse(why))]))

    def _message_complete(self) -> None:
        self.complete = True
        self.limit = None
        response = self.response
        if response is not None:
            response._end(_RESPONSE_DONE)
        sender = self.sender
        if sender is not None:
            # Answered before the whole body went out: stop sending; the connection is spent.
            self.reusable = False
            sender.stopped = True
            self.sender = None
            self.transport.unregisterProducer()
        self._finished()

    def _finished(self) -> None:
        """The answer is whole and the request is sent: back to the pool, or closed."""
        self.call = None
        self.response = None
        if self.reusable and not self.gone:
            self.pool._release(self)
        else:
            self.abandon()

    def _fail(self, reason: ResponseFailed) -> None:
        """The answer cannot be read: fail whoever waits, close the connection."""
        call, response = self.call, self.response
        self.abandon()
        self.call = self.response = None
        d = call.settle() if call is not None else None
        if d is not None:
            d.errback(Failure(reason))
        elif response is not None and not self.complete:
            self.complete = True
            response._end(Failure(reason))

    def abandon(self) -> None:
        """Close at once; the connection is never reused."""
        self.reusable = False
        if self.sender is not None:
            self.sender.stopped = True
        if not self.gone and self.transport is not None:
            self.gone = True
            self.pool._forget(self)
            self.transport.abortConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:  # noqa: N802
        self.gone = True
        self.pool._forget(self)
        call, self.call = self.call, None
        response, self.response = self.response, None
        if response is not None and not self.complete:
            self.complete = True
            if self._close_delimited and reason.check(error.ConnectionDone):
                response._end(Failure(PotentialDataLoss()))
            else:
                response._end(Failure(ResponseFailed([reason])))
            return
        if call is None or call.done:
            return
        if self.reused and not self.answered and not call.retried:
            # The backend closed a kept-alive connection as the request went out: it never saw
            # it. Send it again (its spooled body too) on a fresh connection, once.
            call.retried = True
            log.debug("reused backend connection failed before the response; retrying once")
            self.pool._connect(call)
            return
        d = call.settle()
        if d is None:
            return
        if self.answered:
            d.errback(Failure(ResponseFailed([reason])))
        elif self.sending:
            d.errback(Failure(RequestTransmissionFailed([reason])))
        else:
            d.errback(Failure(ResponseNeverReceived([reason])))


class _Unsolicited(Exception):
    """An answer nobody asked for."""


class _BadResponse(Exception):
    """A response that is not valid HTTP/1.1."""


def _content_length(value: bytes, seen: int | None) -> int:
    """One Content-Length field value (``42`` or ``42, 42``), agreeing with any seen before."""
    found: int | None = seen
    for part in value.split(b","):
        part = part.strip(b" \t")
        if not part.isdigit():
            raise ValueError(f"invalid Content-Length: {value!r}")
        n = int(part)
        if found is not None and found != n:
            raise ValueError(f"conflicting Content-Length: {value!r}")
        found = n
    assert found is not None
    return found


class _ConnectionFactory(Factory):
    noisy = False

    def __init__(self, pool: BackendPool, key: Any) -> None:
        self.pool = pool
        self.key = key

    def buildProtocol(self, addr: Any) -> BackendConnection:  # noqa: N802
        return BackendConnection(self.pool, self.key)


def request_head(
    method: bytes, target: bytes, headers: list[tuple[bytes, bytes]], body_length: int | None
) -> bytes:
    """The request head: ``method target HTTP/1.1``, the headers, and the body's framing.

    ``headers`` must hold no framing (Content-Length, Transfer-Encoding); ``body_length`` None
    means no body at all."""
    if not _METHOD.match(method):
        raise BadRequestForBackend(f"invalid method {method!r}")
    if not _TARGET.match(target):
        raise BadRequestForBackend(f"invalid request target {target!r}")
    lines = [method, b" ", target, b" HTTP/1.1\r\n"]
    for name, value in headers:
        lines += (name, b": ", value, b"\r\n")
    if body_length is not None:
        lines.append(b"Content-Length: %d\r\n" % body_length)
    elif method in _ZERO_LENGTH_METHODS:
        lines.append(b"Content-Length: 0\r\n")
    lines.append(b"\r\n")
    return b"".join(lines)


class BackendPool:
    """Connections to backends, kept alive between requests; see the module's description."""

    def __init__(
        self, reactor: Any, pool_size: int = 64, idle_timeout: float = IDLE_TIMEOUT
    ) -> None:
        self.reactor = reactor
        self.pool_size = pool_size
        self.idle_timeout = idle_timeout
        self._idle: dict[Any, list[BackendConnection]] = {}
        self._busy: dict[Any, int] = {}
        self._peak: dict[Any, int] = {}
        self._all: set[BackendConnection] = set()
        self._sweeper: Any = None
        self._closing: list[Deferred[None]] = []
        self._shutting: set[BackendConnection] = set()
        self._stopped = False

    def request(
        self,
        key: Any,
        endpoint: Any,
        head: bytes,
        content: Any = None,
        length: int = 0,
        progress: Any = None,
        head_only: bool = False,
        sink: Any = None,
        receiver: tuple[Any, Any] | None = None,
    ) -> Any:
        """Send ``head`` (and ``length`` bytes of the seekable ``content``) to the backend of
        ``key``, over an idle connection when there is one, else a new one from ``endpoint``
        (a callable returning the endpoint, only called when a connection is needed).

        Returns a Deferred of the :class:`BackendResponse`; with ``receiver`` (two functions,
        for the response and for a failure), an object with a Deferred's ``cancel`` that calls
        them instead (see :class:`_Direct`)."""
        call = _Call(
            key, endpoint, head, content, length, progress or _nothing, head_only, receiver
        )
        call.sink = sink
        idle = self._idle.get(key)
        while idle:
            connection = idle.pop()
            if connection.gone:
                continue
            if self.reactor.seconds() - connection.idle_since > self.idle_timeout:
                connection.abandon()
                continue
            self._busy_more(key)
            connection.reused = True
            connection.send(call)
            return call.deferred
        self._connect(call)
        return call.deferred

    def _busy_more(self, key: Any) -> None:
        busy = self._busy.get(key, 0) + 1
        self._busy[key] = busy
        if busy > self._peak.get(key, 0):
            self._peak[key] = busy

    def _connect(self, call: _Call) -> None:
        try:
            endpoint = call.endpoint()
        except Exception:
            d = call.settle()
            if d is not None:
                d.errback()
            return
        connecting: Deferred[Any] = endpoint.connect(_ConnectionFactory(self, call.key))
        call.connecting = connecting

        def connected(connection: BackendConnection) -> None:
            call.connecting = None
            if call.done:
                connection.abandon()
                return
            self._all.add(connection)
            self._busy_more(call.key)
            connection.send(call)

        def failed(reason: Failure) -> None:
            call.connecting = None
            d = call.settle()
            if d is not None:
                d.errback(reason)

        connecting.addCallbacks(connected, failed)

    def _release(self, connection: BackendConnection) -> None:
        key = connection.key
        self._busy[key] = max(0, self._busy.get(key, 0) - 1)
        if self._stopped:
            connection.abandon()
            return
        idle = self._idle.setdefault(key, [])
        if len(idle) >= max(self.pool_size, min(self._peak.get(key, 0), IDLE_CEILING)):
            connection.abandon()
            return
        connection.idle_since = self.reactor.seconds()
        idle.append(connection)
        if self._sweeper is None:
            self._sweeper = self.reactor.callLater(self.idle_timeout / 2, self._sweep)

    def _forget(self, connection: BackendConnection) -> None:
        if connection in self._all:
            self._all.discard(connection)
            if connection.call is not None or connection.response is not None:
                key = connection.key
                self._busy[key] = max(0, self._busy.get(key, 0) - 1)
            idle = self._idle.get(connection.key)
            if idle and connection in idle:
                idle.remove(connection)
        self._shutting.discard(connection)
        if not self._shutting and self._closing:
            closing, self._closing = self._closing, []
            for d in closing:
                d.callback(None)

    def _sweep(self) -> None:
        """Close connections idle too long; let the peak follow what is busy now."""
        self._sweeper = None
        now = self.reactor.seconds()
        for key, idle in list(self._idle.items()):
            for connection in [c for c in idle if now - c.idle_since > self.idle_timeout]:
                connection.abandon()
            self._peak[key] = self._busy.get(key, 0)
            if not idle:
                del self._idle[key]
                if not self._busy.get(key):
                    self._busy.pop(key, None)
                    self._peak.pop(key, None)
        if self._idle:
            self._sweeper = self.reactor.callLater(self.idle_timeout / 2, self._sweep)

    def idle_count(self, key: Any = None) -> int:
        if key is not None:
            return len(self._idle.get(key, ()))
        return sum(len(v) for v in self._idle.values())

    def closeCachedConnections(self) -> Deferred[None]:  # noqa: N802
        """Close every idle connection, and from now on every connection when its exchange ends
        (this is for shutdown); fires when the idle ones are closed."""
        self._stopped = True
        if self._sweeper is not None and self._sweeper.active():
            self._sweeper.cancel()
        self._sweeper = None
        for idle in list(self._idle.values()):
            for connection in list(idle):
                if connection.transport is not None and not connection.gone:
                    self._shutting.add(connection)
                    connection.transport.loseConnection()
        self._idle.clear()
        if not self._shutting:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._closing.append(d)
        return d


def _nothing() -> None:
    pass


__all__ = [
    "BackendPool",
    "BackendResponse",
    "BadRequestForBackend",
    "CancelledError",
    "request_head",
]
