"""CSRF tokens for the sign-in and sign-out forms, and the key they are made with.

Sign-in (login CSRF): a random pre-session value lives in the ``__Host-cocalcproxy_csrf`` cookie
(Secure, HttpOnly, SameSite=Strict, Path=/). The ``__Host-`` prefix means no other host, not even
a project subdomain, can set or overwrite it. The form carries HMAC(key, "login" | pre-session); a
cross-site page can neither read the cookie nor compute the HMAC. Sign-out: the form carries
HMAC(key, "logout" | SHA-256(session token)), bound to the session it ends.

The key is kept in ``<state-dir>/secrets/csrf.key`` (0600) so every proxy process sharing the state
directory accepts the others' forms and a restart does not break forms open in browsers. When
the file cannot be written, a per-process key is used and a warning logged: forms then stop
working across restarts, nothing worse.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from pathlib import Path

from twisted.logger import Logger

from cocalcproxy import headers

CSRF_COOKIE = headers.CSRF_COOKIE.decode("ascii")
KEY_BYTES = 32

log = Logger()


def load_or_create_key(state_dir: str | os.PathLike[str]) -> bytes:
    """Read the CSRF key, creating it (atomically, 0600) on first use."""
    directory = Path(state_dir) / "secrets"
    path = directory / "csrf.key"
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            temporary = directory / f".csrf.key.{os.getpid()}.{secrets.token_hex(4)}"
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, secrets.token_bytes(KEY_BYTES))
            finally:
                os.close(fd)
            try:
                os.link(temporary, path)  # fails if another process won the race: use theirs
            except FileExistsError:
                pass
            finally:
                temporary.unlink()
            data = path.read_bytes()
        if len(data) < KEY_BYTES:
            raise OSError(f"{path} is too short to be a key")
        return data
    except OSError as e:
        log.warn(
            "cannot keep the CSRF key in {path} ({e}); using a per-process key", path=path, e=e
        )
        return secrets.token_bytes(KEY_BYTES)


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
