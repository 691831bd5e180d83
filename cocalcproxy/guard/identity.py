"""Signed identity assertions for backends (``--identity-assertion``) and their public keys.

Every proxied HTTP request and WebSocket handshake gets ``X-Cocalcproxy-Identity: <JWT>``, an
ES256-signed token saying who is calling: ``iss`` (the proxy's origin), ``aud`` (the route's URL:
``https://host/<pid>/server/<port>/``, ``.../port/<port>/`` or ``https://<pid>-<port>.<domain>/``),
``sub`` and ``name`` (the account name), ``email`` when known, ``project`` (the project id),
``role`` (``owner`` or ``collaborator``), ``iat``, ``exp`` (60 s later) and ``jti``.

The keys live in the directory (table ``identity_keys``), so every proxy on one directory signs
with and publishes the same keys, at ``/_/jwks.json`` for anyone. Key life:

* a new key is made when the newest is older than ``rotate_after`` (30 days);
* a key signs only after it has been published for ``activation`` seconds (two refreshes), so
  every proxy on the directory already publishes it when the first token made with it appears
  (the very first key of a directory signs at once: nobody can know an older one);
* a key stays published for ``keep_for`` after a newer one appeared, far longer than any token
  made with it lives.

Each proxy re-reads the keys every ``refresh_interval`` seconds. Tokens are cached per (account,
route, role, key) and reused while more than half their life is left, so the hot path costs a
dictionary lookup; a backend sees a given token for at most 30 s of its 60.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from joserfc import jwt
from joserfc.jwk import ECKey
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from cocalcproxy.guard.cache import ExpiringCache
from cocalcproxy.guard.hopkeys import public_authority as authority
from cocalcproxy.http import routing
from cocalcproxy.http.site import Access

# The namespace operators see in log lines (kept from before the package layout).
log = Logger(namespace="cocalcproxy.identity")

ALGORITHM = "ES256"
#: The request header backends read; clients' own copies are always dropped (headers.py).
HEADER = b"X-Cocalcproxy-Identity"

StoredKey = tuple[str, str, float]  # (kid, private JWK as JSON, created)


def make_key() -> tuple[str, str]:
    """A new P-256 key: (kid, private JWK as JSON). The kid is the RFC 7638 thumbprint."""
    key = ECKey.generate_key("P-256", auto_kid=True)
    assert key.kid is not None
    return key.kid, json.dumps(key.as_dict(private=True))


def audience(
    route: routing.Route, hostname: str, project_domain: str | None, port: int | None
) -> str:
    """The route's own URL: what a backend should expect as ``aud``."""
    if route.subdomain and project_domain:
        label = f"{route.project_id}-{route.port}"
        return f"https://{authority(label + '.' + project_domain, port)}/"
    return f"https://{authority(hostname, port)}/{route.project_id}/{route.kind}/{route.port}/"


@dataclass(frozen=True)
class _Signing:
    kid: str
    key: ECKey


class IdentityAssertions:
    """The keys (loaded from the directory, rotated there) and the tokens made with them."""

    def __init__(
        self,
        directory: Any,
        clock: Any,
        *,
        hostname: str,
        project_domain: str | None,
        public_port: Callable[[], int | None],
        lifetime: float = 60.0,
        rotate_after: float = 30 * 86400.0,
        refresh_interval: float = 60.0,
        keep_for: float = 86400.0,
        max_entries: int = 10_000,
    ) -> None:
        self.directory = directory
        self.clock = clock
        self.hostname = hostname
        self.project_domain = project_domain
        self.public_port = public_port
        self.lifetime = lifetime
        self.rotate_after = rotate_after
        self.refresh_interval = refresh_interval
        self.activation = 2 * refresh_interval
        self.keep_for = max(keep_for, self.activation + 2 * lifetime)
        self.keys: list[StoredKey] = []
        self.signing: _Signing | None = None
        self.jwks_body = b'{"keys": []}'
        self._tokens: ExpiringCache[tuple[int, str, str, str], bytes] = ExpiringCache(max_entries)
        self._loop: LoopingCall | None = None
        self._done: Deferred[Any] | None = None

    # -- keys ---------------------------------------------------------------------------------

    def load(self, keys: list[StoredKey]) -> None:
        """Take the directory's keys: publish them all and pick the one to sign with."""
        keys = sorted(keys, key=lambda k: (k[2], k[0]))
        now = self.clock.seconds()
        active = [k for k in keys if k[2] <= now - self.activation]
        chosen = active[-1] if active else (keys[0] if keys else None)
        if chosen is not None and (self.signing is None or self.signing.kid != chosen[0]):
            self.signing = _Signing(chosen[0], ECKey.import_key(json.loads(chosen[1])))
            log.info("identity assertions signed with key {kid}", kid=chosen[0])
        if keys == self.keys:
            return
        public = []
        for kid, private, _created in keys:
            try:
                key = ECKey.import_key(json.loads(private))
            except Exception:
                log.error("identity key {kid} in the directory cannot be read; skipped", kid=kid)
                continue
            public.append(
                {**key.as_dict(private=False), "kid": kid, "alg": ALGORITHM, "use": "sig"}
            )
        self.keys = keys
        self.jwks_body = json.dumps({"keys": public}, sort_keys=True).encode() + b"\n"

    def needs_rotation(self, keys: list[StoredKey]) -> bool:
        now = self.clock.seconds()
        if not keys or max(k[2] for k in keys) <= now - self.rotate_after:
            return True
        ordered = sorted(k[2] for k in keys)
        return len(ordered) > 1 and ordered[1] <= now - self.keep_for

    def prepare(self, sync_directory: Any) -> None:
        """At start-up (blocking, before the reactor runs): make sure a key exists and load."""
        keys = sync_directory.identity_keys()
        if self.needs_rotation(keys):
            keys = sync_directory.rotate_identity_keys(self.rotate_after, self.keep_for, make_key)
        self.load(keys)

    def refresh(self) -> Deferred[None]:
        """Re-read the keys; rotate them in the directory when due. Never fails."""
        d: Deferred[Any] = self.directory.identity_keys()

        def got(keys: list[StoredKey]) -> Any:
            if self.needs_rotation(keys):
                return self.directory.rotate_identity_keys(
                    self.rotate_after, self.keep_for, make_key
                )
            return keys

        d.addCallback(got)
        d.addCallback(self.load)
        d.addErrback(lambda f: log.warn("cannot refresh the identity keys: {why}", why=f.value))
        return d.addCallback(lambda _: None)

    def start(self) -> None:
        if self._loop is not None:
            return
        self._loop = LoopingCall(self.refresh)
        self._loop.clock = cast(IReactorTime, self.clock)
        self._done = self._loop.start(self.refresh_interval, now=False)
        self._done.addErrback(lambda f: log.failure("identity key refresh stopped", f))

    def stop(self) -> Deferred[Any]:
        loop, done = self._loop, self._done
        self._loop = self._done = None
        if loop is None or done is None:
            return succeed(None)
        if loop.running:
            loop.stop()
        return done

    # -- tokens -------------------------------------------------------------------------------

    def issuer(self) -> str:
        return f"https://{authority(self.hostname, self.public_port())}"

    def assertion(self, route: routing.Route, access: Access) -> bytes | None:
        """The token for this caller on this route (cached while more than half its life is
        left); None only when no key could be loaded."""
        signing = self.signing
        if signing is None:
            return None
        account, project = access.account, access.project
        role = "owner" if project.owner_id == account.id else "collaborator"
        aud = audience(route, self.hostname, self.project_domain, self.public_port())
        now = self.clock.seconds()
        cache_key = (account.id, aud, role, signing.kid)
        hit = self._tokens.get(cache_key, now)
        if hit is not None:
            return hit.value
        issued = int(now)
        claims: dict[str, Any] = {
            "iss": self.issuer(),
            "aud": aud,
            "sub": account.name,
            "name": account.name,
            "project": project.id,
            "role": role,
            "iat": issued,
            "nbf": issued,
            "exp": issued + int(self.lifetime),
            "jti": secrets.token_urlsafe(12),
        }
        if account.email:
            claims["email"] = account.email
        header = {"alg": ALGORITHM, "kid": signing.kid, "typ": "JWT"}
        token = jwt.encode(header, claims, signing.key, algorithms=[ALGORITHM]).encode("ascii")
        self._tokens.put(cache_key, token, issued + self.lifetime / 2)
        return token


def parse_public_keys(body: bytes) -> list[dict[str, Any]]:
    """The keys of a JWKS document (for tests and tools)."""
    return cast(list[dict[str, Any]], json.loads(body)["keys"])
