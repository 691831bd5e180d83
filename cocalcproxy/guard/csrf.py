"""CSRF tokens for the sign-in and sign-out forms, and the key they are made with.

Sign-in (login CSRF): a random pre-session value lives in the ``__Host-cocalcproxy_csrf`` cookie
(Secure, HttpOnly, SameSite=Strict, Path=/). The ``__Host-`` prefix means no other host, not even
a project subdomain, can set or overwrite it. The form carries HMAC(key, "login" | pre-session); a
cross-site page can neither read the cookie nor compute the HMAC. Sign-out: the form carries
HMAC(key, "logout" | SHA-256(session token)), bound to the session it ends.

The key is kept in the directory (``shared_secrets``, name ``form-key``), made once by the first
proxy process that starts on it, so every worker and every machine on one directory accepts the
others' forms, device cookies, subdomain cookies and hop tickets, and a restart breaks none of
them. An installation upgraded from a version that kept the key in
``<state-dir>/secrets/csrf.key`` adopts that file's key (the first process to start after the
upgrade puts it in the directory), so forms open in browsers and subdomain cookies keep working;
the file is no longer read after that and may be deleted.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from twisted.logger import Logger

from cocalcproxy.http import headers

CSRF_COOKIE = headers.CSRF_COOKIE.decode("ascii")
KEY_BYTES = 32

log = Logger()


#: The name of the form key in the directory's ``shared_secrets``.
KEY_NAME = "form-key"


def legacy_key(state_dir: str | os.PathLike[str]) -> bytes | None:
    """The key an older version kept in ``<state-dir>/secrets/csrf.key``, if there is one."""
    path = Path(state_dir) / "secrets" / "csrf.key"
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        log.warn("cannot read the old CSRF key {path} ({e}); not adopting it", path=path, e=e)
        return None
    if len(data) < KEY_BYTES:
        log.warn("the old CSRF key {path} is too short to be a key; not adopting it", path=path)
        return None
    return data


class SecretStore(Protocol):
    def shared_secret(self, name: str, make: Callable[[], str]) -> str: ...


def shared_key(directory: SecretStore, state_dir: str | os.PathLike[str]) -> bytes:
    """The form key every process on ``directory`` (a SyncDirectory) uses: the one already in
    the directory, else this state directory's old key file's, else a new random one -- put in
    atomically, so processes starting at once all get the same. Raises DirectoryError."""

    def make() -> str:
        old = legacy_key(state_dir)
        if old is not None:
            log.info("adopting the CSRF key of {state_dir} as the directory's", state_dir=state_dir)
        return (old if old is not None else secrets.token_bytes(KEY_BYTES)).hex()

    value = bytes.fromhex(directory.shared_secret(KEY_NAME, make))
    if len(value) < KEY_BYTES:
        raise ValueError("the directory's form key is too short")
    return value


def new_presession() -> str:
    return secrets.token_urlsafe(32)


def well_formed_presession(value: str | None) -> bool:
    return (
        value is not None
        and 32 <= len(value) <= 128
        and all(c.isascii() and (c.isalnum() or c in "-_") for c in value)
    )


class CsrfTokens:
    def __init__(self, key: bytes) -> None:
        self._key = key

    def _mac(self, purpose: bytes, value: bytes) -> str:
        digest = hmac.new(self._key, purpose + b"\0" + value, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")

    def login_token(self, presession: str) -> str:
        return self._mac(b"login", presession.encode("ascii"))

    def check_login(self, presession: str | None, token: str | None) -> bool:
        if not well_formed_presession(presession) or not token:
            return False
        assert presession is not None
        return _equal(self.login_token(presession), token)

    def logout_token(self, session: str) -> str:
        return self._mac(b"logout", hashlib.sha256(session.encode("utf-8", "replace")).digest())

    def check_logout(self, session: str | None, token: str | None) -> bool:
        if not session or not token:
            return False
        return _equal(self.logout_token(session), token)

    def share_token(self, session: str) -> str:
        """The start page's share forms: bound to the session, like sign-out's."""
        return self._mac(b"share", hashlib.sha256(session.encode("utf-8", "replace")).digest())

    def check_share(self, session: str | None, token: str | None) -> bool:
        if not session or not token:
            return False
        return _equal(self.share_token(session), token)


def _equal(expected: str, given: str) -> bool:
    return hmac.compare_digest(expected.encode("ascii"), given.encode("utf-8", "replace"))
