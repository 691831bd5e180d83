"""``--identity-assertion`` end to end: the whole proxy over real TLS in front of real backends.

* The user guide's Flask example (taken verbatim from docs/user-guide.rst, only its addresses
  changed) verifies the assertion with the proxy's ``/_/jwks.json`` and refuses a tampered,
  forged, expired or misdirected one.
* A recording backend sees exactly one ``X-Cocalcproxy-Identity``, the proxy's, whatever a client
  sent; without the option it sees none.
* WebSocket handshakes carry the assertion too.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from joserfc import jwt
from joserfc.jwk import ECKey, KeySet
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.threads import deferToThread
from twisted.trial import unittest
from twisted.web import server

from tests.integration.test_guard_backend import Echo
from tests.processes import child_environment, free_port, wait_for
from tests.relay_support import WSBackend, in_thread
from tests.support import https_client, start_proxy

USER_GUIDE = Path(__file__).resolve().parents[2] / "docs" / "user-guide.rst"
HEADER = "X-Cocalcproxy-Identity"


def identity_example() -> str:
    """The Python code block of the user guide's identity section."""
    text = USER_GUIDE.read_text(encoding="utf-8")
    section = text[text.index(".. _identity-flask:") :]
    block = section[section.index(".. code-block:: python") :]
    code: list[str] = []
    for line in block.splitlines()[2:]:
        if line and not line.startswith("    "):
            break
        code.append(line[4:])
    return "\n".join(code).strip() + "\n"


def verify(token: str, jwks: dict[str, Any], iss: str, aud: str) -> dict[str, Any]:
    decoded = jwt.decode(token, KeySet.import_key_set(jwks), algorithms=["ES256"])
    jwt.JWTClaimsRegistry(
        iss={"essential": True, "value": iss}, aud={"essential": True, "value": aud}
    ).validate(decoded.claims)
    return dict(decoded.claims)


def tampered(token: str, **changes: Any) -> str:
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims.update(changes)
    body = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"{header}.{body}.{signature}"


def identity_headers(record: dict[str, Any]) -> list[str]:
    return [v for k, v in record["headers"] if k.lower().replace("_", "-") == HEADER.lower()]


class IdentityAssertionTests(unittest.TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def]
        self.echo = Echo()
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            server.Site(self.echo)
        )
        self.addCleanup(port.stopListening)
        self.backend_port = port.getHost().port

    @defer.inlineCallbacks
    def start(self, *options: str):  # type: ignore[no-untyped-def]
        self.proxy = yield start_proxy(self, *options)
        d = self.proxy.directory
        yield d.add_user("alice", "alice-password")
        yield d.add_user("bob", "bob-password")
        project = yield d.add_project("alice")
        self.pid = project.id
        yield d.add_collaborator(self.pid, "bob")
        _, alice = yield d.create_token("alice")
        _, bob = yield d.create_token("bob")
        self.auth = {
            name: {b"Authorization": [b"Bearer " + token.encode()]}
            for name, token in (("alice", alice), ("bob", bob))
        }
        self.http = https_client(self, self.proxy.cert_path)
        self.origin = f"https://localhost:{self.proxy.port}"

    @defer.inlineCallbacks
    def get(self, path: str, who: str = "alice", **extra: list[bytes]):  # type: ignore[no-untyped-def]
        headers = {**self.auth[who], **{k.encode(): v for k, v in extra.items()}}
        response = yield self.http.get(self.origin + path, headers=headers)
        body = yield response.content()
        return response.code, body

    @defer.inlineCallbacks
    def jwks(self):  # type: ignore[no-untyped-def]
        response = yield self.http.get(self.origin + "/_/jwks.json")  # no credentials
        body = yield response.content()
        self.assertEqual(response.code, 200, body)
        self.assertEqual(
            response.headers.getRawHeaders(b"content-type"), [b"application/jwk-set+json"]
        )
        return json.loads(body)

    @defer.inlineCallbacks
    def test_backend_verifies_the_assertion_and_forged_copies_are_dropped(self):  # type: ignore[no-untyped-def]
        yield self.start("--identity-assertion")
        forged = jwt.encode(
            {"alg": "ES256"},
            {"iss": self.origin, "sub": "admin", "role": "owner"},
            ECKey.generate_key("P-256"),
        )
        code, body = yield self.get(
            f"/{self.pid}/server/{self.backend_port}/x",
            who="bob",
            **{HEADER: [forged.encode()], "X_Cocalcproxy_Identity": [b"forged"]},
        )
        self.assertEqual(code, 200, body)
        [token] = identity_headers(json.loads(body))
        self.assertNotEqual(token, forged)
        jwks = yield self.jwks()
        aud = f"{self.origin}/{self.pid}/server/{self.backend_port}/"
        claims = verify(token, jwks, self.origin, aud)
        self.assertEqual(
            {k: claims[k] for k in ("sub", "name", "project", "role")},
            {"sub": "bob", "name": "bob", "project": self.pid, "role": "collaborator"},
        )
        self.assertLessEqual(claims["exp"] - claims["iat"], 60)
        self.assertLessEqual(abs(claims["iat"] - time.time()), 5)
        self.assertNotIn("email", claims)

        # The owner, on the port form: another audience and role.
        code, body = yield self.get(f"/{self.pid}/port/{self.backend_port}/y")
        [token] = identity_headers(json.loads(body))
        claims = verify(
            token, jwks, self.origin, f"{self.origin}/{self.pid}/port/{self.backend_port}/"
        )
        self.assertEqual((claims["sub"], claims["role"]), ("alice", "owner"))

        # Tampering with any claim breaks the signature.
        with self.assertRaises(Exception):
            verify(tampered(token, role="owner", sub="bob"), jwks, self.origin, claims["aud"])

    @defer.inlineCallbacks
    def test_two_proxies_on_one_directory_publish_and_sign_with_the_same_keys(self):  # type: ignore[no-untyped-def]
        yield self.start("--identity-assertion")
        other = yield start_proxy(self, "--identity-assertion", state_dir=self.proxy.state_dir)
        other_http = https_client(self, other.cert_path)
        other_origin = f"https://localhost:{other.port}"
        response = yield other_http.get(other_origin + "/_/jwks.json")
        other_jwks = json.loads((yield response.content()))
        jwks = yield self.jwks()
        self.assertEqual(jwks, other_jwks)
        self.assertEqual(len(jwks["keys"]), 1)
        # A token minted by the second proxy verifies with the first one's published keys.
        headers = self.auth["bob"]
        response = yield other_http.get(
            f"{other_origin}/{self.pid}/server/{self.backend_port}/", headers=headers
        )
        [token] = identity_headers(json.loads((yield response.content())))
        claims = verify(
            token, jwks, other_origin, f"{other_origin}/{self.pid}/server/{self.backend_port}/"
        )
        self.assertEqual(claims["sub"], "bob")

    @defer.inlineCallbacks
    def test_project_host_audience(self):  # type: ignore[no-untyped-def]
        """On a project subdomain the audience is the project host's origin."""
        from treq.client import HTTPClient
        from twisted.internet import ssl as twisted_ssl
        from twisted.web.client import Agent

        from tests.integration.test_hop import DOMAIN, Loopback

        yield self.start("--identity-assertion", "--project-domain", DOMAIN)
        with open(self.proxy.cert_path, "rb") as f:
            authority = twisted_ssl.Certificate.loadPEM(f.read())
        agent = Agent.usingEndpointFactory(reactor, Loopback(self.proxy.port, authority))
        client = HTTPClient(agent)
        origin = f"https://{self.pid}-{self.backend_port}.{DOMAIN}:{self.proxy.port}"
        response = yield client.get(origin + "/deep/path", headers=self.auth["bob"])
        body = yield response.content()
        self.assertEqual(response.code, 200, body)
        [token] = identity_headers(json.loads(body))
        jwks = yield self.jwks()
        claims = verify(token, jwks, self.origin, origin + "/")
        self.assertEqual((claims["sub"], claims["project"]), ("bob", self.pid))

    @defer.inlineCallbacks
    def test_without_the_option_no_assertion_and_no_forgery_passes(self):  # type: ignore[no-untyped-def]
        yield self.start()
        code, body = yield self.get(
            f"/{self.pid}/server/{self.backend_port}/",
            **{HEADER: [b"forged"], "x_cocalcproxy_identity": [b"forged"]},
        )
        self.assertEqual(code, 200, body)
        self.assertEqual(identity_headers(json.loads(body)), [])
        response = yield self.http.get(self.origin + "/_/jwks.json")
        yield response.content()
        self.assertEqual(response.code, 404)

    @defer.inlineCallbacks
    def test_websocket_handshake_carries_the_assertion(self):  # type: ignore[no-untyped-def]
        yield self.start("--identity-assertion")
        from websockets.asyncio.client import connect

        async def handler(ws: Any) -> None:
            await ws.send("hi")

        backend = WSBackend(handler)
        ws_port = backend.start(self)
        context = ssl.create_default_context(cafile=self.proxy.cert_path)
        token = self.auth["bob"][b"Authorization"][0].decode()

        async def scenario() -> str:
            async with connect(
                f"wss://localhost:{self.proxy.port}/{self.pid}/server/{ws_port}/ws",
                ssl=context,
                proxy=None,
                origin=self.origin,
                additional_headers={"Authorization": token, HEADER: "forged"},
                open_timeout=20,
            ) as ws:
                return str(await ws.recv())

        self.assertEqual((yield in_thread(scenario)), "hi")
        headers = backend.request_headers[0]
        [sent] = headers.get_all(HEADER)
        self.assertNotEqual(sent, "forged")
        jwks = yield self.jwks()
        claims = verify(sent, jwks, self.origin, f"{self.origin}/{self.pid}/server/{ws_port}/")
        self.assertEqual((claims["sub"], claims["role"]), ("bob", "collaborator"))

    @defer.inlineCallbacks
    def test_the_user_guide_flask_example(self):  # type: ignore[no-untyped-def]
        """The guide's app accepts what the proxy sends and refuses tampered, forged, expired
        and misdirected tokens sent to it directly."""
        yield self.start("--identity-assertion")
        flask_port = free_port()
        source = identity_example()
        me = f"{self.origin}/{self.pid}/server/{flask_port}/"
        for old, new in (
            ('PROXY = "https://proxy.example.com"', f'PROXY = "{self.origin}"'),
            ('PROXY + "/0f6e3d2a-6b8e-4c7e-9a59-0d1f4c1e2b3a/server/5000/"', repr(me)),
            ('app.run(host="0.0.0.0", port=5000)', f'app.run(host="127.0.0.1", port={flask_port})'),
        ):
            self.assertIn(old, source)
            source = source.replace(old, new)
        folder = Path(self.mktemp())
        folder.mkdir()
        (folder / "app.py").write_text(source, encoding="utf-8")
        process = subprocess.Popen(
            [sys.executable, "app.py"],
            cwd=folder,
            env=child_environment(SSL_CERT_FILE=os.path.abspath(self.proxy.cert_path)),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.addCleanup(lambda: (process.terminate(), process.wait(10)))

        def ready() -> bool:
            if process.poll() is not None:
                raise AssertionError("the example exited")
            with socket.create_connection(("127.0.0.1", flask_port), timeout=1):
                return True

        yield deferToThread(wait_for, ready, 30, "the example to listen")

        code, body = yield self.get(f"/{self.pid}/server/{flask_port}/", who="bob")
        self.assertEqual((code, body), (200, b"Hello bob, collaborator of this project"))
        code, body = yield self.get(f"/{self.pid}/server/{flask_port}/")
        self.assertEqual((code, body), (200, b"Hello alice, owner of this project"))

        # A real token for another route (the echo backend), then variations sent directly.
        code, body = yield self.get(f"/{self.pid}/server/{self.backend_port}/", who="bob")
        [other_route] = identity_headers(json.loads(body))
        stored = yield self.proxy.directory.identity_keys()
        kid, private, _ = stored[-1]
        proxy_key = ECKey.import_key(json.loads(private))
        own_key = ECKey.generate_key("P-256", auto_kid=True)
        now = int(time.time())
        claims = {"iss": self.origin, "aud": me, "sub": "bob", "name": "bob",
                  "role": "owner", "project": self.pid, "iat": now, "exp": now + 60}  # fmt: skip

        def signed(key: ECKey, **changes: Any) -> str:
            return jwt.encode({"alg": "ES256", "kid": kid}, {**claims, **changes}, key)

        def direct(token: str | None) -> int:
            import urllib.error
            import urllib.request

            request = urllib.request.Request(f"http://127.0.0.1:{flask_port}/")
            if token is not None:
                request.add_header(HEADER, token)
            try:
                with urllib.request.urlopen(request, timeout=30) as response:
                    return int(response.status)
            except urllib.error.HTTPError as e:
                return int(e.code)

        # The proxy's key with the right claims passes (so the refusals below are about what
        # each one changes); everything else is refused.
        results = yield deferToThread(
            lambda: {
                "proxy's key": direct(signed(proxy_key)),
                "none": direct(None),
                "garbage": direct("not a token"),
                "other route": direct(other_route),
                "tampered": direct(tampered(other_route, aud=me)),
                "forged": direct(signed(own_key)),
                "expired": direct(signed(proxy_key, iat=now - 120, exp=now - 60)),
                "other issuer": direct(signed(proxy_key, iss="https://evil.example")),
            }
        )
        self.assertEqual(
            results,
            {"proxy's key": 200, "none": 401, "garbage": 401, "other route": 401,
             "tampered": 401, "forged": 401, "expired": 401, "other issuer": 401},
        )  # fmt: skip
