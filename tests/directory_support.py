"""Backends for directory tests: a fresh SQLite file, or a fresh PostgreSQL database.

Every directory test class is written once as a mixin and run against both backends. The
PostgreSQL server is ``$COCALCPROXY_TEST_POSTGRES`` (a maintenance URL, default
``postgresql://postgres@127.0.0.1:5432/postgres``); each test gets its own database, dropped at
cleanup.
"""

from __future__ import annotations

import os
import secrets
from typing import Any

from argon2 import PasswordHasher
from twisted.trial import unittest

POSTGRES_ADMIN_URL = os.environ.get(
    "COCALCPROXY_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres"
)

# Cheap Argon2id parameters so tests that create many users stay fast; one test uses defaults.
FAST_HASHER = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)


class FakeClock:
    """A wall clock the test moves by hand (the directory takes ``clock=`` for expiry)."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def _postgres_admin() -> Any:
    import psycopg

    return psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True)


def new_postgres_url(case: unittest.TestCase) -> str:
    """Create a uniquely named database for this test and drop it at cleanup."""
    from psycopg.conninfo import conninfo_to_dict

    name = f"cocalcproxy_test_{os.getpid()}_{secrets.token_hex(5)}"
    with _postgres_admin() as conn:
        conn.execute(f'CREATE DATABASE "{name}"')

    def drop() -> None:
        with _postgres_admin() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    case.addCleanup(drop)
    params = conninfo_to_dict(POSTGRES_ADMIN_URL)
    user = params.get("user", "postgres")
    host = params.get("host", "127.0.0.1")
    port = params.get("port", "5432")
    return f"postgresql://{user}@{host}:{port}/{name}"


def new_sqlite_url(case: unittest.TestCase) -> str:
    base = os.path.abspath(case.mktemp())
    return f"sqlite:///{base}/state/directory.sqlite3"


class SQLiteBackend:
    backend = "sqlite"

    def new_database_url(self) -> str:
        assert isinstance(self, unittest.TestCase)
        return new_sqlite_url(self)


class PostgresBackend:
    backend = "postgresql"

    def new_database_url(self) -> str:
        assert isinstance(self, unittest.TestCase)
        return new_postgres_url(self)
