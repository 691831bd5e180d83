"""Admin changes reach a running proxy within 2 seconds.

The proxy runs as its own process (``twistd -n cocalcproxy``); changes are made with the admin
command as another process against the same SQLite directory; requests go over real TLS.
"""

from __future__ import annotations

import base64
import http.client
import json
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

from twisted.trial import unittest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from tests.processes import ProxyProcess, admin, free_port, wait_for

DEADLINE = 2.0


class Client:
    """A blocking HTTPS client that trusts exactly the proxy's generated certificate."""

    def __init__(self, proxy: ProxyProcess) -> None:
        self.port = proxy.port
        self.cert = Path(proxy.state_dir) / "tls" / "cert.pem"
        self.context: ssl.SSLContext | None = None

    def status(self, path: str, headers: dict[str, str]) -> int:
        if self.context is None:  # the proxy writes its certificate as it starts
            self.context = ssl.create_default_context(cafile=str(self.cert))
        conn = http.client.HTTPSConnection("localhost", self.port, context=self.context, timeout=10)
        try:
            conn.request("GET", path, headers=headers)
            response = conn.getresponse()
            response.read()
            return response.status
        finally:
            conn.close()


ECHO_BACKEND = """
import sys
from websockets.sync.server import serve

def echo(ws):
    for message in ws:
        ws.send(message)

with serve(echo, "127.0.0.1", int(sys.argv[1])) as server:
    server.serve_forever()
"""


class RevocationSeenByARunningProxy(unittest.TestCase):
    def setUp(self) -> None:
        self.state = str(Path(self.mktemp()).absolute())
        Path(self.state).mkdir(parents=True)
        self.admin_json("user", "add", "alice", "--password-stdin", stdin="alice-password\n")
        self.admin_json("user", "add", "bob", "--password-stdin", stdin="bob-password\n")
        self.pid = self.admin_json("project", "add", "--owner", "alice")["id"]
        self.admin_json("project", "collaborator", "add", self.pid, "bob")
        self.proxy = ProxyProcess(self.state).start()
        self.addCleanup(self.proxy.stop)
        self.client = Client(self.proxy)
        wait_for(lambda: self.client.status("/_/health", {}) == 200, 60, "the proxy's /_/health")
        self.path = f"/{self.pid}/server/{self.start_http_backend()}/"

    def admin_json(self, *args: str, stdin: str | None = None) -> dict:  # type: ignore[type-arg]
        done = admin(self.state, "--json", *args, stdin=stdin)
        self.assertEqual(done.returncode, 0, done.stderr)
        return json.loads(done.stdout) if done.stdout.strip() else {}

    def assert_allowed(self, headers: dict[str, str]) -> None:
        self.assertEqual(self.client.status(self.path, headers), 200)

    def seconds_until_refused(self, credentials: list[dict[str, str]], *change: str) -> float:
        """Make the change with the admin command; seconds until the proxy refuses every one of
        ``credentials`` (each may be cached on its own, so each is watched)."""
        self.admin_json(*change)
        changed = time.monotonic()
        pending = list(credentials)

        def all_refused() -> bool:
            pending[:] = [h for h in pending if self.client.status(self.path, h) not in (401, 404)]
            return not pending

        wait_for(all_refused, 10, "the proxy to refuse after " + " ".join(change), interval=0.02)
        return time.monotonic() - changed

    def test_removed_collaborator(self) -> None:
        headers = {"Authorization": basic("bob", "bob-password")}
        self.assert_allowed(headers)
        self.assert_allowed(headers)  # now from the cache
        took = self.seconds_until_refused(
            [headers], "project", "collaborator", "remove", self.pid, "bob"
        )
        self.assertLess(took, DEADLINE)
        self.assertEqual(self.client.status(self.path, headers), 404)

    def test_removed_user(self) -> None:
        token = self.admin_json("token", "create", "bob")["token"]
        headers = {"Authorization": f"Bearer {token}"}
        self.assert_allowed(headers)
        took = self.seconds_until_refused([headers], "user", "remove", "bob")
        self.assertLess(took, DEADLINE)
        self.assertEqual(self.client.status(self.path, headers), 401)

    def test_revoked_token(self) -> None:
        created = self.admin_json("token", "create", "alice")
        headers = {"Authorization": f"Bearer {created['token']}"}
        basic_headers = {"Authorization": basic("alice", created["token"])}
        self.assert_allowed(headers)
        self.assert_allowed(basic_headers)
        took = self.seconds_until_refused(
            [headers, basic_headers], "token", "revoke", created["id"]
        )
        self.assertLess(took, DEADLINE)
        self.assertEqual(self.client.status(self.path, headers), 401)
        self.assertEqual(self.client.status(self.path, basic_headers), 401)

    def start_http_backend(self) -> int:
        port = free_port()
        backend = subprocess.Popen(
            [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
            cwd=self.state,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.addCleanup(lambda: (backend.terminate(), backend.wait(timeout=30)))
        wait_for(lambda: listening(port), 30, "the HTTP backend")
        return port

    def start_echo_backend(self) -> int:
        port = free_port()
        backend = subprocess.Popen(
            [sys.executable, "-c", ECHO_BACKEND, str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

        def stop() -> None:
            backend.terminate()
            backend.wait(timeout=30)

        self.addCleanup(stop)
        wait_for(lambda: listening(port), 30, "the WebSocket echo backend")
        return port

    def test_open_websocket_cut_when_collaborator_removed(self) -> None:
        backend_port = self.start_echo_backend()
        assert self.client.context is not None
        with connect(
            f"wss://localhost:{self.proxy.port}/{self.pid}/port/{backend_port}/",
            ssl=self.client.context,
            additional_headers={"Authorization": basic("bob", "bob-password")},
            open_timeout=10,
        ) as ws:
            ws.send("hello")
            self.assertEqual(ws.recv(timeout=10), "hello")
            self.admin_json("project", "collaborator", "remove", self.pid, "bob")
            changed = time.monotonic()
            with self.assertRaises(ConnectionClosed):
                while True:
                    ws.recv(timeout=10)
            self.assertLess(time.monotonic() - changed, DEADLINE)

    def test_changed_password_ends_sessions_and_old_password(self) -> None:
        headers = {"Authorization": basic("alice", "alice-password")}
        self.assert_allowed(headers)
        done = admin(self.state, "user", "passwd", "alice", "--password-stdin", stdin="new-pw\n")
        self.assertEqual(done.returncode, 0, done.stderr)
        changed = time.monotonic()
        wait_for(lambda: self.client.status(self.path, headers) == 401, 10, "old password refused")
        self.assertLess(time.monotonic() - changed, DEADLINE)
        self.assert_allowed({"Authorization": basic("alice", "new-pw")})


def listening(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=1):
        return True


def basic(name: str, secret: str) -> str:
    return "Basic " + base64.b64encode(f"{name}:{secret}".encode()).decode()
