"""A directory outage, for real: ``twistd -n cocalcproxy`` reaches PostgreSQL only through a TCP
forwarder that the test closes (connections cut, port refused) and opens again. The machine's
PostgreSQL server itself keeps running (others use it); the admin command reaches it directly.

While the directory is unreachable the proxy serves the decisions it had cached, past their
usual lifetime, for ``--directory-grace`` seconds; credentials it never saw, and sign-ins, get a
clear 503 page; ``/_/health`` says ``degraded``; the log has one line when the outage starts and
one when it ends, never a traceback per request. A revocation made meanwhile applies as soon as
the directory is back.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from twisted.trial import unittest

from tests.directory_support import new_postgres_url
from tests.integration.test_directory_file import run_admin
from tests.integration.test_shutdown import request
from tests.processes import ProxyProcess, wait_for

GRACE = 15.0
STARTED = "directory unreachable:"
ENDED = "directory reachable again"


class Forwarder:
    """127.0.0.1:<port> -> the PostgreSQL server, in threads; ``cut()`` closes the port and every
    connection through it, ``restore()`` listens on the same port again."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.lock = threading.Lock()
        self.sockets: list[socket.socket] = []
        self.listener: socket.socket | None = None
        self.port = 0
        self.restore()

    def restore(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        listener.settimeout(0.1)
        self.port = listener.getsockname()[1]
        self.listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while self.listener is listener:
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            client.settimeout(None)
            upstream.settimeout(None)
            with self.lock:
                self.sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self) -> None:
        listener, self.listener = self.listener, None
        if listener is not None:
            listener.close()
        with self.lock:
            sockets, self.sockets = self.sockets, []
        for s in sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


class Backend:
    def __init__(self, case: unittest.TestCase) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                body = b"hello from the project\n"
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        case.addCleanup(self.server.server_close)
        case.addCleanup(self.server.shutdown)


class DirectoryOutageTests(unittest.TestCase):
    def setUp(self) -> None:
        self.direct = new_postgres_url(self)
        parts = urllib.parse.urlsplit(self.direct)
        self.forwarder = Forwarder((parts.hostname or "127.0.0.1", parts.port or 5432))
        self.addCleanup(self.forwarder.cut)
        self.through = self.direct.replace(f":{parts.port}/", f":{self.forwarder.port}/")
        self.admin("init")
        self.admin("user", "add", "alice", "--password-stdin", stdin="alice-password\n")
        self.pid = self.admin("project", "add", "--owner", "alice")["id"]
        self.cached = self.admin("token", "create", "alice")
        self.unseen = self.admin("token", "create", "alice")
        self.backend = Backend(self)
        state = str(Path(self.mktemp()).absolute())
        self.proxy = ProxyProcess(
            state, "--database", self.through, "--directory-grace", str(GRACE)
        ).start()
        self.addCleanup(self.proxy.stop)
        self.proxy.wait_listening()

    def admin(self, *args: str, stdin: str | None = None) -> Any:
        done = run_admin("--database", self.direct, "--json", *args, stdin=stdin)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout) if done.stdout.strip() else {}

    def get(self, token: dict[str, Any], html: bool = False) -> tuple[int, bytes]:
        headers = {"Authorization": f"Bearer {token['token']}"}
        if html:
            headers["Accept"] = "text/html"
        status, _, body = request(
            self.proxy, "GET", f"/{self.pid}/server/{self.backend.port}/", headers=headers
        )
        return status, body

    def health(self) -> tuple[int, dict[str, Any]]:
        status, _, body = request(self.proxy, "GET", "/_/health")
        return status, json.loads(body)

    def sign_in(self) -> tuple[int, bytes]:
        status, headers, body = request(self.proxy, "GET", "/_/login")
        self.assertEqual(status, 200)
        cookies = [c.split(";", 1)[0] for c in headers.get_all("Set-Cookie") or []]
        csrf = re.search(rb'name="csrf" value="([^"]+)"', body)
        assert csrf is not None
        form = urllib.parse.urlencode(
            {
                "csrf": csrf.group(1).decode(),
                "next": "/",
                "name": "alice",
                "password": "alice-password",
            }
        )
        status, _, body = request(
            self.proxy,
            "POST",
            "/_/login",
            body=form.encode(),
            headers={
                "Content-Type": "application/x-www-form-urlencoded",
                "Origin": f"https://localhost:{self.proxy.port}",
                "Cookie": "; ".join(cookies),
                "Accept": "text/html",
            },
        )
        return status, body

    def test_outage_grace_and_recovery(self) -> None:
        self.assertEqual(self.get(self.cached)[0], 200)
        self.assertEqual(self.health(), (200, {"status": "ok", "directory": True}))

        self.forwarder.cut()
        cut_at = time.monotonic()
        wait_for(lambda: STARTED in self.proxy.output(), 10, "the outage's log line")

        # Cached: still served. Never seen, or a sign-in: a clear 503 page.
        self.assertEqual(self.get(self.cached)[0], 200)
        status, body = self.get(self.unseen, html=True)
        self.assertEqual(status, 503, body[:300])
        self.assertIn(b"account directory", body)
        self.assertNotIn(b"Traceback", body)
        status, body = self.sign_in()
        self.assertEqual(status, 503, body[:300])
        self.assertIn(b"account directory", body)
        self.assertEqual(self.health(), (200, {"status": "degraded", "directory": False}))

        # Revoked meanwhile (through the database directly): the proxy cannot know yet.
        self.admin("token", "revoke", self.cached["id"])
        self.assertEqual(self.get(self.cached)[0], 200)

        # Served past the credentials' usual 10 s in the cache, until the grace ends.
        answers: list[tuple[float, int]] = []

        def refused() -> bool:
            status = self.get(self.cached)[0]
            answers.append((time.monotonic() - cut_at, status))
            return status == 503

        wait_for(refused, GRACE + 15, "the grace to end", interval=0.25)
        last_served = max((t for t, s in answers if s == 200), default=0.0)
        first_refused = min(t for t, s in answers if s == 503)
        self.assertGreater(last_served, 10.5, answers)
        self.assertGreater(first_refused, GRACE - 2, answers)
        self.assertEqual(self.health()[0], 503)
        self.assertEqual(self.health()[1]["status"], "unavailable")

        self.forwarder.restore()
        wait_for(lambda: ENDED in self.proxy.output(), 15, "the recovery's log line")
        self.assertEqual(self.get(self.cached)[0], 401)  # the revocation applies now
        self.assertEqual(self.get(self.unseen)[0], 200)
        self.assertEqual(self.health(), (200, {"status": "ok", "directory": True}))

        output = self.proxy.output()
        self.assertEqual(output.count(STARTED), 1, output[-4000:])
        self.assertEqual(output.count(ENDED), 1, output[-4000:])
        self.assertEqual(output.count("cached decisions are no longer used"), 1)
        self.assertNotIn("Traceback", output, output[-4000:])
