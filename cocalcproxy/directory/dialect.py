"""The few places where SQLite and PostgreSQL differ: URLs, connecting, locking, error classes.

Everything else (the SQL of the queries and of the migrations) is shared. Queries are written with
``?`` placeholders and translated for psycopg, which uses ``%s``.
"""

from __future__ import annotations

import os
import sqlite3
import stat
import time
from typing import Any
from urllib.parse import quote, urlsplit

from cocalcproxy.directory.model import Conflict, DirectoryError, Gone, InvalidInput, Unavailable

SQLITE_BUSY_TIMEOUT_MS = 10_000
POSTGRES_CONNECT_TIMEOUT_S = 10
# Taken by every migration run so two processes starting at once migrate one after the other.
POSTGRES_MIGRATION_LOCK = 0x636F63616C63  # "cocalc"

# PostgreSQL: every change-counter bump sends NOTIFY on this channel (directory/notify.py).
CHANGES_CHANNEL = "cocalcproxy_changes"

URL_HELP = "use sqlite:///ABSOLUTE/PATH or postgresql://USER@HOST[:PORT]/DATABASE"


class Dialect:
    """One database backend. ``connect`` returns a DB-API connection in autocommit mode; the
    store opens transactions itself with ``begin_write`` / ``begin_read``."""

    name = ""
    serial_primary_key = ""

    def describe(self) -> str:
        raise NotImplementedError

    def connect(self) -> Any:
        raise NotImplementedError

    def sql(self, query: str) -> str:
        return query

    def begin_write(self, cursor: Any) -> None:
        raise NotImplementedError

    def begin_read(self, cursor: Any) -> None:
        raise NotImplementedError

    def begin_migration(self, cursor: Any) -> None:
        self.begin_write(cursor)

    def table_exists(self, cursor: Any, table: str) -> bool:
        raise NotImplementedError

    def announce_change(self, cursor: Any) -> None:
        """Called in every write transaction right after the change counter is bumped: tell
        running proxies, where the backend can (delivered on commit, never on rollback)."""

    @property
    def notifies_changes(self) -> bool:
        """True when ``announce_change`` reaches listeners (``directory/notify.py``)."""
        return False

    def translate_error(self, error: BaseException) -> DirectoryError | None:
        """A DirectoryError for a database exception, or None when it is not a database one."""
        raise NotImplementedError

    def is_disconnect(self, error: BaseException) -> bool:
        """True when the connection itself was lost (worth one retry on a new connection)."""
        return False

    def check(self) -> None:
        """Raise Unavailable when the database this process opened is no longer the one at its
        address (a deleted or replaced SQLite file). Called before every transaction."""


#: How a missing SQLite database is treated when opening it: refused ("no"), created as an empty
#: file in an existing folder ("file": the proxy's start), or created with its folder
#: ("folder": ``cocalcproxy init`` in the state directory, and library use).
CREATE_MODES = ("no", "file", "folder")


class SQLiteDialect(Dialect):
    name = "sqlite"
    serial_primary_key = "INTEGER PRIMARY KEY AUTOINCREMENT"

    def __init__(self, path: str, create: str = "folder") -> None:
        assert create in CREATE_MODES
        self.path = path
        self.create = create
        self._prepared = False
        # (st_dev, st_ino) of the file this process opened: a path that later names another
        # file (or none) means the database was deleted or replaced under the running process.
        self._identity: tuple[int, int] | None = None

    def describe(self) -> str:
        return f"sqlite:///{self.path.lstrip('/')}"

    def _prepare_file(self) -> None:
        """Create the parent directory (0700) and an empty database file (0600) if missing.

        Runs once, before this process has any connection to the file: an existing database
        file is only stat()ed, never opened and closed behind SQLite's back, because closing
        any descriptor of a file drops every POSIX lock this process holds on it, including
        the locks of SQLite's open connections (which then lets other processes reset the WAL
        under them).
        """
        if self._prepared:
            return
        parent = os.path.dirname(self.path) or "/"
        if self.create == "folder":
            try:
                os.makedirs(parent, mode=0o700, exist_ok=True)
            except OSError as e:
                raise Unavailable(
                    f"cannot create the directory {parent!r} for the database: {e.strerror}"
                ) from None
        elif not os.path.isdir(parent):
            raise Unavailable(
                f"the folder {parent!r} of the database {self.path!r} does not exist"
                + (" (run 'cocalcproxy init' to create it)" if self.create == "no" else "")
            )
        try:
            info = os.stat(self.path)
        except FileNotFoundError:
            if self.create == "no":
                raise Unavailable(
                    f"there is no database at {self.path!r}; run 'cocalcproxy init' (with the "
                    "same --state-dir or --database) to create it"
                ) from None
            try:
                # 0600 before SQLite sees it; SQLite gives the -wal and -shm files the same
                # mode, so password hashes are never world-readable.
                os.close(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
            except FileExistsError:
                pass
            except OSError as e:
                raise Unavailable(
                    f"cannot create the database {self.path!r}: {e.strerror}"
                ) from None
        except OSError as e:
            raise Unavailable(f"cannot open the database {self.path!r}: {e.strerror}") from None
        else:
            if stat.S_ISDIR(info.st_mode):
                raise Unavailable(f"cannot open the database {self.path!r}: Is a directory")
            if not stat.S_ISREG(info.st_mode):
                raise Unavailable(f"the database {self.path!r} is not a regular file")
        try:
            info = os.stat(self.path)
        except OSError as e:
            raise Unavailable(f"cannot open the database {self.path!r}: {e.strerror}") from None
        self._identity = (info.st_dev, info.st_ino)
        self._prepared = True

    def check(self) -> None:
        if self._identity is None:
            return
        try:
            info = os.stat(self.path)
        except FileNotFoundError:
            raise Gone(
                f"the database file {self.path!r} was deleted under the running process; "
                "restore it (or restart to create an empty one)"
            ) from None
        except OSError as e:
            raise Unavailable(f"cannot check the database {self.path!r}: {e.strerror}") from None
        if (info.st_dev, info.st_ino) != self._identity:
            raise Gone(
                f"the database file {self.path!r} was replaced by another file under the "
                "running process; restart to use the new file"
            )

    def connect(self) -> Any:
        self._prepare_file()
        # Every connection after the first must reach the same file: SQLite would otherwise
        # open (and, without mode=rw, create) whatever now lies at the path.
        self.check()
        try:
            conn = sqlite3.connect(
                "file:" + quote(self.path, safe="/") + "?mode=rw",
                uri=True,
                timeout=SQLITE_BUSY_TIMEOUT_MS / 1000,
                isolation_level=None,
                check_same_thread=False,
            )
        except sqlite3.Error as e:
            raise Unavailable(f"cannot open the database {self.path!r}: {e}") from None
        deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000
        while True:
            try:
                self._configure(conn)
                return conn
            except sqlite3.OperationalError as e:
                # Switching a new database to WAL needs an exclusive lock and does not wait
                # through the busy handler, so a second process opening the same new file at
                # that moment is told "locked"; it simply tries again.
                if "locked" in str(e) and time.monotonic() < deadline:
                    time.sleep(0.02)
                    continue
                conn.close()
                raise Unavailable(f"cannot read the database {self.path!r}: {e}") from None
            except sqlite3.Error as e:
                conn.close()
                raise Unavailable(f"cannot read the database {self.path!r}: {e}") from None
            except BaseException:
                conn.close()
                raise

    def _configure(self, conn: Any) -> None:
        conn.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA foreign_keys = ON")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise Unavailable(f"the database {self.path!r} cannot use WAL mode ({mode})")
        conn.execute("PRAGMA synchronous = NORMAL")

    def begin_write(self, cursor: Any) -> None:
        # IMMEDIATE takes the write lock up front (waiting up to busy_timeout), so a transaction
        # never has to upgrade a read lock, which SQLite answers with an immediate SQLITE_BUSY.
        cursor.execute("BEGIN IMMEDIATE")

    def begin_read(self, cursor: Any) -> None:
        cursor.execute("BEGIN")

    def table_exists(self, cursor: Any, table: str) -> bool:
        cursor.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (table,))
        return cursor.fetchone() is not None

    def translate_error(self, error: BaseException) -> DirectoryError | None:
        if isinstance(error, sqlite3.IntegrityError):
            return Conflict(f"the change conflicts with existing data ({error})")
        if isinstance(error, sqlite3.Error):
            return Unavailable(f"cannot use the database {self.path!r}: {error}")
        return None


class PostgresDialect(Dialect):
    name = "postgresql"
    serial_primary_key = "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY"

    def __init__(self, url: str) -> None:
        try:
            import psycopg  # noqa: F401
            from psycopg.conninfo import conninfo_to_dict, make_conninfo
        except ImportError:
            raise Unavailable(
                "PostgreSQL support needs psycopg 3: pip install 'cocalcproxy[postgresql]'"
            ) from None
        self.url = url
        try:
            params = conninfo_to_dict(url)
        except Exception as e:  # psycopg.ProgrammingError for a malformed URL
            raise InvalidInput(f"invalid database URL {redact(url)!r}: {e}; {URL_HELP}") from None
        if not params.get("dbname"):
            raise InvalidInput(
                f"invalid database URL {redact(url)!r}: no database name; {URL_HELP}"
            )
        extra = (
            {} if "connect_timeout" in params else {"connect_timeout": POSTGRES_CONNECT_TIMEOUT_S}
        )
        self.conninfo = make_conninfo(url, **extra)

    def describe(self) -> str:
        return redact(self.url)

    def connect(self, **defaults: str | int) -> Any:
        """A new connection in autocommit mode; ``defaults`` are connection parameters used
        where the URL does not set them (the change listener's TCP keepalives)."""
        import psycopg
        from psycopg.conninfo import conninfo_to_dict, make_conninfo

        conninfo = self.conninfo
        if defaults:
            given = conninfo_to_dict(conninfo)
            conninfo = make_conninfo(
                conninfo, **{k: v for k, v in defaults.items() if k not in given}
            )
        try:
            return psycopg.connect(conninfo, autocommit=True)
        except psycopg.Error as e:
            message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise Unavailable(f"cannot connect to {self.describe()}: {message}") from None

    def sql(self, query: str) -> str:
        return query.replace("?", "%s")

    def begin_write(self, cursor: Any) -> None:
        cursor.execute("BEGIN")

    def begin_read(self, cursor: Any) -> None:
        # One snapshot for multi-statement reads (a project and its collaborators).
        cursor.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")

    def begin_migration(self, cursor: Any) -> None:
        cursor.execute("BEGIN")
        cursor.execute(f"SELECT pg_advisory_xact_lock({POSTGRES_MIGRATION_LOCK})")

    def table_exists(self, cursor: Any, table: str) -> bool:
        cursor.execute("SELECT to_regclass(%s) IS NOT NULL", (table,))
        row = cursor.fetchone()
        return bool(row and row[0])

    def announce_change(self, cursor: Any) -> None:
        # The payload is the new counter value: listeners need only the wake-up, but it lets an
        # operator (or a test) tell one change's notification from another's.
        cursor.execute(
            "SELECT pg_notify(%s, value::text) FROM change_counter WHERE id = 1",
            (CHANGES_CHANNEL,),
        )

    @property
    def notifies_changes(self) -> bool:
        return True

    def is_disconnect(self, error: BaseException) -> bool:
        import psycopg

        return isinstance(error, psycopg.OperationalError)

    def translate_error(self, error: BaseException) -> DirectoryError | None:
        import psycopg

        if isinstance(error, psycopg.IntegrityError):
            return Conflict(f"the change conflicts with existing data ({_first_line(error)})")
        if isinstance(error, psycopg.Error):
            return Unavailable(f"cannot use the database {self.describe()}: {_first_line(error)}")
        return None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def redact(url: str) -> str:
    """The URL with any password (in the user info or a ``password=`` parameter) replaced, for
    messages and logs."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return "<unparsable URL>"
    netloc, query = parts.netloc, parts.query
    if password is None and "password" not in query.lower():
        return url
    if password is not None:
        netloc = (parts.username or "") + ":***@" + netloc.rsplit("@", 1)[-1]
    query = "&".join(
        f"{key}=***" if key.lower() == "password" else f"{key}{sep}{value}"
        for key, sep, value in (item.partition("=") for item in query.split("&"))
    )
    text = f"{parts.scheme}://{netloc}{parts.path}"
    return text + (f"?{query}" if query else "")


def dialect_for(url: str, create: str = "folder") -> Dialect:
    """Parse a database URL. ``sqlite:///PATH`` and ``sqlite:////PATH`` both name the absolute
    path /PATH (the second is what SQLAlchemy writes); relative paths are refused. ``create``
    (one of ``CREATE_MODES``) says whether a missing SQLite database may be created."""
    if not isinstance(url, str) or not url:
        raise InvalidInput(f"no database URL given: {URL_HELP}")
    scheme = url.split(":", 1)[0].lower()
    if scheme == "sqlite":
        rest = url[len("sqlite:") :]
        if not rest.startswith("///") or len(rest.strip("/")) == 0:
            raise InvalidInput(
                f"invalid database URL {url!r}: the SQLite path must be absolute; {URL_HELP}"
            )
        path = "/" + rest.lstrip("/")
        if "\x00" in path:
            raise InvalidInput(f"invalid database URL {url!r}: {URL_HELP}")
        return SQLiteDialect(path, create)
    if scheme in ("postgresql", "postgres"):
        return PostgresDialect(url)
    raise InvalidInput(f"unsupported database URL {redact(url)!r}: {URL_HELP}")
