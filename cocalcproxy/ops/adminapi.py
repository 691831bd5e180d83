"""The admin API (``--admin-api ENDPOINT``): JSON over HTTP for platforms that drive the directory.

Its own listener, never the proxy's: a project route can never reach it through the proxy's
public side. Every request, ``/openapi.json`` included, carries ``Authorization: Bearer <admin
token>`` (``cocalcproxy admin-token create``); the token's SHA-256 is looked up in the directory
on every request, so a revoked token stops working at once. The listener refuses to start while
no admin token exists, so it is never open to anyone.

Each route calls one function of ``directory.operations``, the same the ``cocalcproxy``
command calls, in the directory's thread pool. This module only turns HTTP into arguments and
results into HTTP:

* request bodies are JSON objects of at most :data:`MAX_BODY` bytes, ``Content-Type:
  application/json``; unknown fields, wrong types, duplicate keys, NaN and non-canonical ids are
  refused before anything is called, so a refused request changes nothing;
* every error is ``{"error": {"code": CODE, "message": TEXT}}`` with a stable code and status
  (400 ``bad_json``/``invalid_cursor``, 401 ``unauthorized``, 403 ``forbidden``, 404
  ``not_found``, 405 ``method_not_allowed``, 409 ``conflict``, 413 ``body_too_large``, 415
  ``unsupported_media_type``, 422 ``invalid_input``, 503 ``unavailable``);
* lists are pages: ``?limit=N`` (1-1000, default 100) and ``?cursor=`` from the previous page's
  ``next_cursor``, in a stable order.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, unquote

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import resource, server
from twisted.web.http import HTTPChannel

from cocalcproxy.directory import operations as ops
from cocalcproxy.directory import validate
from cocalcproxy.directory.model import (
    Conflict,
    DirectoryError,
    InvalidInput,
    NotFound,
    Unavailable,
)
from cocalcproxy.http.bannerless import BannerlessRequest
from cocalcproxy.http.site import REQUEST_HEAD_TIMEOUT, proxy_channel_protocol

# The namespace operators see in log lines (kept from before the package layout).
log = Logger(namespace="cocalcproxy.adminapi")

MAX_BODY = 64 * 1024
#: How much of a refused body is read and dropped before the connection is closed.
MAX_DISCARD = 1024 * 1024
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
API_PREFIX = "/v1"


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def _error_of(e: DirectoryError) -> ApiError:
    if isinstance(e, NotFound):
        return ApiError(404, "not_found", str(e))
    if isinstance(e, Conflict):
        return ApiError(409, "conflict", str(e))
    if isinstance(e, ops.Forbidden):
        return ApiError(403, "forbidden", str(e))
    if isinstance(e, InvalidInput):
        if str(e).startswith("invalid cursor"):
            return ApiError(400, "invalid_cursor", str(e))
        return ApiError(422, "invalid_input", str(e))
    if isinstance(e, Unavailable):
        return ApiError(503, "unavailable", "the directory cannot be reached; try again shortly")
    return ApiError(422, "invalid_input", str(e))


# -- request bodies ------------------------------------------------------------------------------


def _no_constants(value: str) -> Any:
    raise ApiError(400, "bad_json", f"the body is not valid JSON: {value} is not a number")


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    document: dict[str, Any] = {}
    for key, value in pairs:
        if key in document:
            raise ApiError(400, "bad_json", f"the field {key!r} appears twice")
        document[key] = value
    return document


def parse_body(raw: bytes) -> dict[str, Any]:
    """A JSON object, or ApiError 400."""
    try:
        text = raw.decode("utf-8")
        document = json.loads(text, object_pairs_hook=_object, parse_constant=_no_constants)
    except ApiError:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ApiError(400, "bad_json", f"the body is not valid JSON: {e}") from None
    if not isinstance(document, dict):
        raise ApiError(400, "bad_json", "the body must be a JSON object")
    return document


@dataclass(frozen=True)
class Field:
    kind: str  # "string", "string_or_null", "number", "strings", "integer"
    required: bool = False


def _typed(name: str, value: Any, kind: str) -> Any:
    ok = {
        "string": isinstance(value, str),
        "string_or_null": value is None or isinstance(value, str),
        "number": isinstance(value, int | float) and not isinstance(value, bool),
        "number_or_null": value is None
        or (isinstance(value, int | float) and not isinstance(value, bool)),
        "integer": isinstance(value, int) and not isinstance(value, bool),
        "integer_or_null": value is None
        or (isinstance(value, int) and not isinstance(value, bool)),
        "strings": isinstance(value, list) and all(isinstance(v, str) for v in value),
    }[kind]
    if not ok:
        wanted = {
            "string": "a string",
            "string_or_null": "a string or null",
            "number": "a number",
            "number_or_null": "a number or null",
            "integer": "a whole number",
            "integer_or_null": "a whole number or null",
            "strings": "a list of strings",
        }[kind]
        raise ApiError(422, "invalid_input", f"the field {name!r} must be {wanted}")
    return value


def fields(document: dict[str, Any], spec: dict[str, Field]) -> dict[str, Any]:
    """The body's fields checked against ``spec``: unknown or missing fields and wrong types are
    refused (422)."""
    unknown = sorted(set(document) - set(spec))
    if unknown:
        raise ApiError(422, "invalid_input", f"unknown field {unknown[0]!r}")
    out: dict[str, Any] = {}
    for name, field in spec.items():
        if name not in document:
            if field.required:
                raise ApiError(422, "invalid_input", f"the field {name!r} is required")
            continue
        out[name] = _typed(name, document[name], field.kind)
    return out


# -- routes --------------------------------------------------------------------------------------


@dataclass
class Call:
    """A parsed request: path parameters, query, body."""

    params: dict[str, str]
    query: dict[str, str]
    body: dict[str, Any] | None


@dataclass(frozen=True)
class Answer:
    status: int
    document: Any


Work = Callable[[Any, Call], Answer]


def _limit(query: dict[str, str]) -> int:
    text = query.get("limit")
    if text is None:
        return DEFAULT_LIMIT
    if not text.isdigit() or not 1 <= int(text) <= MAX_LIMIT:
        raise ApiError(400, "bad_query", f"limit must be a whole number 1-{MAX_LIMIT}")
    return int(text)


def _query(query: dict[str, str], allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(query) - set(allowed))
    if unknown:
        raise ApiError(400, "bad_query", f"unknown query parameter {unknown[0]!r}")


def _port(text: str) -> int:
    if not re.fullmatch(r"[1-9][0-9]{0,4}", text) or int(text) > 65535:
        raise ApiError(422, "invalid_input", f"invalid port {text!r}: expected a number 1-65535")
    return int(text)


def _pid(text: str) -> str:
    return validate.project_id(text)


class Routes:
    """The table of (method, path pattern) -> operation. Path patterns use ``{name}`` for one
    segment; every segment is percent-decoded once."""

    def __init__(self, policy: ops.SharingPolicy) -> None:
        self.policy = policy
        self.table: list[tuple[str, re.Pattern[str], list[str], Work, dict[str, Field] | None]] = []
        p = API_PREFIX
        self.add("GET", p + "/users", self.users_list)
        self.add(
            "POST",
            p + "/users",
            self.user_add,
            {
                "name": Field("string", True),
                "password": Field("string"),
                "oidc_subject": Field("string"),
            },
        )
        self.add("GET", p + "/users/{name}", self.user_get)
        self.add("DELETE", p + "/users/{name}", self.user_remove)
        self.add(
            "PUT",
            p + "/users/{name}/password",
            self.user_passwd,
            {"password": Field("string", True)},
        )
        self.add(
            "PUT",
            p + "/users/{name}/oidc-subject",
            self.user_link,
            {"oidc_subject": Field("string_or_null", True)},
        )
        self.add("GET", p + "/tokens", self.tokens_list)
        self.add(
            "POST",
            p + "/tokens",
            self.token_create,
            {"user": Field("string", True), "expires_in_days": Field("number_or_null")},
        )
        self.add("DELETE", p + "/tokens/{id}", self.token_revoke)
        self.add("GET", p + "/admin-tokens", self.admin_tokens_list)
        self.add(
            "POST",
            p + "/admin-tokens",
            self.admin_token_create,
            {"description": Field("string"), "expires_in_days": Field("number_or_null")},
        )
        self.add("DELETE", p + "/admin-tokens/{id}", self.admin_token_revoke)
        self.add("GET", p + "/projects", self.projects_list)
        self.add(
            "POST",
            p + "/projects",
            self.project_add,
            {
                "owner": Field("string", True),
                "host": Field("string"),
                "home": Field("string_or_null"),
                "id": Field("string"),
                "title": Field("string"),
                "ports": Field("string_or_null"),
                "socket_dir": Field("string_or_null"),
                "socket_owner": Field("integer_or_null"),
            },
        )
        self.add("GET", p + "/projects/{pid}", self.project_get)
        self.add(
            "PUT",
            p + "/projects/{pid}",
            self.project_put,
            {
                "owner": Field("string", True),
                "host": Field("string"),
                "home": Field("string_or_null"),
                "title": Field("string"),
                "collaborators": Field("strings"),
                "ports": Field("string_or_null"),
                "socket_dir": Field("string_or_null"),
                "socket_owner": Field("integer_or_null"),
            },
        )
        self.add(
            "PATCH",
            p + "/projects/{pid}",
            self.project_set,
            {
                "host": Field("string"),
                "home": Field("string_or_null"),
                "title": Field("string"),
                "ports": Field("string_or_null"),
                "socket_dir": Field("string_or_null"),
                "socket_owner": Field("integer_or_null"),
            },
        )
        self.add("DELETE", p + "/projects/{pid}", self.project_remove)
        self.add("PUT", p + "/projects/{pid}/collaborators/{name}", self.collaborator_put)
        self.add("DELETE", p + "/projects/{pid}/collaborators/{name}", self.collaborator_remove)
        self.add("GET", p + "/shares", self.shares_list)
        self.add("GET", p + "/projects/{pid}/shares", self.project_shares_list)
        self.add(
            "PUT",
            p + "/projects/{pid}/shares/{port}",
            self.share_set,
            {"visibility": Field("string", True), "expires_in_days": Field("number_or_null")},
        )
        self.add("DELETE", p + "/projects/{pid}/shares/{port}", self.share_remove)  # fmt: skip

    def add(
        self, method: str, pattern: str, work: Work, body: dict[str, Field] | None = None
    ) -> None:
        names = re.findall(r"\{(\w+)\}", pattern)
        regex = re.compile("^" + re.sub(r"\\\{\w+\\\}", "([^/]+)", re.escape(pattern)) + "$")
        self.table.append((method, regex, names, work, body))

    def match(self, method: str, path: str) -> tuple[Work, dict[str, str], dict[str, Field] | None]:
        allowed: list[str] = []
        for route_method, regex, names, work, body in self.table:
            m = regex.match(path)
            if m is None:
                continue
            if route_method != method:
                allowed.append(route_method)
                continue
            params = {
                n: unquote(v, errors="strict") for n, v in zip(names, m.groups(), strict=True)
            }
            return work, params, body
        if allowed:
            raise ApiError(405, "method_not_allowed", f"{path} takes {', '.join(sorted(allowed))}")
        raise ApiError(404, "not_found", f"no such API path: {path[:200]!r}")

    def allowed(self, path: str) -> list[str]:
        return sorted({m for m, regex, *_ in self.table if regex.match(path)})

    # users

    def users_list(self, d: Any, c: Call) -> Answer:
        _query(c.query, ("limit", "cursor"))
        return Answer(200, ops.user_list(d, c.query.get("cursor"), _limit(c.query)).json())

    def user_add(self, d: Any, c: Call) -> Answer:
        b = c.body
        assert b is not None
        doc = ops.user_add(d, b["name"], b.get("password"), oidc_subject=b.get("oidc_subject"))
        return Answer(201, doc)

    def user_link(self, d: Any, c: Call) -> Answer:
        assert c.body is not None
        return Answer(200, ops.user_link(d, c.params["name"], c.body["oidc_subject"]))

    def user_get(self, d: Any, c: Call) -> Answer:
        return Answer(200, ops.user_get(d, c.params["name"]))

    def user_remove(self, d: Any, c: Call) -> Answer:
        return Answer(200, ops.user_remove(d, validate.name(c.params["name"])))

    def user_passwd(self, d: Any, c: Call) -> Answer:
        assert c.body is not None
        return Answer(200, ops.user_passwd(d, c.params["name"], c.body["password"]))

    # API tokens

    def tokens_list(self, d: Any, c: Call) -> Answer:
        _query(c.query, ("limit", "cursor", "user"))
        page = ops.token_list(d, c.query.get("user"), c.query.get("cursor"), _limit(c.query))
        return Answer(200, page.json())

    def token_create(self, d: Any, c: Call) -> Answer:
        assert c.body is not None
        return Answer(201, ops.token_create(d, c.body["user"], c.body.get("expires_in_days")))

    def token_revoke(self, d: Any, c: Call) -> Answer:
        return Answer(200, ops.token_revoke(d, c.params["id"]))

    def admin_tokens_list(self, d: Any, c: Call) -> Answer:
        _query(c.query, ("limit", "cursor"))
        return Answer(200, ops.admin_token_list(d, c.query.get("cursor"), _limit(c.query)).json())

    def admin_token_create(self, d: Any, c: Call) -> Answer:
        assert c.body is not None
        doc = ops.admin_token_create(
            d, c.body.get("description", ""), c.body.get("expires_in_days")
        )
        return Answer(201, doc)

    def admin_token_revoke(self, d: Any, c: Call) -> Answer:
        return Answer(200, ops.admin_token_revoke(d, c.params["id"]))

    # projects

    def projects_list(self, d: Any, c: Call) -> Answer:
        _query(c.query, ("limit", "cursor"))
        return Answer(200, ops.project_list(d, c.query.get("cursor"), _limit(c.query)).json())

    def project_add(self, d: Any, c: Call) -> Answer:
        b = c.body
        assert b is not None
        doc = ops.project_add(
            d,
            b["owner"],
            host=b.get("host", "127.0.0.1"),
            home=b.get("home"),
            project_id=b.get("id"),
            title=b.get("title", ""),
            ports=b.get("ports"),
            socket_dir=b.get("socket_dir"),
            socket_owner=b.get("socket_owner"),
            warn=_log_warning,
        )
        return Answer(201, doc)

    def project_get(self, d: Any, c: Call) -> Answer:
        return Answer(200, ops.project_get(d, _pid(c.params["pid"])))

    def project_put(self, d: Any, c: Call) -> Answer:
        b = c.body
        assert b is not None
        doc, created = ops.project_put(
            d,
            _pid(c.params["pid"]),
            b["owner"],
            host=b.get("host", "127.0.0.1"),
            home=b.get("home"),
            title=b.get("title", ""),
            collaborators=b.get("collaborators", []),
            ports=b.get("ports"),
            socket_dir=b.get("socket_dir"),
            socket_owner=b.get("socket_owner"),
            warn=_log_warning,
        )
        return Answer(201 if created else 200, doc)

    def project_set(self, d: Any, c: Call) -> Answer:
        b = c.body
        assert b is not None

        # null removes (home, socket folder, socket owner) or restores the default (ports),
        # as "" and "default" do for the command
        def cleared(name: str, empty: str) -> Any:
            value = b.get(name)
            return empty if name in b and value is None else value

        doc = ops.project_set(
            d,
            _pid(c.params["pid"]),
            host=b.get("host"),
            home=cleared("home", ""),
            title=b.get("title"),
            ports=cleared("ports", "default"),
            socket_dir=cleared("socket_dir", ""),
            socket_owner=cleared("socket_owner", ""),
            warn=_log_warning,
        )
        return Answer(200, doc)

    def project_remove(self, d: Any, c: Call) -> Answer:
        return Answer(200, ops.project_remove(d, _pid(c.params["pid"])))

    def collaborator_put(self, d: Any, c: Call) -> Answer:
        doc, _ = ops.collaborator_put(d, _pid(c.params["pid"]), validate.name(c.params["name"]))
        return Answer(200, doc)

    def collaborator_remove(self, d: Any, c: Call) -> Answer:
        pid, name = _pid(c.params["pid"]), validate.name(c.params["name"])
        return Answer(200, ops.collaborator_remove(d, pid, name))

    # shares

    def shares_list(self, d: Any, c: Call) -> Answer:
        _query(c.query, ("limit", "cursor"))
        page = ops.share_list(d, self.policy, None, c.query.get("cursor"), _limit(c.query))
        return Answer(200, page.json())

    def project_shares_list(self, d: Any, c: Call) -> Answer:
        _query(c.query, ("limit", "cursor"))
        pid = _pid(c.params["pid"])
        page = ops.share_list(d, self.policy, pid, c.query.get("cursor"), _limit(c.query))
        return Answer(200, page.json())

    def share_set(self, d: Any, c: Call) -> Answer:
        b = c.body
        assert b is not None
        pid, port = _pid(c.params["pid"]), _port(c.params["port"])
        doc = ops.share_set(d, self.policy, pid, port, b["visibility"], b.get("expires_in_days"))
        return Answer(200, doc)

    def share_remove(self, d: Any, c: Call) -> Answer:
        pid, port = _pid(c.params["pid"]), _port(c.params["port"])
        return Answer(200, ops.share_remove(d, pid, port))


def _log_warning(message: str) -> None:
    log.warn("admin API: {message}", message=message)


# -- HTTP ----------------------------------------------------------------------------------------


class ApiRequest(BannerlessRequest):
    """Refuses a body over MAX_BODY as soon as it is announced or exceeded (413, close)."""

    too_large = False
    _discard_left = MAX_DISCARD

    def __init__(self, channel: HTTPChannel, queued: object = None) -> None:
        super().__init__(channel, parsePOSTFormSubmission=False)
        self._received = 0

    def gotLength(self, length: int | None) -> None:  # noqa: N802
        if length is not None and length > MAX_BODY:
            self._refuse()
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:  # noqa: N802
        if self.too_large:
            # Read and drop a little more of the refused body, so closing does not reset the
            # connection (and lose the 413) while the client is still sending.
            self._discard_left -= len(data)
            if self._discard_left < 0:
                self.channel.loseConnection()
            return
        self._received += len(data)
        if self._received > MAX_BODY:
            self._refuse()
            return
        super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:  # noqa: N802
        if self.too_large:
            self.channel.loseConnection()
            return
        super().requestReceived(command, path, version)

    def _refuse(self) -> None:
        self.too_large = True
        body = _error_document("body_too_large", f"request bodies are at most {MAX_BODY} bytes")
        head = (
            b"HTTP/1.1 413 Content Too Large\r\nContent-Type: application/json\r\n"
            b"Cache-Control: no-store\r\nConnection: close\r\nContent-Length: %d\r\n\r\n"
            % len(body)
        )
        transport: Any = self.channel.transport
        if transport is not None:
            transport.write(head + body)


def _error_document(code: str, message: str) -> bytes:
    return json.dumps({"error": {"code": code, "message": message}}).encode() + b"\n"


class AdminApi(resource.Resource):
    isLeaf = True

    def __init__(
        self,
        directory: Any,
        policy: ops.SharingPolicy,
        openapi: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.directory = directory
        self.routes = Routes(policy)
        from cocalcproxy.ops.openapi import document

        self.openapi = openapi if openapi is not None else document()

    def render(self, request: server.Request) -> int:
        d = self._authenticate(request)
        d.addCallback(self._authorized, request)
        d.addErrback(self._failed, request)
        return server.NOT_DONE_YET

    def _authenticate(self, request: server.Request) -> Deferred[str | None]:
        values = request.requestHeaders.getRawHeaders(b"authorization", [])
        token: str | None = None
        if len(values) == 1:
            scheme, _, credentials = values[0].partition(b" ")
            if scheme.lower() == b"bearer":
                token = credentials.strip().decode("ascii", "replace")
        if not token:
            d: Deferred[str | None] = Deferred()
            d.callback(None)
            return d
        result: Deferred[str | None] = self.directory.admin_token_id(token)
        return result

    def _authorized(self, token_id: str | None, request: server.Request) -> None:
        if token_id is None:
            request.setHeader(b"WWW-Authenticate", b'Bearer realm="cocalcproxy-admin"')
            raise ApiError(
                401,
                "unauthorized",
                "send Authorization: Bearer <admin token> "
                "(made with 'cocalcproxy admin-token create')",
            )
        method = request.method.decode("ascii", "replace")
        raw_path, _, raw_query = request.uri.partition(b"?")
        path = raw_path.decode("ascii", "replace")
        if path == "/openapi.json":
            if method not in ("GET", "HEAD"):
                request.setHeader(b"Allow", b"GET, HEAD")
                raise ApiError(405, "method_not_allowed", "/openapi.json takes GET")
            self._send(request, 200, self.openapi)
            return
        try:
            work, params, spec = self.routes.match(method, path)
        except ApiError as e:
            if e.status == 405:
                request.setHeader(b"Allow", ", ".join(self.routes.allowed(path)).encode())
            raise
        except UnicodeDecodeError:
            raise ApiError(404, "not_found", "the path is not valid UTF-8") from None
        try:
            pairs = parse_qsl(
                raw_query.decode("ascii"), keep_blank_values=True, max_num_fields=10,
                errors="strict",
            )  # fmt: skip
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, "bad_query", "the query string could not be read") from None
        query = dict(pairs)
        if len(query) != len(pairs):
            raise ApiError(400, "bad_query", "a query parameter was given twice")
        body = None
        if spec is not None:
            body = fields(self._body(request), spec)
        elif self._has_body(request):
            raise ApiError(400, "unexpected_body", f"{method} {path} takes no body")
        call = Call(params, query, body)
        done: Deferred[Answer] = self.directory.run(work, call)
        done.addCallback(lambda a: self._send(request, a.status, a.document))
        done.addErrback(self._failed, request)
        log.info(
            "admin API {method} {path} by admin token {token}",
            method=method, path=path[:200], token=token_id,
        )  # fmt: skip

    @staticmethod
    def _has_body(request: server.Request) -> bool:
        content = request.content
        if content is None:
            return False
        content.seek(0, 2)
        size = content.tell()
        content.seek(0)
        return bool(size > 0)

    @staticmethod
    def _body(request: server.Request) -> dict[str, Any]:
        types = request.requestHeaders.getRawHeaders(b"content-type", [])
        kind = types[0].split(b";")[0].strip().lower() if len(types) == 1 else b""
        if kind != b"application/json":
            raise ApiError(415, "unsupported_media_type", "send the body as application/json")
        content = request.content
        raw = b"" if content is None else content.read(MAX_BODY + 1)
        if len(raw) > MAX_BODY:
            raise ApiError(413, "body_too_large", f"request bodies are at most {MAX_BODY} bytes")
        return parse_body(raw)

    def _send(self, request: server.Request, status: int, document: Any) -> None:
        if request._disconnected or request.finished:
            return
        body = json.dumps(document, ensure_ascii=True).encode() + b"\n"
        request.setResponseCode(status)
        request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"Cache-Control", b"no-store")
        request.setHeader(b"X-Content-Type-Options", b"nosniff")
        request.setHeader(b"Content-Length", str(len(body)).encode())
        if request.method != b"HEAD":
            request.write(body)
        request.finish()

    def _failed(self, failure: Failure, request: server.Request) -> None:
        error = failure.value
        if isinstance(error, DirectoryError):
            error = _error_of(error)
        if not isinstance(error, ApiError):
            log.failure("admin API request {uri!r} failed", failure, uri=request.uri[:200])
            error = ApiError(500, "internal", "the request failed; see the proxy's log")
        self._send(request, error.status, {"error": {"code": error.code, "message": error.message}})


class ApiSite(server.Site):
    requestFactory = ApiRequest  # type: ignore[assignment]
    displayTracebacks = False
    # No Twisted banner (bannerless.py) and the same slow-client deadlines as every listener.
    protocol = proxy_channel_protocol
    request_head_timeout: float | None = REQUEST_HEAD_TIMEOUT

    def log(self, request: Any) -> None:
        """Nothing: Twisted's combined log line would carry query strings."""


def api_site(directory: Any, policy: ops.SharingPolicy, reactor: Any) -> ApiSite:
    return ApiSite(AdminApi(directory, policy), reactor=reactor, timeout=75.0)


def needs_tls(description: str) -> bool:
    """TLS on top of the admin API listener unless it is a Unix socket or loopback TCP."""
    parts = description.split(":")
    kind = parts[0].lower()
    if kind == "unix":
        return False
    if kind in ("tcp", "tcp6"):
        interface = None
        for part in _split_endpoint(description)[1:]:
            if part.startswith("interface="):
                interface = part.split("=", 1)[1].replace("\\:", ":")
        if interface is None:
            return True  # every interface
        import ipaddress

        if interface == "localhost":
            return False
        try:
            return not bool(ipaddress.ip_address(interface).is_loopback)
        except ValueError:
            return True
    return True


def _split_endpoint(description: str) -> list[str]:
    """Split on ':' except where escaped with a backslash."""
    return [p.replace("\x00", "\\:") for p in description.replace("\\:", "\x00").split(":")]
