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
import sys
from dataclasses import dataclass
from typing import IO, Any

from twisted.logger import Logger
from twisted.web import http, server

from cocalcproxy.bannerless import BannerlessRequest

log = Logger()

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
    )


def _word(value: object) -> str | None:
    return value[:64] if isinstance(value, str) else None


# One encoder, built once: json.dumps with non-default arguments builds a new one every call.
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True)


def _timestamp(when: float) -> str:
    # isoformat truncates to milliseconds like ``microsecond // 1000`` and costs a third less
    # than strftime; "+00:00" becomes "Z".
    moment = datetime.datetime.fromtimestamp(when, datetime.timezone.utc)
    return moment.isoformat(timespec="milliseconds")[:-6] + "Z"


def format_line(facts: RequestFacts) -> str:
    record: dict[str, Any] = {
        "time": _timestamp(facts.time),
        "client": facts.client,
        "method": facts.method,
        "host": facts.host,
        "path": facts.path,
        "query": facts.has_query,
        "status": facts.status,
        "completed": facts.completed,
        "bytes_in": facts.bytes_in,
        "bytes_out": facts.bytes_out,
        "duration_ms": round(facts.duration * 1000, 3),
        "account": facts.account,
        "project": facts.project,
        "form": facts.form,
        "port": facts.port,
    }
    if facts.backend_error is not None:
        record["backend"] = facts.backend_error
    if facts.websocket_end is not None:
        record["websocket_end"] = facts.websocket_end
    return _ENCODER.encode(record) + "\n"


class AccessLog:
    """Writes access-log lines to standard output (``"-"``) or appends to a file.

    A file is reopened by ``reopen()`` (the service calls it on SIGHUP) so logrotate can move it.
    Standard output is the real one (``sys.__stdout__``): twistd redirects ``sys.stdout`` into its
    own log, which would wrap every line in a second timestamp.
    """

    def __init__(self, target: str = "-", stream: IO[str] | None = None) -> None:
        self.target = target
        self._owned = False
        self._stream: IO[str] | None = stream
        if self._stream is None:
            self._open()

    def _open(self) -> None:
        if self.target == "-":
            self._stream = sys.__stdout__
            self._owned = False
        else:
            self._stream = open(self.target, "a", encoding="ascii", buffering=1)
            self._owned = True

    def write(self, facts: RequestFacts) -> None:
        stream = self._stream
        if stream is None:
            return
        try:
            stream.write(format_line(facts))
            stream.flush()
        except (OSError, ValueError) as e:
            log.error("access log write failed: {why}", why=str(e))

    def reopen(self) -> None:
        if not self._owned:
            return
        self.close()
        try:
            self._open()
        except OSError as e:
            log.error("cannot reopen access log {path}: {why}", path=self.target, why=str(e))

    def close(self) -> None:
        if self._owned and self._stream is not None:
            self._stream.close()
        self._stream = None


class QuietSite(server.Site):
    """A Site that writes no Twisted access-log line (for the redirect and metrics listeners).

    Twisted's default combined-format line carries the full query string and the Referer, which
    can hold tokens; those listeners proxy nothing, so they are simply not logged.
    """

    requestFactory = BannerlessRequest

    def log(self, request: http.Request) -> None:
        return None
