"""The directory database is never split or created silently.

* A running proxy whose SQLite file is deleted or replaced notices within seconds: ``/_/health``
  answers 503 and the log says so once; it never goes on serving the deleted file's decisions
  while the admin command writes to another file.
* Admin commands never create a database: only ``cocalcproxy init`` (safe to run again) or the
  proxy's first start do; anything else against a missing (or, on PostgreSQL, empty) database
  exits 1 saying to run ``init``.
* ``--database sqlite:///PATH`` in a folder that does not exist is refused at start.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from twisted.trial import unittest

from cocalcproxy.directory.store import open_sync_directory
from tests.directory_support import new_postgres_url
from tests.integration.test_shutdown import request
from tests.processes import ProxyProcess, admin, child_environment, wait_for

DELETED = "was deleted under the running process"


def run_admin(*argv: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cocalcproxy.ops.admin", *argv],
        input=stdin,
        capture_output=True,
        text=True,
        env=child_environment(),
        timeout=60,
    )


class DeletedDatabaseTests(unittest.TestCase):
    def test_deleted_then_recreated_file_is_noticed_not_used(self) -> None:
        state = str(Path(self.mktemp()).absolute())
        proxy = ProxyProcess(state).start()
        self.addCleanup(proxy.stop)
        proxy.wait_listening()
        self.assertEqual(request(proxy, "GET", "/_/health")[0], 200)

        database = Path(state) / "directory.sqlite3"
        for path in Path(state).glob("directory.sqlite3*"):
            path.unlink()
        deleted_at = time.monotonic()
        wait_for(lambda: request(proxy, "GET", "/_/health")[0] == 503, 10, "health 503")
        noticed = time.monotonic() - deleted_at
        self.assertLess(noticed, 5)
        wait_for(lambda: DELETED in proxy.output(), 10, "the log line")

        # The admin command does not create a new, empty database behind the proxy's back.
        refused = admin_no_init(state, "user", "list")
        self.assertEqual(refused.returncode, 1)
        self.assertIn("run 'cocalcproxy init'", refused.stderr)
        self.assertEqual(len(refused.stderr.splitlines()), 1)
        self.assertFalse(database.exists())

        # An explicit init makes a new file; the running proxy still refuses to use it.
        self.assertEqual(admin(state, "init").returncode, 0)
        self.assertTrue(database.exists())
        for _ in range(5):
            status, _, body = request(proxy, "GET", "/_/health")
            self.assertEqual(status, 503, body)
        output = proxy.output()
        self.assertEqual(output.count(DELETED), 1, output[-3000:])
        self.assertNotIn("Traceback", output)
        self.assertEqual(proxy.stop(), 0)

        # A restart uses the new file.
        again = ProxyProcess(state).start()
        self.addCleanup(again.stop)
        again.wait_listening()
        self.assertEqual(request(again, "GET", "/_/health")[0], 200)

    def test_replaced_file_is_noticed(self) -> None:
        state = str(Path(self.mktemp()).absolute())
        proxy = ProxyProcess(state).start()
        self.addCleanup(proxy.stop)
        proxy.wait_listening()
        self.assertEqual(request(proxy, "GET", "/_/health")[0], 200)
        # A restore done by moving another file over the path (a new inode).
        other = Path(self.mktemp()).absolute() / "directory.sqlite3"
        open_sync_directory(f"sqlite:///{other}").close()
        os.replace(other, Path(state) / "directory.sqlite3")
        wait_for(lambda: request(proxy, "GET", "/_/health")[0] == 503, 10, "health 503")
        wait_for(lambda: "was replaced by another file" in proxy.output(), 10, "the log line")


def admin_no_init(state: str, *args: str) -> subprocess.CompletedProcess[str]:
    return run_admin("--state-dir", state, *args)


class ExplicitCreationTests(unittest.TestCase):
    def test_sqlite_commands_refuse_a_missing_database_and_init_creates_it(self) -> None:
        state = str(Path(self.mktemp()).absolute())
        for argv in (["user", "list"], ["user", "add", "bob"], ["project", "list"]):
            with self.subTest(argv=argv):
                result = admin_no_init(state, *argv)
                self.assertEqual(result.returncode, 1, result)
                self.assertEqual(len(result.stderr.splitlines()), 1, result.stderr)
                self.assertIn("run 'cocalcproxy init'", result.stderr)
                self.assertFalse(os.path.exists(state), "a command created the state directory")
        first = admin_no_init(state, "init")
        self.assertEqual(first.returncode, 0, first.stderr)
        self.assertIn("created sqlite:///", first.stdout)
        self.assertEqual(os.stat(state).st_mode & 0o777, 0o700)
        self.assertEqual(admin_no_init(state, "user", "add", "bob").returncode, 0)
        second = admin_no_init(state, "--json", "init")
        self.assertEqual(second.returncode, 0, second.stderr)
        self.assertFalse(json.loads(second.stdout)["created"])
        self.assertEqual(admin_no_init(state, "user", "list").stdout, "bob\n")

    def test_explicit_database_in_a_missing_folder(self) -> None:
        folder = Path(self.mktemp()).absolute()
        url = f"sqlite:///{folder}/nope/directory.sqlite3"
        result = run_admin("--database", url, "init")
        self.assertEqual(result.returncode, 1)
        self.assertIn("does not exist", result.stderr)
        self.assertFalse(folder.exists())

    def test_proxy_refuses_a_database_folder_that_does_not_exist(self) -> None:
        state = str(Path(self.mktemp()).absolute())
        missing = Path(self.mktemp()).absolute() / "typo"
        proxy = ProxyProcess(state, "--database", f"sqlite:///{missing}/directory.sqlite3")
        with open(proxy.log_path, "ab") as log:
            done = subprocess.run(
                proxy.argv,
                cwd=state,
                env=child_environment(),
                stdout=log,
                stderr=subprocess.PIPE,
                text=True,
                timeout=60,
            )
        self.assertEqual(done.returncode, 1)
        self.assertEqual(len(done.stderr.splitlines()), 1, done.stderr)
        self.assertIn("--database", done.stderr)
        self.assertIn("does not exist", done.stderr)
        self.assertFalse(missing.exists())

    def test_postgresql_commands_refuse_an_empty_database_and_init_migrates(self) -> None:
        url = new_postgres_url(self)
        refused = run_admin("--database", url, "user", "list")
        self.assertEqual(refused.returncode, 1)
        self.assertEqual(len(refused.stderr.splitlines()), 1, refused.stderr)
        self.assertIn("no cocalcproxy tables yet; run 'cocalcproxy init'", refused.stderr)
        created = run_admin("--database", url, "--json", "init")
        self.assertEqual(created.returncode, 0, created.stderr)
        doc = json.loads(created.stdout)
        self.assertTrue(doc["created"])
        self.assertGreaterEqual(doc["schema_version"], 1)
        again = run_admin("--database", url, "init")
        self.assertEqual(again.returncode, 0, again.stderr)
        self.assertIn("is ready", again.stdout)
        added = run_admin(
            "--database", url, "user", "add", "carol", "--password-stdin", stdin="pw\n"
        )
        self.assertEqual(added.returncode, 0, added.stderr)
