"""Pure rules of the sign-in hop for project subdomains (no Twisted).

* :func:`parse_target`: the only places ``/_/hop?to=`` may send a browser: ``https://`` plus a
  project host of this proxy (``<pid>-<port>.<domain>`` or ``<pid>-raw.<domain>``, canonical
  lower-case id, optional port equal to the proxy's public HTTPS port) plus a path on it.
* :class:`HopKeys`: the two secrets derived from the proxy's form key
  (kept in the directory, shared by every proxy process on it: guard/csrf.py):

  - a subdomain's session cookie is ``<session token>.<tag>`` where the tag is an HMAC of the
    host's label and the token, so a cookie stolen from one project host is refused on every
    other one (and on the main host, where the tagged value names no session);
  - the hop's ticket is the one-time directory session sealed with AES-GCM, the host's label
    and the hop's *state* as associated data: the secret session token never appears in a URL,
    a ticket minted for one project host cannot be redeemed on another, and a ticket redeems
    only in the browser that started the hop (the state is a random value the project host set
    in that browser's host-only cookie before sending it to the main host; see guard/hop.py).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from cocalcproxy.guard import policy

#: The path on a project host that the proxy answers itself (never forwarded): the hop lands here.
LANDING_PATH = "/.cocalcproxy/hop"
#: How long a ticket may be redeemed (seconds).
TICKET_LIFETIME = 60.0
#: How long a browser keeps the hop's state cookie on a project host (seconds): the time it
#: may take to sign in on the main host in the middle of a hop.
STATE_LIFETIME = 1800

MAX_TO_LENGTH = policy.MAX_NEXT_LENGTH + 256
_TAG_BYTES = 24
_NONCE_BYTES = 12
_MAX_TICKET_LENGTH = 512

_LABEL = re.compile(
    r"\A([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})-([1-9][0-9]{0,4}|raw)\Z"
)


@dataclass(frozen=True)
class Target:
    """Where a hop may lead: ``https://<label>.<domain>[:port]<path>``."""

    project_id: str
    label: str
    path: str


_STATE = re.compile(r"\A[A-Za-z0-9_-]{22}\Z")


def new_state() -> str:
    """A fresh hop state: 128 random bits, URL- and cookie-safe."""
    return secrets.token_urlsafe(16)


def well_formed_state(value: str | None) -> bool:
    return value is not None and _STATE.match(value) is not None


def label_for(project_id: str, port: int | None) -> str:
    """The host label of a project subdomain: ``<pid>-<port>``, or ``<pid>-raw`` for files."""
    return f"{project_id}-{port if port is not None else 'raw'}"


def authority(host: str, port: int | None) -> str:
    """``host`` or ``host:port`` (IPv6 literals bracketed); None means the implied 443."""
    name = f"[{host}]" if ":" in host else host
    return name if port is None else f"{name}:{port}"


def public_authority(host: str, port: int | None) -> str:
    """The authority of one of the proxy's public URLs: ``host`` (a DNS name, IDNA-encoded
    here) with ``:port`` unless it is the implied 443."""
    return authority(host.encode("idna").decode("ascii"), None if port == 443 else port)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes | None:
    if not text or not all(c.isascii() and (c.isalnum() or c in "-_") for c in text):
        return None
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        return None


def parse_target(to: str | None, domain: str, public_port: int | None) -> Target | None:
    """The hop target named by ``to``, or None when it is anything but a path on a project host.

    ``public_port`` None means 443. Refused: other schemes (``javascript:``, ``http:``),
    scheme-relative ``//host``, userinfo (``user@``), backslashes, whitespace and control
    characters anywhere, non-ASCII, fragments, other hosts and domains, non-canonical project
    ids, ports other than the public one, and paths that ``policy.safe_next`` would change
    (``//evil.example`` as a path). Host names compare case-insensitively; the result is
    canonical (lower case).
    """
    if not to or len(to) > MAX_TO_LENGTH:
        return None
    if not all(0x21 <= ord(c) <= 0x7E for c in to) or "\\" in to or "#" in to:
        return None
    prefix = "https://"
    if to[: len(prefix)].lower() != prefix:
        return None
    rest = to[len(prefix) :]
    cut = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
    netloc, path = rest[:cut], rest[cut:]
    if "@" in netloc or not path.startswith("/"):
        return None
    host, colon, port_text = netloc.partition(":")
    if colon:
        expected = 443 if public_port is None else public_port
        if not port_text.isdigit() or port_text.startswith("0") or int(port_text) != expected:
            return None
    host = host.lower()
    suffix = "." + domain.strip(".").lower()
    if not host.endswith(suffix):
        return None
    m = _LABEL.match(host[: -len(suffix)])
    if m is None:
        return None
    if m.group(2) != "raw" and int(m.group(2)) > 65535:
        return None
    if policy.safe_next(path) != path:
        return None
    return Target(m.group(1), m.group(0), path)


class HopKeys:
    """Cookie tags and sealed tickets (see the module docstring)."""

    def __init__(self, secret: bytes) -> None:
        self._tag_key = hmac.new(secret, b"cocalcproxy subdomain cookie", hashlib.sha256).digest()
        ticket_key = hmac.new(secret, b"cocalcproxy hop ticket", hashlib.sha256).digest()
        self._aead = AESGCM(ticket_key)

    def _tag(self, label: str, token: str) -> str:
        material = label.encode("ascii", "replace") + b"\0" + token.encode("utf-8", "replace")
        return _b64(hmac.new(self._tag_key, material, hashlib.sha256).digest()[:_TAG_BYTES])

    def bind(self, label: str, token: str) -> str:
        """The cookie value carrying ``token`` on the host ``label``."""
        return f"{token}.{self._tag(label, token)}"

    def unbind(self, label: str, value: str) -> str | None:
        """The session token in a cookie value, if its tag is right for ``label``."""
        token, dot, tag = value.rpartition(".")
        if not dot or not token or not tag:
            return None
        expected = self._tag(label, token).encode()
        if not hmac.compare_digest(expected, tag.encode("utf-8", "replace")):
            return None
        return token

    def first_bound(self, label: str, values: Iterable[str]) -> str | None:
        """The first cookie value that is bound to ``label`` (others, e.g. tossed in by a
        sibling subdomain with a Domain attribute, are passed over)."""
        for value in values:
            token = self.unbind(label, value)
            if token is not None:
                return token
        return None

    @staticmethod
    def _associated(label: str, state: str) -> bytes:
        return b"ticket\0" + label.encode() + b"\0" + state.encode("ascii", "replace")

    def seal(self, label: str, token: str, state: str) -> str:
        """A ticket for ``label`` carrying the one-time session ``token``, redeemable only
        together with the hop's ``state``."""
        nonce = os.urandom(_NONCE_BYTES)
        sealed = self._aead.encrypt(nonce, token.encode("utf-8"), self._associated(label, state))
        return _b64(nonce + sealed)

    def open(self, label: str, ticket: str | None, state: str | None) -> str | None:
        """The session token in a ticket sealed for ``label`` and ``state``, or None."""
        if not ticket or len(ticket) > _MAX_TICKET_LENGTH or not well_formed_state(state):
            return None
        assert state is not None
        data = _unb64(ticket)
        if data is None or len(data) <= _NONCE_BYTES + 16:
            return None
        try:
            plain = self._aead.decrypt(
                data[:_NONCE_BYTES], data[_NONCE_BYTES:], self._associated(label, state)
            )
            return plain.decode("utf-8")
        except (InvalidTag, UnicodeDecodeError):
            return None
