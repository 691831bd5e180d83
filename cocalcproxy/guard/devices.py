"""Device cookies (OWASP, "Slow down online guessing attacks with device cookies"). Pure.

A successful password sign-in through the form gives the browser a device cookie,
``__Host-cocalcproxy_device``, naming that account: a random nonce and an HMAC of the exact account
name and the nonce, keyed from the proxy's form key (kept in the directory, shared by every
proxy process on it: guard/csrf.py). Later password attempts for that account from that browser
come from a *known device* and are limited per device instead of per name and address
(guard/ratelimit.py), so strangers' wrong guesses cannot lock the owner out of her own browser.
Nobody can make a device cookie for an account without signing in to it, and one for another
account (even one whose name differs only by case) does not count.

One cookie holds up to :data:`MAX_ENTRIES` entries (``<nonce>.<mac>`` joined by ``~``), so a
browser shared by a few people keeps each one's standing.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from collections.abc import Sequence

from cocalcproxy.guard.credentials import cookie_values
from cocalcproxy.http import headers

DEVICE_COOKIE = headers.DEVICE_COOKIE.decode("ascii")
#: How long a browser keeps its device cookie (seconds): a year, renewed on every sign-in.
DEVICE_LIFETIME = 365 * 86400
#: Entries kept in one cookie (the most recent sign-ins' accounts).
MAX_ENTRIES = 5

_ENTRY = re.compile(r"\A([A-Za-z0-9_-]{22})\.([A-Za-z0-9_-]{32})\Z")


class DeviceCookies:
    def __init__(self, secret: bytes) -> None:
        self._key = hmac.new(secret, b"cocalcproxy device cookie", hashlib.sha256).digest()

    def _mac(self, name: str, nonce: str) -> str:
        material = b"device\0" + name.encode("utf-8", "surrogatepass") + b"\0" + nonce.encode()
        digest = hmac.new(self._key, material, hashlib.sha256).digest()[:24]
        return base64.urlsafe_b64encode(digest).decode("ascii")

    def _entries(self, cookie_headers: Sequence[bytes]) -> list[tuple[str, str]]:
        values = cookie_values(cookie_headers, DEVICE_COOKIE)
        if len(values) != 1:
            return []
        found = []
        for part in values[0].split("~")[:MAX_ENTRIES]:
            m = _ENTRY.match(part)
            if m is not None:
                found.append((m.group(1), m.group(2)))
        return found

    def device_for(self, cookie_headers: Sequence[bytes], name: str) -> str | None:
        """The nonce of a device entry valid for account ``name``, or None (unknown client)."""
        for nonce, mac in self._entries(cookie_headers):
            if hmac.compare_digest(mac, self._mac(name, nonce)):
                return nonce
        return None

    def issue(self, cookie_headers: Sequence[bytes], name: str) -> str:
        """The cookie value after a successful sign-in to ``name``: its entry first (kept if the
        browser had one, else new), then the browser's other entries."""
        nonce = self.device_for(cookie_headers, name) or secrets.token_urlsafe(16)
        mine = f"{nonce}.{self._mac(name, nonce)}"
        others = [f"{n}.{m}" for n, m in self._entries(cookie_headers) if n != nonce]
        return "~".join([mine, *others][:MAX_ENTRIES])
