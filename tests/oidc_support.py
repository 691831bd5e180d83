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
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote_plus, urlsplit

from joserfc import jwt
from joserfc.jwk import RSAKey
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.trial import unittest
from twisted.web import resource, server

CLIENT_ID = "cocalcproxy-test"
# Characters that RFC 6749's form-urlencoding of Basic credentials changes, on purpose.
CLIENT_SECRET = "test secret: 100% +/=0123456789"


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
            given = (request.getHeader(b"authorization") or b"").split(b" ", 1)
            pair = base64.b64decode(given[-1]).decode() if given[0] == b"Basic" else ":"
            client, _, secret = pair.partition(":")
            if (unquote_plus(client), unquote_plus(secret)) != (CLIENT_ID, CLIENT_SECRET):
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


# --- the real provider: oidc-provider on node (tests/oidc/) ------------------------------------

OIDC_DIR = Path(__file__).resolve().parent / "oidc"


def install_provider() -> Path:
    """``npm ci`` the pinned oidc-provider into tests/oidc/node_modules once (it is not in git);
    returns the folder. Needs node and npm (Node 20.19 or later)."""
    marker = OIDC_DIR / "node_modules" / "oidc-provider" / "package.json"
    if not marker.exists():
        npm = shutil.which("npm")
        if npm is None:
            raise AssertionError("npm is not installed (Debian: apt-get install nodejs npm)")
        done = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=OIDC_DIR,
            capture_output=True,
            text=True,
            timeout=600,
        )
        if done.returncode != 0 or not marker.exists():
            raise AssertionError(f"npm ci in {OIDC_DIR} failed:\n{done.stdout}\n{done.stderr}")
    return OIDC_DIR


class NodeProvider:
    """``node tests/oidc/provider.js`` on loopback with one client and the given accounts.
    ``restart(new_key)`` stops it and starts it again on the same port with another key."""

    def __init__(
        self,
        case: unittest.TestCase,
        redirect_uris: list[str],
        post_logout_redirect_uris: list[str],
        accounts: dict[str, dict[str, Any]],
    ) -> None:
        self.folder = install_provider()
        self.case = case
        self.config: dict[str, Any] = {
            "port": 0,
            "client": {
                "client_id": CLIENT_ID,
                "client_secret": CLIENT_SECRET,
                "redirect_uris": redirect_uris,
                "post_logout_redirect_uris": post_logout_redirect_uris,
            },
            "accounts": accounts,
        }
        self.process: subprocess.Popen[str] | None = None
        self.issuer = ""
        case.addCleanup(self.stop)

    def start(self, key: RSAKey | None = None) -> NodeProvider:
        self.key = key or RSAKey.generate_key(2048, auto_kid=True)
        self.config["jwks"] = {"keys": [self.key.as_dict(private=True)]}
        path = Path(self.case.mktemp() + ".json").absolute()
        path.write_text(json.dumps(self.config))
        self.log = path.with_suffix(".log")
        node = shutil.which("node") or "node"
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(
                [node, "provider.js", str(path)],
                cwd=self.folder,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
            )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()  # the provider prints its issuer once listening
        if not line:
            self.process.wait(30)
            raise AssertionError(f"the OpenID provider did not start:\n{self.log.read_text()}")
        self.issuer = json.loads(line)["issuer"]
        self.config["port"] = int(self.issuer.rsplit(":", 1)[1])
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process is not None and self.process.stdout is not None:
            self.process.stdout.close()
        self.process = None

    def restart(self, key: RSAKey) -> None:
        self.stop()
        self.start(key)
