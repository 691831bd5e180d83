"""A real browser: headless Chromium, driven over the W3C WebDriver protocol by chromedriver,
opens a proxied URL, is sent to sign in, signs in through the form and lands on the backend's page.

Needs Debian's ``chromium`` and ``chromium-driver`` packages (installed by ``.ci/run``). The proxy
(``twistd -n cocalcproxy``), the backend (``python -m http.server``) and the browser each run as
their own process; the WebDriver protocol is spoken with urllib, so no extra Python package.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from twisted.trial import unittest

from tests.processes import ProxyProcess, admin, free_port, wait_for

ELEMENT = "element-6066-11e4-a52e-4f735466cecf"
MARKER = "Hello from the backend"


def find(program: str) -> str:
    for candidate in (shutil.which(program), f"/usr/bin/{program}", f"/usr/lib/chromium/{program}"):
        if candidate and Path(candidate).exists():
            return candidate
    raise AssertionError(f"{program} is not installed (Debian: apt-get install chromium-driver)")


class WebDriver:
    """Just enough of the W3C WebDriver protocol, spoken to a local chromedriver."""

    def __init__(self, case: unittest.TestCase, extra_args: tuple[str, ...] = ()) -> None:
        self.port = free_port()
        self.profile = tempfile.mkdtemp(prefix="cocalcproxy-chromium-")
        case.addCleanup(shutil.rmtree, self.profile, True)
        self.log = Path(self.profile + ".chromedriver.log")
        self.process = subprocess.Popen(
            [find("chromedriver"), f"--port={self.port}", f"--log-path={self.log}"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        case.addCleanup(self._stop_driver)
        wait_for(lambda: self._call("GET", "/status")["ready"], 60, "chromedriver to be ready")
        capabilities = {
            "browserName": "chrome",
            "acceptInsecureCerts": True,
            "pageLoadStrategy": "normal",
            "goog:chromeOptions": {
                "binary": find("chromium"),
                "args": [
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-dev-shm-usage",
                    "--disable-quic",
                    "--no-first-run",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    "--ignore-certificate-errors",
                    f"--user-data-dir={self.profile}",
                    *extra_args,
                ],
            },
        }
        session = self._call("POST", "/session", {"capabilities": {"alwaysMatch": capabilities}})
        self.session = session["sessionId"]
        case.addCleanup(self._quit)

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}",
            data=data,
            method=method,
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                return json.loads(response.read())["value"]
        except urllib.error.HTTPError as e:
            raise AssertionError(f"WebDriver {method} {path}: {e.read()[:2000]!r}") from None

    def _session(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        return self._call(method, f"/session/{self.session}{path}", body)

    def _quit(self) -> None:
        try:
            self._call("DELETE", f"/session/{self.session}")
        except Exception:  # noqa: BLE001 - the driver is stopped next anyway
            pass

    def _stop_driver(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.unlink(missing_ok=True)

    def go(self, url: str) -> None:
        self._session("POST", "/url", {"url": url})

    @property
    def url(self) -> str:
        return str(self._session("GET", "/url"))

    @property
    def title(self) -> str:
        return str(self._session("GET", "/title"))

    def execute(self, script: str, *args: Any) -> Any:
        """Run ``script`` (a function body; ``arguments`` holds args) in the page."""
        return self._session("POST", "/execute/sync", {"script": script, "args": list(args)})

    def execute_async(self, script: str, *args: Any) -> Any:
        """Run ``script`` in the page; it ends by calling ``arguments[arguments.length - 1]``
        with its result (the WebDriver session's script timeout applies)."""
        return self._session("POST", "/execute/async", {"script": script, "args": list(args)})

    def set_script_timeout(self, seconds: float) -> None:
        self._session("POST", "/timeouts", {"script": int(seconds * 1000)})

    @property
    def source(self) -> str:
        return str(self._session("GET", "/source"))

    def element(self, css: str) -> str:
        return str(
            self._session("POST", "/element", {"using": "css selector", "value": css})[ELEMENT]
        )

    def type(self, css: str, text: str) -> None:
        self._session("POST", f"/element/{self.element(css)}/value", {"text": text})

    def click(self, css: str) -> None:
        self._session("POST", f"/element/{self.element(css)}/click", {})

    def cookies(self) -> list[dict[str, Any]]:
        return list(self._session("GET", "/cookie"))


def start_alice_with_a_backend(case: Any, *proxy_args: str) -> None:
    """On ``case``: an ``http.server`` backend page, alice (password "correct horse") owning a
    project, and a running ``twistd`` proxy given ``proxy_args``; sets ``state``, ``pid``,
    ``backend_port`` and ``proxy``, all stopped at cleanup."""
    case.state = str(Path(case.mktemp()).absolute())
    Path(case.state).mkdir(parents=True)
    site = Path(case.mktemp()).absolute()
    site.mkdir(parents=True)
    (site / "index.html").write_text(
        f"<!DOCTYPE html><title>Backend</title><h1 id='marker'>{MARKER}</h1>"
    )
    case.backend_port = free_port()
    backend = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(case.backend_port)]
        + ["--bind", "127.0.0.1", "--directory", str(site)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    case.addCleanup(lambda: (backend.terminate(), backend.wait(timeout=30)))

    done = admin(case.state, "user", "add", "alice", "--password-stdin", stdin="correct horse\n")
    case.assertEqual(done.returncode, 0, done.stderr)
    done = admin(case.state, "project", "add", "--owner", "alice", "--home", str(site))
    case.assertEqual(done.returncode, 0, done.stderr)
    case.pid = done.stdout.strip().splitlines()[-1]

    case.proxy = ProxyProcess(case.state, *proxy_args).start()
    case.addCleanup(case.proxy.stop)
    case.proxy.wait_listening()


class BrowserSignIn(unittest.TestCase):
    def setUp(self) -> None:
        start_alice_with_a_backend(self)
        self.browser = WebDriver(self)

    def test_sign_in_and_land_on_the_backend(self) -> None:
        proxied = f"{self.proxy.url}/{self.pid}/server/{self.backend_port}/"
        self.browser.go(proxied)
        wait_for(lambda: "/_/login" in self.browser.url, 30, "the sign-in page")
        self.assertIn("Sign in", self.browser.source)

        self.browser.type("#name", "alice")
        self.browser.type("#password", "correct horse")
        self.browser.click("button[type=submit]")

        wait_for(lambda: self.browser.url == proxied, 30, "the proxied URL after signing in")
        wait_for(lambda: MARKER in self.browser.source, 30, "the backend's page")
        session = [c for c in self.browser.cookies() if c["name"] == "__Host-cocalcproxy_session"]
        self.assertEqual(len(session), 1)
        self.assertTrue(session[0]["httpOnly"])
        self.assertTrue(session[0]["secure"])
        self.assertEqual(session[0]["sameSite"], "Lax")

    def test_wrong_password_stays_on_the_form(self) -> None:
        self.browser.go(f"{self.proxy.url}/_/login")
        self.browser.type("#name", "alice")
        self.browser.type("#password", "wrong")
        self.browser.click("button[type=submit]")
        wait_for(
            lambda: "The name or password is not right." in self.browser.source,
            30,
            "the failure message",
        )
        self.assertEqual(
            [c for c in self.browser.cookies() if c["name"] == "__Host-cocalcproxy_session"], []
        )
