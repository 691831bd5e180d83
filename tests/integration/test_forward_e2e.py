"""The whole proxy (real guard, real SQLite directory, real TLS) forwarding to real backends:
the Twisted echo backend and ``python3 -m http.server`` serving a page with relative links."""

from __future__ import annotations

import base64
import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from tests.forward_harness import header_values, start_backend
from tests.processes import free_port, wait_for
from tests.support import https_client, start_proxy


def basic(name: str, secret: str) -> bytes:
    return b"Basic " + base64.b64encode(f"{name}:{secret}".encode())


def start_http_server(case: unittest.TestCase, directory: Path) -> defer.Deferred[int]:
    """``python3 -m http.server`` on a free loopback port; stopped at cleanup."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
        cwd=directory,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def stop() -> None:
        process.terminate()
        process.wait(10)

    case.addCleanup(stop)

    def ready() -> bool:
        if process.poll() is not None:
            raise AssertionError("http.server exited")
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True

    return deferToThread(wait_for, ready, 20, "http.server to listen").addCallback(lambda _: port)


class WholeProxy(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def]
        self.proxy = yield start_proxy(self)
        directory = self.proxy.directory
        self.alice = yield directory.add_user("alice", "alice-password")
        yield directory.add_user("bob", "bob-password")
        yield directory.add_user("eve", "eve-password")
        project = yield directory.add_project("alice", host="127.0.0.1", title="t")
        self.pid = project.id
        yield directory.add_collaborator(self.pid, "bob")
        self.http = https_client(self, self.proxy.cert_path)

    def url(self, path: str) -> str:
        return self.proxy.url + path

    @defer.inlineCallbacks
    def get(self, path: str, headers: dict[bytes, list[bytes]], **kw: Any):  # type: ignore[no-untyped-def]
        response = yield self.http.get(self.url(path), headers=headers, **kw)
        body = yield response.content()
        return response, body

    @defer.inlineCallbacks
    def test_echo_backend_and_credentials_never_leak(self):  # type: ignore[no-untyped-def]
        backend = yield start_backend(self)
        base = f"/{self.pid}/server/{backend.port}"
        # Basic with the proxy password: the header is the proxy's, so it is removed.
        response, body = yield self.get(
            base + "/hello?q=1",
            {b"Authorization": [basic("bob", "bob-password")], b"Cookie": [b"app=1"]},
        )
        self.assertEqual(response.code, 200, body)
        doc = json.loads(body)
        self.assertEqual(doc["uri"], "/hello?q=1")
        self.assertEqual(header_values(doc, "authorization"), [])
        self.assertEqual(header_values(doc, "cookie"), ["app=1"])
        self.assertEqual(header_values(doc, "x-forwarded-prefix"), [base])
        # A session cookie: removed from Cookie, the app's cookies pass.
        session = yield self.proxy.directory.create_session(self.alice.id, 3600)
        response, body = yield self.get(
            f"/{self.pid}/port/{backend.port}/x",
            {b"Cookie": [b"a=1; cocalcproxy_session=" + session.encode() + b"; b=2"]},
        )
        self.assertEqual(response.code, 200, body)
        doc = json.loads(body)
        self.assertEqual(doc["uri"], f"/{self.pid}/port/{backend.port}/x")
        self.assertEqual(header_values(doc, "cookie"), ["a=1; b=2"])
        self.assertNotIn(session, body.decode())
        # Bearer API token: also the proxy's credential.
        _, token = yield self.proxy.directory.create_token("alice")
        response, body = yield self.get(
            base + "/t", {b"Authorization": [b"Bearer " + token.encode()]}
        )
        self.assertEqual(response.code, 200, body)
        self.assertEqual(header_values(json.loads(body), "authorization"), [])
        self.assertNotIn(token, body.decode())

    @defer.inlineCallbacks
    def test_outsiders_never_reach_the_backend(self):  # type: ignore[no-untyped-def]
        backend = yield start_backend(self)
        path = f"/{self.pid}/server/{backend.port}/"
        response, _ = yield self.get(path, {b"Authorization": [basic("eve", "eve-password")]})
        self.assertEqual(response.code, 404)
        response, _ = yield self.get(path, {})
        self.assertEqual(response.code, 401)
        self.assertEqual(backend.stats.client_ports, [])

    @defer.inlineCallbacks
    def test_http_server_relative_links_and_redirects(self):  # type: ignore[no-untyped-def]
        root = Path(self.mktemp())
        (root / "sub").mkdir(parents=True)
        (root / "index.html").write_text(
            '<!DOCTYPE html><a href="sub/page.html">page</a> <a href="sub/">dir</a>'
        )
        (root / "sub" / "page.html").write_text('<a href="../index.html">back</a> page two')
        port = yield start_http_server(self, root)
        auth = {b"Authorization": [basic("alice", "alice-password")]}
        base = f"/{self.pid}/server/{port}"

        response, body = yield self.get(base, auth, allow_redirects=False)
        self.assertEqual(response.code, 301)
        self.assertEqual(response.headers.getRawHeaders(b"location"), [(base + "/").encode()])

        response, body = yield self.get(base + "/", auth)
        self.assertEqual(response.code, 200)
        self.assertIn(b'href="sub/page.html"', body)
        # Following the relative link the way a browser resolves it against base + "/".
        response, body = yield self.get(base + "/sub/page.html", auth)
        self.assertEqual((response.code, b"page two" in body), (200, True))
        response, body = yield self.get(base + "/sub/../index.html", auth)
        self.assertEqual(response.code, 200)
        # http.server redirects a directory without its slash to "/sub/": the prefix is added.
        response, _ = yield self.get(base + "/sub", auth, allow_redirects=False)
        self.assertEqual(response.code, 301)
        self.assertEqual(response.headers.getRawHeaders(b"location"), [(base + "/sub/").encode()])
        response, body = yield self.get(base + "/sub", auth)
        self.assertEqual(response.code, 200)
        self.assertIn(b"page.html", body)
        response, _ = yield self.get(base + "/missing.html", auth)
        self.assertEqual(response.code, 404)

    @defer.inlineCallbacks
    def test_http_server_port_form_sees_whole_path(self):  # type: ignore[no-untyped-def]
        root = Path(self.mktemp())
        port = free_port()
        served = root / self.pid / "port" / str(port)
        served.mkdir(parents=True)
        (served / "index.html").write_text('<a href="next.html">next</a>')
        (served / "next.html").write_text("next page")
        # The server must be on the port picked above: start it there.
        process = subprocess.Popen(
            [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
            cwd=root,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.addCleanup(lambda: (process.terminate(), process.wait(10)))

        def ready() -> bool:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True

        yield deferToThread(wait_for, ready, 20, "http.server to listen")
        auth = {b"Authorization": [basic("bob", "bob-password")]}
        base = f"/{self.pid}/port/{port}"
        response, body = yield self.get(base + "/", auth)
        self.assertEqual(response.code, 200)
        self.assertIn(b'href="next.html"', body)
        response, body = yield self.get(base + "/next.html", auth)
        self.assertEqual((response.code, body), (200, b"next page"))

    @defer.inlineCallbacks
    def test_nothing_listening_page(self):  # type: ignore[no-untyped-def]
        port = free_port()
        response, body = yield self.get(
            f"/{self.pid}/server/{port}/",
            {b"Authorization": [basic("alice", "alice-password")], b"Accept": [b"text/html"]},
        )
        self.assertEqual(response.code, 502)
        self.assertIn(f"Nothing answered on port {port} of this project".encode(), body)
        self.assertIn(b"--ip=0.0.0.0", body)
        self.assertEqual(
            response.headers.getRawHeaders(b"content-type"), [b"text/html; charset=utf-8"]
        )


class QuietBackendConnections(unittest.TestCase):
    """Each backend connection has its own client factory: it must not log start and stop."""

    @defer.inlineCallbacks
    def test_no_factory_lines_per_backend_connection(self):  # type: ignore[no-untyped-def]
        from twisted.logger import globalLogPublisher

        proxy = yield start_proxy(self)
        yield proxy.directory.add_user("alice", "alice-password")
        project = yield proxy.directory.add_project("alice")
        backend = yield start_backend(self)
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        http = https_client(self, proxy.cert_path, persistent=False)
        response = yield http.get(
            f"{proxy.url}/{project.id}/server/{backend.port}/x",
            headers={b"Authorization": [basic("alice", "alice-password")]},
        )
        yield response.content()
        self.assertEqual(response.code, 200)
        yield proxy.service.stopService()
        factory_lines = [
            e for e in events if "factory" in str(e.get("log_format", "")).lower()
            and "_BackendProtocolFactory" in str(e.get("log_namespace", ""))
        ]  # fmt: skip
        self.assertEqual(factory_lines, [])
