"""Pure header policy between clients and backends. No Twisted imports.

One source of truth for what crosses the proxy, used by the HTTP forwarder (forward.py) and the
WebSocket relay (relay.py). Headers are lists of ``(name, value)`` byte pairs in the order they
arrived; names are compared case-insensitively, values pass byte for byte unless a rule below
says otherwise. The functions never raise on odd input: whatever they cannot understand is either
passed unchanged (harmless) or dropped (anything that could carry credentials or steer routing).

Towards the backend (:func:`backend_request_headers`):

* hop-by-hop headers (:data:`HOP_BY_HOP`) and every header named in ``Connection`` are dropped;
  with ``websocket=True`` the handshake's ``Upgrade`` is kept, ``Connection: Upgrade`` is sent
  and ``Sec-WebSocket-*`` headers are kept even if ``Connection`` names them;
* ``Expect`` is dropped: the proxy has already read the body (Twisted answers 100-continue);
* every header whose name contains an underscore is dropped (:func:`underscored`), as nginx and
  gunicorn do by default: CGI, WSGI, Rack and PHP read ``X_Forwarded_For`` and
  ``X-Forwarded-For`` as the same variable, so an underscore spelling could impersonate any
  header the proxy sets or removes;
* ``Cookie2`` (RFC 2965, obsolete) is dropped: it could carry the proxy's cookies past the
  ``Cookie`` filter;
* the proxy's cookies are removed from ``Cookie`` (other cookies pass byte for byte);
* ``Authorization`` is removed when it carried the proxy's own credentials;
* ``X-Forwarded-*``, ``Forwarded`` and ``X-Real-IP`` from the client are dropped, and the proxy
  sets ``X-Forwarded-For``, ``-Proto``, ``-Host`` and (server form) ``-Prefix`` itself;
* ``Host`` is the original one the client sent;
* ``X-Cocalcproxy-Identity`` from the client is always dropped (its underscore spellings go
  with every underscore name); with ``--identity-assertion`` the proxy sets its own.

Towards the client (:func:`client_response_headers`):

* hop-by-hop and ``Connection``-named headers are dropped (``websocket=True`` keeps the 101's
  ``Upgrade``/``Connection: Upgrade`` and ``Sec-WebSocket-*``);
* origin-wide headers a project must not set for the whole proxy (:data:`ORIGIN_WIDE`, and on the
  main host :data:`SHARED_ORIGIN_ONLY`) are dropped;
* ``Location`` is rewritten by :func:`rewrite_location`;
* ``Set-Cookie`` is scoped to the route by :func:`rewrite_set_cookie`; a backend can never set a
  cookie that any browser would send back under one of the proxy's cookie names
  (:func:`is_proxy_cookie_name`); ``Set-Cookie2`` is dropped.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from typing import Protocol

Header = tuple[bytes, bytes]

# --- the proxy's cookie names: the one place they are defined ----------------------------------

#: The session cookie, on the main host and (bound to the host, see guard/hopkeys.py) on each
#: project subdomain. The ``__Host-`` prefix makes browsers refuse it unless it was set by that
#: very host (Secure, Path=/, no Domain), so no other host -- a project subdomain of the same
#: site above all -- can toss one in.
SESSION_COOKIE = b"__Host-cocalcproxy_session"
#: The session cookie's name before issue #11. Read only on the main host, only while no
#: ``SESSION_COOKIE`` is present and only where no other host of the proxy could have set it
#: (guard/credentials.py, ``session_cookie`` and ``legacy_cookie_safe``); never set again.
LEGACY_SESSION_COOKIE = b"cocalcproxy_session"
#: The sign-in form's pre-session cookie (login CSRF protection, see guard/csrf.py).
CSRF_COOKIE = b"__Host-cocalcproxy_csrf"
#: The hop's state cookie on a project subdomain (guard/hop.py): binds a hop ticket to the
#: browser that started the hop.
HOP_STATE_COOKIE = b"__Host-cocalcproxy_hop"
#: The OpenID sign-in's state cookie (guard/oidc.py): state, nonce and PKCE verifier, sealed.
OIDC_STATE_COOKIE = b"__Host-cocalcproxy_oidc"
#: A browser's standing for password sign-ins (guard/devices.py): set after a successful
#: sign-in, so that strangers' wrong guesses cannot lock the account out of that browser.
DEVICE_COOKIE = b"__Host-cocalcproxy_device"
#: A link share's cookie on the one shared project host (guard/shares.py).
SHARE_COOKIE = b"__Host-cocalcproxy_share"
#: Every cookie the proxy sets or reads, as sent.
PROXY_COOKIES: tuple[bytes, ...] = (
    SESSION_COOKIE,
    LEGACY_SESSION_COOKIE,
    CSRF_COOKIE,
    HOP_STATE_COOKIE,
    OIDC_STATE_COOKIE,
    SHARE_COOKIE,
    DEVICE_COOKIE,
)

_COOKIE_PREFIXES = (b"__host-", b"__secure-")


def cookie_core_name(name: bytes) -> bytes:
    """A cookie name as loosely as any browser or server might read it: whitespace stripped,
    lower case, without ``__Host-`` / ``__Secure-`` prefixes."""
    core = name.strip(b" \t").lower()
    stripped = True
    while stripped:
        stripped = False
        for prefix in _COOKIE_PREFIXES:
            if core.startswith(prefix):
                core = core[len(prefix) :].strip(b" \t")
                stripped = True
    return core


#: The proxy's cookie names reduced by :func:`cookie_core_name`.
PROXY_COOKIE_CORES: frozenset[bytes] = frozenset(cookie_core_name(n) for n in PROXY_COOKIES)
#: Kept for callers that want the lower-cased names as sent.
PROXY_COOKIE_NAMES: frozenset[bytes] = frozenset(n.lower() for n in PROXY_COOKIES)


def is_proxy_cookie_name(name: bytes) -> bool:
    """Whether a cookie called ``name`` could be taken for one of the proxy's cookies."""
    return cookie_core_name(name) in PROXY_COOKIE_CORES


def set_cookie_name(value: bytes) -> bytes:
    """The name under which a browser will send back the cookie of a ``Set-Cookie`` value.

    RFC 6265bis: with no ``=`` in the name-value pair, or nothing before it, the cookie is
    nameless and browsers send its value alone, so ``=cocalcproxy_session=x`` comes back as
    ``cocalcproxy_session=x``: its effective name is what precedes the value's first ``=``.
    """
    pair = value.split(b";", 1)[0]
    name, eq, rest = pair.partition(b"=")
    if not eq:
        return pair.strip(b" \t")
    if name.strip(b" \t"):
        return name
    return rest.partition(b"=")[0]


#: RFC 9110 section 7.6.1 connection-specific fields, plus the legacy ones still seen in the wild.
HOP_BY_HOP: frozenset[bytes] = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)

#: Client-sent headers that claim facts only the proxy may state.
FORWARDING_CLAIMS: frozenset[bytes] = frozenset({b"forwarded", b"x-real-ip"})
_FORWARDING_PREFIX = b"x-forwarded-"

#: Response headers that would act on the whole proxy origin, not just one project's route.
#: ``Set-Cookie2`` is obsolete (RFC 2965) and never passed on.
ORIGIN_WIDE: frozenset[bytes] = frozenset({b"alt-svc", b"clear-site-data", b"set-cookie2"})

#: Response headers that widen a project's reach to the whole host, dropped on the main host
#: (path routing) only: ``Service-Worker-Allowed: /`` would let a project's service worker control
#: every path of the proxy's origin, other projects' and the sign-in page included. The reporting
#: headers (``NEL``, ``Report-To``, ``Reporting-Endpoints``) install policies for the whole origin
#: that outlive the page (a NEL policy persists in the browser and would report every request to
#: every project, and the sign-in page, to the project's collector). On a project's own subdomain
#: the origin is the project's, so it may keep them.
SHARED_ORIGIN_ONLY: frozenset[bytes] = frozenset(
    {b"service-worker-allowed", b"nel", b"report-to", b"reporting-endpoints"}
)

#: Request headers never forwarded (besides hop-by-hop): ``Expect`` (the proxy already consumed
#: the body) and ``Cookie2`` (obsolete; not filtered like ``Cookie``).
REQUEST_ONLY: frozenset[bytes] = frozenset({b"expect", b"cookie2"})

#: The signed identity assertion (cocalcproxy.guard.identity) only the proxy may send to a backend.
IDENTITY_HEADER = b"X-Cocalcproxy-Identity"
#: Request headers only the proxy sets (their underscore spellings go with every other one).
PROXY_ONLY: frozenset[bytes] = frozenset({b"x-cocalcproxy-identity"})

_LOOPBACK_NAMES: frozenset[bytes] = frozenset(
    {b"localhost", b"127.0.0.1", b"[::1]", b"::1", b"0.0.0.0", b"[::]"}
)


class RouteLike(Protocol):
    """What the policy needs from a routing.Route (kept structural so this module stays pure)."""

    @property
    def kind(self) -> str: ...

    @property
    def port(self) -> int | None: ...

    @property
    def prefix(self) -> bytes: ...

    @property
    def subdomain(self) -> bool: ...


def _lower(name: bytes) -> bytes:
    return name.strip().lower()


def underscored(name: bytes) -> bool:
    """Request header names with an underscore are never forwarded (the rule is nginx's and
    gunicorn's default): backends that expose headers as ``HTTP_*`` variables cannot tell
    ``X_Real_IP`` from ``X-Real-IP``, nor ``X_Cocalcproxy_Identity`` from the proxy's own."""
    return b"_" in name


def connection_tokens(headers: Iterable[Header]) -> set[bytes]:
    """Lower-case tokens listed in every ``Connection`` header."""
    tokens: set[bytes] = set()
    for name, value in headers:
        if _lower(name) == b"connection":
            for token in value.split(b","):
                token = token.strip().lower()
                if token:
                    tokens.add(token)
    return tokens


def _is_websocket_keep(name: bytes) -> bool:
    return name.startswith(b"sec-websocket-")


def _drop_hop_by_hop(headers: Sequence[Header], websocket: bool) -> list[Header]:
    named = connection_tokens(headers)
    kept: list[Header] = []
    for name, value in headers:
        lname = _lower(name)
        if websocket and _is_websocket_keep(lname):
            kept.append((name, value))
            continue
        if lname in HOP_BY_HOP or lname in named:
            continue
        kept.append((name, value))
    return kept


def _upgrade_value(headers: Sequence[Header]) -> bytes | None:
    for name, value in headers:
        if _lower(name) == b"upgrade":
            return value
    return None


def strip_proxy_cookies(value: bytes) -> bytes | None:
    """A ``Cookie`` header value without the proxy's cookies; None when nothing is left.

    Each remaining ``name=value`` pair keeps its exact bytes; when nothing is removed the value
    is returned unchanged. Names are compared by :func:`is_proxy_cookie_name`, so near-misses
    (case, spaces, ``__Host-``/``__Secure-`` variants) are removed too.
    """
    pieces = value.split(b";")
    kept = [p for p in pieces if not is_proxy_cookie_name(p.split(b"=", 1)[0])]
    if len(kept) == len(pieces):
        return value
    kept = [p for p in kept if p.strip()]
    if not kept:
        return None
    return b"; ".join(p.strip(b" \t") for p in kept)


def backend_request_headers(
    client_headers: Sequence[Header],
    *,
    route: RouteLike,
    client_ip: str,
    proto: bytes = b"https",
    host: bytes | None,
    strip_authorization: bool,
    websocket: bool = False,
    identity: bytes | None = None,
) -> list[Header]:
    """The headers to send to the backend for one request.

    ``client_headers`` are the request's headers as received; ``client_ip`` the peer address
    (empty when the listener has none, e.g. a Unix socket: then no X-Forwarded-For is sent);
    ``proto`` the scheme the client used (always https for proxied requests); ``host`` the
    client's Host header (None if absent: then no Host and no X-Forwarded-Host are sent, and the
    HTTP client fills in the backend's address). ``strip_authorization`` is
    ``request.authorization_is_proxy_credential``. ``websocket=True`` keeps the upgrade
    handshake (``Upgrade``, ``Connection: Upgrade``, ``Sec-WebSocket-*``). ``identity`` is the
    proxy's signed assertion (``X-Cocalcproxy-Identity``), added last when given.

    Body framing (``Content-Length``) is kept: a forwarder that lets its HTTP client frame the
    body itself must remove it (see forward.py).
    """
    upgrade = _upgrade_value(client_headers) if websocket else None
    out: list[Header] = []
    for name, value in _drop_hop_by_hop(client_headers, websocket):
        lname = _lower(name)
        if lname == b"host" or underscored(lname):
            continue
        if lname in FORWARDING_CLAIMS or lname.startswith(_FORWARDING_PREFIX):
            continue
        if lname in REQUEST_ONLY or lname in PROXY_ONLY:
            continue
        if lname == b"authorization" and strip_authorization:
            continue
        if lname == b"cookie":
            stripped = strip_proxy_cookies(value)
            if stripped is None:
                continue
            value = stripped
        out.append((name, value))
    if host is not None:
        out.insert(0, (b"Host", host))
    if websocket:
        out.append((b"Connection", b"Upgrade"))
        out.append((b"Upgrade", upgrade if upgrade is not None else b"websocket"))
    if client_ip:
        out.append((b"X-Forwarded-For", client_ip.encode("ascii", "replace")))
    out.append((b"X-Forwarded-Proto", proto))
    if host is not None:
        out.append((b"X-Forwarded-Host", host))
    if route.kind == "server" and route.prefix and not route.subdomain:
        out.append((b"X-Forwarded-Prefix", route.prefix))
    if identity is not None:
        out.append((IDENTITY_HEADER, identity))
    return out


# --- Location -------------------------------------------------------------------------------


def _split_authority(authority: bytes) -> tuple[bytes, int | None] | None:
    """(lower-case host, explicit port or None) of ``host[:port]``; None if implausible."""
    if b"@" in authority or not authority:
        return None
    if authority.startswith(b"["):
        end = authority.find(b"]")
        if end < 0:
            return None
        hostname, rest = authority[: end + 1], authority[end + 1 :]
    else:
        hostname, sep, port_s = authority.partition(b":")
        rest = b":" + port_s if sep else b""
    if not rest or rest == b":":
        return hostname.lower(), None
    digits = rest[1:]
    if not rest.startswith(b":") or not digits.isdigit() or len(digits) > 5:
        return None
    return hostname.lower(), int(digits)


def _host_names(project_host: str) -> set[bytes]:
    """The names under which a backend on ``project_host`` may refer to itself."""
    host = project_host.strip().lower().rstrip(".")
    raw = host.encode("utf-8", "replace")
    names = {raw}
    if not _is_ip(host):
        try:
            names.add(host.encode("idna"))
        except UnicodeError:
            pass
    elif ":" in host:
        names.add(b"[" + raw + b"]")
    if raw in _LOOPBACK_NAMES or _is_loopback(host):
        names |= _LOOPBACK_NAMES
    return names


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _parse_absolute(location: bytes) -> tuple[bytes, bytes, bytes] | None:
    """(scheme, authority, path-and-rest) of an absolute or scheme-relative URL, else None."""
    scheme = b""
    rest = location
    colon = location.find(b":")
    slash = location.find(b"/")
    if colon > 0 and (slash < 0 or colon < slash):
        scheme = location[:colon].lower()
        if not scheme.isalpha():
            return None
        rest = location[colon + 1 :]
    if not rest.startswith(b"//"):
        return None
    rest = rest[2:]
    end = len(rest)
    for stop in (b"/", b"?", b"#"):
        i = rest.find(stop)
        if 0 <= i < end:
            end = i
    authority, tail = rest[:end], rest[end:]
    if not tail.startswith(b"/"):
        tail = b"/" + tail
    return scheme, authority, tail


def _under(path: bytes, prefix: bytes) -> bool:
    return path == prefix or path.startswith(prefix + b"/") or path.startswith(prefix + b"?")


def rewrite_location(
    location: bytes,
    *,
    route: RouteLike,
    project_host: str,
    proxy_hosts: Iterable[bytes] = (),
) -> bytes:
    """Map a backend's ``Location`` onto the proxied URL space.

    Server form (prefix stripped for the backend):

    * an absolute path (``/login``) gets the prefix (``/<pid>/server/<port>/login``), unless it
      already starts with the prefix (a backend that honours ``X-Forwarded-Prefix``);
    * an absolute URL (or scheme-relative ``//host/...``) whose authority is the backend itself
      (the project's host, or a loopback name when the project is on loopback, with the route's
      port) or one of ``proxy_hosts`` (``host[:port]`` as clients address the proxy) becomes the
      prefixed absolute path on the proxy;
    * relative references (``login``, ``../x``, ``?q``) and other sites' URLs are left alone.

    Port form and subdomain routes (the backend sees the whole path): only absolute URLs naming
    the backend are rewritten, to their path on the proxy.

    Results are always path-absolute references (``/...``) on the proxy's own origin, so the
    proxy never reflects a client-supplied Host into a redirect.
    """
    prefix = route.prefix
    stripping = route.kind == "server" and bool(prefix) and not route.subdomain
    if location.startswith(b"/") and not location.startswith(b"//"):
        if stripping and not _under(location, prefix):
            return prefix + location
        return location
    parsed = _parse_absolute(location)
    if parsed is None:
        return location
    scheme, authority, tail = parsed
    if scheme not in (b"", b"http", b"https"):
        return location
    hostport = _split_authority(authority)
    if hostport is None:
        return location
    hostname, port = hostport
    effective = port if port is not None else (443 if scheme == b"https" else 80)
    backend = (
        route.port is not None and hostname in _host_names(project_host) and effective == route.port
    )
    proxy = False
    if not backend and stripping:
        for candidate in proxy_hosts:
            wanted = _split_authority(candidate.strip().lower())
            if wanted is not None and hostname == wanted[0]:
                wanted_port = wanted[1] if wanted[1] is not None else 443
                if port is None or port == wanted_port:
                    proxy = True
                    break
    if not (backend or proxy):
        return location
    if stripping and not _under(tail, prefix):
        return prefix + tail
    return tail


# --- Set-Cookie -----------------------------------------------------------------------------


def rewrite_set_cookie(value: bytes, *, route: RouteLike) -> bytes | None:
    """Scope one ``Set-Cookie`` value to the route; None to drop it.

    * Any ``Domain`` attribute is removed (the cookie becomes host-only).
    * A ``Path`` outside the route's prefix is narrowed: in the server form ``Path=/x`` becomes
      ``Path=<prefix>/x`` (the backend's ``/x`` is the proxy's ``<prefix>/x``); in the port form
      it becomes ``Path=<prefix>/``. A cookie without ``Path`` gets the browser's default path,
      which lies under the request path and so under the prefix already.
    * Subdomain routes have no prefix: only ``Domain`` goes.
    * A cookie that a browser would send back under a name like one of the proxy's own cookies
      is dropped (:func:`set_cookie_name`, :func:`is_proxy_cookie_name`): ``=name=x``,
      `` name =x``, case and ``__Host-``/``__Secure-`` variants included.
    """
    parts = value.split(b";")
    if is_proxy_cookie_name(set_cookie_name(value)):
        return None
    prefix = route.prefix
    stripping = route.kind == "server" and bool(prefix) and not route.subdomain
    out = [parts[0]]
    for attribute in parts[1:]:
        name, sep, attr_value = attribute.partition(b"=")
        lname = name.strip().lower()
        if lname == b"domain":
            continue
        if lname == b"path" and prefix and not route.subdomain:
            path = attr_value.strip()
            if path.startswith(b"/") and (path == prefix or path.startswith(prefix + b"/")):
                out.append(attribute)
                continue
            if stripping and path.startswith(b"/"):
                narrowed = prefix + path
            else:
                narrowed = prefix + b"/"
            out.append(b" Path=" + narrowed)
            continue
        out.append(attribute)
    return b";".join(out)


def client_response_headers(
    backend_headers: Sequence[Header],
    *,
    route: RouteLike,
    project_host: str,
    proxy_hosts: Iterable[bytes] = (),
    websocket: bool = False,
) -> list[Header]:
    """The headers to send to the client for a backend's response (or 101 handshake answer).

    ``project_host`` is the project's registered backend host; ``proxy_hosts`` the authorities
    (``host[:port]``) by which clients reach the proxy: the request's Host and the configured
    public name. Framing (``Content-Length``) is kept; ``Transfer-Encoding`` is hop-by-hop and is
    left to the server side to choose again.
    """
    hosts = list(proxy_hosts)
    out: list[Header] = []
    kept = _drop_hop_by_hop(backend_headers, websocket)
    for name, value in kept:
        lname = _lower(name)
        if lname in ORIGIN_WIDE:
            continue
        if lname in SHARED_ORIGIN_ONLY and not route.subdomain:
            continue
        if lname == b"location":
            value = rewrite_location(
                value, route=route, project_host=project_host, proxy_hosts=hosts
            )
        elif lname == b"set-cookie":
            rewritten = rewrite_set_cookie(value, route=route)
            if rewritten is None:
                continue
            value = rewritten
        out.append((name, value))
    if websocket:
        upgrade = _upgrade_value(backend_headers)
        out.append((b"Connection", b"Upgrade"))
        out.append((b"Upgrade", upgrade if upgrade is not None else b"websocket"))
    return out
