"""Versioned schema migrations.

The database records its version in ``schema_version`` (one row). Each step is a SQL script in
``migrations/`` numbered from 1; the steps not yet applied run in order, each in its own
transaction together with the version bump, so a failure leaves the database at the previous
version with nothing half-done. The migration lock (SQLite's write lock, a PostgreSQL advisory
lock) makes two processes starting at once take turns; the second finds nothing left to do.
A database newer than this code is refused rather than touched.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

from cocalcproxy.directory.dialect import Dialect
from cocalcproxy.directory.model import Unavailable

STEPS: tuple[tuple[int, str], ...] = (
    (1, "0001_base.sql"),
    (2, "0002_expiry_and_titles.sql"),
    (3, "0003_identity.sql"),
    (4, "0004_ports_and_sockets.sql"),
    (5, "0005_session_families.sql"),
    (6, "0006_admin_tokens_and_shares.sql"),
    (7, "0007_signin_failures.sql"),
    (8, "0008_shared_secrets.sql"),
)
LATEST = STEPS[-1][0]


def statements(script: str, dialect: Dialect) -> list[str]:
    """The statements of a migration script: comment lines dropped, split on ';'."""
    lines = [line for line in script.splitlines() if not line.lstrip().startswith("--")]
    text = "\n".join(lines).replace("@SERIAL_PRIMARY_KEY@", dialect.serial_primary_key)
    return [part.strip() for part in text.split(";") if part.strip()]


def script(filename: str) -> str:
    return (
        resources.files("cocalcproxy.directory")
        .joinpath("migrations", filename)
        .read_text(encoding="utf-8")
    )


def current_version(cursor: Any, dialect: Dialect) -> int:
    if not dialect.table_exists(cursor, "schema_version"):
        return 0
    cursor.execute("SELECT version FROM schema_version")
    row = cursor.fetchone()
    return int(row[0]) if row else 0


def migrate(conn: Any, dialect: Dialect, target: int | None = None) -> tuple[int, int]:
    """Bring the database to ``target`` (default: the latest); returns (before, after)."""
    latest = STEPS[-1][0]
    target = latest if target is None else target
    cursor = conn.cursor()
    before: int | None = None
    while True:
        dialect.begin_migration(cursor)
        try:
            version = current_version(cursor, dialect)
            if before is None:
                before = version
            if version > latest:
                raise Unavailable(
                    f"the database {dialect.describe()} has schema version {version}, newer "
                    f"than this cocalcproxy understands ({latest}); upgrade cocalcproxy"
                )
            if version >= target:
                cursor.execute("COMMIT")
                return before, version
            step, filename = STEPS[version]
            assert step == version + 1
            if version == 0:
                cursor.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
                cursor.execute("INSERT INTO schema_version (version) VALUES (0)")
            for statement in statements(script(filename), dialect):
                cursor.execute(statement)
            cursor.execute(dialect.sql("UPDATE schema_version SET version = ?"), (step,))
            cursor.execute("COMMIT")
        except BaseException:
            _rollback(cursor)
            raise


def _rollback(cursor: Any) -> None:
    try:
        cursor.execute("ROLLBACK")
    except Exception:  # noqa: S110 - the original error matters more than a failed rollback
        pass
