"""Blocking clients for end-to-end tests of the admin API and of shared ports.

``UnixHTTP`` speaks HTTP over the admin API's Unix socket (no port to pick); ``ProxyClient`` speaks
HTTPS to the proxy's loopback port with any Host header (project subdomains resolve to it),
trusting exactly the proxy's generated certificate.
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.processes import free_port, wait_for

ECHO_WS_BACKEND = """
import sys
from websockets.sync.server import serve

def echo(ws):
    for message in ws:
        ws.send(message)

with serve(echo, "127.0.0.1", int(sys.argv[1])) as server:
    server.serve_forever()
"""

# Answers every request with what it saw (path, Cookie, Authorization) as JSON, and sets a
# cookie of its own so tests can check the proxy's cookies are not the ones reaching a visitor.
HTTP_ECHO_BACKEND = """
import json, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class Echo(BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({
            "path": self.path,
            "cookie": self.headers.get_all("Cookie") or [],
            "authorization": self.headers.get_all("Authorization") or [],
        }).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Set-Cookie", "backend=1; Path=/")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Echo).serve_forever()
"""


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=10)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(10)
        sock.connect(self.unix_path)
        self.sock = sock


class Response:
    def __init__(self, status: int, headers: http.client.HTTPMessage, body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def code(self) -> str | None:
        try:
            return str(self.json()["error"]["code"])
        except (ValueError, KeyError, TypeError):
            return None


class UnixHTTP:
    """HTTP/1.1 to a Unix socket; ``token`` goes in ``Authorization: Bearer``."""

    def __init__(self, path: str, token: str | None = None) -> None:
        self.path = path
        self.token = token

    def request(
        self,
        method: str,
        target: str,
        body: Any = None,
        raw: bytes | None = None,
        headers: dict[str, str] | None = None,
        token: str | None = None,
    ) -> Response:
        conn = _UnixConnection(self.path)
        sent: dict[str, str] = {}
        bearer = token if token is not None else self.token
        if bearer:
            sent["Authorization"] = f"Bearer {bearer}"
        data = raw
        if body is not None:
            data = json.dumps(body).encode()
            sent["Content-Type"] = "application/json"
        sent.update(headers or {})
        try:
            conn.request(method, target, body=data, headers=sent)
            response = conn.getresponse()
            return Response(response.status, response.headers, response.read())
        finally:
            conn.close()


class ProxyClient:
    """HTTPS to the proxy on 127.0.0.1 with any Host (SNI and Host set to it), trusting only the
    proxy's certificate (its chain; host names are not checked: project subdomains are not in
    the generated certificate)."""

    def __init__(self, port: int, cert: Path) -> None:
        self.port = port
        self.cert = cert
        self._context: ssl.SSLContext | None = None

    @property
    def context(self) -> ssl.SSLContext:
        if self._context is None:
            context = ssl.create_default_context(cafile=str(self.cert))
            context.check_hostname = False
            self._context = context
        return self._context

    def get(self, host: str, path: str, headers: dict[str, str] | None = None) -> Response:
        conn = http.client.HTTPSConnection("127.0.0.1", self.port, context=self.context, timeout=10)
        try:
            conn.putrequest("GET", path, skip_host=True)
            conn.putheader("Host", host)
            for name, value in (headers or {}).items():
                conn.putheader(name, value)
            conn.endheaders()
            response = conn.getresponse()
            return Response(response.status, response.headers, response.read())
        finally:
            conn.close()


def listening(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=1):
        return True


def start_backend(case: Any, source: str) -> int:
    """A backend process from ``source`` (given its port as argv[1]); stopped at cleanup."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-c", source, str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def stop() -> None:
        process.terminate()
        process.wait(timeout=30)

    case.addCleanup(stop)
    wait_for(lambda: listening(port), 30, "a test backend")
    return port
