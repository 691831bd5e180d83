"""The user guide's worked examples, run for real behind the whole proxy.

The Flask example is taken verbatim from docs/user-guide.rst (only its listening address and
port are changed to a free loopback port), so the page cannot promise what the code does not do.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path

from twisted.internet import defer
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from tests.processes import free_port, wait_for
from tests.support import https_client, start_proxy

USER_GUIDE = Path(__file__).resolve().parents[2] / "docs" / "user-guide.rst"


def flask_example() -> str:
    """The Python code block of the user guide's Flask section."""
    text = USER_GUIDE.read_text(encoding="utf-8")
    section = text[text.index(".. _flask:") :]
    block = section[section.index(".. code-block:: python") :]
    lines = block.splitlines()[2:]
    code: list[str] = []
    for line in lines:
        if line and not line.startswith("    "):
            break
        code.append(line[4:])
    return "\n".join(code).strip() + "\n"


class FlaskExampleTests(unittest.TestCase):
    timeout = 60

    def start_flask(self, proxy_fix: bool = True) -> defer.Deferred[int]:
        source = flask_example()
        fix = "app.wsgi_app = ProxyFix(app.wsgi_app, x_for=1, x_proto=1, x_host=1, x_prefix=1)"
        self.assertIn('app.run(host="0.0.0.0", port=5000)', source)
        self.assertIn(fix, source)
        if not proxy_fix:
            source = source.replace(fix, "")
        port = free_port()
        source = source.replace(
            'app.run(host="0.0.0.0", port=5000)', f'app.run(host="127.0.0.1", port={port})'
        )
        folder = Path(self.mktemp())
        folder.mkdir()
        (folder / "app.py").write_text(source, encoding="utf-8")
        process = subprocess.Popen(
            [sys.executable, "app.py"],
            cwd=folder,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

        def stop() -> None:
            process.terminate()
            process.wait(10)

        self.addCleanup(stop)

        def ready() -> bool:
            if process.poll() is not None:
                raise AssertionError("the Flask example exited")
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True

        return deferToThread(wait_for, ready, 30, "the Flask example to listen").addCallback(
            lambda _: port
        )

    @defer.inlineCallbacks
    def test_flask_behind_the_server_form(self):  # type: ignore[no-untyped-def]
        port = yield self.start_flask()
        proxy = yield start_proxy(self)
        yield proxy.directory.add_user("alice", "alice-password")
        project = yield proxy.directory.add_project("alice", host="127.0.0.1")
        _, token = yield proxy.directory.create_token("alice")
        http = https_client(self, proxy.cert_path)
        prefix = f"/{project.id}/server/{port}"
        auth = {b"Authorization": [b"Bearer " + token.encode()]}

        # The links Flask writes carry the prefix, even when a client sends a forged one.
        forged = {**auth, b"X-Forwarded-Prefix": [b"/evil"]}
        response = yield http.get(proxy.url + prefix + "/", headers=forged)
        body = (yield response.content()).decode()
        self.assertEqual(response.code, 200, body)
        hrefs = re.findall(r'href="([^"]*)"', body)
        self.assertEqual(hrefs, [prefix + "/static/style.css", prefix + "/hello"])

        # Following a link works.
        response = yield http.get(proxy.url + hrefs[1], headers=auth)
        body = (yield response.content()).decode()
        self.assertEqual((response.code, body), (200, "Hello from behind the proxy"))

        # Flask's redirect names the prefixed path; the proxy leaves it as it is.
        response = yield http.get(proxy.url + prefix + "/old", headers=auth, allow_redirects=False)
        yield response.content()
        self.assertEqual(response.code, 302)
        self.assertEqual(response.headers.getRawHeaders(b"location"), [f"{prefix}/hello".encode()])

    @defer.inlineCallbacks
    def test_without_proxy_fix_links_leave_the_prefix(self):  # type: ignore[no-untyped-def]
        """The pitfall the guide describes: without ProxyFix the same app writes links that
        start with ``/``, which leave the project's prefix and reach the proxy's 404."""
        port = yield self.start_flask(proxy_fix=False)
        proxy = yield start_proxy(self)
        yield proxy.directory.add_user("alice", "alice-password")
        project = yield proxy.directory.add_project("alice", host="127.0.0.1")
        _, token = yield proxy.directory.create_token("alice")
        http = https_client(self, proxy.cert_path)
        auth = {b"Authorization": [b"Bearer " + token.encode()]}
        response = yield http.get(proxy.url + f"/{project.id}/server/{port}/", headers=auth)
        body = (yield response.content()).decode()
        self.assertEqual(response.code, 200, body)
        hrefs = re.findall(r'href="([^"]*)"', body)
        self.assertEqual(hrefs, ["/static/style.css", "/hello"])
        response = yield http.get(proxy.url + hrefs[1], headers=auth)
        yield response.content()
        self.assertEqual(response.code, 404)
