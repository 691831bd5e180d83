"""Opening databases: fresh, empty, old (upgraded in place with their data), newer, broken,
unreachable; and the URLs that name them."""

from __future__ import annotations

import os
import stat
import threading
from typing import Any

from twisted.internet import reactor
from twisted.trial import unittest

from cocalcproxy.directory import Account, InvalidInput, Unavailable
from cocalcproxy.directory import migrate as migrate_module
from cocalcproxy.directory.dialect import redact
from cocalcproxy.directory.hashing import token_hash
from cocalcproxy.directory.migrate import LATEST
from cocalcproxy.directory.store import SyncDirectory, open_directory, open_sync_directory
from tests.directory_support import FAST_HASHER, FakeClock, PostgresBackend, SQLiteBackend

PID = "0b9d1c56-3f4a-4e6b-9a51-2c7d8e9f0a1b"


def make_version_1_database(url: str, clock: FakeClock) -> dict[str, Any]:
    """A database as version 1 of the schema left it, holding one of everything."""
    old = open_sync_directory(url, hasher=FAST_HASHER, clock=clock, migrate_to=1)
    try:
        assert old.schema_version() == 1
        facts = {
            "password": "old password",
            "session": "session-secret-from-v1",
            "token": "api-token-secret-from-v1",
        }
        hashed = FAST_HASHER.hash(facts["password"])

        def fill(tx: Any) -> None:
            now = clock()
            tx.run(
                "INSERT INTO accounts (name, password_hash, created) VALUES (?, ?, ?)",
                "alice",
                hashed,
                now,
            )
            tx.run(
                "INSERT INTO accounts (name, password_hash, created) VALUES (?, ?, ?)",
                "bob",
                hashed,
                now,
            )
            tx.run(
                "INSERT INTO projects (id, owner_id, host, home, created) VALUES (?, 1, ?, ?, ?)",
                PID,
                "10.0.0.5",
                "/srv/alice",
                now,
            )
            tx.run("INSERT INTO collaborators (project_id, account_id) VALUES (?, 2)", PID)
            tx.run(
                "INSERT INTO sessions (token_hash, account_id, created, expires) "
                "VALUES (?, 2, ?, ?)",
                token_hash(facts["session"]),
                now,
                now + 3600,
            )
            tx.run(
                "INSERT INTO api_tokens (id, token_hash, account_id, created) "
                "VALUES ('00000000000000aa', ?, 1, ?)",
                token_hash(facts["token"]),
                now,
            )

        old._write(fill)
        facts["counter"] = old.change_counter()
        return facts
    finally:
        old.close()


class MigrationTests:
    new_database_url: Any

    def setUp(self) -> None:
        self.url = self.new_database_url()
        self.clock = FakeClock()

    def open(self, **kwargs: Any) -> SyncDirectory:
        d = open_sync_directory(self.url, hasher=FAST_HASHER, clock=self.clock, **kwargs)
        self.addCleanup(d.close)  # type: ignore[attr-defined]
        return d

    def test_fresh_database_gets_the_latest_schema(self) -> None:
        d = self.open()
        self.assertEqual(d.schema_version(), LATEST)
        self.assertEqual(d.change_counter(), 0)
        self.assertEqual(d.migrate(), (LATEST, LATEST))

    def test_upgrade_from_version_1_keeps_everything(self) -> None:
        facts = make_version_1_database(self.url, self.clock)
        d = self.open()
        self.assertEqual(d.schema_version(), LATEST)
        alice, bob = Account(1, "alice"), Account(2, "bob")
        self.assertEqual(d.list_users(), [alice, bob])
        self.assertEqual(d.check_password("alice", facts["password"]), alice)
        self.assertEqual(d.account_for_session(facts["session"]), bob)
        self.assertEqual(d.account_for_token(facts["token"]), alice)
        [info] = d.list_tokens()
        self.assertEqual((info.id, info.expires), ("00000000000000aa", None))
        project = d.get_project(PID)
        assert project is not None
        self.assertEqual(
            (project.owner_name, project.host, project.home, project.title, project.collaborators),
            ("alice", "10.0.0.5", "/srv/alice", "", ("bob",)),
        )
        self.assertEqual(d.change_counter(), facts["counter"])
        # and the new columns work
        d.set_project(PID, title="now with a title")
        d.create_token("bob", expires_in_days=1)
        self.assertEqual(len(d.list_tokens()), 2)

    def test_reopening_does_not_migrate_again(self) -> None:
        self.open().add_user("alice", "pw")
        again = self.open()
        self.assertEqual(again.migrate(), (LATEST, LATEST))
        self.assertEqual(again.list_users(), [Account(1, "alice")])

    def test_newer_schema_is_refused_untouched(self) -> None:
        d = self.open()
        d.add_user("alice", "pw")
        d._write(lambda tx: tx.run("UPDATE schema_version SET version = ?", LATEST + 7))
        d.close()
        with self.assertRaisesRegex(Unavailable, f"schema version {LATEST + 7}, newer than"):
            self.open()
        self.patch(migrate_module, "STEPS", migrate_module.STEPS + ((LATEST + 7, "x"),))
        self.assertEqual(self.open().list_users(), [Account(1, "alice")])

    def test_failed_step_leaves_the_previous_version(self) -> None:
        self.open().add_user("alice", "pw")
        broken = (LATEST + 1, "broken.sql")
        self.patch(migrate_module, "STEPS", migrate_module.STEPS + (broken,))
        real_script = migrate_module.script

        def script(filename: str) -> str:
            if filename == "broken.sql":
                return (
                    "CREATE TABLE half_done (x INTEGER);\n"
                    "ALTER TABLE accounts ADD COLUMN half TEXT;\n"
                    "THIS IS NOT SQL;\n"
                )
            return real_script(filename)

        self.patch(migrate_module, "script", script)
        with self.assertRaisesRegex(Unavailable, "cannot migrate the database"):
            self.open()
        self.patch(migrate_module, "STEPS", migrate_module.STEPS[:-1])
        d = self.open()
        self.assertEqual(d.schema_version(), LATEST)
        self.assertFalse(
            d._read(lambda tx: d.dialect.table_exists(tx.cursor, "half_done")),
            "the failed step was rolled back as a whole",
        )
        self.assertEqual(d.list_users(), [Account(1, "alice")])

    def test_concurrent_first_opens_migrate_once(self) -> None:
        errors: list[BaseException] = []
        opened: list[SyncDirectory] = []

        def run() -> None:
            try:
                opened.append(open_sync_directory(self.url, hasher=FAST_HASHER))
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=run) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        for d in opened:
            self.addCleanup(d.close)  # type: ignore[attr-defined]
        self.assertEqual(errors, [])
        self.assertEqual(len(opened), 4)
        self.assertEqual({d.schema_version() for d in opened}, {LATEST})
        self.assertEqual(
            opened[0]._read(lambda tx: tx.all("SELECT * FROM schema_version")), [(LATEST,)]
        )

    def test_open_directory_migrates_before_the_reactor_is_needed(self) -> None:
        make_version_1_database(self.url, self.clock)
        directory = open_directory(self.url, reactor, hasher=FAST_HASHER)
        self.addCleanup(directory.close)  # type: ignore[attr-defined]
        check = self.open()
        self.assertEqual(check.schema_version(), LATEST)


class SQLiteMigrationTests(SQLiteBackend, MigrationTests, unittest.TestCase):
    def path(self) -> str:
        return self.url[len("sqlite://") :]

    def test_parent_directory_and_file_are_private(self) -> None:
        d = self.open()
        d.add_user("alice", "pw")
        path = self.path()
        self.assertEqual(stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode), 0o700)
        for name in (path, path + "-wal", path + "-shm"):
            if os.path.exists(name):
                self.assertEqual(stat.S_IMODE(os.stat(name).st_mode), 0o600, name)
        self.assertEqual(d._read(lambda tx: tx.one("PRAGMA journal_mode"))[0], "wal")
        self.assertEqual(d._read(lambda tx: tx.one("PRAGMA foreign_keys"))[0], 1)

    def test_empty_file_is_a_fresh_database(self) -> None:
        os.makedirs(os.path.dirname(self.path()))
        open(self.path(), "wb").close()
        self.assertEqual(self.open().schema_version(), LATEST)

    def test_four_slashes_name_the_same_file(self) -> None:
        self.open().add_user("alice", "pw")
        other = open_sync_directory("sqlite:////" + self.path().lstrip("/"), hasher=FAST_HASHER)
        self.addCleanup(other.close)
        self.assertEqual(other.list_users(), [Account(1, "alice")])

    def test_not_a_database(self) -> None:
        os.makedirs(os.path.dirname(self.path()))
        with open(self.path(), "wb") as f:
            f.write(b"this is not a database, it is a shopping list\n" * 100)
        with self.assertRaisesRegex(Unavailable, "file is not a database"):
            self.open()
        with open(self.path(), "rb") as f:
            self.assertTrue(f.read().startswith(b"this is not a database"), "left untouched")
        with self.assertRaisesRegex(Unavailable, "file is not a database"):
            open_directory(self.url, reactor)

    def test_path_is_a_directory(self) -> None:
        os.makedirs(self.path())
        with self.assertRaisesRegex(Unavailable, "cannot open the database .*: Is a directory"):
            self.open()

    def test_parent_is_a_file(self) -> None:
        os.makedirs(os.path.dirname(os.path.dirname(self.path())))
        open(os.path.dirname(self.path()), "w").close()
        with self.assertRaisesRegex(Unavailable, "cannot create the directory"):
            self.open()


class PostgresMigrationTests(PostgresBackend, MigrationTests, unittest.TestCase):
    def test_unreachable_server(self) -> None:
        with self.assertRaisesRegex(Unavailable, "cannot connect to postgresql://"):
            open_sync_directory("postgresql://postgres@127.0.0.1:1/nothing")

    def test_missing_database(self) -> None:
        url = self.url + "_missing"
        with self.assertRaisesRegex(Unavailable, "does not exist"):
            open_sync_directory(url)

    def test_password_is_never_shown(self) -> None:
        url = "postgresql://someone:hunter2secret@127.0.0.1:1/nothing"
        with self.assertRaises(Unavailable) as caught:
            open_sync_directory(url)
        self.assertNotIn("hunter2secret", str(caught.exception))
        self.assertIn("someone:***@127.0.0.1:1", str(caught.exception))

    def test_postgres_scheme_alias(self) -> None:
        self.open().add_user("alice", "pw")
        other = open_sync_directory("postgres://" + self.url.split("://", 1)[1])
        self.addCleanup(other.close)
        self.assertEqual(other.list_users(), [Account(1, "alice")])


class URLTests(unittest.TestCase):
    def test_bad_urls(self) -> None:
        cases = {
            "": "no database URL given",
            "mysql://root@localhost/db": "unsupported database URL",
            "/var/lib/x.sqlite3": "unsupported database URL",
            "sqlite:relative.db": "must be absolute",
            "sqlite://relative.db": "must be absolute",
            "sqlite:///": "must be absolute",
            "postgresql://postgres@127.0.0.1:5432": "no database name",
            "postgresql://a@b/c?sslmode=bogus&=": "invalid database URL",
        }
        for url, message in cases.items():
            with self.assertRaisesRegex(InvalidInput, message, msg=url):
                open_sync_directory(url)
            with self.assertRaisesRegex(InvalidInput, message, msg=url):
                open_directory(url, reactor)

    def test_passwords_never_appear_in_messages(self) -> None:
        cases = {
            "postgresql://u:hunter2@h/db": "postgresql://u:***@h/db",
            "postgresql://u@h/db?password=hunter2&sslmode=require": (
                "postgresql://u@h/db?password=***&sslmode=require"
            ),
            "postgresql:///db?host=/run/postgresql": "postgresql:///db?host=/run/postgresql",
        }
        for url, shown in cases.items():
            self.assertEqual(redact(url), shown)
        with self.assertRaises(InvalidInput) as caught:
            open_sync_directory("postgresql://u:hunter2@h/db?bogus=1")
        self.assertNotIn("hunter2", str(caught.exception))
