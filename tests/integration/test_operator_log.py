"""What the proxy's log tells an operator, read from a real ``twistd -n cocalcproxy``: a sign-out
is logged as a sign-in is (once, with the name and address), and a WebSocket relay does not log
Twisted's "Starting factory" / "Stopping factory" lines for each backend connection."""

from __future__ import annotations

import re
import threading
from urllib.parse import urlencode

from twisted.trial import unittest
from websockets.sync import client as ws_client
from websockets.sync import server as ws_server

from cocalcproxy.guard.credentials import SESSION_COOKIE
from tests.integration.test_shutdown import project_with_token, request, tls_context
from tests.processes import ProxyProcess, admin, wait_for


class OperatorLogTests(unittest.TestCase):
    def setUp(self) -> None:
        self.state = self.mktemp()
        self.proxy = ProxyProcess(self.state, "--access-log", "off")
        self.pid, self.token = project_with_token(self.proxy.state_dir)
        self.proxy.start()
        self.addCleanup(self.proxy.stop)
        self.proxy.wait_listening()

    def origin_headers(self, cookies: list[str]) -> dict[str, str]:
        return {
            "Content-Type": "application/x-www-form-urlencoded",
            "Origin": f"https://localhost:{self.proxy.port}",
            "Cookie": "; ".join(cookies),
        }

    def test_sign_in_and_sign_out_each_logged_once(self) -> None:
        added = admin(
            self.proxy.state_dir,
            "user",
            "add",
            "erin",
            "--password-stdin",
            stdin="a fine password\n",
        )
        self.assertEqual(added.returncode, 0, added.stderr)
        status, headers, body = request(self.proxy, "GET", "/_/login")
        cookies = [c.split(";", 1)[0] for c in headers.get_all("Set-Cookie") or []]
        csrf = re.search(rb'name="csrf" value="([^"]+)"', body)
        assert csrf is not None, body[:2000]
        form = {
            "csrf": csrf.group(1).decode(),
            "next": "/",
            "name": "erin",
            "password": "a fine password",
        }
        status, headers, body = request(
            self.proxy,
            "POST",
            "/_/login",
            body=urlencode(form).encode(),
            headers=self.origin_headers(cookies),
        )
        self.assertEqual(status, 303, body[:500])
        session = next(
            c.split(";", 1)[0]
            for c in headers.get_all("Set-Cookie") or []
            if c.split("=", 1)[0] == SESSION_COOKIE
        )
        status, _, body = request(
            self.proxy, "GET", "/", headers={"Cookie": session, "Accept": "text/html"}
        )
        self.assertEqual(status, 200, body[:500])
        logout = re.search(rb'name="csrf" value="([^"]+)"', body)
        assert logout is not None, body[:3000]
        status, _, body = request(
            self.proxy,
            "POST",
            "/_/logout",
            body=urlencode({"csrf": logout.group(1).decode()}).encode(),
            headers=self.origin_headers([session]),
        )
        self.assertEqual(status, 303, body[:500])
        wait_for(lambda: "erin signed out" in self.proxy.output(), 30, "the sign-out line")
        output = self.proxy.output()
        self.assertEqual(len(re.findall(r"erin signed in from 127\.0\.0\.1", output)), 1, output)
        self.assertEqual(len(re.findall(r"erin signed out from 127\.0\.0\.1", output)), 1, output)
        # The session really ended: the cookie no longer opens the index.
        status, _, _ = request(self.proxy, "GET", "/", headers={"Cookie": session})
        self.assertEqual(status, 401)

    def test_websocket_relays_do_not_log_factory_lines(self) -> None:
        def echo(connection: ws_server.ServerConnection) -> None:
            for message in connection:
                connection.send(message)

        server = ws_server.serve(echo, "127.0.0.1", 0)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        self.addCleanup(server.shutdown)
        backend_port = server.socket.getsockname()[1]
        for round_trip in range(3):
            with ws_client.connect(
                f"wss://localhost:{self.proxy.port}/{self.pid}/server/{backend_port}/echo",
                ssl=tls_context(self.proxy),
                additional_headers={"Authorization": f"Bearer {self.token}"},
                open_timeout=30,
            ) as connection:
                connection.send(f"hello {round_trip}")
                self.assertEqual(connection.recv(timeout=30), f"hello {round_trip}")
        # A plain HTTP request through the same backend port, too (the forwarder's factories).
        status, _, _ = request(
            self.proxy,
            "GET",
            f"/{self.pid}/server/{backend_port}/",
            headers={"Authorization": f"Bearer {self.token}"},
        )
        self.assertNotEqual(status, 502)
        self.proxy.stop()
        output = self.proxy.output()
        self.assertIn("stopped cleanly", output)
        factory_lines = [
            line
            for line in output.splitlines()
            if ("Starting factory" in line or "Stopping factory" in line)
            and "ProxySite" not in line
        ]
        self.assertEqual(factory_lines, [], output[-3000:])
