"""Absolute URLs from a server-form app through the whole proxy over real TLS (issue #14): the
307 into the prefix, the guard on the redirected request, the explaining 404s, the option off,
and a real browser running a page whose script and stylesheet use absolute URLs."""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.trial import unittest

from tests.forward_harness import start_backend
from tests.integration.test_browser import WebDriver
from tests.processes import ProxyProcess, admin, free_port, wait_for
from tests.support import https_client, start_proxy


def basic(name: str, secret: str) -> list[bytes]:
    return [b"Basic " + base64.b64encode(f"{name}:{secret}".encode())]


class OverRealSockets(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def start(self, *options: str):  # type: ignore[no-untyped-def]
        self.proxy = yield start_proxy(self, *options)
        directory = self.proxy.directory
        yield directory.add_user("alice", "alice-password")
        yield directory.add_user("eve", "eve-password")
        project = yield directory.add_project("alice", host="127.0.0.1")
        self.pid = project.id
        self.backend = yield start_backend(self)
        self.http = https_client(self, self.proxy.cert_path)
        self.prefix = f"/{self.pid}/server/{self.backend.port}"
        self.referer = f"{self.proxy.url}{self.prefix}/app/page".encode()

    @defer.inlineCallbacks
    def ask(self, method: str, path: str, headers: dict[bytes, list[bytes]], **kw: Any):  # type: ignore[no-untyped-def]
        response = yield self.http.request(
            method, self.proxy.url + path, headers=headers, allow_redirects=False, **kw
        )
        body = yield response.content()
        return response, body

    @defer.inlineCallbacks
    def test_redirected_into_the_prefix_then_guarded(self):  # type: ignore[no-untyped-def]
        yield self.start()
        headers = {b"Referer": [self.referer], b"Authorization": basic("alice", "alice-password")}
        response, _ = yield self.ask("GET", "/static/app.js?v=1", headers)
        self.assertEqual(response.code, 307)
        location = response.headers.getRawHeaders(b"location")[0].decode()
        self.assertEqual(location, f"{self.prefix}/static/app.js?v=1")
        self.assertEqual(response.headers.getRawHeaders(b"vary"), [b"Referer"])
        self.assertEqual(response.headers.getRawHeaders(b"cache-control"), [b"no-store"])

        # The redirected request goes through the guard like any other.
        response, body = yield self.ask("GET", location, headers)
        self.assertEqual(response.code, 200)
        self.assertEqual(json.loads(body)["uri"], "/static/app.js?v=1")
        response, _ = yield self.ask("GET", location, {})
        self.assertEqual(response.code, 401)
        eve = {b"Referer": [self.referer], b"Authorization": basic("eve", "eve-password")}
        response, _ = yield self.ask("GET", "/static/app.js", eve)
        self.assertEqual(response.code, 307)  # the redirect itself tells nothing...
        response, _ = yield self.ask("GET", f"{self.prefix}/static/app.js", eve)
        self.assertEqual(response.code, 404)  # ...and the guard lets no outsider through
        self.assertEqual(len(self.backend.stats.requests), 1)

    @defer.inlineCallbacks
    def test_post_keeps_method_and_body(self):  # type: ignore[no-untyped-def]
        yield self.start()
        headers = {
            b"Referer": [self.referer],
            b"Authorization": basic("alice", "alice-password"),
            b"Content-Type": [b"application/json"],
        }
        body = b'{"run": "all cells"}'
        response, _ = yield self.ask("POST", "/api/run", headers, data=body)
        self.assertEqual(response.code, 307)
        location = response.headers.getRawHeaders(b"location")[0].decode()
        response, echoed = yield self.ask("POST", location, headers, data=body)
        document = json.loads(echoed)
        self.assertEqual((document["method"], document["uri"]), ("POST", "/api/run"))
        self.assertEqual(document["body_sha256"], hashlib.sha256(body).hexdigest())

    @defer.inlineCallbacks
    def test_websocket_and_cross_origin_get_404s(self):  # type: ignore[no-untyped-def]
        yield self.start()
        ws = {
            b"Upgrade": [b"websocket"],
            b"Connection": [b"Upgrade"],
            b"Sec-WebSocket-Version": [b"13"],
            b"Sec-WebSocket-Key": [b"dGhlIHNhbXBsZSBub25jZQ=="],
            b"Referer": [self.referer],
            b"Authorization": basic("alice", "alice-password"),
        }
        response, body = yield self.ask("GET", "/api/kernels/k/channels", ws)
        self.assertEqual(response.code, 404)
        self.assertEqual(
            response.headers.getRawHeaders(b"content-type"), [b"text/plain; charset=utf-8"]
        )
        text = body.decode()
        self.assertIn(f"{self.proxy.url}{self.prefix}/api/kernels/k/channels", text)
        self.assertIn(f"{self.proxy.url}/{self.pid}/port/{self.backend.port}/", text)
        other = {b"Referer": [b"https://evil.example" + self.referer[len(self.proxy.url) :]]}
        response, _ = yield self.ask("GET", "/static/app.js", other)
        self.assertEqual(response.code, 404)
        self.assertEqual(self.backend.stats.requests, [])

    @defer.inlineCallbacks
    def test_off_explains_instead(self):  # type: ignore[no-untyped-def]
        yield self.start("--absolute-url-redirect", "off")
        headers = {b"Referer": [self.referer], b"Accept": [b"text/html"]}
        response, body = yield self.ask("GET", "/static/app.js", headers)
        self.assertEqual(response.code, 404)
        self.assertIn(f"{self.proxy.url}{self.prefix}/static/app.js".encode(), body)


PAGE = """<!DOCTYPE html><html><head><title>waiting</title>
<link rel="stylesheet" href="/static/app.css"></head>
<body><h1 id="m">absolute</h1><script src="/static/app.js?v=1"></script></body></html>"""


class InABrowser(unittest.TestCase):
    """An app page whose script and stylesheet use absolute URLs works in the server form."""

    def setUp(self) -> None:
        self.state = str(Path(self.mktemp()).absolute())
        Path(self.state).mkdir(parents=True)
        site = Path(self.mktemp()).absolute()
        (site / "static").mkdir(parents=True)
        (site / "index.html").write_text(PAGE)
        (site / "static" / "app.js").write_text(
            "document.title = 'script ran: ' + "
            "getComputedStyle(document.getElementById('m')).color;"
        )
        (site / "static" / "app.css").write_text("#m { color: rgb(1, 2, 3); }")
        self.backend_port = free_port()
        backend = subprocess.Popen(
            [sys.executable, "-m", "http.server", str(self.backend_port)]
            + ["--bind", "127.0.0.1", "--directory", str(site)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.addCleanup(lambda: (backend.terminate(), backend.wait(timeout=30)))
        done = admin(
            self.state, "user", "add", "alice", "--password-stdin", stdin="correct horse\n"
        )
        self.assertEqual(done.returncode, 0, done.stderr)
        done = admin(self.state, "project", "add", "--owner", "alice")
        self.assertEqual(done.returncode, 0, done.stderr)
        self.pid = done.stdout.strip().splitlines()[-1]
        self.proxy = ProxyProcess(self.state).start()
        self.addCleanup(self.proxy.stop)
        self.proxy.wait_listening()
        self.browser = WebDriver(self)

    def test_script_and_style_load_through_the_redirect(self) -> None:
        page = f"{self.proxy.url}/{self.pid}/server/{self.backend_port}/index.html"
        self.browser.go(page)
        wait_for(lambda: "/_/login" in self.browser.url, 30, "the sign-in page")
        self.browser.type("#name", "alice")
        self.browser.type("#password", "correct horse")
        self.browser.click("button[type=submit]")
        wait_for(lambda: self.browser.url == page, 30, "the app page")
        try:
            wait_for(
                lambda: "script ran: rgb(1, 2, 3)" in self.browser.title, 30, "the script and style"
            )
        except AssertionError as e:
            raise AssertionError(f"{e}\n{self.proxy.output()[-3000:]}") from None
