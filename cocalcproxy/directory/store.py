"""The directory over SQL: a blocking ``SyncDirectory`` and the asynchronous ``Directory``.

``SyncDirectory`` holds one DB-API connection per thread (SQLite connections must not be shared
between threads, and a PostgreSQL connection runs one transaction at a time). Every write runs
in one transaction that begins by bumping the change counter, which also serialises writers on
both backends; a failure rolls everything back, so a refused command changes nothing.

``Directory`` implements ``IDirectory``: every call runs the blocking method in a dedicated
thread pool with ``deferToThreadPool``, so neither SQL nor Argon2 ever runs on the reactor thread.
The pool starts with the reactor and stops in ``close()``.

Choices worth knowing:

* Removing a user who still owns projects is refused (Conflict, naming the projects): a project
  without an owner would be unreachable, and silently deleting projects is worse. The user's
  sessions, API tokens and collaborations go with the account.
* Every write bumps the change counter, session creation included, except rehashing a password
  whose Argon2 parameters changed (it cannot change any decision). On PostgreSQL the same
  transaction sends ``NOTIFY`` (``Dialect.announce_change``), so running proxies that listen
  (``Directory.change_listener``) read the counter at once instead of at their next poll.
* User names are unique regardless of case but looked up exactly.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, ParamSpec, TypeVar

from argon2 import PasswordHasher
from twisted.internet.defer import Deferred, fail
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from cocalcproxy.directory import validate
from cocalcproxy.directory.dialect import Dialect, dialect_for
from cocalcproxy.directory.hashing import (
    Passwords,
    new_token,
    new_token_id,
    token_hash,
)
from cocalcproxy.directory.migrate import migrate
from cocalcproxy.directory.model import (
    Account,
    AdminTokenInfo,
    Conflict,
    DirectoryError,
    InvalidInput,
    NotFound,
    Project,
    Share,
    TokenInfo,
    Unavailable,
)
from cocalcproxy.directory.notify import ChangeListener

T = TypeVar("T")
P = ParamSpec("P")

TOKEN_MAX = 512  # longer "tokens" are refused without touching the database

_ACCOUNT_COLUMNS = "a.id, a.name, a.email, a.oidc_subject"
#: The password_hash of an account that has no password (made by signing in with the provider,
#: or added with an OpenID subject and no password): no password ever verifies against it.
NO_PASSWORD = ""


def _account(row: Any) -> Account:
    return Account(int(row[0]), row[1], row[2], row[3])


_PROJECT_COLUMNS = (
    "SELECT p.id, p.owner_id, a.name, p.host, p.home, p.title, p.ports, p.socket_dir, "
    "p.socket_owner FROM projects p JOIN accounts a ON a.id = p.owner_id "
)


def _project_fields(
    host: str,
    home: str | None,
    title: str,
    ports: str | None,
    socket_dir: str | None,
    socket_owner: int | str | None,
) -> tuple[str, str | None, str, str | None, str | None, int | None]:
    """A whole project's fields, validated and in the form they are stored in (the port set as
    its normal text, None for the proxy's default; an empty socket folder as None)."""
    host = validate.host(host)
    home = validate.home(home)
    title = validate.title(title)
    port_set = validate.ports(ports)
    stored_ports = None if port_set is None else str(port_set)
    return (
        host,
        home,
        title,
        stored_ports,
        validate.socket_dir(socket_dir or None),
        validate.socket_owner(socket_owner),
    )


class _Retryable(Exception):
    def __init__(self, error: DirectoryError) -> None:
        super().__init__(str(error))
        self.error = error


class Tx:
    """A cursor inside one transaction, speaking ``?`` placeholders on every backend."""

    def __init__(self, cursor: Any, dialect: Dialect) -> None:
        self.cursor = cursor
        self.dialect = dialect

    def run(self, query: str, *params: object) -> int:
        self.cursor.execute(self.dialect.sql(query), params)
        return int(self.cursor.rowcount)

    def one(self, query: str, *params: object) -> Any:
        self.cursor.execute(self.dialect.sql(query), params)
        return self.cursor.fetchone()

    def all(self, query: str, *params: object) -> list[Any]:
        self.cursor.execute(self.dialect.sql(query), params)
        return list(self.cursor.fetchall())


class SyncDirectory:
    """The directory with blocking calls returning plain values; see the module docstring."""

    def __init__(
        self,
        dialect: Dialect,
        hasher: PasswordHasher | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.dialect = dialect
        self.passwords = Passwords(hasher)
        self.clock = clock
        self._local = threading.local()
        self._connections: list[Any] = []
        self._lock = threading.Lock()
        self._closed = False

    # connections and transactions

    def _connection(self) -> Any:
        if self._closed:
            raise Unavailable("the directory is closed")
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self.dialect.connect()
            with self._lock:
                if self._closed:
                    conn.close()
                    raise Unavailable("the directory is closed")
                self._connections.append(conn)
            self._local.conn = conn
        return conn

    def _drop_connection(self) -> None:
        """Forget this thread's connection after a database error; the next call reconnects."""
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            with self._lock:
                if conn in self._connections:
                    self._connections.remove(conn)
            try:
                conn.close()
            except Exception:  # noqa: S110 - already broken
                pass

    def release_thread_connection(self) -> None:
        """Close the calling thread's connection (used after migrating on the main thread)."""
        self._drop_connection()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            connections, self._connections = self._connections, []
        for conn in connections:
            try:
                conn.close()
            except Exception:  # noqa: S110 - closing anyway
                pass

    def _transaction(self, write: bool, work: Callable[[Tx], T], bump: bool = True) -> T:
        """Run ``work`` in one transaction. A connection that has sat idle may have been cut
        (a PostgreSQL restart, an idle timeout): when it fails before anything was done, or
        during a read, the call is tried once more on a new connection."""
        for attempt in (1, 2):
            reused = getattr(self._local, "conn", None) is not None
            try:
                return self._transaction_once(write, work, bump)
            except _Retryable as e:
                if not reused or attempt == 2:
                    raise e.error from None
        raise AssertionError("unreachable")  # pragma: no cover

    def _transaction_once(self, write: bool, work: Callable[[Tx], T], bump: bool) -> T:
        self.dialect.check()
        conn = self._connection()
        started = False
        try:
            cursor = conn.cursor()
            tx = Tx(cursor, self.dialect)
            if write:
                self.dialect.begin_write(cursor)
            else:
                self.dialect.begin_read(cursor)
            started = True
            try:
                if write and bump:
                    tx.run("UPDATE change_counter SET value = value + 1 WHERE id = 1")
                    self.dialect.announce_change(cursor)
                result = work(tx)
                cursor.execute("COMMIT")
            except BaseException:
                try:
                    cursor.execute("ROLLBACK")
                except Exception:  # noqa: S110 - the first error is the one to report
                    pass
                raise
            return result
        except DirectoryError:
            raise
        except Exception as e:
            translated = self.dialect.translate_error(e)
            if translated is None:
                raise
            if isinstance(translated, Conflict):
                raise translated from None
            self._drop_connection()
            if self.dialect.is_disconnect(e) and (not started or not write):
                raise _Retryable(translated) from None
            raise translated from None

    def _read(self, work: Callable[[Tx], T]) -> T:
        return self._transaction(False, work)

    def _write(self, work: Callable[[Tx], T], bump: bool = True) -> T:
        return self._transaction(True, work, bump)

    def migrate(self, target: int | None = None) -> tuple[int, int]:
        conn = self._connection()
        try:
            return migrate(conn, self.dialect, target)
        except DirectoryError:
            raise
        except Exception as e:
            translated = self.dialect.translate_error(e)
            if translated is None:
                raise
            self._drop_connection()
            raise Unavailable(f"cannot migrate the database: {translated}") from None

    def schema_version(self) -> int:
        from cocalcproxy.directory.migrate import current_version

        return self._read(lambda tx: current_version(tx.cursor, self.dialect))

    # health and changes

    def ping(self) -> None:
        self._read(lambda tx: tx.one("SELECT value FROM change_counter WHERE id = 1"))

    def change_counter(self) -> int:
        row = self._read(lambda tx: tx.one("SELECT value FROM change_counter WHERE id = 1"))
        return int(row[0])

    # accounts

    @staticmethod
    def _account_row(tx: Tx, name: str) -> Any:
        return tx.one("SELECT id, name, password_hash FROM accounts WHERE name = ?", name)

    def _require_account(self, tx: Tx, name: str) -> Account:
        row = tx.one(f"SELECT {_ACCOUNT_COLUMNS} FROM accounts a WHERE a.name = ?", name)  # noqa: S608
        if row is None:
            raise NotFound(f"no user named {name!r}")
        return _account(row)

    @staticmethod
    def _subject_free(tx: Tx, subject: str) -> None:
        holder = tx.one("SELECT name FROM accounts WHERE oidc_subject = ?", subject)
        if holder is not None:
            raise Conflict(f"the OpenID subject {subject!r} is already bound to {holder[0]!r}")

    def add_user(
        self,
        name: str,
        password: str | None,
        oidc_subject: str | None = None,
        email: str | None = None,
    ) -> Account:
        """A new account. ``password`` None makes an account without a password, which only
        signing in with the OpenID provider can reach (so ``oidc_subject`` is then required)."""
        validate.name(name)
        if password is None:
            if oidc_subject is None:
                raise InvalidInput("an account without a password needs an OpenID subject")
            hashed = NO_PASSWORD
        else:
            validate.password(password)
            hashed = self.passwords.hash(password)
        if oidc_subject is not None:
            validate.oidc_subject(oidc_subject)
        email = validate.email(email)
        now = self.clock()

        def work(tx: Tx) -> Account:
            existing = tx.one("SELECT name FROM accounts WHERE lower(name) = lower(?)", name)
            if existing is not None:
                if existing[0] == name:
                    raise Conflict(f"a user named {name!r} already exists")
                raise Conflict(
                    f"a user named {existing[0]!r} already exists (names are case-insensitive)"
                )
            if oidc_subject is not None:
                self._subject_free(tx, oidc_subject)
            row = tx.one(
                "INSERT INTO accounts (name, password_hash, created, oidc_subject, email) "
                "VALUES (?, ?, ?, ?, ?) RETURNING id",
                name,
                hashed,
                now,
                oidc_subject,
                email,
            )
            return Account(int(row[0]), name, email, oidc_subject)

        return self._write(work)

    def link_oidc_subject(self, name: str, subject: str | None) -> Account:
        """Bind the account to the provider's subject, or (``subject`` None) unbind it. An
        account without a password cannot be unbound: nothing could sign in to it any more.
        Ends the account's sessions either way, as a password change does."""
        validate.name(name)
        if subject is not None:
            validate.oidc_subject(subject)

        def work(tx: Tx) -> Account:
            account = self._require_account(tx, name)
            if subject is not None and account.oidc_subject != subject:
                self._subject_free(tx, subject)
            if subject is None:
                row = tx.one("SELECT password_hash FROM accounts WHERE id = ?", account.id)
                if row[0] == NO_PASSWORD:
                    raise Conflict(
                        f"user {name!r} has no password; set one with 'cocalcproxy user passwd' "
                        "before unbinding the OpenID subject"
                    )
            tx.run("UPDATE accounts SET oidc_subject = ? WHERE id = ?", subject, account.id)
            tx.run("DELETE FROM sessions WHERE account_id = ?", account.id)
            return Account(account.id, account.name, account.email, subject)

        return self._write(work)

    def account_for_oidc_subject(self, subject: str) -> Account | None:
        if not isinstance(subject, str) or not subject or len(subject) > validate.SUBJECT_MAX:
            return None
        row = self._read(
            lambda tx: tx.one(
                f"SELECT {_ACCOUNT_COLUMNS} FROM accounts a WHERE a.oidc_subject = ?",  # noqa: S608
                subject,
            )
        )
        return None if row is None else _account(row)

    def oidc_sign_in(self, subject: str, username: str, email: str | None) -> Account:
        """The account for someone the OpenID provider vouched for, in one transaction.

        * An account bound to ``subject`` is theirs (its e-mail address is brought up to date);
          the name the provider states now does not matter, so renaming oneself at the provider
          can never reach someone else's account.
        * Otherwise a new account named ``username``, without a password, bound to ``subject``.
        * An existing account of that name that is not bound to ``subject`` is never taken
          over (Conflict): the operator binds it with ``cocalcproxy user link``.
        """
        validate.oidc_subject(subject)
        email = validate.email(email)
        now = self.clock()

        def work(tx: Tx) -> Account:
            row = tx.one(
                f"SELECT {_ACCOUNT_COLUMNS} FROM accounts a WHERE a.oidc_subject = ?",  # noqa: S608
                subject,
            )
            if row is not None:
                account = _account(row)
                if email is not None and account.email != email:
                    tx.run("UPDATE accounts SET email = ? WHERE id = ?", email, account.id)
                return Account(account.id, account.name, email or account.email, subject)
            validate.name(username)
            existing = tx.one("SELECT name FROM accounts WHERE lower(name) = lower(?)", username)
            if existing is not None:
                raise Conflict(
                    f"an account named {existing[0]!r} already exists and is not bound to this "
                    "identity at the provider"
                )
            created = tx.one(
                "INSERT INTO accounts (name, password_hash, created, oidc_subject, email) "
                "VALUES (?, ?, ?, ?, ?) RETURNING id",
                username,
                NO_PASSWORD,
                now,
                subject,
                email,
            )
            return Account(int(created[0]), username, email, subject)

        return self._write(work)

    # identity assertion keys

    def identity_keys(self) -> list[tuple[str, str, float]]:
        """Every stored identity key as (kid, private JWK as JSON, created), oldest first."""
        rows = self._read(
            lambda tx: tx.all(
                "SELECT kid, private_jwk, created FROM identity_keys ORDER BY created, kid"
            )
        )
        return [(r[0], r[1], float(r[2])) for r in rows]

    def rotate_identity_keys(
        self,
        rotate_after: float,
        keep_for: float,
        make_key: Callable[[], tuple[str, str]],
    ) -> list[tuple[str, str, float]]:
        """Add a key when the newest is older than ``rotate_after`` seconds (or there is none)
        and drop keys that have had a newer one for longer than ``keep_for``; returns the keys
        as ``identity_keys`` does. One write transaction, so proxies sharing the directory
        agree on one new key however many of them rotate at once."""
        now = self.clock()

        def work(tx: Tx) -> list[tuple[str, str, float]]:
            # A write that changes nothing, for its row lock: it makes concurrent rotations on
            # PostgreSQL take turns (SQLite's BEGIN IMMEDIATE already does) without moving the
            # change counter, which would drop every proxy's cached decisions.
            tx.run("UPDATE change_counter SET value = value WHERE id = 1")
            rows = tx.all(
                "SELECT kid, private_jwk, created FROM identity_keys ORDER BY created, kid"
            )
            keys = [(r[0], r[1], float(r[2])) for r in rows]
            if not keys or keys[-1][2] <= now - rotate_after:
                kid, jwk = make_key()
                tx.run(
                    "INSERT INTO identity_keys (kid, private_jwk, created) VALUES (?, ?, ?)",
                    kid,
                    jwk,
                    now,
                )
                keys.append((kid, jwk, now))
            kept = [
                key
                for key, newer in zip(keys, keys[1:] + [None], strict=True)
                if newer is None or newer[2] > now - keep_for
            ]
            for kid, _, _ in keys:
                if all(k[0] != kid for k in kept):
                    tx.run("DELETE FROM identity_keys WHERE kid = ?", kid)
            return kept

        return self._write(work, bump=False)

    def set_password(self, name: str, password: str) -> None:
        """Set a new password and end every session of the user (API tokens stay)."""
        validate.name(name)
        validate.password(password)
        hashed = self.passwords.hash(password)

        def work(tx: Tx) -> None:
            account = self._require_account(tx, name)
            tx.run("UPDATE accounts SET password_hash = ? WHERE id = ?", hashed, account.id)
            tx.run("DELETE FROM sessions WHERE account_id = ?", account.id)

        self._write(work)

    def remove_user(self, name: str) -> None:
        """Delete the account with its sessions, API tokens and collaborations. Refused while
        the user owns projects: remove those (or their owner's other data) first."""
        validate.name(name)

        def work(tx: Tx) -> None:
            account = self._require_account(tx, name)
            owned = tx.all(
                "SELECT id FROM projects WHERE owner_id = ? ORDER BY created, id", account.id
            )
            if owned:
                ids = ", ".join(row[0] for row in owned[:5])
                more = f" and {len(owned) - 5} more" if len(owned) > 5 else ""
                raise Conflict(
                    f"user {name!r} still owns {len(owned)} project(s): {ids}{more}; "
                    "remove them first with 'cocalcproxy project remove PID'"
                )
            tx.run("DELETE FROM sessions WHERE account_id = ?", account.id)
            tx.run("DELETE FROM api_tokens WHERE account_id = ?", account.id)
            tx.run("DELETE FROM collaborators WHERE account_id = ?", account.id)
            tx.run("DELETE FROM accounts WHERE id = ?", account.id)

        self._write(work)

    def list_users(self, after: str | None = None, limit: int | None = None) -> list[Account]:
        """Accounts ordered by name; ``after`` (a name) and ``limit`` page through them."""
        limit = validate.page_limit(limit)
        where, params = ("WHERE a.name > ? ", [after]) if after is not None else ("", [])
        tail = f"LIMIT {int(limit)}" if limit is not None else ""
        rows = self._read(
            lambda tx: tx.all(
                f"SELECT {_ACCOUNT_COLUMNS} FROM accounts a {where}"  # noqa: S608
                f"ORDER BY a.name, a.id {tail}",
                *params,
            )
        )
        return [_account(r) for r in rows]

    def get_user(self, name: str) -> Account | None:
        if not validate.is_name(name):
            return None
        row = self._read(
            lambda tx: tx.one(f"SELECT {_ACCOUNT_COLUMNS} FROM accounts a WHERE a.name = ?", name)  # noqa: S608
        )
        return None if row is None else _account(row)

    def check_password(self, name: str, password: str) -> Account | None:
        """The account when the password is right, else None. Exactly one Argon2 verification
        runs whether or not the name exists (a dummy hash stands in for unknown names)."""
        if not isinstance(password, str) or not isinstance(name, str):
            return None
        try:
            validate.password(password)
        except DirectoryError:
            return None
        row = self._read(lambda tx: self._account_row(tx, name)) if validate.is_name(name) else None
        # No password (NO_PASSWORD) burns the dummy hash like an unknown name.
        stored = None if row is None or not row[2] else str(row[2])
        if not self.passwords.verify(stored, password):
            return None
        assert row is not None and stored is not None
        account = Account(int(row[0]), row[1])
        if self.passwords.needs_rehash(stored):
            rehashed = self.passwords.hash(password)
            self._write(
                lambda tx: tx.run(
                    "UPDATE accounts SET password_hash = ? WHERE id = ? AND password_hash = ?",
                    rehashed,
                    account.id,
                    stored,
                ),
                bump=False,
            )
        return account

    # API tokens

    def create_token(self, name: str, expires_in_days: float | None = None) -> tuple[str, str]:
        """A new API token for the user: (public token id, secret token). Only the SHA-256 of
        the secret is stored; the secret cannot be shown again."""
        validate.name(name)
        days = validate.expires_in_days(expires_in_days)
        now = self.clock()
        expires = None if days is None else now + days * 86400
        token_id, token = new_token_id(), new_token()

        def work(tx: Tx) -> tuple[str, str]:
            account = self._require_account(tx, name)
            tx.run(
                "INSERT INTO api_tokens (id, token_hash, account_id, created, expires) "
                "VALUES (?, ?, ?, ?, ?)",
                token_id,
                token_hash(token),
                account.id,
                now,
                expires,
            )
            return token_id, token

        return self._write(work)

    def revoke_token(self, token_id: str) -> None:
        validate.token_id(token_id)

        def work(tx: Tx) -> None:
            if tx.run("DELETE FROM api_tokens WHERE id = ?", token_id) == 0:
                raise NotFound(f"no API token with id {token_id!r}")

        self._write(work)

    def list_tokens(
        self, name: str | None = None, after: str | None = None, limit: int | None = None
    ) -> list[TokenInfo]:
        """Public facts about API tokens (all, or one user's); the secrets are not stored.
        Paging (``after`` a token id, ``limit``) orders by token id."""
        limit = validate.page_limit(limit)
        query = (
            "SELECT t.id, a.name, t.created, t.expires FROM api_tokens t "
            "JOIN accounts a ON a.id = t.account_id "
        )
        paged = after is not None or limit is not None
        conditions: list[str] = []
        params: list[object] = []
        if name is not None:
            conditions.append("a.name = ?")
            params.append(name)
        if after is not None:
            conditions.append("t.id > ?")
            params.append(after)
        where = ("WHERE " + " AND ".join(conditions) + " ") if conditions else ""
        if paged:
            order = "ORDER BY t.id" + (f" LIMIT {int(limit)}" if limit is not None else "")
        else:
            order = (
                "ORDER BY t.created, t.id"
                if name is not None
                else "ORDER BY a.name, t.created, t.id"
            )

        def work(tx: Tx) -> list[Any]:
            if name is not None:
                self._require_account(tx, name)
            return tx.all(query + where + order, *params)

        if name is not None:
            validate.name(name)
        return [
            TokenInfo(r[0], r[1], float(r[2]), None if r[3] is None else float(r[3]))
            for r in self._read(work)
        ]

    def _account_for_secret(self, secret: str, query: str) -> Account | None:
        """The account a secret (API or session token) belongs to: ``query`` takes the token's
        SHA-256 and the current time and yields (id, name) for an unexpired match."""
        if not isinstance(secret, str) or not secret or len(secret) > TOKEN_MAX:
            return None
        digest = token_hash(secret)
        now = self.clock()
        row = self._read(lambda tx: tx.one(query, digest, now))
        return None if row is None else _account(row)

    def account_for_token(self, token: str) -> Account | None:
        return self._account_for_secret(
            token,
            f"SELECT {_ACCOUNT_COLUMNS} FROM api_tokens t JOIN accounts a ON a.id = t.account_id "  # noqa: S608 - constant text
            "WHERE t.token_hash = ? AND (t.expires IS NULL OR t.expires > ?)",
        )

    # sessions

    def create_session(
        self, account_id: int, lifetime_seconds: float, parent: str | None = None
    ) -> str:
        """A new sign-in session; returns the secret (the cookie value). Expired sessions of
        everyone are purged on the way.

        With ``parent`` (the secret of a live session of the same account) the new session joins
        the parent's family: ending the session at the root of the family (signing out on the
        main host) ends every session derived from it. A parent that has ended is refused
        (:class:`NotFound`), so nothing outlives the sign-out it raced with."""
        lifetime = validate.lifetime_seconds(lifetime_seconds)
        now = self.clock()
        token = new_token()
        parent_digest = None
        if parent is not None:
            if not isinstance(parent, str) or not parent or len(parent) > TOKEN_MAX:
                raise NotFound("the parent session has ended")
            parent_digest = token_hash(parent)

        def work(tx: Tx) -> str:
            if tx.one("SELECT 1 FROM accounts WHERE id = ?", account_id) is None:
                raise NotFound(f"no account with id {account_id}")
            tx.run("DELETE FROM sessions WHERE expires <= ?", now)
            family = None
            if parent_digest is not None:
                row = tx.one(
                    "SELECT family FROM sessions WHERE token_hash = ? AND account_id = ? "
                    "AND expires > ?",
                    parent_digest,
                    account_id,
                    now,
                )
                if row is None:
                    raise NotFound("the parent session has ended")
                family = row[0] or parent_digest
            tx.run(
                "INSERT INTO sessions (token_hash, account_id, created, expires, family) "
                "VALUES (?, ?, ?, ?, ?)",
                token_hash(token),
                account_id,
                now,
                now + lifetime,
                family,
            )
            return token

        return self._write(work)

    def account_for_session(self, token: str) -> Account | None:
        return self._account_for_secret(
            token,
            f"SELECT {_ACCOUNT_COLUMNS} FROM sessions s JOIN accounts a ON a.id = s.account_id "  # noqa: S608 - constant text
            "WHERE s.token_hash = ? AND s.expires > ?",
        )

    def delete_session(self, token: str) -> None:
        """End a session (sign-out) and every session derived from it (its family, see
        ``create_session``). Unknown or malformed tokens are ignored."""
        if not isinstance(token, str) or not token or len(token) > TOKEN_MAX:
            return
        digest = token_hash(token)
        self._write(
            lambda tx: tx.run(
                "DELETE FROM sessions WHERE token_hash = ? OR family = ?", digest, digest
            )
        )

    # failed sign-ins (guard/ratelimit.py, DirectoryLimiter)

    def signin_attempt(
        self, checks: Sequence[tuple[str, int, float]]
    ) -> tuple[float | None, float]:
        """Start a password attempt under ``checks`` (key, limit, window seconds): when a key
        already has ``limit`` failures within its window, (seconds until the oldest of them
        leaves it, now) and nothing is recorded; else a failure is recorded under every key
        (taken back by ``signin_forgive`` if the password was right) and (None, now). One
        transaction, so processes sharing the directory count together. Never bumps the change
        counter (a failed sign-in changes nobody's access)."""
        now = self.clock()
        wanted = [(str(key)[:512], int(limit), float(window)) for key, limit, window in checks]

        def work(tx: Tx) -> tuple[float | None, float]:
            longest = max((window for _, _, window in wanted), default=0.0)
            tx.run("DELETE FROM signin_failures WHERE at <= ?", now - max(longest, 3600.0))
            waits = []
            for key, limit, window in wanted:
                rows = tx.all(
                    "SELECT at FROM signin_failures WHERE limit_key = ? AND at > ? "
                    "ORDER BY at DESC LIMIT ?",
                    key,
                    now - window,
                    limit,
                )
                if len(rows) >= limit:
                    waits.append(min(float(r[0]) for r in rows) + window - now)
            if waits:
                return max(waits), now
            for key, _, _ in wanted:
                tx.run("INSERT INTO signin_failures (limit_key, at) VALUES (?, ?)", key, now)
            return None, now

        return self._write(work, bump=False)

    def signin_forgive(self, key: str, at: float) -> None:
        """Take back one failure of ``key`` recorded at ``at`` (the attempt was right)."""
        self._write(
            lambda tx: tx.run(
                "DELETE FROM signin_failures WHERE id IN "
                "(SELECT id FROM signin_failures WHERE limit_key = ? AND at = ? LIMIT 1)",
                str(key)[:512],
                float(at),
            ),
            bump=False,
        )

    def signin_reset(self, key: str) -> None:
        """Forget every failure of ``key`` (a right password for that name or device)."""
        self._write(
            lambda tx: tx.run("DELETE FROM signin_failures WHERE limit_key = ?", str(key)[:512]),
            bump=False,
        )

    # state shared by every process on the directory (guard/csrf.py, guard/hop.py, oidcweb.py)

    def shared_secret(self, name: str, make: Callable[[], str]) -> str:
        """The secret called ``name``, made with ``make`` by the first process that asks for it
        (INSERT ... ON CONFLICT DO NOTHING, then SELECT): however many start at once, all of
        them get the one value that went in. Never bumps the change counter."""
        now = self.clock()

        def work(tx: Tx) -> str:
            row = tx.one("SELECT secret FROM shared_secrets WHERE name = ?", name)
            if row is None:
                tx.run(
                    "INSERT INTO shared_secrets (name, secret, created) VALUES (?, ?, ?) "
                    "ON CONFLICT (name) DO NOTHING",
                    name,
                    make(),
                    now,
                )
                row = tx.one("SELECT secret FROM shared_secrets WHERE name = ?", name)
            return str(row[0])

        return self._write(work, bump=False)

    def use_once(self, purpose: str, value: str, expires: float) -> bool:
        """Claim ``value`` for ``purpose`` (e.g. a hop ticket): True the first time, False every
        later time in any process on the directory, until ``expires`` (then the row is swept;
        the caller's own expiry must refuse the value by then). Only a digest is kept."""
        now = self.clock()
        digest = token_hash(value)

        def work(tx: Tx) -> bool:
            tx.run("DELETE FROM used_once WHERE expires <= ?", now)
            inserted = tx.run(
                "INSERT INTO used_once (purpose, digest, expires) VALUES (?, ?, ?) "
                "ON CONFLICT (purpose, digest) DO NOTHING",
                purpose,
                digest,
                max(float(expires), now + 1.0),
            )
            return inserted == 1

        return self._write(work, bump=False)

    def purge_expired(self) -> int:
        """Delete expired sessions and API tokens; returns how many rows went."""
        now = self.clock()

        def work(tx: Tx) -> int:
            gone = tx.run("DELETE FROM sessions WHERE expires <= ?", now)
            return gone + tx.run(
                "DELETE FROM api_tokens WHERE expires IS NOT NULL AND expires <= ?", now
            )

        return self._write(work)

    # projects

    @staticmethod
    def _projects(tx: Tx, rows: Sequence[Any]) -> list[Project]:
        if not rows:
            return []
        ids = [row[0] for row in rows]
        collaborators: dict[str, list[str]] = {pid: [] for pid in ids}
        marks = ", ".join("?" for _ in ids)
        for pid, name in tx.all(
            "SELECT c.project_id, a.name FROM collaborators c "  # noqa: S608 - only '?' marks
            f"JOIN accounts a ON a.id = c.account_id WHERE c.project_id IN ({marks}) "
            "ORDER BY a.name",
            *ids,
        ):
            collaborators[pid].append(name)
        hosts = sorted({row[3] for row in rows})
        host_marks = ", ".join("?" for _ in hosts)
        counts = {
            host: int(n)
            for host, n in tx.all(
                f"SELECT host, COUNT(*) FROM projects WHERE host IN ({host_marks}) "  # noqa: S608
                "GROUP BY host",
                *hosts,
            )
        }
        total = int(tx.one("SELECT COUNT(*) FROM projects")[0])
        return [
            Project(
                id=row[0],
                owner_id=int(row[1]),
                owner_name=row[2],
                host=row[3],
                home=row[4],
                title=row[5],
                collaborators=tuple(collaborators[row[0]]),
                ports=validate.ports(row[6]),
                socket_dir=row[7],
                socket_owner=None if row[8] is None else int(row[8]),
                shares_host=counts.get(row[3], 0) > 1,
                other_projects=total - 1,
            )
            for row in rows
        ]

    def _load_project(self, tx: Tx, project_id: str) -> Project | None:
        rows = tx.all(_PROJECT_COLUMNS + "WHERE p.id = ?", project_id)
        found = self._projects(tx, rows)
        return found[0] if found else None

    def _require_project(self, tx: Tx, project_id: str) -> Project:
        project = self._load_project(tx, project_id)
        if project is None:
            raise NotFound(f"no project with id {project_id!r}")
        return project

    def add_project(
        self,
        owner: str,
        host: str = "127.0.0.1",
        home: str | None = None,
        project_id: str | None = None,
        title: str = "",
        ports: str | None = None,
        socket_dir: str | None = None,
        socket_owner: int | str | None = None,
    ) -> Project:
        validate.name(owner)
        host, home, title, stored_ports, sockets, sockets_owner = _project_fields(
            host, home, title, ports, socket_dir, socket_owner
        )
        pid = validate.new_project_id() if project_id is None else validate.project_id(project_id)
        now = self.clock()

        def work(tx: Tx) -> Project:
            account = self._require_account(tx, owner)
            if tx.one("SELECT 1 FROM projects WHERE id = ?", pid) is not None:
                raise Conflict(f"a project with id {pid!r} already exists")
            tx.run(
                "INSERT INTO projects (id, owner_id, host, home, title, created, ports, "
                "socket_dir, socket_owner) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                pid,
                account.id,
                host,
                home,
                title,
                now,
                stored_ports,
                sockets,
                sockets_owner,
            )
            return self._require_project(tx, pid)

        return self._write(work)

    def set_project(
        self,
        project_id: str,
        host: str | None = None,
        home: str | None = None,
        title: str | None = None,
        ports: str | None = None,
        socket_dir: str | None = None,
        socket_owner: int | str | None = None,
    ) -> Project:
        """Change what is given; None leaves a field alone. ``home=""`` removes the home,
        ``ports="default"`` the project's own port set, ``socket_dir=""`` the socket folder
        (back to TCP) and ``socket_owner=""`` the required socket owner."""
        validate.project_id(project_id)
        changes: list[tuple[str, object]] = []
        if ports is not None:
            port_set = validate.ports(ports)
            changes.append(("ports", None if port_set is None else str(port_set)))
        if socket_dir is not None:
            changes.append(
                ("socket_dir", None if socket_dir == "" else validate.socket_dir(socket_dir))
            )
        if socket_owner is not None:
            changes.append(
                (
                    "socket_owner",
                    None if socket_owner == "" else validate.socket_owner(socket_owner),
                )
            )
        if host is not None:
            changes.append(("host", validate.host(host)))
        if home is not None:
            changes.append(("home", None if home == "" else validate.home(home)))
        if title is not None:
            changes.append(("title", validate.title(title)))

        def work(tx: Tx) -> Project:
            self._require_project(tx, project_id)
            for column, value in changes:
                tx.run(f"UPDATE projects SET {column} = ? WHERE id = ?", value, project_id)  # noqa: S608
            return self._require_project(tx, project_id)

        return self._write(work)

    def remove_project(self, project_id: str) -> None:
        validate.project_id(project_id)

        def work(tx: Tx) -> None:
            self._require_project(tx, project_id)
            tx.run("DELETE FROM collaborators WHERE project_id = ?", project_id)
            tx.run("DELETE FROM projects WHERE id = ?", project_id)

        self._write(work)

    def add_collaborator(self, project_id: str, name: str) -> None:
        validate.project_id(project_id)
        validate.name(name)

        def work(tx: Tx) -> None:
            project = self._require_project(tx, project_id)
            account = self._require_account(tx, name)
            if account.id == project.owner_id:
                raise Conflict(f"{name!r} owns project {project_id!r}")
            if name in project.collaborators:
                raise Conflict(f"{name!r} is already a collaborator on project {project_id!r}")
            tx.run(
                "INSERT INTO collaborators (project_id, account_id) VALUES (?, ?)",
                project_id,
                account.id,
            )

        self._write(work)

    def remove_collaborator(self, project_id: str, name: str) -> None:
        validate.project_id(project_id)
        validate.name(name)

        def work(tx: Tx) -> None:
            self._require_project(tx, project_id)
            account = self._require_account(tx, name)
            removed = tx.run(
                "DELETE FROM collaborators WHERE project_id = ? AND account_id = ?",
                project_id,
                account.id,
            )
            if removed == 0:
                raise NotFound(f"{name!r} is not a collaborator on project {project_id!r}")

        self._write(work)

    def get_project(self, project_id: str) -> Project | None:
        if not validate.is_project_id(project_id):
            return None
        return self._read(lambda tx: self._load_project(tx, project_id))

    def list_projects(self, after: str | None = None, limit: int | None = None) -> list[Project]:
        """Projects by owner name and age; with paging (``after`` a project id, ``limit``), by
        id."""
        limit = validate.page_limit(limit)
        if after is None and limit is None:
            return self._read(
                lambda tx: self._projects(
                    tx, tx.all(_PROJECT_COLUMNS + "ORDER BY a.name, p.created, p.id")
                )
            )
        where, params = ("WHERE p.id > ? ", [after]) if after is not None else ("", [])
        tail = f" LIMIT {int(limit)}" if limit is not None else ""
        return self._read(
            lambda tx: self._projects(
                tx,
                tx.all(_PROJECT_COLUMNS + where + "ORDER BY p.id" + tail, *params),  # noqa: S608
            )
        )

    def put_project(
        self,
        project_id: str,
        owner: str,
        host: str = "127.0.0.1",
        home: str | None = None,
        title: str = "",
        collaborators: Sequence[str] = (),
        ports: str | None = None,
        socket_dir: str | None = None,
        socket_owner: int | str | None = None,
    ) -> tuple[Project, bool]:
        """Make the project exactly this (owner, host, home, title, port set (None: the
        proxy's default), socket folder and owner, and the collaborator set), creating it when
        needed, in one transaction; returns (project, created). Idempotent: the same call again
        changes nothing (and does not bump the change counter)."""
        validate.project_id(project_id)
        validate.name(owner)
        host, home, title, stored_ports, sockets, sockets_owner = _project_fields(
            host, home, title, ports, socket_dir, socket_owner
        )
        wanted = sorted({validate.name(n) for n in collaborators})
        if owner in wanted:
            raise InvalidInput(f"{owner!r} owns the project and cannot also be a collaborator")
        now = self.clock()

        def same(p: Project | None) -> bool:
            return p is not None and (
                p.owner_name == owner
                and p.host == host
                and p.home == home
                and p.title == title
                and (None if p.ports is None else str(p.ports)) == stored_ports
                and p.socket_dir == sockets
                and p.socket_owner == sockets_owner
                and sorted(p.collaborators) == wanted
            )

        existing = self._read(lambda tx: self._load_project(tx, project_id))
        if existing is not None and same(existing):
            return existing, False

        def work(tx: Tx) -> tuple[Project, bool]:
            account = self._require_account(tx, owner)
            members = [self._require_account(tx, n) for n in wanted]
            found = self._load_project(tx, project_id)
            if found is None:
                tx.run(
                    "INSERT INTO projects (id, owner_id, host, home, title, created, ports, "
                    "socket_dir, socket_owner) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    project_id,
                    account.id,
                    host,
                    home,
                    title,
                    now,
                    stored_ports,
                    sockets,
                    sockets_owner,
                )
            else:
                tx.run(
                    "UPDATE projects SET owner_id = ?, host = ?, home = ?, title = ?, ports = ?, "
                    "socket_dir = ?, socket_owner = ? WHERE id = ?",
                    account.id,
                    host,
                    home,
                    title,
                    stored_ports,
                    sockets,
                    sockets_owner,
                    project_id,
                )
            tx.run("DELETE FROM collaborators WHERE project_id = ?", project_id)
            for member in members:
                tx.run(
                    "INSERT INTO collaborators (project_id, account_id) VALUES (?, ?)",
                    project_id,
                    member.id,
                )
            return self._require_project(tx, project_id), found is None

        return self._write(work)

    def project_for(self, account_id: int, project_id: str) -> Project | None:
        """The project when the account owns it or collaborates on it; otherwise None, the
        same answer as for a project that does not exist."""
        if not validate.is_project_id(project_id) or not isinstance(account_id, int):
            return None

        def work(tx: Tx) -> Project | None:
            rows = tx.all(
                _PROJECT_COLUMNS  # noqa: S608 - constant text
                + "WHERE p.id = ? AND (p.owner_id = ? OR EXISTS ("
                "SELECT 1 FROM collaborators c WHERE c.project_id = p.id AND c.account_id = ?))",
                project_id,
                account_id,
                account_id,
            )
            found = self._projects(tx, rows)
            return found[0] if found else None

        return self._read(work)

    def projects_for(self, account_id: int) -> list[Project]:
        """Projects the account owns or collaborates on."""
        return self._read(
            lambda tx: self._projects(
                tx,
                tx.all(
                    _PROJECT_COLUMNS  # noqa: S608 - constant text
                    + "WHERE p.owner_id = ? OR EXISTS ("
                    "SELECT 1 FROM collaborators c WHERE c.project_id = p.id "
                    "AND c.account_id = ?) ORDER BY a.name, p.created, p.id",
                    account_id,
                    account_id,
                ),
            )
        )

    # admin API tokens

    def create_admin_token(
        self, description: str = "", expires_in_days: float | None = None
    ) -> tuple[AdminTokenInfo, str]:
        """A new admin API token: (its public facts, the secret). Only the SHA-256 of the
        secret is stored; the secret cannot be shown again."""
        description = validate.description(description)
        days = validate.expires_in_days(expires_in_days)
        now = self.clock()
        expires = None if days is None else now + days * 86400
        token_id, token = new_token_id(), new_token()

        def work(tx: Tx) -> None:
            tx.run(
                "INSERT INTO admin_tokens (id, token_hash, description, created, expires) "
                "VALUES (?, ?, ?, ?, ?)",
                token_id,
                token_hash(token),
                description,
                now,
                expires,
            )

        self._write(work)
        return AdminTokenInfo(token_id, description, now, expires), token

    def list_admin_tokens(
        self, after: str | None = None, limit: int | None = None
    ) -> list[AdminTokenInfo]:
        limit = validate.page_limit(limit)
        where, params = ("WHERE id > ? ", [after]) if after is not None else ("", [])
        tail = f" LIMIT {int(limit)}" if limit is not None else ""
        rows = self._read(
            lambda tx: tx.all(
                "SELECT id, description, created, expires FROM admin_tokens "  # noqa: S608
                + where
                + "ORDER BY id"
                + tail,
                *params,
            )
        )
        return [
            AdminTokenInfo(r[0], r[1], float(r[2]), None if r[3] is None else float(r[3]))
            for r in rows
        ]

    def revoke_admin_token(self, token_id: str) -> None:
        validate.token_id(token_id)

        def work(tx: Tx) -> None:
            if tx.run("DELETE FROM admin_tokens WHERE id = ?", token_id) == 0:
                raise NotFound(f"no admin token with id {token_id!r}")

        self._write(work)

    def admin_token_id(self, token: str) -> str | None:
        """The id of the unexpired admin token whose secret is ``token``, else None. One
        indexed lookup of the secret's SHA-256, as for API tokens (no comparison of secrets
        in Python, so no timing that depends on how much of a guess was right)."""
        if not isinstance(token, str) or not token or len(token) > TOKEN_MAX:
            return None
        digest = token_hash(token)
        now = self.clock()
        row = self._read(
            lambda tx: tx.one(
                "SELECT id FROM admin_tokens WHERE token_hash = ? "
                "AND (expires IS NULL OR expires > ?)",
                digest,
                now,
            )
        )
        return None if row is None else str(row[0])

    def count_admin_tokens(self) -> int:
        """How many unexpired admin tokens exist (the admin API refuses to start with none)."""
        now = self.clock()
        row = self._read(
            lambda tx: tx.one(
                "SELECT COUNT(*) FROM admin_tokens WHERE expires IS NULL OR expires > ?", now
            )
        )
        return int(row[0])

    # port shares

    @staticmethod
    def _share(row: Any) -> Share:
        return Share(
            project_id=row[0],
            port=int(row[1]),
            visibility=row[2],
            created=float(row[4]),
            expires=None if row[5] is None else float(row[5]),
            secret_hash=row[3],
        )

    _SHARE_COLUMNS = (
        "SELECT project_id, port, visibility, secret_hash, created, expires FROM port_shares "
    )

    def set_share(
        self,
        project_id: str,
        port: int,
        visibility: str,
        expires_in_days: float | None = None,
    ) -> tuple[Share | None, str | None]:
        """Set a port's visibility: ``private`` removes any share (returns (None, None));
        ``link`` makes a new secret each time (the old link stops working) and returns it;
        ``public`` returns (share, None). Replaces what was there."""
        validate.project_id(project_id)
        validate.port(port)
        validate.visibility(visibility)
        days = validate.expires_in_days(expires_in_days)
        now = self.clock()
        expires = None if days is None else now + days * 86400
        secret = new_token() if visibility == "link" else None
        digest = None if secret is None else token_hash(secret)

        def work(tx: Tx) -> Share | None:
            self._require_project(tx, project_id)
            tx.run("DELETE FROM port_shares WHERE project_id = ? AND port = ?", project_id, port)
            if visibility == "private":
                return None
            tx.run(
                "INSERT INTO port_shares (project_id, port, visibility, secret_hash, created, "
                "expires) VALUES (?, ?, ?, ?, ?, ?)",
                project_id,
                port,
                visibility,
                digest,
                now,
                expires,
            )
            return Share(project_id, port, visibility, now, expires, digest)

        return self._write(work), secret

    def remove_share(self, project_id: str, port: int) -> None:
        """Make the port private again; NotFound when it was not shared."""
        validate.project_id(project_id)
        validate.port(port)

        def work(tx: Tx) -> None:
            self._require_project(tx, project_id)
            if (
                tx.run(
                    "DELETE FROM port_shares WHERE project_id = ? AND port = ?", project_id, port
                )
                == 0
            ):
                raise NotFound(f"port {port} of project {project_id!r} is not shared")

        self._write(work)

    def list_shares(
        self,
        project_id: str | None = None,
        after: tuple[str, int] | None = None,
        limit: int | None = None,
    ) -> list[Share]:
        """Shares (all, or one project's) by project id and port."""
        limit = validate.page_limit(limit)
        conditions: list[str] = []
        params: list[object] = []
        if project_id is not None:
            validate.project_id(project_id)
            conditions.append("project_id = ?")
            params.append(project_id)
        if after is not None:
            conditions.append("(project_id > ? OR (project_id = ? AND port > ?))")
            params.extend([after[0], after[0], after[1]])
        where = ("WHERE " + " AND ".join(conditions) + " ") if conditions else ""
        tail = f" LIMIT {int(limit)}" if limit is not None else ""

        def work(tx: Tx) -> list[Any]:
            if project_id is not None:
                self._require_project(tx, project_id)
            return tx.all(self._SHARE_COLUMNS + where + "ORDER BY project_id, port" + tail, *params)

        return [self._share(r) for r in self._read(work)]

    def share_for(self, project_id: str, port: int) -> tuple[Share, Project] | None:
        """The share of a port with its project (for the proxy), or None when private."""
        if not validate.is_project_id(project_id) or not isinstance(port, int):
            return None

        def work(tx: Tx) -> tuple[Share, Project] | None:
            row = tx.one(
                self._SHARE_COLUMNS + "WHERE project_id = ? AND port = ?", project_id, port
            )
            if row is None:
                return None
            project = self._load_project(tx, project_id)
            return None if project is None else (self._share(row), project)

        return self._read(work)


class Directory:
    """``IDirectory`` over a ``SyncDirectory``: each call runs in a dedicated thread pool."""

    def __init__(self, sync: SyncDirectory, reactor: Any, pool_size: int = 4) -> None:
        self.sync = sync
        self.reactor = reactor
        self.pool = ThreadPool(minthreads=0, maxthreads=pool_size, name="cocalcproxy-directory")
        self._closed = False
        self._done = False
        self._waiters: list[Deferred[None]] = []
        self._shutdown_trigger: Any = None
        if hasattr(reactor, "callWhenRunning"):
            reactor.callWhenRunning(self._start)
        else:
            self._start()

    def _start(self) -> None:
        if self._closed or self.pool.started:
            return
        self.pool.start()
        # The dummy hash for unknown names is made now, so the first failed sign-in with an
        # unknown name does not take visibly longer than one with a known name.
        self.pool.callInThread(self.sync.passwords.dummy_hash)
        if hasattr(self.reactor, "addSystemEventTrigger"):
            # A fallback for owners that never call close(); like the reactor's own thread
            # pool, it joins the workers during shutdown.
            self._shutdown_trigger = self.reactor.addSystemEventTrigger(
                "during", "shutdown", self._stop_now
            )

    def _stop_now(self) -> None:
        self._closed = True
        self._shutdown_trigger = None
        self.pool.stop()
        self.sync.close()
        self._finished()

    def _call(self, method: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> Deferred[T]:
        if self._closed:
            return fail(Unavailable("the directory is closed"))
        return deferToThreadPool(self.reactor, self.pool, method, *args, **kwargs)

    def close(self) -> Deferred[None]:
        """Refuse new calls, let the work already queued finish, then close the connections.

        Joining the worker threads happens in a helper thread, so the reactor keeps serving
        (and delivering the results of that queued work) meanwhile; the Deferred fires when
        everything is closed. Calling it again returns another Deferred for the same end.
        """
        if self._shutdown_trigger is not None:
            self.reactor.removeSystemEventTrigger(self._shutdown_trigger)
            self._shutdown_trigger = None
        waiter: Deferred[None] = Deferred()
        if self._done:
            waiter.callback(None)
            return waiter
        self._waiters.append(waiter)
        if self._closed:
            return waiter
        self._closed = True
        if not self.pool.started:
            # The reactor has not run since we were made: start the workers now only so that
            # calls already queued are answered rather than left hanging.
            self.pool.start()
        threading.Thread(target=self._join, name="cocalcproxy-directory-close", daemon=True).start()
        return waiter

    def _join(self) -> None:
        try:
            self.pool.stop()
            self.sync.close()
        finally:
            self.reactor.callFromThread(self._finished)

    def _finished(self) -> None:
        self._done = True
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def change_listener(self, on_change: Callable[[], object]) -> ChangeListener | None:
        """A listener that calls ``on_change()`` as soon as any process commits a change (not
        started), or None when the backend cannot announce changes (SQLite: poll instead)."""
        dialect = self.sync.dialect
        if not dialect.notifies_changes:
            return None
        return ChangeListener(dialect.connect, self.reactor, on_change, dialect.describe())

    def ping(self) -> Deferred[None]:
        return self._call(self.sync.ping)

    def change_counter(self) -> Deferred[int]:
        return self._call(self.sync.change_counter)

    def add_user(
        self,
        name: str,
        password: str | None,
        oidc_subject: str | None = None,
        email: str | None = None,
    ) -> Deferred[Account]:
        return self._call(self.sync.add_user, name, password, oidc_subject, email)

    def link_oidc_subject(self, name: str, subject: str | None) -> Deferred[Account]:
        return self._call(self.sync.link_oidc_subject, name, subject)

    def account_for_oidc_subject(self, subject: str) -> Deferred[Account | None]:
        return self._call(self.sync.account_for_oidc_subject, subject)

    def oidc_sign_in(self, subject: str, username: str, email: str | None) -> Deferred[Account]:
        return self._call(self.sync.oidc_sign_in, subject, username, email)

    def identity_keys(self) -> Deferred[list[tuple[str, str, float]]]:
        return self._call(self.sync.identity_keys)

    def rotate_identity_keys(
        self, rotate_after: float, keep_for: float, make_key: Callable[[], tuple[str, str]]
    ) -> Deferred[list[tuple[str, str, float]]]:
        return self._call(self.sync.rotate_identity_keys, rotate_after, keep_for, make_key)

    def set_password(self, name: str, password: str) -> Deferred[None]:
        return self._call(self.sync.set_password, name, password)

    def remove_user(self, name: str) -> Deferred[None]:
        return self._call(self.sync.remove_user, name)

    def list_users(self) -> Deferred[list[Account]]:
        return self._call(self.sync.list_users)

    def get_user(self, name: str) -> Deferred[Account | None]:
        return self._call(self.sync.get_user, name)

    def check_password(self, name: str, password: str) -> Deferred[Account | None]:
        return self._call(self.sync.check_password, name, password)

    def create_token(
        self, name: str, expires_in_days: float | None = None
    ) -> Deferred[tuple[str, str]]:
        return self._call(self.sync.create_token, name, expires_in_days)

    def revoke_token(self, token_id: str) -> Deferred[None]:
        return self._call(self.sync.revoke_token, token_id)

    def list_tokens(self, name: str | None = None) -> Deferred[list[TokenInfo]]:
        return self._call(self.sync.list_tokens, name)

    def account_for_token(self, token: str) -> Deferred[Account | None]:
        return self._call(self.sync.account_for_token, token)

    def create_session(
        self, account_id: int, lifetime_seconds: float, parent: str | None = None
    ) -> Deferred[str]:
        return self._call(self.sync.create_session, account_id, lifetime_seconds, parent)

    def account_for_session(self, token: str) -> Deferred[Account | None]:
        return self._call(self.sync.account_for_session, token)

    def delete_session(self, token: str) -> Deferred[None]:
        return self._call(self.sync.delete_session, token)

    def shared_secret(self, name: str, make: Callable[[], str]) -> Deferred[str]:
        return self._call(self.sync.shared_secret, name, make)

    def use_once(self, purpose: str, value: str, expires: float) -> Deferred[bool]:
        return self._call(self.sync.use_once, purpose, value, expires)

    def purge_expired(self) -> Deferred[int]:
        return self._call(self.sync.purge_expired)

    def signin_attempt(
        self, checks: Sequence[tuple[str, int, float]]
    ) -> Deferred[tuple[float | None, float]]:
        return self._call(self.sync.signin_attempt, checks)

    def signin_forgive(self, key: str, at: float) -> Deferred[None]:
        return self._call(self.sync.signin_forgive, key, at)

    def signin_reset(self, key: str) -> Deferred[None]:
        return self._call(self.sync.signin_reset, key)

    def add_project(
        self,
        owner: str,
        host: str = "127.0.0.1",
        home: str | None = None,
        project_id: str | None = None,
        title: str = "",
        ports: str | None = None,
        socket_dir: str | None = None,
        socket_owner: int | str | None = None,
    ) -> Deferred[Project]:
        return self._call(
            self.sync.add_project,
            owner,
            host,
            home,
            project_id,
            title,
            ports,
            socket_dir,
            socket_owner,
        )

    def set_project(
        self,
        project_id: str,
        host: str | None = None,
        home: str | None = None,
        title: str | None = None,
        ports: str | None = None,
        socket_dir: str | None = None,
        socket_owner: int | str | None = None,
    ) -> Deferred[Project]:
        return self._call(
            self.sync.set_project, project_id, host, home, title, ports, socket_dir, socket_owner
        )

    def remove_project(self, project_id: str) -> Deferred[None]:
        return self._call(self.sync.remove_project, project_id)

    def add_collaborator(self, project_id: str, name: str) -> Deferred[None]:
        return self._call(self.sync.add_collaborator, project_id, name)

    def remove_collaborator(self, project_id: str, name: str) -> Deferred[None]:
        return self._call(self.sync.remove_collaborator, project_id, name)

    def get_project(self, project_id: str) -> Deferred[Project | None]:
        return self._call(self.sync.get_project, project_id)

    def share_for(self, project_id: str, port: int) -> Deferred[tuple[Share, Project] | None]:
        return self._call(self.sync.share_for, project_id, port)

    def list_shares(self, project_id: str | None = None) -> Deferred[list[Share]]:
        return self._call(self.sync.list_shares, project_id)

    def admin_token_id(self, token: str) -> Deferred[str | None]:
        return self._call(self.sync.admin_token_id, token)

    def run(self, work: Callable[..., T], *args: Any, **kwargs: Any) -> Deferred[T]:
        """Run ``work(sync_directory, *args, **kwargs)`` in the directory's thread pool: how
        the admin API calls the shared operations (cocalcproxy.directory.operations)."""
        return self._call(work, self.sync, *args, **kwargs)

    def list_projects(self) -> Deferred[list[Project]]:
        return self._call(self.sync.list_projects)

    def project_for(self, account_id: int, project_id: str) -> Deferred[Project | None]:
        return self._call(self.sync.project_for, account_id, project_id)

    def projects_for(self, account_id: int) -> Deferred[list[Project]]:
        return self._call(self.sync.projects_for, account_id)


def open_sync_directory(
    url: str,
    hasher: PasswordHasher | None = None,
    clock: Callable[[], float] = time.time,
    migrate_to: int | None = None,
    create: str = "folder",
) -> SyncDirectory:
    """Open the database at ``url`` and bring its schema up to date (blocking).

    ``create`` says what may be created (``dialect.CREATE_MODES``): with ``"no"`` (the admin
    commands other than ``init``) a missing SQLite file, and a database of either kind without
    the proxy's tables, are refused with a message saying to run ``cocalcproxy init``; an older
    schema is still brought up to date. Raises InvalidInput for a malformed URL and Unavailable
    when the database cannot be opened, read or migrated; the messages name the database (never
    its password).
    """
    sync = SyncDirectory(dialect_for(url, create), hasher=hasher, clock=clock)
    try:
        if create == "no" and sync.schema_version() == 0:
            raise Unavailable(
                f"the database {sync.dialect.describe()} has no cocalcproxy tables yet; run "
                "'cocalcproxy init' (with the same --state-dir or --database) to create them"
            )
        sync.migrate(migrate_to)
    except BaseException:
        sync.close()
        raise
    return sync


def open_directory(
    url: str,
    reactor: Any,
    hasher: PasswordHasher | None = None,
    clock: Callable[[], float] = time.time,
    pool_size: int = 4,
    create: str = "folder",
) -> Directory:
    """The asynchronous directory for the proxy. Migrates synchronously right away (this runs
    in makeService, before the reactor), so a bad database stops the start with a clear error."""
    sync = open_sync_directory(url, hasher=hasher, clock=clock, create=create)
    sync.release_thread_connection()
    return Directory(sync, reactor, pool_size=pool_size)
