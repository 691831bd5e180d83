"""The directory: every operation, every refusal, secrets at rest, expiry and the change counter.

Each test class is a mixin run twice: on a fresh SQLite file and on a fresh PostgreSQL database.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from argon2 import PasswordHasher
from twisted.internet import defer, reactor
from twisted.trial import unittest

from cocalcproxy.directory import Account, Conflict, InvalidInput, NotFound, Unavailable
from cocalcproxy.directory.hashing import token_hash
from cocalcproxy.directory.migrate import LATEST
from cocalcproxy.directory.store import (
    Directory,
    SyncDirectory,
    open_directory,
    open_sync_directory,
)
from tests.directory_support import (
    FAST_HASHER,
    FakeClock,
    PostgresBackend,
    SQLiteBackend,
    _postgres_admin,
)

PID = "0b9d1c56-3f4a-4e6b-9a51-2c7d8e9f0a1b"
OTHER_PID = "11111111-2222-4333-8444-555555555555"


class CountingHasher(PasswordHasher):
    """Counts Argon2 verifications, to prove unknown names cost one too."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.verifications: list[str] = []

    def verify(self, hash: str | bytes, password: str | bytes) -> bool:
        self.verifications.append(hash if isinstance(hash, str) else hash.decode())
        return super().verify(hash, password)


def fast_counting_hasher() -> CountingHasher:
    return CountingHasher(time_cost=1, memory_cost=1024, parallelism=1)


class SyncMixin:
    """Shared set-up: a migrated directory on a fresh database with a hand-moved clock."""

    new_database_url: Any

    def setUp(self) -> None:
        self.url = self.new_database_url()
        self.clock = FakeClock()
        self.hasher = fast_counting_hasher()
        self.d = self.open()

    def open(self, hasher: PasswordHasher | None = None) -> SyncDirectory:
        d = open_sync_directory(self.url, hasher=hasher or self.hasher, clock=self.clock)
        self.addCleanup(d.close)  # type: ignore[attr-defined]
        return d

    def raw(self, query: str, *params: object) -> list[Any]:
        """Read the database behind the directory's back, as an attacker with a copy would."""
        d = self.d
        return d._read(lambda tx: tx.all(query, *params))

    def snapshot(self) -> tuple[Any, ...]:
        return (
            self.raw("SELECT * FROM accounts ORDER BY id"),
            self.raw("SELECT * FROM projects ORDER BY id"),
            self.raw("SELECT * FROM collaborators ORDER BY project_id, account_id"),
            self.raw("SELECT * FROM sessions ORDER BY token_hash"),
            self.raw("SELECT * FROM api_tokens ORDER BY id"),
            self.d.change_counter(),
        )


class AccountTests(SyncMixin):
    def test_fresh_database(self) -> None:
        self.assertEqual(self.d.schema_version(), LATEST)
        self.assertEqual(self.d.change_counter(), 0)
        self.assertEqual(self.d.list_users(), [])

    def test_add_and_list(self) -> None:
        alice = self.d.add_user("alice", "correct horse")
        bob = self.d.add_user("bob.b@example-1_x", "pw")
        self.assertEqual(alice.name, "alice")
        self.assertNotEqual(alice.id, bob.id)
        self.assertEqual(self.d.list_users(), [alice, bob])
        self.assertEqual(self.d.get_user("alice"), alice)
        self.assertIsNone(self.d.get_user("carol"))

    def test_duplicate_name_conflicts_regardless_of_case(self) -> None:
        self.d.add_user("alice", "pw")
        before = self.snapshot()
        with self.assertRaisesRegex(Conflict, "a user named 'alice' already exists"):
            self.d.add_user("alice", "other")
        with self.assertRaisesRegex(Conflict, "case-insensitive"):
            self.d.add_user("Alice", "other")
        self.assertEqual(self.snapshot(), before)

    def test_invalid_names(self) -> None:
        for bad in ["", "-alice", "a b", "a/b", "x" * 65, "é", "a\nb", "a:b", "<script>"]:
            with self.assertRaisesRegex(InvalidInput, "invalid user name"):
                self.d.add_user(bad, "pw")
        self.assertEqual(self.d.list_users(), [])
        self.d.add_user("x" * 64, "pw")

    def test_empty_password_refused(self) -> None:
        with self.assertRaisesRegex(InvalidInput, "must not be empty"):
            self.d.add_user("alice", "")
        with self.assertRaisesRegex(InvalidInput, "too long"):
            self.d.add_user("alice", "x" * 5000)
        self.assertEqual(self.d.list_users(), [])

    def test_password_stored_as_argon2id(self) -> None:
        self.d.add_user("alice", "correct horse")
        [(stored,)] = self.raw("SELECT password_hash FROM accounts")
        self.assertTrue(stored.startswith("$argon2id$"), stored)
        self.assertNotIn("correct horse", stored)

    def test_check_password(self) -> None:
        alice = self.d.add_user("alice", "correct horse")
        self.assertEqual(self.d.check_password("alice", "correct horse"), alice)
        self.assertIsNone(self.d.check_password("alice", "wrong"))
        self.assertIsNone(self.d.check_password("alice", ""))
        self.assertIsNone(self.d.check_password("ALICE", "correct horse"))

    def test_unknown_name_costs_one_verification_against_a_dummy(self) -> None:
        self.d.add_user("alice", "pw")
        [(stored,)] = self.raw("SELECT password_hash FROM accounts")
        self.hasher.verifications.clear()
        self.assertIsNone(self.d.check_password("nobody", "pw"))
        self.assertIsNone(self.d.check_password("not a valid name!", "pw"))
        self.assertIsNone(self.d.check_password("alice", "wrong"))
        self.assertEqual(len(self.hasher.verifications), 3)
        dummy = self.hasher.verifications[0]
        self.assertTrue(dummy.startswith("$argon2id$"))
        self.assertNotEqual(dummy, stored)
        self.assertEqual(self.hasher.verifications[1], dummy)
        self.assertEqual(self.hasher.verifications[2], stored)

    def test_rehash_when_parameters_change(self) -> None:
        self.d.add_user("alice", "pw")
        [(old,)] = self.raw("SELECT password_hash FROM accounts")
        self.assertIn("m=1024,t=1,p=1", old)
        counter = self.d.change_counter()
        stronger = self.open(PasswordHasher(time_cost=2, memory_cost=2048, parallelism=1))
        self.assertEqual(stronger.check_password("alice", "pw"), Account(1, "alice"))
        [(new,)] = self.raw("SELECT password_hash FROM accounts")
        self.assertIn("m=2048,t=2,p=1", new)
        self.assertEqual(self.d.change_counter(), counter, "a rehash changes no decision")
        self.assertEqual(self.d.check_password("alice", "pw"), Account(1, "alice"))

    def test_default_parameters_verify(self) -> None:
        strong = self.open(PasswordHasher())
        alice = strong.add_user("alice", "pw")
        self.assertEqual(strong.check_password("alice", "pw"), alice)
        self.assertIsNone(strong.check_password("alice", "pW"))

    def test_set_password_ends_sessions_keeps_tokens(self) -> None:
        alice = self.d.add_user("alice", "old")
        bob = self.d.add_user("bob", "pw")
        session = self.d.create_session(alice.id, 3600)
        bobs = self.d.create_session(bob.id, 3600)
        _, token = self.d.create_token("alice")
        self.d.set_password("alice", "new")
        self.assertIsNone(self.d.check_password("alice", "old"))
        self.assertEqual(self.d.check_password("alice", "new"), alice)
        self.assertIsNone(self.d.account_for_session(session))
        self.assertEqual(self.d.account_for_session(bobs), bob)
        self.assertEqual(self.d.account_for_token(token), alice)

    def test_set_password_unknown_user(self) -> None:
        with self.assertRaisesRegex(NotFound, "no user named 'carol'"):
            self.d.set_password("carol", "pw")
        with self.assertRaises(InvalidInput):
            self.d.set_password("carol", "")

    def test_remove_user_takes_sessions_tokens_collaborations(self) -> None:
        alice = self.d.add_user("alice", "pw")
        bob = self.d.add_user("bob", "pw")
        self.d.add_project("alice", project_id=PID)
        self.d.add_collaborator(PID, "bob")
        session = self.d.create_session(bob.id, 3600)
        _, token = self.d.create_token("bob")
        self.d.remove_user("bob")
        self.assertEqual(self.d.list_users(), [alice])
        self.assertIsNone(self.d.account_for_session(session))
        self.assertIsNone(self.d.account_for_token(token))
        self.assertIsNone(self.d.check_password("bob", "pw"))
        project = self.d.get_project(PID)
        assert project is not None
        self.assertEqual(project.collaborators, ())
        self.assertEqual(self.raw("SELECT * FROM sessions"), [])
        self.assertEqual(self.raw("SELECT * FROM api_tokens"), [])

    def test_remove_user_who_owns_projects_is_refused(self) -> None:
        self.d.add_user("alice", "pw")
        self.d.add_project("alice", project_id=PID)
        before = self.snapshot()
        with self.assertRaisesRegex(Conflict, f"'alice' still owns 1 project\\(s\\): {PID}"):
            self.d.remove_user("alice")
        self.assertEqual(self.snapshot(), before)
        self.d.remove_project(PID)
        self.d.remove_user("alice")
        self.assertEqual(self.d.list_users(), [])

    def test_remove_unknown_user(self) -> None:
        with self.assertRaisesRegex(NotFound, "no user named 'carol'"):
            self.d.remove_user("carol")

    def test_removed_name_can_be_reused_with_a_new_id(self) -> None:
        first = self.d.add_user("alice", "pw")
        self.d.remove_user("alice")
        second = self.d.add_user("alice", "pw")
        self.assertNotEqual(first.id, second.id, "ids are never reused")


class OIDCAccountTests(SyncMixin):
    """Accounts bound to an OpenID provider's subject, and the sign-in policy (oidc_sign_in)."""

    def test_first_sign_in_creates_a_bound_account_without_password(self) -> None:
        carol = self.d.oidc_sign_in("sub-1", "carol", "carol@example.org")
        self.assertEqual((carol.name, carol.oidc_subject, carol.email),
                         ("carol", "sub-1", "carol@example.org"))  # fmt: skip
        self.assertEqual(self.d.account_for_oidc_subject("sub-1"), carol)
        [listed] = self.d.list_users()
        self.assertEqual((listed.oidc_subject, listed.email), ("sub-1", "carol@example.org"))
        # No password reaches it, and checking one still costs one Argon2 verification.
        before = len(self.hasher.verifications)
        self.assertIsNone(self.d.check_password("carol", ""))
        self.assertIsNone(self.d.check_password("carol", "anything"))
        self.assertEqual(len(self.hasher.verifications), before + 1)

    def test_later_sign_ins_go_by_subject_and_refresh_the_email(self) -> None:
        carol = self.d.oidc_sign_in("sub-1", "carol", "carol@example.org")
        again = self.d.oidc_sign_in("sub-1", "someone-else", "c2@example.org")
        self.assertEqual((again.id, again.name, again.email), (carol.id, "carol", "c2@example.org"))
        self.assertEqual([a.name for a in self.d.list_users()], ["carol"])

    def test_never_takes_over_an_account_by_name(self) -> None:
        self.d.add_user("alice", "alice-password")
        self.d.oidc_sign_in("sub-2", "bob", None)
        before = self.snapshot()
        for name in ("alice", "ALICE", "bob"):
            with self.assertRaisesRegex(Conflict, "already exists and is not bound"):
                self.d.oidc_sign_in("sub-evil", name, None)
        self.assertEqual(self.snapshot(), before)

    def test_pre_bound_and_linked_accounts(self) -> None:
        dave = self.d.add_user("dave", None, oidc_subject="sub-dave")
        self.assertEqual(self.d.oidc_sign_in("sub-dave", "whatever", None).id, dave.id)
        with self.assertRaisesRegex(InvalidInput, "needs an OpenID subject"):
            self.d.add_user("erin", None)
        with self.assertRaisesRegex(Conflict, "already bound to 'dave'"):
            self.d.add_user("erin", "pw", oidc_subject="sub-dave")
        alice = self.d.add_user("alice", "alice-password")
        token = self.d.create_session(alice.id, 60)
        linked = self.d.link_oidc_subject("alice", "sub-alice")
        self.assertEqual(linked.oidc_subject, "sub-alice")
        self.assertIsNone(self.d.account_for_session(token))  # linking ends sessions
        self.assertEqual(self.d.oidc_sign_in("sub-alice", "x", None).id, alice.id)
        with self.assertRaisesRegex(Conflict, "already bound to 'alice'"):
            self.d.link_oidc_subject("dave", "sub-alice")
        with self.assertRaisesRegex(Conflict, "has no password"):
            self.d.link_oidc_subject("dave", None)
        self.d.link_oidc_subject("alice", None)
        self.assertIsNone(self.d.account_for_oidc_subject("sub-alice"))
        for bad in ("", "has space", "x" * 256, "tab\there"):
            with self.assertRaises(InvalidInput):
                self.d.link_oidc_subject("alice", bad)

    def test_identity_keys_rotate_once(self) -> None:
        made: list[str] = []

        def make() -> tuple[str, str]:
            made.append(f"k{len(made)}")
            return made[-1], "{}"

        counter = self.d.change_counter()
        self.assertEqual([k[0] for k in self.d.rotate_identity_keys(100, 1000, make)], ["k0"])
        self.assertEqual([k[0] for k in self.d.rotate_identity_keys(100, 1000, make)], ["k0"])
        self.clock.now += 150
        self.assertEqual([k[0] for k in self.d.rotate_identity_keys(100, 1000, make)],
                         ["k0", "k1"])  # fmt: skip
        self.clock.now += 1001
        self.assertEqual([k[0] for k in self.d.rotate_identity_keys(10_000, 1000, make)], ["k1"])
        self.assertEqual([k[0] for k in self.d.identity_keys()], ["k1"])
        # Key upkeep is not a change any cached decision depends on.
        self.assertEqual(self.d.change_counter(), counter)


class TokenTests(SyncMixin):
    def test_create_use_revoke(self) -> None:
        alice = self.d.add_user("alice", "pw")
        token_id, token = self.d.create_token("alice")
        self.assertRegex(token_id, "^[0-9a-f]{16}$")
        self.assertGreaterEqual(len(token), 43)
        self.assertEqual(self.d.account_for_token(token), alice)
        [info] = self.d.list_tokens()
        self.assertEqual((info.id, info.account_name, info.expires), (token_id, "alice", None))
        self.d.revoke_token(token_id)
        self.assertIsNone(self.d.account_for_token(token))
        self.assertEqual(self.d.list_tokens(), [])

    def test_only_the_hash_is_stored(self) -> None:
        self.d.add_user("alice", "pw")
        token_id, token = self.d.create_token("alice")
        rows = self.raw("SELECT id, token_hash FROM api_tokens")
        self.assertEqual(rows, [(token_id, token_hash(token))])
        self.assertNotIn(token, repr(self.snapshot()))

    def test_tokens_are_distinct(self) -> None:
        self.d.add_user("alice", "pw")
        made = {self.d.create_token("alice") for _ in range(5)}
        self.assertEqual(len({t for _, t in made}), 5)
        self.assertEqual(len({i for i, _ in made}), 5)

    def test_expiry(self) -> None:
        alice = self.d.add_user("alice", "pw")
        token_id, token = self.d.create_token("alice", expires_in_days=2)
        [info] = self.d.list_tokens("alice")
        self.assertEqual(info.expires, self.clock.now + 2 * 86400)
        self.clock.advance(2 * 86400 - 1)
        self.assertEqual(self.d.account_for_token(token), alice)
        self.clock.advance(1)
        self.assertIsNone(self.d.account_for_token(token))
        self.assertEqual(self.d.purge_expired(), 1)
        self.assertEqual(self.d.list_tokens(), [])

    def test_unknown_user_and_bad_expiry(self) -> None:
        with self.assertRaisesRegex(NotFound, "no user named 'carol'"):
            self.d.create_token("carol")
        self.d.add_user("alice", "pw")
        for bad in (0, -1, float("nan"), float("inf"), 10**6):
            with self.assertRaisesRegex(InvalidInput, "positive number of days"):
                self.d.create_token("alice", bad)
        self.assertEqual(self.d.list_tokens(), [])

    def test_revoke_unknown_or_malformed(self) -> None:
        with self.assertRaisesRegex(NotFound, "no API token with id '0123456789abcdef'"):
            self.d.revoke_token("0123456789abcdef")
        with self.assertRaisesRegex(InvalidInput, "invalid token id"):
            self.d.revoke_token("'; DROP TABLE accounts; --")

    def test_garbage_tokens_are_unknown(self) -> None:
        self.d.add_user("alice", "pw")
        self.d.create_token("alice")
        for junk in ["", "x", "a" * 10_000, "\x00", "' OR 1=1 --"]:
            self.assertIsNone(self.d.account_for_token(junk))
            self.assertIsNone(self.d.account_for_session(junk))

    def test_list_tokens_of_unknown_user(self) -> None:
        with self.assertRaises(NotFound):
            self.d.list_tokens("carol")


class SessionTests(SyncMixin):
    def test_create_lookup_delete(self) -> None:
        alice = self.d.add_user("alice", "pw")
        session = self.d.create_session(alice.id, 3600)
        self.assertEqual(self.d.account_for_session(session), alice)
        self.assertEqual(self.raw("SELECT token_hash FROM sessions"), [(token_hash(session),)])
        self.d.delete_session(session)
        self.assertIsNone(self.d.account_for_session(session))
        self.d.delete_session(session)  # already gone: ignored
        self.d.delete_session("")

    def test_expiry_and_purge(self) -> None:
        alice = self.d.add_user("alice", "pw")
        short = self.d.create_session(alice.id, 60)
        long = self.d.create_session(alice.id, 3600)
        self.clock.advance(59)
        self.assertEqual(self.d.account_for_session(short), alice)
        self.clock.advance(1)
        self.assertIsNone(self.d.account_for_session(short))
        self.assertEqual(self.d.account_for_session(long), alice)
        self.d.create_session(alice.id, 60)  # purges the expired one on the way
        self.assertEqual(len(self.raw("SELECT * FROM sessions")), 2)
        self.clock.advance(3600)
        self.assertEqual(self.d.purge_expired(), 2)

    def test_unknown_account_and_bad_lifetime(self) -> None:
        with self.assertRaisesRegex(NotFound, "no account with id 99"):
            self.d.create_session(99, 60)
        alice = self.d.add_user("alice", "pw")
        with self.assertRaises(InvalidInput):
            self.d.create_session(alice.id, 0)

    def test_derived_sessions_end_with_their_root(self) -> None:
        alice = self.d.add_user("alice", "pw")
        main = self.d.create_session(alice.id, 3600)
        other = self.d.create_session(alice.id, 3600)
        ticket = self.d.create_session(alice.id, 60, parent=main)
        host = self.d.create_session(alice.id, 3600, parent=ticket)  # the root is still main
        host2 = self.d.create_session(alice.id, 3600, parent=main)
        self.assertEqual(
            sorted(self.raw("SELECT family FROM sessions WHERE family IS NOT NULL")),
            [(token_hash(main),)] * 3,
        )
        # Ending the ticket (redeemed) or one host's session ends only that one.
        self.d.delete_session(ticket)
        self.assertEqual(self.d.account_for_session(host), alice)
        self.d.delete_session(host2)
        self.assertEqual(self.d.account_for_session(host), alice)
        before = self.d.change_counter()
        self.d.delete_session(main)  # signing out on the main host
        self.assertIsNone(self.d.account_for_session(host))
        self.assertIsNone(self.d.account_for_session(main))
        self.assertEqual(self.d.account_for_session(other), alice)  # another sign-in stays
        self.assertGreater(self.d.change_counter(), before)

    def test_a_derived_session_needs_a_live_parent_of_the_same_account(self) -> None:
        alice = self.d.add_user("alice", "pw")
        bob = self.d.add_user("bob", "pw")
        main = self.d.create_session(alice.id, 60)
        for parent in ("", "x" * 10_000, "unknown"):
            with self.assertRaisesRegex(NotFound, "parent session has ended"):
                self.d.create_session(alice.id, 60, parent=parent)
        with self.assertRaisesRegex(NotFound, "parent session has ended"):
            self.d.create_session(bob.id, 60, parent=main)
        self.clock.advance(60)
        with self.assertRaisesRegex(NotFound, "parent session has ended"):
            self.d.create_session(alice.id, 60, parent=main)
        self.assertEqual(len(self.raw("SELECT * FROM sessions")), 1)  # main only: nothing made


class ProjectTests(SyncMixin):
    def setUp(self) -> None:
        super().setUp()
        self.alice = self.d.add_user("alice", "pw")
        self.bob = self.d.add_user("bob", "pw")
        self.carol = self.d.add_user("carol", "pw")

    def test_add_with_defaults(self) -> None:
        project = self.d.add_project("alice")
        self.assertRegex(project.id, "^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-")
        self.assertEqual(
            (project.owner_id, project.owner_name, project.host, project.home, project.title),
            (self.alice.id, "alice", "127.0.0.1", None, ""),
        )
        self.assertEqual(self.d.get_project(project.id), project)
        self.assertEqual(self.d.list_projects(), [project])

    def test_add_with_everything(self) -> None:
        project = self.d.add_project(
            "alice", host="Backend.Example.ORG", home="/srv/p/../q/", project_id=PID, title="Ünï"
        )
        self.assertEqual(
            (project.id, project.host, project.home, project.title),
            (PID, "backend.example.org", "/srv/q", "Ünï"),
        )

    def test_hosts(self) -> None:
        good = {
            "localhost": "localhost",
            "10.1.2.3": "10.1.2.3",
            "::1": "::1",
            "[::1]": "::1",
            "2001:DB8:0:0::1": "2001:db8::1",
            "a-b.c": "a-b.c",
        }
        for given, stored in good.items():
            self.assertEqual(self.d.add_project("alice", host=given).host, stored)
        bad = [
            "",
            "http://x",
            "x:80",
            "x/y",
            "a b",
            "-x",
            "x-",
            "x..y",
            "user@x",
            "1.2.3",
            "999.1.1.1",
            "x" * 64,
            "fe80::1%eth0",
            "x\n",
        ]
        for given in bad:
            with self.assertRaisesRegex(InvalidInput, "invalid host"):
                self.d.add_project("alice", host=given)
        self.assertEqual(len(self.d.list_projects()), len(good))

    def test_bad_home_title_id(self) -> None:
        before = self.snapshot()
        for home in ["relative", "", "~/x", "/a\x00b", "/a\nb"]:
            with self.assertRaisesRegex(InvalidInput, "invalid home"):
                self.d.add_project("alice", home=home)
        for title in ["x" * 201, "a\x1bb", "a\nb", "evil\u202etxt.exe", "zero\u200bwidth"]:
            with self.assertRaisesRegex(InvalidInput, "invalid title"):
                self.d.add_project("alice", title=title)
        for pid in [PID.upper(), "{" + PID + "}", PID.replace("-", ""), "not-a-uuid", PID + " "]:
            with self.assertRaisesRegex(InvalidInput, "invalid project id"):
                self.d.add_project("alice", project_id=pid)
        self.assertEqual(self.snapshot(), before)

    def test_unknown_owner_and_duplicate_id(self) -> None:
        with self.assertRaisesRegex(NotFound, "no user named 'dave'"):
            self.d.add_project("dave")
        self.d.add_project("alice", project_id=PID)
        before = self.snapshot()
        with self.assertRaisesRegex(Conflict, f"a project with id '{PID}' already exists"):
            self.d.add_project("bob", project_id=PID)
        self.assertEqual(self.snapshot(), before)

    def test_set_project(self) -> None:
        self.d.add_project("alice", project_id=PID, home="/srv/a", title="old")
        project = self.d.set_project(PID, host="10.0.0.2")
        self.assertEqual((project.host, project.home, project.title), ("10.0.0.2", "/srv/a", "old"))
        project = self.d.set_project(PID, home="/srv/b", title="new")
        self.assertEqual((project.host, project.home, project.title), ("10.0.0.2", "/srv/b", "new"))
        project = self.d.set_project(PID, home="")
        self.assertIsNone(project.home)
        self.assertEqual(self.d.get_project(PID), project)

    def test_set_project_refusals(self) -> None:
        with self.assertRaisesRegex(NotFound, f"no project with id '{OTHER_PID}'"):
            self.d.set_project(OTHER_PID, title="x")
        self.d.add_project("alice", project_id=PID)
        before = self.snapshot()
        with self.assertRaises(InvalidInput):
            self.d.set_project(PID, title="ok", host="http://evil")
        with self.assertRaises(InvalidInput):
            self.d.set_project(PID.upper(), title="x")
        self.assertEqual(self.snapshot(), before)

    def test_collaborators(self) -> None:
        self.d.add_project("alice", project_id=PID)
        self.d.add_collaborator(PID, "carol")
        self.d.add_collaborator(PID, "bob")
        project = self.d.get_project(PID)
        assert project is not None
        self.assertEqual(project.collaborators, ("bob", "carol"))
        self.d.remove_collaborator(PID, "carol")
        project = self.d.get_project(PID)
        assert project is not None
        self.assertEqual(project.collaborators, ("bob",))

    def test_collaborator_refusals(self) -> None:
        self.d.add_project("alice", project_id=PID)
        self.d.add_collaborator(PID, "bob")
        before = self.snapshot()
        with self.assertRaisesRegex(Conflict, "already a collaborator"):
            self.d.add_collaborator(PID, "bob")
        with self.assertRaisesRegex(Conflict, "'alice' owns project"):
            self.d.add_collaborator(PID, "alice")
        with self.assertRaisesRegex(NotFound, "no user named 'dave'"):
            self.d.add_collaborator(PID, "dave")
        with self.assertRaisesRegex(NotFound, f"no project with id '{OTHER_PID}'"):
            self.d.add_collaborator(OTHER_PID, "bob")
        with self.assertRaisesRegex(NotFound, "'carol' is not a collaborator"):
            self.d.remove_collaborator(PID, "carol")
        with self.assertRaisesRegex(InvalidInput, "invalid project id"):
            self.d.remove_collaborator("x", "bob")
        self.assertEqual(self.snapshot(), before)

    def test_project_for(self) -> None:
        project = self.d.add_project("alice", project_id=PID)
        self.d.add_collaborator(PID, "bob")
        project = self.d.get_project(PID)
        self.assertEqual(self.d.project_for(self.alice.id, PID), project)
        self.assertEqual(self.d.project_for(self.bob.id, PID), project)
        self.assertIsNone(self.d.project_for(self.carol.id, PID))
        self.assertIsNone(self.d.project_for(self.alice.id, OTHER_PID))
        self.assertIsNone(self.d.project_for(self.alice.id, PID.upper()))
        self.assertIsNone(self.d.project_for(self.alice.id, "../etc"))

    def test_who_shares_a_host(self) -> None:
        """Computed on every read: the same host text, and how many other projects there are
        (on this machine a project is alone only in a directory of one)."""
        ids = {}
        for name, host in (("a", "127.0.0.1"), ("b", "localhost"), ("c", "10.0.0.9"),
                           ("d", "10.0.0.9"), ("e", "10.0.0.8")):  # fmt: skip
            ids[name] = self.d.add_project("alice", host=host, home=None).id

        def flags(name: str) -> tuple[bool, int]:
            project = self.d.get_project(ids[name])
            assert project is not None
            return project.shares_host, project.other_projects

        self.assertEqual(flags("a"), (False, 4))
        self.assertEqual(flags("c"), (True, 4), "10.0.0.9 twice")
        self.assertEqual(flags("e"), (False, 4))
        listed = {p.id: (p.shares_host, p.other_projects) for p in self.d.list_projects()}
        self.assertEqual(listed[ids["d"]], (True, 4))
        for name in ("a", "c", "d", "e"):
            self.d.remove_project(ids[name])
        self.assertEqual(flags("b"), (False, 0), "the directory's only project")

    def test_ports_and_socket_fields_round_trip(self) -> None:
        made = self.d.add_project(
            "alice", ports="9000, 8000-8099,8100", socket_dir="/run/x/", socket_owner=1000
        )
        self.assertEqual(str(made.ports), "8000-8100,9000")
        self.assertEqual((made.socket_dir, made.socket_owner), ("/run/x", 1000))
        changed = self.d.set_project(made.id, ports="default", socket_dir="", socket_owner="")
        self.assertEqual((changed.ports, changed.socket_dir, changed.socket_owner), (None,) * 3)
        with self.assertRaises(InvalidInput):
            self.d.set_project(made.id, ports="1-70000")

    def test_projects_for_and_list(self) -> None:
        first = self.d.add_project("alice", project_id=PID)
        second = self.d.add_project("bob", project_id=OTHER_PID)
        self.d.add_collaborator(OTHER_PID, "alice")
        second = self.d.get_project(OTHER_PID)
        assert second is not None
        self.assertFalse(first.shares_host, "alone on 127.0.0.1 when it was made")
        first = self.d.get_project(PID)  # now both share 127.0.0.1 (computed on each read)
        assert first is not None and first.shares_host and second.shares_host
        self.assertEqual(self.d.projects_for(self.alice.id), [first, second])
        self.assertEqual(self.d.projects_for(self.bob.id), [second])
        self.assertEqual(self.d.projects_for(self.carol.id), [])
        self.assertEqual(self.d.list_projects(), [first, second])

    def test_remove_project(self) -> None:
        self.d.add_project("alice", project_id=PID)
        self.d.add_collaborator(PID, "bob")
        self.d.remove_project(PID)
        self.assertIsNone(self.d.get_project(PID))
        self.assertIsNone(self.d.project_for(self.bob.id, PID))
        self.assertEqual(self.raw("SELECT * FROM collaborators"), [])
        with self.assertRaisesRegex(NotFound, f"no project with id '{PID}'"):
            self.d.remove_project(PID)
        with self.assertRaises(InvalidInput):
            self.d.remove_project("nope")


class SignInFailureTests(SyncMixin):
    """Issue #11 item 1: the sign-in limiter's counters, shared by every process on a
    directory (two SyncDirectory objects stand for two proxy processes)."""

    def test_counted_together_by_every_process(self) -> None:
        one, two = self.d, self.open()
        checks = [("name:alice", 3, 600.0), ("address:10.0.0.1", 5, 600.0)]
        counter = one.change_counter()
        self.assertIsNone(one.signin_attempt(checks)[0])
        self.assertIsNone(two.signin_attempt([("name:alice", 3, 600.0)])[0])
        self.clock.now += 10
        self.assertIsNone(one.signin_attempt(checks)[0])
        self.clock.now += 10
        wait, _ = two.signin_attempt([("name:alice", 3, 600.0), ("address:10.0.0.9", 5, 600.0)])
        self.assertEqual(wait, 580.0)  # the oldest of the three leaves the window then
        # A refused attempt records nothing: the other address is still clean.
        self.assertIsNone(one.signin_attempt([("address:10.0.0.9", 1, 600.0)])[0])
        # Failed sign-ins change nobody's access: no cache anywhere is dropped for them.
        self.assertEqual(one.change_counter(), counter)

    def test_forgive_reset_and_expiry(self) -> None:
        d = self.d
        wait, at = d.signin_attempt([("address:a", 2, 60.0), ("name:n", 2, 60.0)])
        self.assertIsNone(wait)
        d.signin_forgive("address:a", at)  # the password was right
        d.signin_reset("name:n")
        self.assertEqual(self.raw("SELECT limit_key FROM signin_failures"), [])
        for _ in range(2):
            self.assertIsNone(d.signin_attempt([("device:x", 2, 60.0)])[0])
        self.assertIsNotNone(d.signin_attempt([("device:x", 2, 60.0)])[0])
        self.clock.now += 61
        self.assertIsNone(d.signin_attempt([("device:x", 2, 60.0)])[0])
        self.clock.now += 3601
        d.signin_attempt([("device:y", 2, 60.0)])
        self.assertEqual(
            [r[0] for r in self.raw("SELECT limit_key FROM signin_failures")], ["device:y"]
        )


class SharedStateTests(SyncMixin):
    """Issue #10: the form key and single-use values, shared by every process on a directory
    (two SyncDirectory objects stand for two proxy processes, threads for ones racing)."""

    def test_one_secret_for_every_process_made_once(self) -> None:
        one, two = self.d, self.open()
        counter = one.change_counter()
        made: list[str] = []

        def make(value: str) -> Callable[[], str]:
            def maker() -> str:
                made.append(value)
                return value

            return maker

        self.assertEqual(one.shared_secret("form-key", make("aa" * 32)), "aa" * 32)
        self.assertEqual(two.shared_secret("form-key", make("bb" * 32)), "aa" * 32)
        self.assertEqual(made, ["aa" * 32])  # the second process did not even make one
        self.assertEqual(two.shared_secret("other", make("cc" * 32)), "cc" * 32)
        self.assertEqual(one.change_counter(), counter)

    def test_processes_starting_at_once_agree(self) -> None:
        directories = [self.open() for _ in range(6)]
        barrier = threading.Barrier(len(directories))
        results: list[str] = []

        def start(d: SyncDirectory, value: str) -> None:
            barrier.wait()
            results.append(d.shared_secret("form-key", lambda: value))

        threads = [
            threading.Thread(target=start, args=(d, f"{i:02x}" * 32))
            for i, d in enumerate(directories)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual(len(results), len(directories))
        self.assertEqual(len(set(results)), 1, results)

    def test_used_once_by_every_process(self) -> None:
        one, two = self.d, self.open()
        counter = one.change_counter()
        expires = self.clock.now + 120
        self.assertTrue(one.use_once("hop-ticket", "t1", expires))
        self.assertFalse(two.use_once("hop-ticket", "t1", expires))
        self.assertFalse(one.use_once("hop-ticket", "t1", expires))
        # Another purpose, another value: their own.
        self.assertTrue(two.use_once("oidc-state", "t1", expires))
        self.assertTrue(two.use_once("hop-ticket", "t2", expires))
        # Only digests are kept.
        stored = [r[0] for r in self.raw("SELECT digest FROM used_once")]
        self.assertNotIn("t1", stored)
        self.assertEqual(one.change_counter(), counter)
        # Swept once expired (the caller refuses the expired value itself by then).
        self.clock.now += 121
        self.assertTrue(one.use_once("hop-ticket", "t3", self.clock.now + 120))
        self.assertEqual(len(self.raw("SELECT digest FROM used_once")), 1)

    def test_a_race_has_one_winner(self) -> None:
        directories = [self.open() for _ in range(6)]
        barrier = threading.Barrier(len(directories))
        results: list[bool] = []

        def claim(d: SyncDirectory) -> None:
            barrier.wait()
            results.append(d.use_once("hop-ticket", "raced", self.clock.now + 60))

        threads = [threading.Thread(target=claim, args=(d,)) for d in directories]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual(sorted(results), [False] * (len(directories) - 1) + [True])


class ChangeCounterTests(SyncMixin):
    def test_every_write_bumps_reads_do_not(self) -> None:
        d = self.d
        alice = d.add_user("alice", "pw")
        d.add_user("bob", "pw")
        steps = [
            lambda: d.set_password("alice", "pw2"),
            lambda: d.create_token("alice"),
            lambda: d.revoke_token(d.list_tokens()[0].id),
            lambda: d.create_session(alice.id, 60),
            lambda: d.delete_session("whatever"),
            lambda: d.add_project("alice", project_id=PID),
            lambda: d.set_project(PID, title="t"),
            lambda: d.add_collaborator(PID, "bob"),
            lambda: d.remove_collaborator(PID, "bob"),
            lambda: d.remove_project(PID),
            lambda: d.remove_user("bob"),
            lambda: d.purge_expired(),
        ]
        reads = [
            d.list_users,
            d.list_projects,
            d.list_tokens,
            d.ping,
            lambda: d.check_password("alice", "pw2"),
            lambda: d.project_for(alice.id, PID),
            lambda: d.projects_for(alice.id),
            lambda: d.account_for_token("x"),
            lambda: d.account_for_session("x"),
            lambda: d.get_project(PID),
        ]
        for step in steps:
            before = d.change_counter()
            step()
            self.assertEqual(d.change_counter(), before + 1)
            for read in reads:
                read()
            self.assertEqual(d.change_counter(), before + 1)

    def test_refused_writes_do_not_bump(self) -> None:
        self.d.add_user("alice", "pw")
        before = self.d.change_counter()
        with self.assertRaises(Conflict):
            self.d.add_user("alice", "pw")
        with self.assertRaises(NotFound):
            self.d.remove_user("bob")
        self.assertEqual(self.d.change_counter(), before)

    def test_second_connection_sees_bumps(self) -> None:
        other = self.open()
        self.assertEqual(other.change_counter(), 0)
        self.d.add_user("alice", "pw")
        self.assertEqual(other.change_counter(), 1)
        other.add_user("bob", "pw")
        self.assertEqual(self.d.change_counter(), 2)
        self.assertEqual([a.name for a in self.d.list_users()], ["alice", "bob"])


class AsyncTests:
    """The Deferred face: answers come back through the reactor from a worker thread."""

    new_database_url: Any

    def setUp(self) -> None:
        self.url = self.new_database_url()
        self.clock = FakeClock()
        self.directory = open_directory(self.url, reactor, hasher=FAST_HASHER, clock=self.clock)
        self.addCleanup(self.directory.close)  # type: ignore[attr-defined]

    @defer.inlineCallbacks
    def test_calls_return_unfired_deferreds_and_run_off_the_reactor_thread(self):  # type: ignore[no-untyped-def]
        seen: list[threading.Thread] = []
        original = self.directory.sync.list_users

        def spy() -> list[Account]:
            seen.append(threading.current_thread())
            return original()

        self.directory.sync.list_users = spy  # type: ignore[method-assign]
        d = self.directory.list_users()
        self.assertFalse(d.called, "the reactor thread must not wait for the database")
        self.assertEqual((yield d), [])
        self.assertEqual(len(seen), 1)
        self.assertIsNot(seen[0], threading.main_thread())
        d = self.directory.check_password("alice", "pw")
        self.assertFalse(d.called, "Argon2 must not run on the reactor thread")
        self.assertIsNone((yield d))

    @defer.inlineCallbacks
    def test_every_method(self):  # type: ignore[no-untyped-def]
        d: Directory = self.directory
        yield d.ping()
        self.assertEqual((yield d.change_counter()), 0)
        alice = yield d.add_user("alice", "pw")
        bob = yield d.add_user("bob", "pw")
        self.assertEqual((yield d.list_users()), [alice, bob])
        self.assertEqual((yield d.get_user("bob")), bob)
        self.assertEqual((yield d.check_password("alice", "pw")), alice)
        yield d.set_password("alice", "pw2")
        self.assertIsNone((yield d.check_password("alice", "pw")))
        token_id, token = yield d.create_token("alice", 1)
        self.assertEqual((yield d.account_for_token(token)), alice)
        self.assertEqual([t.id for t in (yield d.list_tokens())], [token_id])
        yield d.revoke_token(token_id)
        self.assertIsNone((yield d.account_for_token(token)))
        session = yield d.create_session(alice.id, 60)
        self.assertEqual((yield d.account_for_session(session)), alice)
        yield d.delete_session(session)
        self.assertIsNone((yield d.account_for_session(session)))
        project = yield d.add_project("alice", host="::1", home="/srv", project_id=PID, title="t")
        self.assertEqual(project.host, "::1")
        project = yield d.set_project(PID, title="u")
        self.assertEqual(project.title, "u")
        yield d.add_collaborator(PID, "bob")
        project = yield d.get_project(PID)
        self.assertEqual(project.collaborators, ("bob",))
        self.assertEqual((yield d.project_for(bob.id, PID)), project)
        self.assertEqual((yield d.projects_for(bob.id)), [project])
        self.assertEqual((yield d.list_projects()), [project])
        yield d.remove_collaborator(PID, "bob")
        self.assertIsNone((yield d.project_for(bob.id, PID)))
        yield d.remove_project(PID)
        yield d.remove_user("bob")
        self.clock.advance(120)
        self.assertEqual((yield d.purge_expired()), 0)
        self.assertEqual((yield d.change_counter()), 14)

    @defer.inlineCallbacks
    def test_errors_arrive_as_failures(self):  # type: ignore[no-untyped-def]
        yield self.directory.add_user("alice", "pw")
        with self.assertRaises(Conflict):
            yield self.directory.add_user("alice", "pw")
        with self.assertRaises(NotFound):
            yield self.directory.add_project("nobody")
        with self.assertRaises(InvalidInput):
            yield self.directory.add_project("alice", project_id="NOPE")

    @defer.inlineCallbacks
    def test_close_does_not_block_and_finishes_queued_work(self):  # type: ignore[no-untyped-def]
        release = threading.Event()

        def slow() -> int:
            release.wait(30)
            return self.directory.sync.change_counter()

        in_flight = self.directory._call(slow)
        closing = self.directory.close()
        self.assertFalse(closing.called, "close() must not join the workers on the reactor")
        again = self.directory.close()
        with self.assertRaisesRegex(Unavailable, "closed"):
            yield self.directory.ping()
        release.set()
        self.assertEqual((yield in_flight), 0, "work queued before close() still completes")
        yield closing
        yield again
        self.assertEqual(self.directory.sync._connections, [])

    @defer.inlineCallbacks
    def test_closed_directory_refuses(self):  # type: ignore[no-untyped-def]
        yield self.directory.close()
        with self.assertRaisesRegex(Unavailable, "closed"):
            yield self.directory.ping()
        self.assertFalse(self.directory.pool.started)
        yield self.directory.close()  # twice is fine


class SQLiteAccountTests(SQLiteBackend, AccountTests, unittest.TestCase):
    pass


class PostgresAccountTests(PostgresBackend, AccountTests, unittest.TestCase):
    pass


class SQLiteOIDCAccountTests(SQLiteBackend, OIDCAccountTests, unittest.TestCase):
    pass


class PostgresOIDCAccountTests(PostgresBackend, OIDCAccountTests, unittest.TestCase):
    pass


class SQLiteTokenTests(SQLiteBackend, TokenTests, unittest.TestCase):
    pass


class PostgresTokenTests(PostgresBackend, TokenTests, unittest.TestCase):
    pass


class SQLiteSessionTests(SQLiteBackend, SessionTests, unittest.TestCase):
    pass


class PostgresSessionTests(PostgresBackend, SessionTests, unittest.TestCase):
    pass


class SQLiteProjectTests(SQLiteBackend, ProjectTests, unittest.TestCase):
    pass


class PostgresProjectTests(PostgresBackend, ProjectTests, unittest.TestCase):
    pass


class SQLiteSignInFailureTests(SQLiteBackend, SignInFailureTests, unittest.TestCase):
    pass


class PostgresSignInFailureTests(PostgresBackend, SignInFailureTests, unittest.TestCase):
    pass


class SQLiteSharedStateTests(SQLiteBackend, SharedStateTests, unittest.TestCase):
    pass


class PostgresSharedStateTests(PostgresBackend, SharedStateTests, unittest.TestCase):
    pass


class SQLiteChangeCounterTests(SQLiteBackend, ChangeCounterTests, unittest.TestCase):
    pass


class PostgresChangeCounterTests(PostgresBackend, ChangeCounterTests, unittest.TestCase):
    pass


class SQLiteAsyncTests(SQLiteBackend, AsyncTests, unittest.TestCase):
    pass


class PostgresAsyncTests(PostgresBackend, AsyncTests, unittest.TestCase):
    pass


class PostgresConnectionLossTests(PostgresBackend, unittest.TestCase):
    """Connections cut by the server are replaced; a database that is gone is reported."""

    def setUp(self) -> None:
        self.url = self.new_database_url()
        self.directory = open_directory(self.url, reactor, hasher=FAST_HASHER)
        self.addCleanup(self.directory.close)
        self.dbname = self.url.rsplit("/", 1)[1]

    def kill_connections(self) -> int:
        with _postgres_admin() as conn:
            rows = conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                (self.dbname,),
            ).fetchall()
        return len(rows)

    @defer.inlineCallbacks
    def test_reads_and_writes_survive_a_server_side_disconnect(self):  # type: ignore[no-untyped-def]
        yield self.directory.add_user("alice", "pw")
        self.assertGreater(self.kill_connections(), 0)
        yield self.directory.ping()
        self.assertEqual([a.name for a in (yield self.directory.list_users())], ["alice"])
        self.kill_connections()
        yield self.directory.add_user("bob", "pw")
        self.assertEqual((yield self.directory.change_counter()), 2)

    @defer.inlineCallbacks
    def test_a_vanished_database_is_unavailable(self):  # type: ignore[no-untyped-def]
        yield self.directory.ping()
        with _postgres_admin() as conn:
            conn.execute(f'DROP DATABASE "{self.dbname}" WITH (FORCE)')
        with self.assertRaisesRegex(Unavailable, "does not exist"):
            yield self.directory.ping()
        with self.assertRaises(Unavailable):
            yield self.directory.add_user("carol", "pw")
