"""Pure routing: (Host, raw request-target) -> what to do with it. No Twisted imports.

Only the contract's forms are recognised; everything else is a 404 (:class:`NotFound`), never a
proxy attempt. The decision is made on the raw bytes the client sent, before any decoding:

* ``<pid>`` is a canonical lower-case UUID, ``<port>`` a decimal 1..65535 without sign or leading
  zero. Upper-case ids, percent-encoded prefixes (``%2f``, ``%2e``), doubled slashes, dot
  segments inside the prefix and anything else that is not exactly the form are 404.
* The request-target must be origin-form (``/...``): absolute-form (``http://host/...``),
  authority-form and ``*`` are 404, so nothing in the request can name a backend. The backend is
  always the project's registered host and the port from the prefix.
* Only visible ASCII (0x21-0x7e) is accepted; control bytes, NUL, spaces, non-ASCII and ``#``
  are 404, as is a target longer than :data:`MAX_TARGET` bytes.
* After the prefix, the path and query are opaque: they reach the backend byte for byte, dot
  segments and percent-escapes included (they can only ever reach the same backend).
* ``raw`` paths are checked more strictly because they name files: a segment that decodes to
  ``.`` or ``..`` or contains ``/``, ``\\`` or NUL once decoded is 404.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal
from urllib.parse import unquote_to_bytes

Kind = Literal["server", "port", "raw"]

#: Longest request-target accepted (bytes).
MAX_TARGET = 8192

_UUID = rb"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
_PORT = rb"[1-9][0-9]{0,4}"
_VISIBLE = re.compile(rb"\A/[\x21-\x7e]*\Z")
_PROXIED = re.compile(rb"\A/(" + _UUID + rb")/(server|port)/(" + _PORT + rb")(/.*)?\Z", re.S)
_RAW = re.compile(rb"\A/(" + _UUID + rb")/raw(/.*)?\Z", re.S)
_STATIC_NAME = re.compile(rb"\A[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}\Z")
_SUBDOMAIN = re.compile(rb"\A(" + _UUID + rb")-(" + _PORT + rb"|raw)\Z")
_OWN_PAGES = {
    b"/_/login": "login",
    b"/_/logout": "logout",
    b"/_/health": "health",
    b"/_/hop": "hop",
    b"/_/jwks.json": "jwks",
    b"/_/oidc/login": "oidc_login",
    b"/_/oidc/callback": "oidc_callback",
    b"/_/open": "open",
    b"/_/share": "share",
}
#: Own pages outside ``/_/`` (browsers ask for these by name).
FAVICON = b"/favicon.ico"
#: The reason of the 404 for a main-host path that names no route and no own page: only these
#: are candidates for the absolute-URL redirect (see :func:`absolute_url`).
NO_ROUTE = "no such route"
#: The one path on a project subdomain that the proxy answers itself (the sign-in hop lands
#: there, see cocalcproxy.guard.hop); everything else on a subdomain is the project's.
HOP_LANDING = b"/.cocalcproxy/hop"
#: Where a link share's secret is presented, on a port subdomain (guard/shares.py).
SHARE_LANDING = b"/.cocalcproxy/share"


@dataclass(frozen=True)
class Route:
    """A request for a project.

    ``prefix`` is the part of the path that names the route (``/<pid>/server/<port>``,
    ``/<pid>/port/<port>``, ``/<pid>/raw``; empty in subdomain mode).
    ``backend_target`` is the request-target the backend sees (path and query, bytes exactly as
    the client sent them); for ``raw`` it is the still-encoded path after the prefix plus query.
    Subdomain routes (``<pid>-<port>.<domain>``) have ``kind="port"`` (the backend sees the path
    unchanged), an empty prefix and ``subdomain=True``; ``<pid>-raw.<domain>`` gives ``raw``.
    """

    project_id: str
    kind: Kind
    port: int | None
    prefix: bytes
    backend_target: bytes
    subdomain: bool = False

    @property
    def path(self) -> bytes:
        """``backend_target`` without its query."""
        return self.backend_target.split(b"?", 1)[0]

    @property
    def query(self) -> bytes:
        """The query string including its ``?``, or empty."""
        _, sep, query = self.backend_target.partition(b"?")
        return sep + query


@dataclass(frozen=True)
class OwnPage:
    """A proxy page: ``index`` (``/``), ``login``, ``logout``, ``health``, ``static``, ``hop``;
    on a project subdomain ``hop_landing`` with ``rest`` the host label (``<pid>-<port|raw>``)."""

    name: str
    rest: bytes = b""


@dataclass(frozen=True)
class Redirect:
    """Answer with a redirect to ``location`` (a path on the proxy, query kept)."""

    location: bytes


@dataclass(frozen=True)
class NotFound:
    reason: str


Outcome = Route | OwnPage | Redirect | NotFound


def parse(
    host: bytes | None,
    target: bytes,
    project_domain: str | None = None,
    main_host: str | None = None,
) -> Outcome:
    """Classify a request by its Host header and raw request-target.

    ``main_host`` is the proxy's own public name (``--hostname``): it is never a project host, even
    when it sits under ``project_domain`` (``proxy.example.org`` with ``--project-domain
    example.org``).
    """
    if len(target) > MAX_TARGET:
        return NotFound("request-target too long")
    if not _VISIBLE.match(target) or b"#" in target:
        return NotFound("not an origin-form request-target of visible ASCII")
    path, sep, query_s = target.partition(b"?")
    query = sep + query_s
    if project_domain and not _is_main_host(host, main_host):
        label = _project_label(host, project_domain)
        if label is not None:
            return _parse_subdomain(label, path, query, target)
    return _parse_main(path, query, target)


def _host_name(host: bytes) -> bytes:
    return host.strip().lower().split(b":", 1)[0].rstrip(b".")


def _is_main_host(host: bytes | None, main_host: str | None) -> bool:
    if not host or not main_host or host.strip().startswith(b"["):
        return False
    return _host_name(host) == main_host.strip().lower().rstrip(".").encode("ascii", "replace")


def _project_label(host: bytes | None, project_domain: str) -> bytes | None:
    """The label left of ``.<project_domain>`` when Host is a project subdomain, else None."""
    if not host:
        return None
    if host.strip().startswith(b"["):
        return None
    name = _host_name(host)
    suffix = b"." + project_domain.strip(".").lower().encode("ascii", "replace")
    if not name.endswith(suffix):
        return None
    return name[: -len(suffix)]


def _parse_subdomain(label: bytes, path: bytes, query: bytes, target: bytes) -> Outcome:
    m = _SUBDOMAIN.match(label)
    if not m:
        return NotFound("no such project host")
    pid, which = m.group(1).decode(), m.group(2)
    if which != b"raw" and int(which) > 65535:
        return NotFound("port out of range")
    if path == HOP_LANDING:
        return OwnPage("hop_landing", label)
    if path == SHARE_LANDING and which != b"raw":
        return OwnPage("share_landing", label)
    if which == b"raw":
        if not _safe_raw_path(path):
            return NotFound("unsafe file path")
        return Route(pid, "raw", None, b"", target, subdomain=True)
    port = int(which)
    if port > 65535:
        return NotFound("port out of range")
    return Route(pid, "port", port, b"", target, subdomain=True)


def _parse_main(path: bytes, query: bytes, target: bytes) -> Outcome:
    if path == b"/":
        return OwnPage("index")
    if path == FAVICON:
        return OwnPage("favicon")
    if path.startswith(b"/_/"):
        name = _OWN_PAGES.get(path)
        if name is not None:
            return OwnPage(name)
        if path.startswith(b"/_/static/"):
            rest = path[len(b"/_/static/") :]
            if _STATIC_NAME.match(rest) and b".." not in rest:
                return OwnPage("static", rest)
        return NotFound("no such page")
    m = _PROXIED.match(path)
    if m:
        pid, kind_b, port_s, rest = m.groups()
        port = int(port_s)
        if port > 65535:
            return NotFound("port out of range")
        prefix = b"/" + pid + b"/" + kind_b + b"/" + port_s
        if rest is None:
            return Redirect(prefix + b"/" + query)
        if kind_b == b"server":
            return Route(pid.decode(), "server", port, prefix, rest + query)
        return Route(pid.decode(), "port", port, prefix, target)
    m = _RAW.match(path)
    if m:
        pid, rest = m.groups()
        prefix = b"/" + pid + b"/raw"
        if rest is None:
            return Redirect(prefix + b"/" + query)
        if not _safe_raw_path(rest):
            return NotFound("unsafe file path")
        return Route(pid.decode(), "raw", None, prefix, rest + query)
    return NotFound(NO_ROUTE)


def _safe_raw_path(path: bytes) -> bool:
    """No segment of a file path may decode to ``.``/``..`` or hide a separator or NUL."""
    for segment in path.split(b"/")[1:]:
        decoded = unquote_to_bytes(segment)
        if decoded in (b".", b".."):
            return False
        if b"/" in decoded or b"\\" in decoded or b"\x00" in decoded:
            return False
    return True


# --- absolute URLs from apps in the server form ---------------------------------------------

_REFERER = re.compile(rb"\Ahttps://([^/?#\s]+)(/" + _UUID + rb"/server/(" + _PORT + rb"))/")


@dataclass(frozen=True)
class AbsoluteUrl:
    """A main-host request that names no route, seemingly written by an app in the server form.

    ``prefix`` is ``/<pid>/server/<port>`` taken from the request's same-origin ``Referer`` (None
    when there is none, as for every browser WebSocket handshake). ``location`` is where to send
    the request with a 307 (``prefix`` plus the request's path and query), or None when the answer
    must be a 404 that explains instead: a WebSocket cannot follow a redirect, and the redirect
    may be turned off.
    """

    prefix: bytes | None
    location: bytes | None
    target: bytes


def referer_prefix(referer: bytes, host: bytes | None) -> bytes | None:
    """``/<pid>/server/<port>`` when ``referer`` is ``https://<host>/<pid>/server/<port>/...``
    on exactly this request's ``host`` (same origin), else None."""
    if not host:
        return None
    m = _REFERER.match(referer.strip())
    if m is None or m.group(1).lower() != host.strip().lower():
        return None
    if int(m.group(3)) > 65535:
        return None
    return m.group(2)


def absolute_url(
    outcome: Outcome,
    host: bytes | None,
    target: bytes,
    referers: Sequence[bytes],
    fetch_sites: Sequence[bytes] = (),
    *,
    websocket: bool = False,
    redirect: bool = True,
) -> AbsoluteUrl | None:
    """Decide whether a 404 is an app's absolute URL, and whether to redirect it.

    Only a :data:`NO_ROUTE` 404 qualifies (never an own page, a malformed project path or a
    project subdomain). The prefix comes only from one ``Referer`` on this request's own origin,
    and only when the browser does not say the request came from another site
    (``Sec-Fetch-Site``), so the ``Location`` is always a path on this host under a well-formed
    server-form prefix: the redirected request is authorised like any other, nothing is
    forwarded on the Referer's word.
    """
    if not isinstance(outcome, NotFound) or outcome.reason != NO_ROUTE:
        return None
    prefix = None
    if len(referers) == 1 and len(fetch_sites) <= 1:
        site = fetch_sites[0].strip().lower() if fetch_sites else b"same-origin"
        if site == b"same-origin":
            prefix = referer_prefix(referers[0], host)
    if prefix is None:
        if websocket:
            return AbsoluteUrl(None, None, target)
        return None
    if websocket or not redirect:
        return AbsoluteUrl(prefix, None, target)
    return AbsoluteUrl(prefix, prefix + target, target)
