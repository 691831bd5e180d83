"""Every committed write announces itself on PostgreSQL (NOTIFY, payload the new counter value);
refused writes and reads announce nothing; SQLite offers no listener (the guard polls)."""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.trial import unittest

from cocalcproxy.directory import Conflict, NotFound
from cocalcproxy.directory.dialect import CHANGES_CHANNEL
from cocalcproxy.directory.notify import ChangeListener
from cocalcproxy.directory.store import open_directory, open_sync_directory
from tests.directory_support import FAST_HASHER, new_postgres_url, new_sqlite_url

PID = "3f2c9a8e-0d6b-4c1e-9a57-2b8e4d6f1a30"


class PostgresAnnouncesCommittedChanges(unittest.TestCase):
    def setUp(self) -> None:
        import psycopg

        self.url = new_postgres_url(self)
        self.d = open_sync_directory(self.url, hasher=FAST_HASHER)
        self.addCleanup(self.d.close)
        self.listen = psycopg.connect(self.url, autocommit=True)
        self.addCleanup(self.listen.close)
        self.listen.execute(f"LISTEN {CHANGES_CHANNEL}")

    def heard(self) -> list[str]:
        """Payloads of the notifications delivered so far (each commit's is sent before the
        call that made it returns, so a short wait only covers loopback delivery)."""
        return [n.payload for n in self.listen.notifies(timeout=0.2)]

    def test_each_write_announces_its_counter_once(self) -> None:
        d = self.d
        alice = d.add_user("alice", "pw")
        d.add_user("bob", "pw")
        self.heard()
        steps: list[Any] = [
            lambda: d.create_token("alice"),
            lambda: d.revoke_token(d.list_tokens()[0].id),
            lambda: d.create_session(alice.id, 60),
            lambda: d.add_project("alice", project_id=PID),
            lambda: d.add_collaborator(PID, "bob"),
            lambda: d.remove_collaborator(PID, "bob"),
            lambda: d.remove_user("bob"),
        ]
        for step in steps:
            step()
            self.assertEqual(self.heard(), [str(d.change_counter())])

    def test_refused_writes_and_reads_announce_nothing(self) -> None:
        d = self.d
        d.add_user("alice", "pw")
        self.heard()
        with self.assertRaises(Conflict):
            d.add_user("alice", "pw")
        with self.assertRaises(NotFound):
            d.remove_user("bob")
        d.list_users()
        d.change_counter()
        self.assertEqual(self.heard(), [])

    def test_proxy_directory_offers_a_listener(self) -> None:
        directory = open_directory(self.url, reactor, hasher=FAST_HASHER)
        self.addCleanup(directory.close)
        self.assertIsInstance(directory.change_listener(lambda: None), ChangeListener)


class SQLiteHasNoListener(unittest.TestCase):
    def test_no_listener(self) -> None:
        directory = open_directory(new_sqlite_url(self), reactor, hasher=FAST_HASHER)
        self.addCleanup(directory.close)
        self.assertIsNone(directory.change_listener(lambda: None))
