"""A real browser takes the sign-in hop: headless Chromium opens a project subdomain
(``https://<pid>-<port>.proj.test``, mapped to loopback with ``--host-resolver-rules``), is sent
to the main host to sign in, comes back through the landing path with a cookie of that host only,
and sees the backend's page. Processes as in test_browser (twistd, http.server, chromedriver)."""

from __future__ import annotations

from twisted.trial import unittest

from tests.integration.test_browser import MARKER, WebDriver, start_alice_with_a_backend
from tests.processes import wait_for

DOMAIN = "proj.test"


class BrowserHop(unittest.TestCase):
    def setUp(self) -> None:
        start_alice_with_a_backend(self, "--project-domain", DOMAIN)
        self.browser = WebDriver(self, (f"--host-resolver-rules=MAP *.{DOMAIN} 127.0.0.1",))

    def test_sign_in_through_the_hop(self) -> None:
        host = f"{self.pid}-{self.backend_port}.{DOMAIN}"
        page = f"https://{host}:{self.proxy.port}/index.html?from=hop"
        self.browser.go(page)
        wait_for(lambda: "/_/login" in self.browser.url, 30, "the sign-in page on the main host")
        self.assertTrue(self.browser.url.startswith(f"{self.proxy.url}/_/login?next="))

        self.browser.type("#name", "alice")
        self.browser.type("#password", "correct horse")
        self.browser.click("button[type=submit]")

        try:
            wait_for(lambda: self.browser.url == page, 30, "the subdomain page after the hop")
        except AssertionError as e:
            # Where the browser stopped, and what the proxy saw, to tell why.
            detail = f"{e}\nat {self.browser.url}\n{self.proxy.output()[-3000:]}"
            raise AssertionError(detail) from None
        wait_for(lambda: MARKER in self.browser.source, 30, "the backend's page")
        session = [c for c in self.browser.cookies() if c["name"] == "__Host-cocalcproxy_session"]
        self.assertEqual(len(session), 1, session)
        self.assertEqual(session[0]["domain"], host)  # host-only: no leading dot
        self.assertTrue(session[0]["httpOnly"])
        self.assertTrue(session[0]["secure"])
        self.assertEqual(session[0]["sameSite"], "Lax")

        # Signed in on the main host, another page of the project host loads directly, and a
        # second visit to the landing URL is not needed again.
        self.browser.go(f"https://{host}:{self.proxy.port}/")
        wait_for(
            lambda: MARKER in self.browser.source or "index.html" in self.browser.source,
            30,
            "the backend again",
        )
        self.assertEqual(self.browser.url, f"https://{host}:{self.proxy.port}/")
