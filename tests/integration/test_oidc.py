"""Signing in with an OpenID provider: every bad input gets a clear page and no session.

The whole proxy runs in this process over real TLS; the provider is tests/oidc_support's
scriptable one on loopback HTTP, whose token endpoint checks the client secret and PKCE and then
answers with the ID token each test makes (joserfc; forgeries with a key the provider does not
know). A treq client plays the browser: it follows the proxy's redirect to the provider, takes
the code from there and brings it back with the state cookie, as a browser would.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import time
from http.cookies import SimpleCookie
from typing import Any
from urllib.parse import urlencode

from joserfc import jwt
from joserfc.jwk import KeySet, RSAKey
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.trial import unittest
from twisted.web import server

from cocalcproxy.http import headers
from tests.integration.test_guard_backend import Echo
from tests.oidc_support import CLIENT_ID, CLIENT_SECRET, FakeProvider
from tests.processes import free_port
from tests.support import https_client, start_proxy

SESSION = headers.SESSION_COOKIE.decode()
STATE_COOKIE = headers.OIDC_STATE_COOKIE.decode()
HTML = {b"Accept": [b"text/html"]}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def set_cookies(response: Any) -> dict[str, str]:
    jar: dict[str, str] = {}
    for line in response.headers.getRawHeaders(b"set-cookie", []):
        cookie: SimpleCookie = SimpleCookie()
        cookie.load(line.decode("latin-1"))
        for name, morsel in cookie.items():
            jar[name] = morsel.value
    return jar


class OIDCSignIn(unittest.TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def]
        self.provider = yield FakeProvider().start(self)

    @defer.inlineCallbacks
    def start(self, *extra: str, issuer: str | None = None):  # type: ignore[no-untyped-def]
        secret = os.path.abspath(self.mktemp())
        with open(secret, "w") as f:
            f.write(CLIENT_SECRET + "\n")
        self.proxy = yield start_proxy(
            self,
            "--oidc-issuer", issuer or self.provider.issuer,
            "--oidc-client-id", CLIENT_ID,
            "--oidc-client-secret-file", secret,
            "--oidc-name", "Example <ID>",
            *extra,
        )  # fmt: skip
        self.http = https_client(self, self.proxy.cert_path)

    @defer.inlineCallbacks
    def get(self, path: str, cookies: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
        headers = dict(HTML)
        if cookies:
            headers[b"Cookie"] = ["; ".join(f"{k}={v}" for k, v in cookies.items()).encode()]
        response = yield self.http.get(
            self.proxy.url + path, headers=headers, allow_redirects=False
        )
        body = yield response.content()
        return response, body.decode()

    @defer.inlineCallbacks
    def begin(self, next_path: str = "/"):  # type: ignore[no-untyped-def]
        """Start a sign-in: (code, state, the browser's state cookie)."""
        response, body = yield self.get("/_/oidc/login?" + urlencode({"next": next_path}))
        self.assertEqual(response.code, 302, body)
        [location] = response.headers.getRawHeaders(b"location")
        code, state = self.provider.authorize(location.decode())
        cookies = set_cookies(response)
        self.assertIn(STATE_COOKIE, cookies)
        [line] = [
            c for c in response.headers.getRawHeaders(b"set-cookie") if c.startswith(b"__Host-")
        ]
        for attribute in (b"Secure", b"HttpOnly", b"SameSite=lax", b"Path=/", b"Max-Age=600"):
            self.assertIn(attribute.lower(), line.lower())
        self.assertNotIn(b"domain", line.lower())
        return code, state, {STATE_COOKIE: cookies[STATE_COOKIE]}

    @defer.inlineCallbacks
    def finish(self, code: str, state: str, cookies: dict[str, str], **extra: str):  # type: ignore[no-untyped-def]
        query = urlencode({"code": code, "state": state, **extra})
        response, body = yield self.get("/_/oidc/callback?" + query, cookies)
        return response, body

    @defer.inlineCallbacks
    def refused(self, status: int, text: str, **token: Any):  # type: ignore[no-untyped-def]
        """A whole sign-in whose ID token is ``self.provider.id_token(**token)`` is refused."""
        code, state, cookies = yield self.begin()
        self.provider.answer_with(lambda: self.provider.id_token(**token))
        response, body = yield self.finish(code, state, cookies)
        self.assert_refused(response, body, status, text)

    def assert_refused(self, response: Any, body: str, status: int, text: str) -> None:
        self.assertEqual(response.code, status, body)
        self.assertIn(text, body)
        self.assertIn('<a href="/_/login">', body)
        self.assertNotIn(SESSION, set_cookies(response))
        self.assertEqual(set_cookies(response).get(STATE_COOKIE), "")  # cleared

    # -- the good path --------------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_sign_in_creates_the_account_and_a_session(self):  # type: ignore[no-untyped-def]
        yield self.start()
        code, state, cookies = yield self.begin("/somewhere?x=1")
        self.provider.answer_with(self.provider.id_token())
        response, body = yield self.finish(code, state, cookies)
        self.assertEqual(response.code, 303, body)
        self.assertEqual(response.headers.getRawHeaders(b"location"), [b"/somewhere?x=1"])
        jar = set_cookies(response)
        self.assertEqual(jar[STATE_COOKIE], "")
        session = jar[SESSION]
        # The redirect URI, secret (Basic) and verifier went to the token endpoint.
        [form] = self.provider.token_requests
        self.assertEqual(form["redirect_uri"], f"{self.proxy.url}/_/oidc/callback")
        self.assertEqual(form["grant_type"], "authorization_code")
        # The session is carol's; the account exists, bound, with her e-mail, and no password.
        response = yield self.http.get(
            self.proxy.url + "/", headers={b"Cookie": [f"{SESSION}={session}".encode()]}
        )
        index = json.loads((yield response.content()))
        self.assertEqual(index, {"account": "carol", "projects": []})
        [carol] = yield self.proxy.directory.list_users()
        self.assertEqual((carol.name, carol.oidc_subject, carol.email),
                         ("carol", "subject-carol", "carol@example.org"))  # fmt: skip
        # Signing in grants nothing but identity: no project, and no password to use.
        self.assertIsNone((yield self.proxy.directory.check_password("carol", "")))

        # The same subject under a new name is still carol's account, never another one.
        code, state, cookies = yield self.begin()
        self.provider.answer_with(self.provider.id_token(preferred_username="mallory"))
        response, body = yield self.finish(code, state, cookies)
        self.assertEqual(response.code, 303, body)
        users = yield self.proxy.directory.list_users()
        self.assertEqual([u.name for u in users], ["carol"])

    @defer.inlineCallbacks
    def test_sign_in_page_offers_the_provider_escaped(self):  # type: ignore[no-untyped-def]
        yield self.start()
        response, body = yield self.get("/_/login?next=/abc")
        self.assertEqual(response.code, 200)
        self.assertIn("Sign in with Example &lt;ID&gt;", body)
        self.assertIn('href="/_/oidc/login?next=%2Fabc"', body)
        self.assertIn('id="password"', body)

    @defer.inlineCallbacks
    def test_backends_learn_the_provider_email_from_the_assertion(self):  # type: ignore[no-untyped-def]
        """With --identity-assertion, a backend is told the e-mail address the provider
        verified (and which is kept on the account)."""
        echo = Echo()
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(server.Site(echo))
        self.addCleanup(port.stopListening)
        yield self.start("--identity-assertion")
        code, state, cookies = yield self.begin()
        self.provider.answer_with(self.provider.id_token())
        response, body = yield self.finish(code, state, cookies)
        self.assertEqual(response.code, 303, body)
        session = set_cookies(response)[SESSION]
        d = self.proxy.directory
        yield d.add_user("alice", "alice-password")
        project = yield d.add_project("alice")
        yield d.add_collaborator(project.id, "carol")
        path = f"/{project.id}/server/{port.getHost().port}/"
        response = yield self.http.get(
            self.proxy.url + path, headers={b"Cookie": [f"{SESSION}={session}".encode()]}
        )
        record = json.loads((yield response.content()))
        [token] = [v for k, v in record["headers"] if k.lower() == "x-cocalcproxy-identity"]
        response = yield self.http.get(self.proxy.url + "/_/jwks.json")
        keys = KeySet.import_key_set(json.loads((yield response.content())))
        claims = jwt.decode(token, keys, algorithms=["ES256"]).claims
        self.assertEqual(
            (claims["sub"], claims["email"], claims["role"], claims["aud"]),
            ("carol", "carol@example.org", "collaborator", self.proxy.url + path),
        )

    @defer.inlineCallbacks
    def test_without_a_provider_there_is_nothing_to_see(self):  # type: ignore[no-untyped-def]
        self.proxy = yield start_proxy(self)
        self.http = https_client(self, self.proxy.cert_path)
        for path in ("/_/oidc/login", "/_/oidc/callback?code=x&state=y"):
            response, _ = yield self.get(path)
            self.assertEqual(response.code, 404, path)
        response, body = yield self.get("/_/login")
        self.assertNotIn("Sign in with", body)
        self.assertIn('id="password"', body)

    # -- the state ------------------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_state_mismatch_missing_cookie_and_replay(self):  # type: ignore[no-untyped-def]
        yield self.start()
        self.provider.answer_with(lambda: self.provider.id_token())
        code, state, cookies = yield self.begin()
        response, body = yield self.finish(code, state + "x", cookies)
        self.assert_refused(response, body, 403, "does not belong to the sign-in this browser")
        response, body = yield self.finish(code, state, {})
        self.assert_refused(response, body, 400, "not started in this browser")
        # Another browser's cookie does not fit this state either.
        _, _, others = yield self.begin()
        response, body = yield self.finish(code, state, others)
        self.assert_refused(response, body, 403, "does not belong to the sign-in this browser")
        # The right pair works once; replaying it (cookie kept by an attacker) does not.
        code, state, cookies = yield self.begin()
        response, body = yield self.finish(code, state, cookies)
        self.assertEqual(response.code, 303, body)
        response, body = yield self.finish(code, state, cookies)
        self.assert_refused(response, body, 403, "already used")
        # A tampered cookie is no cookie.
        code, state, cookies = yield self.begin()
        broken = {STATE_COOKIE: cookies[STATE_COOKIE][:-4] + "AAAA"}
        response, body = yield self.finish(code, state, broken)
        self.assert_refused(response, body, 400, "not started in this browser")

    @defer.inlineCallbacks
    def test_a_state_is_used_once_across_proxies(self):  # type: ignore[no-untyped-def]
        """Issue #10: two proxies on one directory (workers, machines behind a balancer): an
        answer used through one is refused by the other, which also opens the browser's state
        cookie (the key is the directory's)."""
        yield self.start()
        one = self.proxy
        self.provider.answer_with(lambda: self.provider.id_token())
        code, state, cookies = yield self.begin()
        response, body = yield self.finish(code, state, cookies)
        self.assertEqual(response.code, 303, body)
        yield self.start(
            "--database", f"sqlite:///{os.path.abspath(one.state_dir)}/directory.sqlite3",
            "--tls-cert", one.cert_path,
            "--tls-key", os.path.join(one.state_dir, "tls", "key.pem"),
        )  # fmt: skip
        self.assertNotEqual(self.proxy.port, one.port)
        response, body = yield self.finish(code, state, cookies)
        self.assert_refused(response, body, 403, "already used")
        # A sign-in begun on one proxy finishes on the other.
        self.proxy, other = one, self.proxy
        code, state, cookies = yield self.begin()
        self.proxy = other
        response, body = yield self.finish(code, state, cookies)
        self.assertEqual(response.code, 303, body)  # the other proxy opened the cookie
        self.assertIn(SESSION, set_cookies(response))

    # -- the ID token ---------------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_bad_id_tokens(self):  # type: ignore[no-untyped-def]
        yield self.start()
        untrusted = "could not be trusted"
        now = int(time.time())
        stranger = RSAKey.generate_key(2048, auto_kid=True)
        yield self.refused(403, untrusted, nonce="another-nonce")
        yield self.refused(403, untrusted, exp=now - 120, iat=now - 420)
        yield self.refused(403, untrusted, iat=now + 600, exp=now + 900)
        yield self.refused(403, untrusted, aud="another-client")
        yield self.refused(403, untrusted, aud=[CLIENT_ID, "another"], azp="another")
        yield self.refused(403, untrusted, iss="https://evil.example")
        yield self.refused(403, untrusted, sub=None)
        # Forged: a key the provider does not know, under the provider's kid or its own.
        yield self.refused(403, untrusted, key=stranger)
        yield self.refused(
            403, untrusted, key=stranger, header={"alg": "RS256", "kid": stranger.kid}
        )

        # Made by hand, as joserfc refuses to: HS256 keyed with the provider's public key (the
        # classic confusion attack), and alg none.
        def hand_made(alg: str, key: bytes | None) -> str:
            header = {"alg": alg, "kid": self.provider.key.kid, "typ": "JWT"}
            signing_input = (
                b64(json.dumps(header).encode())
                + "."
                + b64(json.dumps(self.provider.claims()).encode())
            )
            if key is None:
                return signing_input + "."
            mac = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
            return signing_input + "." + b64(mac)

        for alg, key in (
            ("HS256", self.provider.key.as_pem(private=False)),
            ("HS256", json.dumps(self.provider.key.as_dict(private=False)).encode()),
            ("none", None),
            ("None", None),
        ):
            code, state, cookies = yield self.begin()
            self.provider.answer_with(lambda alg=alg, key=key: hand_made(alg, key))
            response, body = yield self.finish(code, state, cookies)
            self.assert_refused(response, body, 403, untrusted)
        # None of those made an account.
        self.assertEqual((yield self.proxy.directory.list_users()), [])
        # ... and a good token right after works (the refusals were about the tokens).
        code, state, cookies = yield self.begin()
        self.provider.answer_with(self.provider.id_token())
        response, body = yield self.finish(code, state, cookies)
        self.assertEqual(response.code, 303, body)

    @defer.inlineCallbacks
    def test_provider_error_answer_is_not_reflected(self):  # type: ignore[no-untyped-def]
        yield self.start()
        code, state, cookies = yield self.begin()
        response, body = yield self.finish(
            "", state, cookies, error="access_denied<script>", error_description="<script>x"
        )
        self.assert_refused(response, body, 403, "Example &lt;ID&gt; did not sign you in")
        self.assertNotIn("<script>", body)
        self.assertNotIn("access_denied", body)
        # The token endpoint refusing the code.
        code, state, cookies = yield self.begin()
        self.provider.token_answer = lambda form: (400, {"error": "invalid_grant<b>"})
        response, body = yield self.finish(code, state, cookies)
        self.assert_refused(response, body, 403, "could not be trusted")
        self.assertNotIn("invalid_grant", body)

    @defer.inlineCallbacks
    def test_allowed_domains(self):  # type: ignore[no-untyped-def]
        yield self.start("--oidc-allowed-domains", "example.org,Example.NET")
        yield self.refused(403, "not allowed to sign in here", email="eve@evil.example")
        yield self.refused(403, "not allowed to sign in here", email_verified=False)
        yield self.refused(403, "not allowed to sign in here", email="eve@sub.example.org")
        code, state, cookies = yield self.begin()
        self.provider.answer_with(self.provider.id_token(email="dan@example.net", sub="dan"))
        response, body = yield self.finish(code, state, cookies)
        self.assertEqual(response.code, 303, body)

    # -- accounts -------------------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_no_takeover_of_a_local_account_by_name(self):  # type: ignore[no-untyped-def]
        yield self.start()
        d = self.proxy.directory
        yield d.add_user("carol", "carols-own-password")
        yield self.refused(403, "already exists here and is not linked")
        # Once the operator links the account, the provider's carol reaches it.
        yield d.link_oidc_subject("carol", "subject-carol")
        code, state, cookies = yield self.begin()
        self.provider.answer_with(self.provider.id_token())
        response, body = yield self.finish(code, state, cookies)
        self.assertEqual(response.code, 303, body)
        # A pre-bound account (user add --oidc-subject) is reached by subject, whatever the name.
        yield d.add_user("dave", None, oidc_subject="subject-dave")
        code, state, cookies = yield self.begin()
        self.provider.answer_with(self.provider.id_token(sub="subject-dave"))
        response, body = yield self.finish(code, state, cookies)
        self.assertEqual(response.code, 303, body)
        session = set_cookies(response)[SESSION]
        response = yield self.http.get(
            self.proxy.url + "/", headers={b"Cookie": [f"{SESSION}={session}".encode()]}
        )
        self.assertEqual(json.loads((yield response.content()))["account"], "dave")

    # -- the provider itself --------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_unreachable_and_wrong_issuer(self):  # type: ignore[no-untyped-def]
        yield self.start(issuer=f"http://127.0.0.1:{free_port()}")
        response, body = yield self.get("/_/oidc/login")
        self.assertEqual(response.code, 502, body)
        self.assertIn("could not be reached", body)
        self.assertNotIn(STATE_COOKIE, set_cookies(response))

    @defer.inlineCallbacks
    def test_discovery_naming_another_issuer(self):  # type: ignore[no-untyped-def]
        self.provider.discovery_changes = {"issuer": "https://evil.example"}
        yield self.start()
        response, body = yield self.get("/_/oidc/login")
        self.assertEqual(response.code, 502, body)
        self.assertNotIn("evil", body)

    @defer.inlineCallbacks
    def test_symmetric_only_provider_is_refused(self):  # type: ignore[no-untyped-def]
        self.provider.discovery_changes = {"id_token_signing_alg_values_supported": ["HS256"]}
        yield self.start()
        response, body = yield self.get("/_/oidc/login")
        self.assertEqual(response.code, 502, body)

    # -- password sign-in off -------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_password_login_off(self):  # type: ignore[no-untyped-def]
        yield self.start("--password-login", "off")
        d = self.proxy.directory
        yield d.add_user("alice", "alice-password")
        _, token = yield d.create_token("alice")
        response, body = yield self.get("/_/login")
        self.assertIn("Sign in with Example &lt;ID&gt;", body)
        self.assertNotIn('id="password"', body)
        # Basic with the password is refused; Basic and Bearer with the API token work.
        import base64

        for credentials, expected in (
            (b"Basic " + base64.b64encode(b"alice:alice-password"), 401),
            (b"Basic " + base64.b64encode(b"alice:" + token.encode()), 200),
            (b"Bearer " + token.encode(), 200),
        ):
            response = yield self.http.get(
                self.proxy.url + "/", headers={b"Authorization": [credentials]}
            )
            yield response.content()
            self.assertEqual(response.code, expected, credentials)
