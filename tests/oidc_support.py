"""A scriptable OpenID provider on loopback (real HTTP, Twisted) for the sign-in's bad-input tests.

It serves a discovery document, its JWKS and a token endpoint that checks the client's secret
and the PKCE verifier, then answers with whatever ID token the test asks for. Tokens are made
with joserfc: with the provider's own key, or with a key it does not know (forgeries).
The whole flow against a real provider (``oidc-provider`` on node) is in
tests/integration/test_oidc_browser.py.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

from joserfc import jwt
from joserfc.jwk import RSAKey
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.trial import unittest
from twisted.web import resource, server

CLIENT_ID = "cocalcproxy-test"
CLIENT_SECRET = "test-client-secret-0123456789"


class FakeProvider(resource.Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.key = RSAKey.generate_key(2048, auto_kid=True)
        self.issuer = ""
        self.discovery_changes: dict[str, Any] = {}
        # (form) -> (status, JSON object); set by each test
        self.token_answer: Callable[[dict[str, str]], tuple[int, dict[str, Any]]] | None = None
        self.challenges: dict[str, str] = {}  # code -> the PKCE challenge it was issued for
        self.token_requests: list[dict[str, str]] = []

    @defer.inlineCallbacks
    def start(self, case: unittest.TestCase):  # type: ignore[no-untyped-def]
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(server.Site(self))
        case.addCleanup(port.stopListening)
        self.issuer = f"http://127.0.0.1:{port.getHost().port}"
        return self

    def discovery(self) -> dict[str, Any]:
        document = {
            "issuer": self.issuer,
            "authorization_endpoint": self.issuer + "/auth",
            "token_endpoint": self.issuer + "/token",
            "jwks_uri": self.issuer + "/jwks",
            "end_session_endpoint": self.issuer + "/logout",
            "id_token_signing_alg_values_supported": ["RS256"],
            "code_challenge_methods_supported": ["S256"],
            "token_endpoint_auth_methods_supported": ["client_secret_basic"],
        }
        document.update(self.discovery_changes)
        return document

    def render(self, request: server.Request) -> bytes:
        path = request.path.decode()
        request.setHeader(b"Content-Type", b"application/json")
        if path == "/.well-known/openid-configuration":
            return json.dumps(self.discovery()).encode()
        if path == "/jwks":
            return json.dumps({"keys": [self.key.as_dict(private=False)]}).encode()
        if path == "/token" and request.method == b"POST":
            assert request.content is not None
            form = {k: v[0] for k, v in parse_qs(request.content.read().decode()).items()}
            self.token_requests.append(form)
            expected = b"Basic " + base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode())
            if request.getHeader(b"authorization") != expected:
                request.setResponseCode(401)
                return b'{"error": "invalid_client"}'
            challenge = self.challenges.get(form.get("code", ""))
            verifier = form.get("code_verifier", "")
            digest = hashlib.sha256(verifier.encode()).digest()
            if challenge != base64.urlsafe_b64encode(digest).rstrip(b"=").decode():
                request.setResponseCode(400)
                return b'{"error": "invalid_grant"}'
            assert self.token_answer is not None
            status, answer = self.token_answer(form)
            request.setResponseCode(status)
            return json.dumps(answer).encode()
        request.setResponseCode(404)
        return b'{"error": "not found"}'

    # -- what a test needs ---------------------------------------------------------------------

    def authorize(self, location: str) -> tuple[str, str]:
        """Act as the provider's login page for the proxy's redirect: (code, state), and the
        nonce is kept for the ID token."""
        query = {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}
        assert location.startswith(self.issuer + "/auth?"), location
        assert query["client_id"] == CLIENT_ID
        assert query["code_challenge_method"] == "S256"
        assert query["response_type"] == "code"
        code = base64.urlsafe_b64encode(hashlib.sha256(location.encode()).digest()).decode()
        self.challenges[code] = query["code_challenge"]
        self.nonce = query["nonce"]
        return code, query["state"]

    def claims(self, **changes: Any) -> dict[str, Any]:
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "aud": CLIENT_ID,
            "sub": "subject-carol",
            "iat": now,
            "exp": now + 300,
            "nonce": self.nonce,
            "preferred_username": "carol",
            "email": "carol@example.org",
            "email_verified": True,
        }
        claims.update(changes)
        return {k: v for k, v in claims.items() if v is not None}

    def id_token(
        self, key: Any = None, header: dict[str, Any] | None = None, **changes: Any
    ) -> str:
        key = key if key is not None else self.key
        header = header or {"alg": "RS256", "kid": self.key.kid}
        return jwt.encode(header, self.claims(**changes), key, algorithms=[header["alg"]])

    def answer_with(self, id_token: str | Callable[[], str]) -> None:
        def answer(form: dict[str, str]) -> tuple[int, dict[str, Any]]:
            token = id_token() if callable(id_token) else id_token
            return 200, {"access_token": "at", "token_type": "Bearer", "id_token": token}

        self.token_answer = answer
