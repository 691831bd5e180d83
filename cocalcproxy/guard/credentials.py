"""Which proxy credentials a request carries: pure parsing, plus the twisted.cred credential types.

Three kinds, in this order of precedence:

* ``Authorization: Bearer <api token>``
* ``Authorization: Basic`` with name and password, or name and API token
* the session cookie (``__Host-cocalcproxy_session``; on the main host, under the rules of
  :func:`session_cookie`, also the name it had before, ``cocalcproxy_session``)

An ``Authorization`` header with any other scheme (``token ...`` for Jupyter, ``Digest``) belongs
to the backend: it is ignored here and passed on. A Basic or Bearer header that cannot be parsed,
or more than one ``Authorization`` header when one of them is Basic or Bearer, is ``Malformed``:
the guard answers 401 rather than guessing which one was meant.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

from twisted.cred.credentials import ICredentials, IUsernamePassword, UsernamePassword
from zope.interface import Attribute, implementer

from cocalcproxy.http import headers

SESSION_COOKIE = headers.SESSION_COOKIE.decode("ascii")
LEGACY_SESSION_COOKIE = headers.LEGACY_SESSION_COOKIE.decode("ascii")
HOP_STATE_COOKIE = headers.HOP_STATE_COOKIE.decode("ascii")

# Longer values are refused without asking the directory.
MAX_SECRET_LENGTH = 1024
MAX_NAME_LENGTH = 256

_TOKEN68 = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
# Cookie values the directory could have issued: printable ASCII without separators.
_COOKIE_VALUE = re.compile(r"[!#-+\--:<-\[\]-~]+")


class ISessionToken(ICredentials):
    """The secret value of a ``cocalcproxy_session`` cookie."""

    token = Attribute("The session token, a str.")


class IAPIToken(ICredentials):
    """An API token sent as ``Authorization: Bearer``."""

    token = Attribute("The API token, a str.")


class INameAndSecret(ICredentials):
    """``Authorization: Basic``: a name and either that account's password or one of its tokens."""

    name = Attribute("The account name, a str.")
    secret = Attribute("The password or API token, a str.")


@implementer(ISessionToken)
@dataclass(frozen=True, repr=False)
class SessionToken:
    token: str

    def __repr__(self) -> str:
        return "SessionToken(<secret>)"


@implementer(IAPIToken)
@dataclass(frozen=True, repr=False)
class APIToken:
    token: str

    def __repr__(self) -> str:
        return "APIToken(<secret>)"


@implementer(INameAndSecret)
@dataclass(frozen=True, repr=False)
class NameAndSecret:
    name: str
    secret: str

    def __repr__(self) -> str:
        return f"NameAndSecret({self.name!r}, <secret>)"


Credential = SessionToken | APIToken | NameAndSecret


@dataclass(frozen=True)
class Presented:
    """Credentials found on a request; ``from_authorization`` when they came in that header."""

    credentials: Credential
    from_authorization: bool


@dataclass(frozen=True)
class Malformed:
    """A Basic or Bearer Authorization header we cannot use: always a 401, never forwarded."""

    reason: str


def form_password(name: str, password: str) -> UsernamePassword:
    """The credentials the sign-in form presents (password only, never an API token)."""
    return UsernamePassword(name.encode("utf-8"), password.encode("utf-8"))


def password_pair(credentials: IUsernamePassword) -> tuple[str, str] | None:
    try:
        return credentials.username.decode("utf-8"), credentials.password.decode("utf-8")
    except UnicodeDecodeError:
        return None


def parse_authorization(values: Sequence[bytes]) -> APIToken | NameAndSecret | Malformed | None:
    """The proxy credential in the Authorization header(s), or None if they are not ours."""
    ours = [v for v in values if _scheme(v) in (b"basic", b"bearer")]
    if not ours:
        return None
    if len(values) > 1:
        return Malformed("more than one Authorization header")
    scheme, _, rest = ours[0].strip().partition(b" ")
    value = rest.strip()
    if len(value) > 4 * MAX_SECRET_LENGTH:
        return Malformed("credentials too long")
    try:
        text = value.decode("ascii")
    except UnicodeDecodeError:
        return Malformed("non-ASCII credentials")
    if scheme.lower() == b"bearer":
        if not _TOKEN68.fullmatch(text) or len(text) > MAX_SECRET_LENGTH:
            return Malformed("bad bearer token")
        return APIToken(text)
    try:
        decoded = base64.b64decode(text, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return Malformed("bad Basic credentials")
    name, colon, secret = decoded.partition(":")
    if not colon or not name or not secret:
        return Malformed("bad Basic credentials")
    if len(name) > MAX_NAME_LENGTH or len(secret) > MAX_SECRET_LENGTH:
        return Malformed("credentials too long")
    return NameAndSecret(name, secret)


def _scheme(value: bytes) -> bytes:
    return value.strip().partition(b" ")[0].lower()


def cookie_values(cookie_headers: Sequence[bytes], name: str) -> list[str]:
    """Every value of cookie ``name`` in the Cookie header(s), in order, quotes removed."""
    wanted = name.encode("ascii")
    found: list[str] = []
    for header in cookie_headers:
        for part in header.split(b";"):
            key, eq, value = part.strip().partition(b"=")
            if not eq or key.strip() != wanted:
                continue
            value = value.strip()
            if len(value) >= 2 and value.startswith(b'"') and value.endswith(b'"'):
                value = value[1:-1]
            found.append(value.decode("latin-1"))
    return found


def session_cookie(cookie_headers: Sequence[bytes], legacy: bool = False) -> str | None:
    """The session token in the Cookie header(s), or None.

    The ``__Host-`` cookie always wins: when the request has one, the old name is not even
    looked at (another host may have tossed an old-name cookie in beside it, with a more
    specific Path so that it comes first). Only without one, and only when ``legacy`` (no other
    host of this proxy could have set a cookie the main host receives: ``legacy_cookie_safe``),
    a session still held under the old name counts, and then only when there is exactly one
    non-empty value of it (two mean one was planted).
    """
    current = cookie_values(cookie_headers, SESSION_COOKIE)
    if current:
        return next((v for v in current if v), None)
    if not legacy:
        return None
    old = [v for v in cookie_values(cookie_headers, LEGACY_SESSION_COOKIE) if v]
    return old[0] if len(old) == 1 else None


def has_legacy_cookie(cookie_headers: Sequence[bytes]) -> bool:
    return bool(cookie_values(cookie_headers, LEGACY_SESSION_COOKIE))


def _labels(host: str) -> list[str]:
    return [label for label in host.strip().strip(".").lower().split(".") if label]


def legacy_cookie_safe(hostname: str, project_domain: str | None) -> bool:
    """Whether no project subdomain could have set a cookie that the main host receives.

    A host can set a cookie for any parent domain that is not a public suffix, and the main host
    receives cookies set for its own parent domains. So a project host ``<label>.<domain>`` can
    toss cookies at the main host when the two share a parent domain that is not a public
    suffix. Without the Public Suffix List the proxy assumes that any two shared trailing labels
    may be such a domain (``example.com`` in ``proxy.example.com`` and ``p.example.com``), and
    that one label (a top-level domain, or ``localhost``) never is. An IP address as the main
    host cannot receive domain cookies.
    """
    if not project_domain:
        return True
    host = _labels(hostname)
    if not host or all(part.isdigit() for part in host) or ":" in hostname:
        return True
    domain = _labels(project_domain)
    shared = 0
    for a, b in zip(reversed(host), reversed(domain), strict=False):
        if a != b:
            break
        shared += 1
    return shared < 2


def well_formed_cookie_token(token: str) -> bool:
    return 0 < len(token) <= MAX_SECRET_LENGTH and _COOKIE_VALUE.fullmatch(token) is not None


def extract(
    authorization: Sequence[bytes], cookies: Sequence[bytes], legacy: bool = False
) -> Presented | Malformed | None:
    """What the request presents: Authorization (ours) first, then the session cookie
    (``legacy``: see :func:`session_cookie`)."""
    parsed = parse_authorization(authorization)
    if isinstance(parsed, Malformed):
        return parsed
    if parsed is not None:
        return Presented(parsed, from_authorization=True)
    token = session_cookie(cookies, legacy)
    if token is not None:
        return Presented(SessionToken(token), from_authorization=False)
    return None


def cache_key(key: bytes, credentials: Credential) -> bytes:
    """A keyed hash naming the credentials, so caches never hold secrets or plain hashes of them.

    Keyed BLAKE2b (a MAC by design, RFC 7693) rather than HMAC-SHA256: every request with a
    token or a session computes it, and the HMAC's two passes and setup cost three times as
    much. Without the key, which never leaves the process, nobody can compute or guess a cache
    key, so timing of the cache's lookup by key tells an attacker nothing about a secret."""
    # One string after a fixed kind and a NUL for tokens (json.dumps cost more than the hash);
    # JSON, which starts with "[", for the name and secret pair. The three forms can never
    # produce the same material.
    if isinstance(credentials, SessionToken):
        material = b"session\x00" + credentials.token.encode("utf-8", "surrogatepass")
    elif isinstance(credentials, APIToken):
        material = b"token\x00" + credentials.token.encode("utf-8", "surrogatepass")
    else:
        parts = ["basic", credentials.name, credentials.secret]
        material = json.dumps(parts).encode("utf-8", "surrogatepass")
    return hashlib.blake2b(material, key=key, digest_size=32).digest()
