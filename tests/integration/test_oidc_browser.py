"""Signing in with a real OpenID provider, in a real browser.

The provider is panva's ``oidc-provider`` (npm, the version pinned in tests/oidc/package.json,
installed by ``npm ci`` on first use) run by the machine's node from tests/oidc/provider.js,
with one client (the proxy) and test accounts; its development login form takes any password.
The proxy runs as ``twistd -n cocalcproxy`` with ``--password-login off``, the browser is
headless Chromium over WebDriver (tests/integration/test_browser.py). The provider's keys are
rotated by restarting it with a new key on the same port: the proxy must fetch them again.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from joserfc.jwk import RSAKey
from twisted.trial import unittest

from cocalcproxy.http import headers
from tests.integration.test_browser import MARKER, WebDriver
from tests.oidc_support import CLIENT_ID, CLIENT_SECRET, NodeProvider
from tests.processes import ProxyProcess, admin, free_port, wait_for

ACCOUNTS = {
    "carol": {"preferred_username": "carol", "email": "carol@example.org", "email_verified": True},
    "dana": {"preferred_username": "dana", "email": "dana@example.org", "email_verified": True},
}


class ProviderAndProxy(unittest.TestCase):
    """Set-up shared by the browser tests: backend, provider, proxy (with ``proxy_args``) and
    a browser (with ``browser_args``)."""

    timeout = 300
    proxy_args: tuple[str, ...] = ()
    browser_args: tuple[str, ...] = ()

    def setUp(self) -> None:
        self.state = str(Path(self.mktemp()).absolute())
        Path(self.state).mkdir(parents=True)
        site = Path(self.mktemp()).absolute()
        site.mkdir(parents=True)
        (site / "index.html").write_text(
            f"<!DOCTYPE html><title>Backend</title><h1 id='marker'>{MARKER}</h1>"
        )
        self.backend_port = free_port()
        backend = subprocess.Popen(
            [sys.executable, "-m", "http.server", str(self.backend_port)]
            + ["--bind", "127.0.0.1", "--directory", str(site)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.addCleanup(lambda: (backend.terminate(), backend.wait(timeout=30)))

        # carol is pre-bound by the operator (her provider subject is her login there) and owns
        # a project; dana is not known here before she signs in.
        done = admin(self.state, "user", "add", "carol", "--oidc-subject", "carol")
        self.assertEqual(done.returncode, 0, done.stderr)
        done = admin(self.state, "project", "add", "--owner", "carol", "--home", str(site))
        self.assertEqual(done.returncode, 0, done.stderr)
        self.pid = done.stdout.strip().splitlines()[-1]

        port = free_port()
        origin = f"https://localhost:{port}"
        self.provider = NodeProvider(
            self, [f"{origin}/_/oidc/callback"], [f"{origin}/_/login"], ACCOUNTS
        ).start()
        secret = Path(self.state) / "oidc-secret"
        secret.write_text(CLIENT_SECRET + "\n")
        os.chmod(secret, 0o600)
        self.proxy = ProxyProcess(
            self.state,
            "--oidc-issuer", self.provider.issuer,
            "--oidc-client-id", CLIENT_ID,
            "--oidc-client-secret-file", str(secret),
            "--oidc-name", "Test IdP",
            "--password-login", "off",
            *self.proxy_args,
            port=port,
        ).start()  # fmt: skip
        self.addCleanup(self.proxy.stop)
        self.proxy.wait_listening()
        self.browser = WebDriver(self, self.browser_args)

    def sign_in_at_the_provider(self, login: str) -> None:
        """From the proxy's sign-in page: the button, the provider's login and consent."""
        wait_for(lambda: "/_/login" in self.browser.url, 30, "the proxy's sign-in page")
        source = self.browser.source
        self.assertIn("Sign in with Test IdP", source)
        self.assertNotIn('id="password"', source)  # --password-login off: the button alone
        self.browser.click("p.provider a")
        wait_for(lambda: self.provider.issuer in self.browser.url, 30, "the provider's login")
        self.browser.type("input[name=login]", login)
        self.browser.type("input[name=password]", "any password")
        self.browser.click("button[type=submit]")
        wait_for(lambda: "Continue" in self.browser.source, 30, "the provider's consent page")
        self.browser.click("button[type=submit]")

    def session_cookies(self) -> list[dict[str, object]]:
        return [c for c in self.browser.cookies() if c["name"] == headers.SESSION_COOKIE.decode()]


class RealProviderInABrowser(ProviderAndProxy):
    def test_whole_flow_sign_out_and_key_rotation(self) -> None:
        proxied = f"{self.proxy.url}/{self.pid}/server/{self.backend_port}/"
        self.browser.go(proxied)
        self.sign_in_at_the_provider("carol")
        wait_for(lambda: self.browser.url == proxied, 30, "the proxied URL after signing in")
        wait_for(lambda: MARKER in self.browser.source, 30, "the backend's page")
        [session] = self.session_cookies()
        self.assertTrue(session["httpOnly"] and session["secure"])
        # The state cookie was used up.
        names = [c["name"] for c in self.browser.cookies()]
        self.assertNotIn(headers.OIDC_STATE_COOKIE.decode(), names)

        # Sign out: the proxy session ends, and the provider's logout is offered.
        self.browser.go(f"{self.proxy.url}/")
        wait_for(lambda: "Sign out" in self.browser.source, 30, "the project list")
        self.assertIn("carol", self.browser.source)
        self.browser.click("form[action='/_/logout'] button")
        wait_for(lambda: "Also sign out of Test IdP" in self.browser.source, 30, "signed out")
        self.assertEqual(self.session_cookies(), [])
        self.browser.click("p.notice a")
        wait_for(lambda: "sign me out" in self.browser.source, 30, "the provider's logout page")
        self.browser.click("button[name=logout]")
        wait_for(lambda: "/_/login" in self.browser.url, 30, "back on the proxy after logout")

        # The provider rotates its signing key (restart with a new key on the same port); the
        # proxy has only the old key cached and must fetch the new one.
        old_kid = self.provider.key.kid
        self.provider.restart(RSAKey.generate_key(2048, auto_kid=True))
        self.assertNotEqual(self.provider.key.kid, old_kid)
        self.browser.go(proxied)
        self.sign_in_at_the_provider("carol")
        wait_for(lambda: MARKER in self.browser.source, 60, "the backend after the rotation")
        self.assertIn("fetching the JWKS again", self.proxy.output())

    def test_new_person_gets_an_account_and_nothing_else(self) -> None:
        proxied = f"{self.proxy.url}/{self.pid}/server/{self.backend_port}/"
        self.browser.go(proxied)
        self.sign_in_at_the_provider("dana")
        # dana is signed in (a session, her account now exists) but not a member: 404.
        wait_for(lambda: self.session_cookies(), 30, "dana's session")
        wait_for(lambda: "Not found" in self.browser.source, 30, "the 404 for a non-member")
        self.assertNotIn(MARKER, self.browser.source)
        listed = admin(self.state, "user", "list")
        self.assertEqual(listed.stdout, "carol\toidc=carol\ndana\toidc=dana\n")


class RealProviderThroughTheHop(ProviderAndProxy):
    """A project subdomain: the browser is sent to the main host to sign in with the provider,
    and comes back through the sign-in hop with a cookie for that project host only."""

    proxy_args = ("--project-domain", "proj.test")
    browser_args = ("--host-resolver-rules=MAP *.proj.test 127.0.0.1",)

    def test_sign_in_with_the_provider_for_a_project_host(self) -> None:
        host = f"{self.pid}-{self.backend_port}.proj.test"
        page = f"https://{host}:{self.proxy.port}/index.html?from=hop"
        self.browser.go(page)
        self.sign_in_at_the_provider("carol")
        try:
            wait_for(lambda: self.browser.url == page, 30, "the project host after the hop")
        except AssertionError as e:
            detail = f"{e}\nat {self.browser.url}\n{self.proxy.output()[-3000:]}"
            raise AssertionError(detail) from None
        wait_for(lambda: MARKER in self.browser.source, 30, "the backend's page")
        hosts = sorted(str(c["domain"]) for c in self.session_cookies())
        self.assertEqual(hosts, [host])  # the browser is looking at the project host
