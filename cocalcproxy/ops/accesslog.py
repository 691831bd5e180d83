"""The access log: one JSON object per line per request, on standard output by default.

What is written, and what never is:

* time (UTC, ISO 8601, when the request ended), client address (the TCP peer; forwarded-for
  headers are not trusted), method, host, path, status, bytes in and out, duration, and the
  proxy's own facts from ``request.log_info``: account name, project id, URL form and port.
* The path is logged WITHOUT its query string: queries carry secrets in practice (Jupyter's
  ``?token=``, signed URLs, ``/_/login?next=...``). Only whether there was one is recorded.
* No request or response header is logged: not ``Cookie``, ``Authorization``, ``Set-Cookie``,
  nor anything a backend sent. Bodies never are.
* Everything is JSON-escaped (ASCII only), so a hostile path or method cannot forge a line.

``facts_of`` computes the per-request facts once; the metrics use the same facts.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web import http, server

from cocalcproxy.http.bannerless import BannerlessRequest
from cocalcproxy.http.site import REQUEST_HEAD_TIMEOUT, proxy_channel_protocol

# The namespace operators see in log lines (kept from before the package layout).
log = Logger(namespace="cocalcproxy.accesslog")

MAX_PATH = 2048


@dataclass(slots=True)
class RequestFacts:
    time: float
    client: str
    method: str
    host: str | None
    path: str
    has_query: bool
    status: int
    completed: bool
    bytes_in: int
    bytes_out: int
    duration: float
    account: str | None
    project: str | None
    form: str | None
    port: int | None
    # Why a backend could not serve ("refused", "connect-timeout", ...: the forwarder's words).
    backend_error: str | None = None
    # How a WebSocket relay ended ("client closed", "idle timeout", ...).
    websocket_end: str | None = None
    # "link" or "public" when the request came in through a shared port (no account).
    share: str | None = None


def _text(raw: bytes | None, limit: int = 512) -> str | None:
    if raw is None:
        return None
    text = raw.decode("utf-8", "backslashreplace")
    if len(text) > limit:
        text = text[:limit] + "..."
    return text


def client_of(request: server.Request) -> str:
    address = request.getClientAddress()
    host = getattr(address, "host", None)
    if isinstance(host, str):
        return host
    return "unix" if type(address).__name__ == "UNIXAddress" else "-"


def facts_of(request: server.Request, now: float) -> RequestFacts:
    """Everything the access log and the metrics need about a request that has ended."""
    info = getattr(request, "log_info", None)
    started = getattr(info, "started", None)
    extra = getattr(info, "extra", None) or {}
    uri = request.uri or b""
    path, question, _ = uri.partition(b"?")
    hosts = request.requestHeaders.getRawHeaders(b"host", [])
    return RequestFacts(
        time=now,
        client=client_of(request),
        method=_text(request.method, 32) or "-",
        host=_text(hosts[0], 256) if hosts else None,
        path=_text(path, MAX_PATH) or "",
        has_query=bool(question),
        status=int(request.code),
        # A relayed WebSocket is never "finished": its answer was the 101, then the splice.
        completed=(bool(request.finished) and not request._disconnected) or request.code == 101,
        bytes_in=int(getattr(info, "bytes_in", 0)),
        bytes_out=int(request.sentLength) + int(getattr(info, "bytes_out", 0)),
        duration=max(0.0, now - started) if started is not None else 0.0,
        account=getattr(info, "account", None),
        project=getattr(info, "project", None),
        form=getattr(info, "form", None),
        port=getattr(info, "port", None),
        backend_error=_word(extra.get("backend")),
        websocket_end=_word(extra.get("websocket_end")),
        share=_word(extra.get("share")),
    )


def _word(value: object) -> str | None:
    return value[:64] if isinstance(value, str) else None


def _timestamp_slow(when: float) -> str:
    # isoformat truncates to milliseconds like ``microsecond // 1000``; "+00:00" becomes "Z".
    moment = datetime.datetime.fromtimestamp(when, datetime.timezone.utc)
    return moment.isoformat(timespec="milliseconds")[:-6] + "Z"


class _Timestamps:
    """``_timestamp_slow``'s text for a time, with the part up to the second formatted once a
    second: a datetime per line cost about a quarter of writing one."""

    __slots__ = ("second", "prefix")

    def __init__(self) -> None:
        self.second = -1
        self.prefix = ""

    def __call__(self, when: float) -> str:
        second = int(when)
        # As datetime does: the fraction rounded (half to even) to the microsecond, then cut.
        milliseconds = round((when - second) * 1e6) // 1000
        if second != self.second or not 0 <= milliseconds < 1000:
            # Rounding at a second's edge, or a new second: the slow way says which second.
            text = _timestamp_slow(when)
            if 0 <= milliseconds < 1000 and text[-5:-1] == f".{milliseconds:03d}":
                self.second, self.prefix = second, text[:-5]
            return text
        return f"{self.prefix}.{milliseconds:03d}Z"


_timestamp = _Timestamps()

# JSON text of a string: the C function json.dumps uses with ensure_ascii=True.
_quoted: Callable[[str], str] = json.encoder.encode_basestring_ascii


def _text_or_null(value: str | None) -> str:
    return "null" if value is None else _quoted(value)


def format_line(facts: RequestFacts) -> str:
    """One JSON object, exactly as ``json.dumps(record, separators=(",", ":"))`` writes it
    (the keys below, in this order; the last three only when set), formatted directly: the
    encoder's dict walk cost half of writing a line. Every text goes through json's own
    escaping, so a hostile path or method cannot forge a line (tested against json)."""
    port = "null" if facts.port is None else str(facts.port)
    line = (
        f'{{"time":"{_timestamp(facts.time)}","client":{_quoted(facts.client)},'
        f'"method":{_quoted(facts.method)},"host":{_text_or_null(facts.host)},'
        f'"path":{_quoted(facts.path)},"query":{"true" if facts.has_query else "false"},'
        f'"status":{facts.status:d},"completed":{"true" if facts.completed else "false"},'
        f'"bytes_in":{facts.bytes_in:d},"bytes_out":{facts.bytes_out:d},'
        f'"duration_ms":{round(facts.duration * 1000, 3)!r},'
        f'"account":{_text_or_null(facts.account)},"project":{_text_or_null(facts.project)},'
        f'"form":{_text_or_null(facts.form)},"port":{port}'
    )
    if facts.backend_error is not None:
        line += ',"backend":' + _quoted(facts.backend_error)
    if facts.websocket_end is not None:
        line += ',"websocket_end":' + _quoted(facts.websocket_end)
    if facts.share is not None:
        line += ',"share":' + _quoted(facts.share)
    return line + "}\n"


# Lines wait in memory at most this long, and at most this many bytes of them: one ``write(2)``
# per batch instead of per request (issue 10), and a tail that ``tail -f`` still sees at once.
FLUSH_DELAY = 0.1
FLUSH_BYTES = 64 * 1024


class _SinkFailed(Exception):
    """A write that failed after ``written`` bytes of its data were out (whole lines among them
    are in the file; the rest, a cut line included, are lost)."""

    def __init__(self, why: str, written: int) -> None:
        super().__init__(why)
        self.why = why
        self.written = written


class _FileSink:
    """An access-log file written with one ``write(2)`` per batch of whole lines.

    No user-space buffer sits between the proxy and the file beyond ``AccessLog``'s own batch: a
    write that fails (a full disk) loses exactly the lines it carried, nothing is left behind to
    fail again later, and closing cannot raise (Python's buffered file re-raises the failed flush
    on ``close()``, which is how a full disk once kept SIGHUP from ever opening the new file).
    ``O_APPEND`` keeps lines whole when several processes share the file: each batch is one
    ``write(2)``, which Linux never interleaves with another process's on a local file system.
    """

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        # The file ends inside a line that a failed write cut short: finish it before the next.
        self.torn = False

    def write(self, data: bytes) -> None:
        prefix = 1 if self.torn else 0
        whole = b"\n" + data if prefix else data
        view = memoryview(whole)
        done = 0
        while done < len(whole):
            try:
                done += os.write(self.fd, view[done:])
            except OSError as e:
                if done:
                    self.torn = whole[done - 1] != 0x0A
                raise _SinkFailed(e.strerror or str(e), max(0, done - prefix)) from None
        self.torn = False

    def close(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass


class _PipeSink(_FileSink):
    """A worker's standard-output lines, on its own pipe to the supervisor, which joins each
    worker's bytes into whole lines before writing them to the one standard output: lines of
    two workers never interleave, and a batch larger than ``PIPE_BUF`` may arrive in pieces.

    The pipe is made blocking: a partial write (a signal, a pipe the supervisor has not emptied
    yet) is followed by the rest at once, never by another line, so nothing is split or lost; a
    supervisor that falls behind holds the worker back, as it did with one write per line.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.torn = False
        try:
            os.set_blocking(fd, True)
        except OSError:
            pass  # not a descriptor (closed): writing fails and counts the lines as lost


class _StreamSink:
    """Standard output (or a stream given by a test)."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream

    def write(self, data: bytes) -> None:
        try:
            self.stream.write(data.decode("ascii"))
            self.stream.flush()
        except (OSError, ValueError) as e:
            raise _SinkFailed(getattr(e, "strerror", None) or str(e), 0) from None

    def close(self) -> None:
        pass


class AccessLog:
    """Writes access-log lines to standard output (``"-"``) or appends to a file.

    Given a ``clock`` (the reactor), lines are kept and written out together: within
    ``FLUSH_DELAY`` (100 ms) of the first one, at once when ``FLUSH_BYTES`` (64 KiB) are waiting,
    and by ``flush()``, which ``reopen()``, ``close()`` and ``end_buffering()`` (the service, once
    it has stopped) call first. One timer runs only while lines wait; an idle proxy has none.
    Without a clock every line is written at once.

    A file is opened afresh by ``reopen()`` (the service calls it on SIGHUP) so logrotate can move
    it: the waiting lines go to the old file, then the new file is opened, then the old one is
    closed, whatever closing it says. Standard output is the real one (``sys.__stdout__``): twistd
    redirects ``sys.stdout`` into its own log, which would wrap every line in a second timestamp.

    While writing fails (a full disk, a file that cannot be opened) the lines are counted as lost
    (``on_lost``, the ``cocalcproxy_access_log_lines_lost_total`` metric) and the service log gets
    one line when the failure starts and one when writing works again, not one per request. A
    batch that fails part way counts only the lines that did not reach the file whole.
    """

    def __init__(
        self,
        target: str = "-",
        stream: IO[str] | None = None,
        on_lost: Callable[[int], object] | None = None,
        pipe_fd: int | None = None,
        clock: IReactorTime | None = None,
        flush_delay: float = FLUSH_DELAY,
        flush_bytes: int = FLUSH_BYTES,
    ) -> None:
        self.target = target
        self.on_lost = on_lost
        self.flush_delay = flush_delay
        self.flush_bytes = flush_bytes
        # Any: mypy reads zope interface methods as unbound (IReactorTime.callLater).
        self._clock: Any = clock
        self._buffering = clock is not None
        self._waiting: list[bytes] = []
        self._waiting_bytes = 0
        self._timer: Any = None  # the IDelayedCall of the next flush, while lines wait
        self._sink: _FileSink | _StreamSink | None = None
        self._failing = False
        self._lost = 0
        if pipe_fd is not None and target == "-":
            self._sink = _PipeSink(pipe_fd)
        elif stream is not None:
            self._sink = _StreamSink(stream)
        elif target == "-":
            assert sys.__stdout__ is not None
            self._sink = _StreamSink(sys.__stdout__)
        else:
            self._sink = _FileSink(target)

    @property
    def failing(self) -> bool:
        return self._failing

    def write(self, facts: RequestFacts) -> None:
        data = format_line(facts).encode("ascii")
        if not self._buffering:
            self._emit(data, 1)
            return
        self._waiting.append(data)
        self._waiting_bytes += len(data)
        if self._waiting_bytes >= self.flush_bytes:
            self.flush()
        elif self._timer is None:
            self._timer = self._clock.callLater(self.flush_delay, self._flush_due)

    def _flush_due(self) -> None:
        self._timer = None
        self.flush()

    def flush(self) -> None:
        """Write every waiting line now, in one batch."""
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()
        if not self._waiting:
            return
        lines, self._waiting, self._waiting_bytes = self._waiting, [], 0
        self._emit(b"".join(lines), len(lines))

    def end_buffering(self) -> None:
        """Flush, and write every later line at once (the process is stopping: no timer would
        run for a line written while connections are cut at the very end)."""
        self._buffering = False
        self.flush()

    def _emit(self, data: bytes, lines: int) -> None:
        sink = self._sink
        if sink is None:
            self._failed(lines, "no file is open")
            return
        try:
            sink.write(data)
        except _SinkFailed as e:
            self._failed(data.count(b"\n", e.written) if e.written else lines, e.why)
            return
        if self._failing:
            self._failing = False
            log.info(
                "access log {target}: writing again ({lost} line(s) were lost)",
                target=self.target,
                lost=self._lost,
            )
            self._lost = 0

    def _failed(self, lines: int, why: str) -> None:
        self._lost += lines
        if self.on_lost is not None:
            self.on_lost(lines)
        if not self._failing:
            self._failing = True
            log.error(
                "access log {target}: cannot write ({why}); lines are lost until it works "
                "again (counted in cocalcproxy_access_log_lines_lost_total)",
                target=self.target,
                why=why,
            )

    def reopen(self) -> None:
        """Write the waiting lines to the old file, then open the configured file afresh
        (SIGHUP). If it cannot be opened, keep writing to the old one, which is better than
        nothing; without an old one, lines count as lost."""
        self.flush()
        if self.target == "-" or isinstance(self._sink, _StreamSink):
            return
        try:
            fresh = _FileSink(self.target)
        except OSError as e:
            log.error(
                "access log {target}: cannot open it afresh ({why}); "
                + ("still writing to the previous file" if self._sink else "nothing is written"),
                target=self.target,
                why=e.strerror or str(e),
            )
            return
        old, self._sink = self._sink, fresh
        if old is not None:
            old.close()

    def close(self) -> None:
        """Write the waiting lines, then close; a line written after this counts as lost."""
        self.end_buffering()
        sink, self._sink = self._sink, None
        if sink is not None:
            sink.close()


class QuietSite(server.Site):
    """A Site that writes no Twisted access-log line (for the redirect and metrics listeners).

    Twisted's default combined-format line carries the full query string and the Referer, which
    can hold tokens; those listeners proxy nothing, so they are simply not logged.
    """

    requestFactory = BannerlessRequest
    # Slow clients are cut off as on the HTTPS listeners (--request-head-timeout).
    protocol = proxy_channel_protocol
    request_head_timeout: float | None = REQUEST_HEAD_TIMEOUT

    def log(self, request: http.Request) -> None:
        return None
