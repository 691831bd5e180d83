"""SIGTERM to a real ``twistd -n cocalcproxy``: what is in flight finishes, nothing new gets in,
the exit status is 0, and a restart finds every piece of data the proxy and the admin wrote."""

from __future__ import annotations

import http.client
import re
import signal
import socket
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlencode

from twisted.trial import unittest
from websockets.exceptions import ConnectionClosed
from websockets.sync import client as ws_client
from websockets.sync import server as ws_server

from tests.processes import ProxyProcess, admin, wait_for


def tls_context(proxy: ProxyProcess) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(Path(proxy.state_dir) / "tls" / "cert.pem"))


def open_tls(proxy: ProxyProcess) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", proxy.port), timeout=30)
    return tls_context(proxy).wrap_socket(raw, server_hostname="localhost")


def read_until_closed(sock: ssl.SSLSocket) -> bytes:
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ssl.SSLZeroReturnError:
            break
        if not chunk:
            break
        data += chunk
    return data


def start_upload(sock: ssl.SSLSocket, part: bytes) -> None:
    """Send a POST's headers and part of its 10-byte body, once the server has the headers.

    ``Expect: 100-continue`` makes the server say when it has parsed them, so the request is
    really in flight before the test goes on. The sign-in form is the own page that takes a
    (small) body without credentials; the post itself fails its CSRF check.
    """
    sock.sendall(
        b"POST /_/login HTTP/1.1\r\nHost: localhost\r\nContent-Length: 10\r\n"
        b"Content-Type: application/x-www-form-urlencoded\r\n"
        b"Expect: 100-continue\r\n\r\n"
    )
    interim = b""
    while not interim.endswith(b"\r\n\r\n"):
        interim += sock.recv(1)
    assert interim.startswith(b"HTTP/1.1 100 "), interim
    sock.sendall(part)


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


def request(
    proxy: ProxyProcess,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, http.client.HTTPMessage, bytes]:
    conn = http.client.HTTPSConnection(
        "localhost", proxy.port, context=tls_context(proxy), timeout=30
    )
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.headers, response.read()
    finally:
        conn.close()


class GracefulStopTests(unittest.TestCase):
    def test_request_in_flight_finishes_new_connections_refused_exit_0(self) -> None:
        proxy = ProxyProcess(self.mktemp()).start()
        self.addCleanup(proxy.stop)
        proxy.wait_listening()

        # A request in flight: headers and half the body sent; the rest comes after SIGTERM.
        slow = open_tls(proxy)
        self.addCleanup(slow.close)
        start_upload(slow, b"12345")
        # An idle keep-alive connection, which the drain must close for the process to end.
        idle = open_tls(proxy)
        self.addCleanup(idle.close)
        idle.sendall(b"GET /_/health HTTP/1.1\r\nHost: localhost\r\n\r\n")
        first = idle.recv(65536)
        self.assertTrue(first.startswith(b"HTTP/1.1 200 "), first)

        proxy.signal(signal.SIGTERM)
        wait_for(lambda: refused(proxy.port), 30, "the listener to close")
        assert proxy.process is not None
        self.assertIsNone(proxy.process.poll(), "exited with a request still in flight")
        # The idle connection is closed by the server, without a response to anything.
        self.assertEqual(read_until_closed(idle), b"")

        slow.sendall(b"67890")
        answer = read_until_closed(slow)
        head, _, _ = answer.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 403 "), answer[:500])
        self.assertIn(b"connection: close", head.lower())

        self.assertEqual(proxy.process.wait(timeout=60), 0, proxy.output()[-3000:])
        self.assertIn("stopped cleanly", proxy.output())

    def test_shutdown_timeout_bounds_the_wait(self) -> None:
        proxy = ProxyProcess(self.mktemp(), "--shutdown-timeout", "1").start()
        self.addCleanup(proxy.stop)
        proxy.wait_listening()
        stuck = open_tls(proxy)
        self.addCleanup(stuck.close)
        start_upload(stuck, b"1")
        proxy.signal(signal.SIGTERM)
        assert proxy.process is not None
        self.assertEqual(proxy.process.wait(timeout=60), 0, proxy.output()[-3000:])
        self.assertIn("shutdown timeout", proxy.output())
        # The abandoned request got no response, just the end of the connection.
        try:
            self.assertEqual(read_until_closed(stuck), b"")
        except (ConnectionResetError, ssl.SSLError):
            pass


class RestartTests(unittest.TestCase):
    def test_restart_keeps_accounts_projects_tokens_and_sessions(self) -> None:
        state = str(Path(self.mktemp()).absolute())
        added = admin(state, "user", "add", "alice", "--password-stdin", stdin="correct horse b\n")
        self.assertEqual(added.returncode, 0, added.stderr)
        pid = admin(state, "project", "add", "--owner", "alice").stdout.strip().splitlines()[-1]
        token = admin(state, "token", "create", "alice").stdout.strip().splitlines()[-1]

        proxy = ProxyProcess(state).start()
        self.addCleanup(proxy.stop)
        proxy.wait_listening()
        session = self.sign_in(proxy, "alice", "correct horse b")
        before = self.observe(proxy, pid, token, session)
        proxy.signal(signal.SIGTERM)
        assert proxy.process is not None
        self.assertEqual(proxy.process.wait(timeout=60), 0, proxy.output()[-3000:])

        again = ProxyProcess(state, port=proxy.port).start()
        self.addCleanup(again.stop)
        again.wait_listening()
        after = self.observe(again, pid, token, session)
        self.assertEqual(before, after)
        # And what was observed is access, not a uniform refusal.
        self.assertNotIn(after["token"], (401, 403, 404))
        self.assertEqual(after["index"], 200)
        self.assertTrue(after["listed"])
        self.assertEqual(after["bad token"], 401)
        listing = admin(state, "project", "list").stdout
        self.assertIn(pid, listing)

    def sign_in(self, proxy: ProxyProcess, name: str, password: str) -> str:
        """The browser flow: the form (CSRF cookie and field), then the POST; the session cookie."""
        status, headers, body = request(proxy, "GET", "/_/login")
        self.assertEqual(status, 200, body[:300])
        cookies = [c.split(";", 1)[0] for c in headers.get_all("Set-Cookie") or []]
        match = re.search(rb'name="csrf" value="([^"]+)"', body) or re.search(
            rb'value="([^"]+)" name="csrf"', body
        )
        self.assertIsNotNone(match, body[:2000])
        assert match is not None
        form = urlencode(
            {"csrf": match.group(1).decode(), "next": "/", "name": name, "password": password}
        ).encode()
        status, headers, body = request(
            proxy,
            "POST",
            "/_/login",
            body=form,
            headers={
                "Content-Type": "application/x-www-form-urlencoded",
                "Origin": f"https://localhost:{proxy.port}",
                "Cookie": "; ".join(cookies),
            },
        )
        self.assertEqual(status, 303, body[:500])
        for cookie in headers.get_all("Set-Cookie") or []:
            if cookie.startswith("__Host-cocalcproxy_session="):
                return cookie.split(";", 1)[0]
        raise AssertionError(f"no session cookie in {headers}")

    def observe(self, proxy: ProxyProcess, pid: str, token: str, session: str) -> dict[str, object]:
        path = f"/{pid}/server/8000/"
        bearer = request(proxy, "GET", path, headers={"Authorization": f"Bearer {token}"})[0]
        wrong = request(proxy, "GET", path, headers={"Authorization": "Bearer nope"})[0]
        status, _, body = request(proxy, "GET", "/", headers={"Cookie": session})
        return {
            "token": bearer,
            "bad token": wrong,
            "index": status,
            "listed": pid.encode() in body,
        }


class SlowBackend:
    """A real HTTP backend in a thread whose answer waits until the test releases it."""

    def __init__(self, case: unittest.TestCase) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                outer.entered.set()
                outer.release.wait(60)
                body = b"slow answer\n" * 10000
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        thread.start()
        case.addCleanup(self.server.server_close)
        case.addCleanup(self.server.shutdown)
        case.addCleanup(self.release.set)


def project_with_token(state: str) -> tuple[str, str]:
    added = admin(state, "user", "add", "dora", "--password-stdin", stdin="a fine password\n")
    assert added.returncode == 0, added.stderr
    pid = admin(state, "project", "add", "--owner", "dora").stdout.strip().splitlines()[-1]
    token = admin(state, "token", "create", "dora").stdout.strip().splitlines()[-1]
    return pid, token


class InFlightThroughBackendTests(unittest.TestCase):
    def test_slow_backend_answer_completes_after_sigterm(self) -> None:
        backend = SlowBackend(self)
        state = str(Path(self.mktemp()).absolute())
        pid, token = project_with_token(state)
        proxy = ProxyProcess(state).start()
        self.addCleanup(proxy.stop)
        proxy.wait_listening()

        result: dict[str, object] = {}

        def client() -> None:
            try:
                result["answer"] = request(
                    proxy,
                    "GET",
                    f"/{pid}/server/{backend.port}/slow",
                    headers={"Authorization": f"Bearer {token}"},
                )
            except Exception as e:  # noqa: BLE001
                result["error"] = e

        thread = threading.Thread(target=client)
        thread.start()
        self.addCleanup(thread.join, 60)
        self.assertTrue(backend.entered.wait(30), proxy.output()[-3000:])

        proxy.signal(signal.SIGTERM)
        wait_for(lambda: refused(proxy.port), 30, "the listener to close")
        assert proxy.process is not None
        self.assertIsNone(proxy.process.poll())
        backend.release.set()
        thread.join(60)
        self.assertNotIn("error", result)
        status, headers, body = result["answer"]  # type: ignore[misc]
        self.assertEqual(status, 200)
        self.assertEqual(body, b"slow answer\n" * 10000)
        self.assertEqual(proxy.process.wait(timeout=60), 0, proxy.output()[-3000:])


class WebSocketAtShutdownTests(unittest.TestCase):
    def test_open_relay_gets_a_close_frame_and_the_proxy_exits_0(self) -> None:
        def echo(connection: ws_server.ServerConnection) -> None:
            for message in connection:
                connection.send(message)

        server = ws_server.serve(echo, "127.0.0.1", 0)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        self.addCleanup(server.shutdown)
        backend_port = server.socket.getsockname()[1]
        state = str(Path(self.mktemp()).absolute())
        pid, token = project_with_token(state)
        proxy = ProxyProcess(state).start()
        self.addCleanup(proxy.stop)
        proxy.wait_listening()

        with ws_client.connect(
            f"wss://localhost:{proxy.port}/{pid}/server/{backend_port}/echo",
            ssl=tls_context(proxy),
            additional_headers={"Authorization": f"Bearer {token}"},
            open_timeout=30,
        ) as connection:
            connection.send("hello")
            self.assertEqual(connection.recv(timeout=30), "hello")

            proxy.signal(signal.SIGTERM)
            with self.assertRaises(ConnectionClosed) as caught:
                connection.recv(timeout=30)
        received = caught.exception.rcvd
        self.assertIsNotNone(received, proxy.output()[-3000:])
        assert received is not None
        self.assertEqual(received.code, 1001, proxy.output()[-3000:])
        assert proxy.process is not None
        self.assertEqual(proxy.process.wait(timeout=60), 0, proxy.output()[-3000:])
        self.assertNotIn("shutdown timeout", proxy.output())
