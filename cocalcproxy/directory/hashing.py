"""Secrets at rest: Argon2id for passwords, SHA-256 for random tokens.

Tokens are 256-bit random values, so a plain SHA-256 is enough to make a stolen database useless
for signing in while keeping lookups a single indexed equality. Passwords are chosen by people and
get Argon2id. Every function here is blocking and meant to run in a worker thread.
"""

from __future__ import annotations

import hashlib
import secrets
import threading

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

TOKEN_BYTES = 32


def new_token() -> str:
    """A fresh 256-bit secret, URL-safe (usable as a cookie value and a Bearer token)."""
    return secrets.token_urlsafe(TOKEN_BYTES)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def new_token_id() -> str:
    """The public handle of an API token (shown in listings, used to revoke); not a secret."""
    return secrets.token_hex(8)


def generated_password() -> str:
    """A password for people to copy: 24 URL-safe characters, about 143 bits."""
    return secrets.token_urlsafe(18)


class Passwords:
    """Argon2id hashing and verification with a dummy hash for unknown names.

    ``check`` always runs exactly one Argon2 verification, whether or not the account exists,
    so the time taken does not tell which names exist.
    """

    def __init__(self, hasher: PasswordHasher | None = None) -> None:
        self.hasher = hasher if hasher is not None else PasswordHasher()
        self._dummy: str | None = None
        self._lock = threading.Lock()

    def hash(self, password: str) -> str:
        return self.hasher.hash(password)

    def dummy_hash(self) -> str:
        with self._lock:
            if self._dummy is None:
                self._dummy = self.hasher.hash(secrets.token_urlsafe(16))
            return self._dummy

    def verify(self, stored: str | None, password: str) -> bool:
        """True when ``password`` matches ``stored``; with ``stored`` None, burns the same time
        against the dummy hash and returns False."""
        candidate = stored if stored is not None else self.dummy_hash()
        try:
            ok = self.hasher.verify(candidate, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False
        return bool(ok) and stored is not None

    def needs_rehash(self, stored: str) -> bool:
        try:
            return bool(self.hasher.check_needs_rehash(stored))
        except (InvalidHashError, ValueError):
            return True
