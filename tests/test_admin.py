"""The ``cocalcproxy`` admin command: every command, every refusal (exit 1, a clear message on
stderr, nothing changed), run in-process on both backends and as a real subprocess."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from functools import partial
from typing import Any

from twisted.internet import defer, reactor, utils
from twisted.trial import unittest

from cocalcproxy.directory import Account
from cocalcproxy.directory.store import open_directory, open_sync_directory
from cocalcproxy.ops import admin
from tests.directory_support import FAST_HASHER, PostgresBackend, SQLiteBackend

PID = "0b9d1c56-3f4a-4e6b-9a51-2c7d8e9f0a1b"
OTHER_PID = "11111111-2222-4333-8444-555555555555"
UUID_LINE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Result:
    def __init__(self, code: int, out: str, err: str) -> None:
        self.code, self.out, self.err = code, out, err

    @property
    def last_line(self) -> str:
        return self.out.splitlines()[-1]

    def __repr__(self) -> str:
        return f"Result({self.code}, out={self.out!r}, err={self.err!r})"


class TTYlessInput(io.StringIO):
    def isatty(self) -> bool:
        return False


class AdminMixin:
    """In-process runs of admin.main against a fresh database (Argon2 made cheap for speed)."""

    new_database_url: Any

    def setUp(self) -> None:
        self.url = self.new_database_url()
        self.patch(  # type: ignore[attr-defined]
            admin, "open_sync_directory", partial(open_sync_directory, hasher=FAST_HASHER)
        )
        self.d = open_sync_directory(self.url, hasher=FAST_HASHER)
        self.addCleanup(self.d.close)  # type: ignore[attr-defined]

    def cli(self, *argv: str, stdin: str = "", database: bool = True) -> Result:
        out, err = io.StringIO(), io.StringIO()
        args = (["--database", self.url] if database else []) + list(argv)
        code = admin.main(args, stdin=TTYlessInput(stdin), stdout=out, stderr=err)
        return Result(code, out.getvalue(), err.getvalue())

    def ok(self, *argv: str, stdin: str = "") -> Result:
        result = self.cli(*argv, stdin=stdin)
        self.assertEqual((result.code, result.err), (0, ""), result)  # type: ignore[attr-defined]
        return result

    def snapshot(self) -> tuple[Any, ...]:
        d = self.d
        return (
            d._read(lambda tx: tx.all("SELECT * FROM accounts ORDER BY id")),
            d._read(lambda tx: tx.all("SELECT * FROM projects ORDER BY id")),
            d._read(lambda tx: tx.all("SELECT * FROM collaborators ORDER BY project_id")),
            d._read(lambda tx: tx.all("SELECT * FROM sessions ORDER BY token_hash")),
            d._read(lambda tx: tx.all("SELECT * FROM api_tokens ORDER BY id")),
            d._read(lambda tx: tx.all("SELECT * FROM admin_tokens ORDER BY id")),
            d._read(lambda tx: tx.all("SELECT * FROM port_shares ORDER BY project_id, port")),
            d.change_counter(),
        )

    def refused(self, message: str, *argv: str, stdin: str = "") -> Result:
        """Run a command that must fail: exit 1, the message on stderr, nothing on stdout,
        and the database exactly as before."""
        before = self.snapshot()
        result = self.cli(*argv, stdin=stdin)
        self.assertEqual(result.code, 1, result)  # type: ignore[attr-defined]
        self.assertRegex(result.err, message)  # type: ignore[attr-defined]
        self.assertEqual(result.out, "", result)  # type: ignore[attr-defined]
        self.assertNotIn("Traceback", result.err)  # type: ignore[attr-defined]
        self.assertEqual(self.snapshot(), before)  # type: ignore[attr-defined]
        return result


class UserCommandTests(AdminMixin):
    def test_user_add_generates_a_password(self) -> None:
        result = self.ok("user", "add", "alice")
        name, password = result.out.splitlines()
        self.assertEqual(name, "alice")
        self.assertRegex(password, r"^[A-Za-z0-9_-]{24}$")
        self.assertEqual(self.d.check_password("alice", password), Account(1, "alice"))
        other = self.ok("user", "add", "bob").last_line
        self.assertNotEqual(other, password)

    def test_user_add_password_stdin(self) -> None:
        result = self.ok("user", "add", "alice", "--password-stdin", stdin="s3cret pass\n")
        self.assertEqual(result.out, "alice\n")
        self.assertNotIn("s3cret", result.out + result.err)
        self.assertEqual(self.d.check_password("alice", "s3cret pass"), Account(1, "alice"))
        self.ok("user", "add", "bob", "--password-stdin", stdin="windows\r\nsecond line\n")
        self.assertEqual(self.d.check_password("bob", "windows"), Account(2, "bob"))
        self.ok("user", "add", "carol", "--password-stdin", stdin="no newline")
        self.assertEqual(self.d.check_password("carol", "no newline"), Account(3, "carol"))

    def test_user_add_json(self) -> None:
        doc = json.loads(self.ok("--json", "user", "add", "alice").out)
        self.assertEqual(set(doc), {"id", "name", "password"})
        self.assertEqual(self.d.check_password("alice", doc["password"]), Account(1, "alice"))
        doc = json.loads(
            self.ok("user", "add", "bob", "--password-stdin", "--json", stdin="x\n").out
        )
        self.assertEqual(doc, {"id": 2, "name": "bob"})

    def test_user_add_refusals(self) -> None:
        self.ok("user", "add", "alice")
        self.refused("a user named 'alice' already exists", "user", "add", "alice")
        self.refused("case-insensitive", "user", "add", "ALICE")
        self.refused("invalid user name", "user", "add", "bad name")
        self.refused("invalid user name", "user", "add", "--", "-dash")
        self.refused("empty password is refused", "user", "add", "bob", "--password-stdin")
        self.refused(
            "empty password is refused", "user", "add", "bob", "--password-stdin", stdin="\n"
        )

    def test_user_passwd(self) -> None:
        alice = self.d.add_user("alice", "old")
        session = self.d.create_session(alice.id, 3600)
        result = self.ok("user", "passwd", "alice", "--password-stdin", stdin="new one\n")
        self.assertEqual(result.out, "")
        self.assertEqual(self.d.check_password("alice", "new one"), alice)
        self.assertIsNone(self.d.check_password("alice", "old"))
        self.assertIsNone(self.d.account_for_session(session), "sessions end")
        self.refused(
            "no user named 'carol'", "user", "passwd", "carol", "--password-stdin", stdin="x\n"
        )
        self.refused("required: --password-stdin", "user", "passwd", "alice")
        self.refused("empty password", "user", "passwd", "alice", "--password-stdin", stdin="\n")
        doc = json.loads(
            self.ok("user", "passwd", "alice", "--password-stdin", "--json", stdin="z\n").out
        )
        self.assertEqual(doc, {"name": "alice"})

    def test_user_remove(self) -> None:
        self.d.add_user("alice", "pw")
        bob = self.d.add_user("bob", "pw")
        self.d.add_project("alice", project_id=PID)
        self.d.add_collaborator(PID, "bob")
        self.d.create_session(bob.id, 60)
        _, token = self.d.create_token("bob")
        self.assertEqual(self.ok("user", "remove", "bob").out, "")
        self.assertEqual([a.name for a in self.d.list_users()], ["alice"])
        self.assertIsNone(self.d.account_for_token(token))
        self.refused("no user named 'bob'", "user", "remove", "bob")
        self.refused(f"'alice' still owns 1 project\\(s\\): {PID}", "user", "remove", "alice")
        self.ok("project", "remove", PID)
        doc = json.loads(self.ok("--json", "user", "remove", "alice").out)
        self.assertEqual(doc, {"removed": "alice"})

    def test_user_list(self) -> None:
        self.assertEqual(self.ok("user", "list").out, "")
        self.d.add_user("bob", "pw")
        self.d.add_user("alice", "pw")
        self.assertEqual(self.ok("user", "list").out, "alice\nbob\n")
        self.assertEqual(
            json.loads(self.ok("user", "list", "--json").out),
            [{"id": 2, "name": "alice"}, {"id": 1, "name": "bob"}],
        )

    def test_user_add_with_oidc_subject_link_and_list(self) -> None:
        # Without --password-stdin: no password is generated, the account is bound.
        result = self.ok("user", "add", "carol", "--oidc-subject", "sub|carol")
        self.assertEqual(result.out, "carol\n")
        carol = self.d.account_for_oidc_subject("sub|carol")
        assert carol is not None
        self.assertEqual(carol.name, "carol")
        self.assertIsNone(self.d.check_password("carol", ""))
        # With it, both.
        self.ok("user", "add", "dave", "--oidc-subject", "sub-dave", "--password-stdin",
                stdin="dave-password\n")  # fmt: skip
        self.assertIsNotNone(self.d.check_password("dave", "dave-password"))
        self.ok("user", "add", "alice", "--password-stdin", stdin="pw\n")
        self.refused(
            "already bound to 'carol'", "user", "add", "erin", "--oidc-subject", "sub|carol"
        )
        self.refused("invalid OpenID subject", "user", "add", "erin", "--oidc-subject", "a b")
        self.assertEqual(
            self.ok("user", "list").out, "alice\ncarol\toidc=sub|carol\ndave\toidc=sub-dave\n"
        )
        doc = json.loads(self.ok("--json", "user", "link", "alice", "--oidc-subject", "sub-a").out)
        self.assertEqual(doc, {"id": 3, "name": "alice", "oidc_subject": "sub-a"})
        listed = json.loads(self.ok("user", "list", "--json").out)
        self.assertEqual(
            [u.get("oidc_subject") for u in listed], ["sub-a", "sub|carol", "sub-dave"]
        )
        self.assertEqual(self.ok("user", "unlink", "alice").out, "")
        self.refused("has no password", "user", "unlink", "carol")
        self.refused("no user named 'zed'", "user", "link", "zed", "--oidc-subject", "s")


class TokenCommandTests(AdminMixin):
    def test_token_create_and_revoke(self) -> None:
        alice = self.d.add_user("alice", "pw")
        result = self.ok("token", "create", "alice")
        token_id, token = result.out.splitlines()
        self.assertRegex(token_id, "^[0-9a-f]{16}$")
        self.assertEqual(self.d.account_for_token(token), alice)
        listed = self.ok("token", "list").out
        self.assertIn(f"{token_id}\talice\texpires=never", listed)
        self.assertNotIn(token, listed)
        self.assertEqual(self.ok("token", "revoke", token_id).out, "")
        self.assertIsNone(self.d.account_for_token(token))
        self.refused(f"no API token with id '{token_id}'", "token", "revoke", token_id)
        self.refused("invalid token id", "token", "revoke", "not-an-id")

    def test_token_expiry_and_json(self) -> None:
        self.d.add_user("alice", "pw")
        doc = json.loads(self.ok("--json", "token", "create", "alice", "--expires-in", "1.5").out)
        self.assertEqual(set(doc), {"id", "user", "token", "created", "expires"})
        self.assertAlmostEqual(doc["expires"] - doc["created"], 1.5 * 86400, places=3)
        self.assertEqual(self.d.account_for_token(doc["token"]), Account(1, "alice"))
        [listed] = json.loads(self.ok("token", "list", "alice", "--json").out)
        self.assertEqual(listed["id"], doc["id"])
        self.assertNotIn("token", listed)
        self.assertEqual(
            json.loads(self.ok("--json", "token", "revoke", doc["id"]).out), {"revoked": doc["id"]}
        )

    def test_token_refusals(self) -> None:
        self.d.add_user("alice", "pw")
        self.refused("no user named 'carol'", "token", "create", "carol")
        self.refused("positive number of days", "token", "create", "alice", "--expires-in", "0")
        self.refused("not a number of days", "token", "create", "alice", "--expires-in", "soon")
        self.refused("no user named 'carol'", "token", "list", "carol")


class ProjectCommandTests(AdminMixin):
    def setUp(self) -> None:
        super().setUp()
        self.d.add_user("alice", "pw")
        self.d.add_user("bob", "pw")

    def test_project_add_prints_the_id_alone(self) -> None:
        result = self.ok("project", "add", "--owner", "alice")
        self.assertEqual(len(result.out.splitlines()), 1)
        pid = result.last_line
        self.assertRegex(pid, UUID_LINE)
        project = self.d.get_project(pid)
        assert project is not None
        self.assertEqual(
            (project.owner_name, project.host, project.home), ("alice", "127.0.0.1", None)
        )

    def test_ports_and_sockets_normalised_listed_and_cleared(self) -> None:
        self.ok("project", "add", "--owner", "alice", "--id", PID, "--ports", "8888, 8000-8099")
        doc = json.loads(self.ok("project", "list", "--json").out)
        self.assertEqual(doc[0]["ports"], "8000-8099,8888")
        self.assertIn("\tports=8000-8099,8888\tsockets=-\t", self.ok("project", "list").out)
        doc = json.loads(
            self.ok(
                "project", "set", PID, "--socket-dir", "/run//p/", "--socket-owner", "1000",
                "--ports", "none", "--json",
            ).out
        )  # fmt: skip
        self.assertEqual(
            (doc["ports"], doc["socket_dir"], doc["socket_owner"]), ("none", "/run/p", 1000)
        )
        self.assertIn("\tports=none\tsockets=/run/p\t", self.ok("project", "list").out)
        self.ok(
            "project", "set", PID, "--ports", "default", "--socket-dir", "", "--socket-owner", ""
        )
        project = self.d.get_project(PID)
        assert project is not None
        self.assertEqual((project.ports, project.socket_dir, project.socket_owner), (None,) * 3)

    def test_port_and_socket_refusals(self) -> None:
        self.ok("project", "add", "--owner", "alice", "--id", PID)
        for bad, message in (
            ("80000", "invalid --ports: invalid port in '80000'"),
            ("90-80", "invalid --ports: invalid range '90-80'"),
            ("", "invalid --ports: empty port list"),
            ("http", "invalid --ports: invalid port list item 'http'"),
        ):
            result = self.refused(message, "project", "set", PID, "--ports", bad)
            self.assertEqual(len(result.err.strip().splitlines()), 1, result)
        self.refused("invalid socket folder 'rel'", "project", "set", PID, "--socket-dir", "rel")
        self.refused("invalid socket owner '-5'", "project", "set", PID, "--socket-owner=-5")
        self.refused("invalid --ports", "project", "add", "--owner", "bob", "--ports", "0")

    def test_overlapping_sets_on_one_host_warn(self) -> None:
        self.ok("project", "add", "--owner", "alice", "--id", PID, "--ports", "8000-8009")
        result = self.cli("project", "add", "--owner", "bob", "--id", OTHER_PID, "--host",
                          "localhost", "--ports", "8005-8020")  # fmt: skip
        self.assertEqual(result.code, 0, result)
        self.assertIn(f"warning: ports 8005-8009 of project {OTHER_PID} are also", result.err)
        self.assertIn(PID, result.err)
        self.assertEqual(result.last_line, OTHER_PID)
        quiet = self.cli("project", "set", OTHER_PID, "--ports", "8010-8020")
        self.assertEqual((quiet.code, quiet.err), (0, ""))
        elsewhere = self.cli("project", "set", OTHER_PID, "--host", "10.0.0.9", "--ports", "8000")
        self.assertEqual((elsewhere.code, elsewhere.err), (0, ""), "another host: no warning")

    def test_project_add_everything(self) -> None:
        home = os.path.abspath(self.mktemp())
        os.makedirs(home)
        result = self.ok(
            "project", "add", "--owner", "alice", "--host", "10.1.2.3", "--home", home,
            "--id", PID, "--title", "My project",
        )  # fmt: skip
        self.assertEqual(result.out, PID + "\n")
        doc = json.loads(
            self.ok("project", "add", "--owner", "bob", "--id", OTHER_PID, "--json").out
        )
        self.assertEqual(
            doc,
            {
                "id": OTHER_PID,
                "owner": "bob",
                "host": "127.0.0.1",
                "home": None,
                "title": "",
                "collaborators": [],
                "ports": None,
                "socket_dir": None,
                "socket_owner": None,
            },
        )
        project = self.d.get_project(PID)
        assert project is not None
        self.assertEqual(
            (project.host, project.home, project.title), ("10.1.2.3", home, "My project")
        )

    def test_project_add_refusals(self) -> None:
        self.ok("project", "add", "--owner", "alice", "--id", PID)
        self.refused("no user named 'carol'", "project", "add", "--owner", "carol")
        self.refused("required: --owner", "project", "add")
        self.refused(
            "invalid project id", "project", "add", "--owner", "alice", "--id", PID.upper()
        )
        self.refused("invalid project id", "project", "add", "--owner", "alice", "--id", "x")
        self.refused("already exists", "project", "add", "--owner", "bob", "--id", PID)
        self.refused(
            "invalid host", "project", "add", "--owner", "alice", "--host", "http://evil.example"
        )
        self.refused("invalid host", "project", "add", "--owner", "alice", "--host", "x:8080")
        self.refused("invalid home", "project", "add", "--owner", "alice", "--home", "rel/path")
        missing = os.path.abspath(self.mktemp())
        self.refused(
            f"--home {missing} does not exist on this machine",
            "project", "add", "--owner", "alice", "--home", missing,
        )  # fmt: skip
        with open(missing, "w") as f:
            f.write("a file")
        self.refused(
            f"--home {missing} is not a folder", "project", "add", "--owner", "alice", "--home",
            missing,
        )  # fmt: skip
        self.refused("invalid title", "project", "add", "--owner", "alice", "--title", "t" * 300)

    def test_project_set(self) -> None:
        self.d.add_project("alice", project_id=PID, home="/srv/a")
        self.assertEqual(
            self.ok("project", "set", PID, "--title", "T", "--host", "h.example").out, ""
        )
        project = self.d.get_project(PID)
        assert project is not None
        self.assertEqual((project.title, project.host, project.home), ("T", "h.example", "/srv/a"))
        doc = json.loads(self.ok("project", "set", PID, "--home", "", "--json").out)
        self.assertIsNone(doc["home"])
        self.refused("nothing to change", "project", "set", PID)
        self.refused(
            f"no project with id '{OTHER_PID}'", "project", "set", OTHER_PID, "--title", "x"
        )
        self.refused("invalid project id", "project", "set", "nope", "--title", "x")
        self.refused("invalid host", "project", "set", PID, "--title", "ok", "--host", "a b")
        missing = os.path.abspath(self.mktemp())
        self.refused(f"--home {missing} does not exist", "project", "set", PID, "--home", missing)

    def test_collaborators(self) -> None:
        self.d.add_project("alice", project_id=PID)
        self.assertEqual(self.ok("project", "collaborator", "add", PID, "bob").out, "")
        project = self.d.get_project(PID)
        assert project is not None
        self.assertEqual(project.collaborators, ("bob",))
        self.refused("already a collaborator", "project", "collaborator", "add", PID, "bob")
        self.refused("'alice' owns project", "project", "collaborator", "add", PID, "alice")
        self.refused("no user named 'carol'", "project", "collaborator", "add", PID, "carol")
        self.refused("no project with id", "project", "collaborator", "add", OTHER_PID, "bob")
        self.refused("invalid project id", "project", "collaborator", "add", "1234", "bob")
        doc = json.loads(self.ok("--json", "project", "collaborator", "remove", PID, "bob").out)
        self.assertEqual(doc["collaborators"], [])
        self.refused("'bob' is not a collaborator", "project", "collaborator", "remove", PID, "bob")
        self.refused("invalid choice", "project", "collaborator", "list", PID)

    def test_project_remove_and_list(self) -> None:
        self.d.add_project("alice", project_id=PID, home="/srv/a", title="A")
        self.d.add_project("bob", project_id=OTHER_PID)
        self.d.add_collaborator(PID, "bob")
        lines = self.ok("project", "list").out.splitlines()
        self.assertEqual(
            lines,
            [
                f"{PID}\towner=alice\thost=127.0.0.1\thome=/srv/a\tports=default\tsockets=-\t"
                "collaborators=bob\ttitle=A",
                f"{OTHER_PID}\towner=bob\thost=127.0.0.1\thome=-\tports=default\tsockets=-\t"
                "collaborators=-\ttitle=",
            ],
        )
        docs = json.loads(self.ok("project", "list", "--json").out)
        self.assertEqual([d["id"] for d in docs], [PID, OTHER_PID])
        self.assertEqual(self.ok("project", "remove", PID).out, "")
        self.assertIsNone(self.d.get_project(PID))
        self.refused(f"no project with id '{PID}'", "project", "remove", PID)
        self.refused("invalid project id", "project", "remove", PID.replace("-", ""))


class GlobalOptionTests(AdminMixin):
    def test_usage_errors_exit_1(self) -> None:
        for argv in (
            [],
            ["user"],
            ["frobnicate"],
            ["user", "add"],
            ["user", "add", "a", "b"],
            ["project", "add", "--owner"],
        ):
            self.refused("error", *argv)

    def test_help_exits_0(self) -> None:
        result = self.cli("--help", database=False)
        self.assertEqual(result.code, 0)
        for word in (
            "user",
            "token",
            "project",
            "--state-dir",
            "--database",
            "--json",
            "owns projects",
        ):
            self.assertIn(word, result.out)

    def test_state_dir_and_database_exclusive(self) -> None:
        result = self.cli(
            "--state-dir", "/tmp/x", "--database", self.url, "user", "list", database=False
        )
        self.assertEqual(result.code, 1)
        self.assertIn("not allowed with", result.err)
        result = self.cli(
            "--state-dir", "/tmp/x", "user", "list", "--database", self.url, database=False
        )
        self.assertEqual(result.code, 1)
        self.assertIn("not both", result.err)

    def test_bad_database_urls(self) -> None:
        for url, message in (
            ("mysql://x/y", "unsupported database URL"),
            ("sqlite:relative.db", "must be absolute"),
            ("postgresql://postgres@127.0.0.1:1/none", "cannot connect"),
        ):
            result = self.cli("--database", url, "user", "list", database=False)
            self.assertEqual((result.code, result.out), (1, ""), result)
            self.assertIn(message, result.err)
            self.assertTrue(result.err.startswith("cocalcproxy: "), result.err)

    def test_options_after_the_command(self) -> None:
        self.d.add_user("alice", "pw")
        result = self.cli("user", "list", "--json", "--database", self.url, database=False)
        self.assertEqual((result.code, json.loads(result.out)), (0, [{"id": 1, "name": "alice"}]))


class AdminTokenAndShareCommandTests(AdminMixin):
    def test_admin_tokens(self) -> None:
        made = self.ok("admin-token", "create", "--description", "hub")
        token_id, token = made.out.splitlines()
        self.assertEqual(self.d.admin_token_id(token), token_id)
        self.assertIsNone(self.d.admin_token_id(token + "x"))
        listed = json.loads(self.ok("admin-token", "list", "--json").out)
        self.assertEqual([(t["id"], t["description"]) for t in listed], [(token_id, "hub")])
        self.assertNotIn(token, self.ok("admin-token", "list").out)
        self.ok("admin-token", "revoke", token_id)
        self.assertIsNone(self.d.admin_token_id(token))
        self.refused("no admin token", "admin-token", "revoke", token_id)
        self.refused("expected 16 hex digits", "admin-token", "revoke", "nope")

    def test_share_unshare_list(self) -> None:
        self.d.add_user("alice", "pw")
        self.d.add_project("alice", project_id=PID)
        result = self.cli("project", "share", PID, "8000", "--visibility", "link")
        self.assertEqual(result.code, 0, result)
        self.assertRegex(result.last_line, r"^/\.cocalcproxy/share\?s=[A-Za-z0-9_-]{40,}$")
        self.assertIn("--project-domain", result.err)
        full = self.ok(
            "project", "share", PID, "8001", "--visibility", "public", "--expires-in", "1",
            "--project-domain", "Proj.Test", "--allow-sharing", "public",
        )  # fmt: skip
        self.assertEqual(full.last_line, f"https://{PID}-8001.proj.test/")
        self.assertEqual(
            [
                (s["port"], s["visibility"])
                for s in json.loads(self.ok("project", "shares", "--json").out)
            ],
            [(8000, "link"), (8001, "public")],
        )
        self.refused(
            "does not allow 'public'",
            "project", "share", PID, "8002", "--visibility", "public",
            "--project-domain", "proj.test", "--allow-sharing", "link",
        )  # fmt: skip
        self.refused("not a port", "project", "share", PID, "0", "--visibility", "link")
        self.refused("not a port", "project", "share", PID, "080", "--visibility", "link")
        self.refused(
            "invalid project id", "project", "share", PID.upper(), "80", "--visibility", "link"
        )
        self.ok("project", "unshare", PID, "8000")
        self.refused("is not shared", "project", "unshare", PID, "8000")
        self.ok("project", "share", PID, "8001", "--visibility", "private")
        self.assertEqual(self.ok("project", "shares").out, "")


class SQLiteOnlyAdminTests(SQLiteBackend, AdminMixin, unittest.TestCase):
    def test_state_dir_default_file(self) -> None:
        state = os.path.abspath(self.mktemp())
        result = self.cli("--state-dir", state, "user", "add", "zed", database=False)
        self.assertEqual(result.code, 1, result)
        self.assertIn("run 'cocalcproxy init'", result.err)
        self.assertFalse(os.path.exists(state))
        result = self.cli("--state-dir", state, "init", database=False)
        self.assertEqual(result.code, 0, result)
        result = self.cli("--state-dir", state, "user", "add", "zed", database=False)
        self.assertEqual(result.code, 0, result)
        other = open_sync_directory(f"sqlite:///{state}/directory.sqlite3", hasher=FAST_HASHER)
        self.addCleanup(other.close)
        self.assertEqual([a.name for a in other.list_users()], ["zed"])

    def test_unreadable_database(self) -> None:
        state = os.path.abspath(self.mktemp())
        os.makedirs(state)
        with open(os.path.join(state, "directory.sqlite3"), "wb") as f:
            f.write(b"\x00garbage" * 1000)
        result = self.cli("--state-dir", state, "user", "add", "zed", database=False)
        self.assertEqual((result.code, result.out), (1, ""), result)
        self.assertIn("file is not a database", result.err)


for _name, _mixin in (
    ("User", UserCommandTests),
    ("Token", TokenCommandTests),
    ("Project", ProjectCommandTests),
    ("GlobalOption", GlobalOptionTests),
    ("AdminTokenAndShare", AdminTokenAndShareCommandTests),
):
    for _prefix, _backend in (("SQLite", SQLiteBackend), ("Postgres", PostgresBackend)):
        _cls = type(f"{_prefix}{_name}Tests", (_backend, _mixin, unittest.TestCase), {})
        _cls.__module__ = __name__
        globals()[_cls.__name__] = _cls
del _name, _mixin, _prefix, _backend, _cls


def admin_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COCALCPROXY_")}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


class SubprocessTests(unittest.TestCase):
    """The real command in its own process, as an operator's shell script would run it."""

    def cocalcproxy(
        self, *argv: str, stdin: str = "", **env: str
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "cocalcproxy.ops.admin", *argv],
            input=stdin,
            capture_output=True,
            text=True,
            env=admin_env(**env),
            cwd=self.cwd,
            timeout=60,
        )

    def setUp(self) -> None:
        self.cwd = os.path.abspath(self.mktemp())
        os.makedirs(self.cwd)

    def test_a_session_from_the_readme(self) -> None:
        state = os.path.join(self.cwd, "state")
        created = self.cocalcproxy("--state-dir", state, "init")
        self.assertEqual((created.returncode, created.stderr), (0, ""))
        added = self.cocalcproxy("--state-dir", state, "user", "add", "alice")
        self.assertEqual((added.returncode, added.stderr), (0, ""))
        name, password = added.stdout.splitlines()
        self.assertEqual(name, "alice")
        project = self.cocalcproxy("--state-dir", state, "project", "add", "--owner", "alice")
        self.assertEqual(project.returncode, 0)
        pid = project.stdout.splitlines()[-1]
        self.assertRegex(pid, UUID_LINE)
        d = open_sync_directory(f"sqlite:///{state}/directory.sqlite3")
        self.addCleanup(d.close)
        self.assertEqual(d.check_password("alice", password), Account(1, "alice"))
        self.assertEqual(d.project_for(1, pid).owner_name, "alice")  # type: ignore[union-attr]

    def test_state_dir_from_the_environment(self) -> None:
        state = os.path.join(self.cwd, "from-env")
        r = self.cocalcproxy("init", COCALCPROXY_STATE_DIR=state)
        self.assertEqual(r.returncode, 0, r.stderr)
        r = self.cocalcproxy(
            "user", "add", "bob", "--password-stdin", stdin="pw\n", COCALCPROXY_STATE_DIR=state
        )
        self.assertEqual((r.returncode, r.stdout, r.stderr), (0, "bob\n", ""))
        self.assertTrue(os.path.exists(os.path.join(state, "directory.sqlite3")))
        r = self.cocalcproxy("user", "list")
        self.assertEqual(r.returncode, 1, "the default ./cocalcproxy-state is another")
        self.assertIn("run 'cocalcproxy init'", r.stderr)
        self.assertFalse(os.path.exists(os.path.join(self.cwd, "cocalcproxy-state")))

    def test_errors_exit_1_with_a_message(self) -> None:
        state = os.path.join(self.cwd, "state")
        self.assertEqual(self.cocalcproxy("--state-dir", state, "init").returncode, 0)
        r = self.cocalcproxy("--state-dir", state, "project", "add", "--owner", "ghost")
        self.assertEqual((r.returncode, r.stdout), (1, ""))
        self.assertEqual(r.stderr, "cocalcproxy: no user named 'ghost'\n")
        r = self.cocalcproxy(
            "--state-dir", state, "project", "add", "--owner", "ghost", "--id", "NOT-A-UUID"
        )
        self.assertEqual(r.returncode, 1)
        self.assertIn("invalid project id 'NOT-A-UUID'", r.stderr)
        r = self.cocalcproxy("--database", "ftp://x", "user", "list")
        self.assertEqual(r.returncode, 1)
        self.assertIn("unsupported database URL", r.stderr)
        self.assertNotIn("Traceback", r.stderr)

    def test_password_stdin_is_never_echoed(self) -> None:
        state = os.path.join(self.cwd, "state")
        self.assertEqual(self.cocalcproxy("--state-dir", state, "init").returncode, 0)
        r = self.cocalcproxy(
            "--state-dir", state, "user", "add", "eve", "--password-stdin", stdin="Tr0ub4dor&3\n"
        )
        self.assertEqual(r.returncode, 0)
        self.assertNotIn("Tr0ub4dor", r.stdout + r.stderr)
        r = self.cocalcproxy(
            "--state-dir", state, "user", "passwd", "eve", "--password-stdin", stdin="n3w\n"
        )
        self.assertEqual((r.returncode, r.stdout, r.stderr), (0, "", ""))


class ConcurrentMixin:
    """Admin processes write while the proxy's asynchronous directory reads in the reactor.

    (This caught a real bug: opening and closing the SQLite file outside SQLite dropped the
    process's POSIX locks, and the writers then reset the WAL under the readers' feet.)"""

    new_database_url: Any

    @defer.inlineCallbacks
    def test_admin_writes_while_the_proxy_reads(self):  # type: ignore[no-untyped-def]
        url = self.new_database_url()
        directory = open_directory(url, reactor, hasher=FAST_HASHER)
        self.addCleanup(directory.close)
        yield directory.add_user("owner", "pw")
        project = yield directory.add_project("owner", project_id=PID)
        self.assertEqual(project.collaborators, ())

        writers = 3
        rounds = 8
        script = (
            "import sys\n"
            "from functools import partial\n"
            "from argon2 import PasswordHasher\n"
            "from cocalcproxy.ops import admin\n"
            "from cocalcproxy.directory import store\n"
            "admin.open_sync_directory = partial(store.open_sync_directory,"
            " hasher=PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1))\n"
            "url, who = sys.argv[1], sys.argv[2]\n"
            f"for i in range({rounds}):\n"
            "    name = f'{who}-{i}'\n"
            "    assert admin.main(['--database', url, 'user', 'add', name]) == 0\n"
            "    assert admin.main(['--database', url, 'project', 'collaborator', 'add',\n"
            f"                       '{PID}', name]) == 0\n"
        )
        runs = [
            utils.getProcessOutputAndValue(
                sys.executable, ["-c", script, url, f"w{n}"], env=admin_env(), path=ROOT
            )
            for n in range(writers)
        ]
        done = defer.DeferredList(runs)
        counters: list[int] = []
        while not done.called:
            counters.append((yield directory.change_counter()))
            seen = yield directory.project_for(1, PID)
            self.assertIsNotNone(seen)
            yield directory.list_users()
        results = yield done
        for ok, (out, err, code) in results:
            self.assertTrue(ok)
            self.assertEqual(code, 0, err.decode())
        self.assertEqual(counters, sorted(counters), "the counter never goes backwards")
        self.assertGreater(len(set(counters)), 2, "reads overlapped the writes")
        final = yield directory.get_project(PID)
        self.assertEqual(len(final.collaborators), writers * rounds)
        users = yield directory.list_users()
        self.assertEqual(len(users), 1 + writers * rounds)
        self.assertEqual((yield directory.change_counter()), 2 + 2 * writers * rounds)


class SQLiteConcurrentTests(SQLiteBackend, ConcurrentMixin, unittest.TestCase):
    pass


class PostgresConcurrentTests(PostgresBackend, ConcurrentMixin, unittest.TestCase):
    pass
