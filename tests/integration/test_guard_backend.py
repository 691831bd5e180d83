"""The proxy's own credentials never reach a backend, and refused requests never reach it at all.

A real echo backend on loopback records every request it gets; the real proxy (real TLS, real
directory, real forwarder) sits in front of it.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.trial import unittest
from twisted.web import resource, server

from cocalcproxy.http import headers as header_policy
from tests.support import https_client, start_proxy


class Echo(resource.Resource):
    """Answers with the request it got, as JSON, and keeps a copy."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[dict[str, Any]] = []

    def render(self, request: server.Request) -> bytes:
        record = {
            "method": request.method.decode(),
            "uri": request.uri.decode("latin-1"),
            "headers": [
                [k.decode("latin-1"), v.decode("latin-1")]
                for k, vs in request.requestHeaders.getAllRawHeaders()
                for v in vs
            ],
            "body": (request.content.read() if request.content else b"").decode("latin-1"),
        }
        self.seen.append(record)
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps(record).encode()


class CredentialsStayHere(unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def]
        self.echo = Echo()
        site = server.Site(self.echo)
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(site)
        self.addCleanup(port.stopListening)
        self.backend_port = port.getHost().port

        self.proxy = yield start_proxy(self)
        d = self.proxy.directory
        yield d.add_user("alice", "alice-password")
        project = yield d.add_project("alice")
        _, self.token = yield d.create_token("alice")
        self.session = yield d.create_session(1, 3600)
        self.path = f"/{project.id}/server/{self.backend_port}/echo?x=1"
        self.http = https_client(self, self.proxy.cert_path)

    @defer.inlineCallbacks
    def fetch(self, headers: dict[str, str], method: str = "GET", body: bytes | None = None):  # type: ignore[no-untyped-def]
        response = yield self.http.request(
            method, self.proxy.url + self.path, headers=headers, data=body, allow_redirects=False
        )
        content = yield response.content()
        return response.code, content

    def assert_no_secret(self, record: dict[str, Any], *secrets: str) -> None:
        text = json.dumps(record)
        for secret in secrets:
            self.assertNotIn(secret, text)
        names = [k.lower() for k, _ in record["headers"]]
        self.assertNotIn("authorization", names)

    @defer.inlineCallbacks
    def test_no_proxy_credential_reaches_the_backend(self):  # type: ignore[no-untyped-def]
        basic_pw = base64.b64encode(b"alice:alice-password").decode()
        basic_token = base64.b64encode(f"alice:{self.token}".encode()).decode()
        cases = [
            ({"Authorization": f"Bearer {self.token}"}, [self.token]),
            ({"Authorization": f"Basic {basic_pw}"}, [basic_pw, "alice-password"]),
            ({"Authorization": f"Basic {basic_token}"}, [basic_token, self.token]),
            ({"Cookie": f"cocalcproxy_session={self.session}"}, [self.session]),
        ]
        for headers, secrets in cases:
            code, body = yield self.fetch(headers, "POST", b"payload")
            self.assertEqual(code, 200, body)
            record = json.loads(body)
            self.assertEqual(record["body"], "payload")
            self.assert_no_secret(record, *secrets)
            self.assert_no_secret(self.echo.seen[-1], *secrets)
        self.assertEqual(len(self.echo.seen), len(cases))

    @defer.inlineCallbacks
    def test_other_cookies_and_foreign_authorization_pass(self):  # type: ignore[no-untyped-def]
        headers = {
            "Cookie": f"theme=dark; cocalcproxy_session={self.session}; _xsrf=abc; "
            "__Host-cocalcproxy_csrf=presession-value",
            "Authorization": "token jupyter-token",
        }
        code, body = yield self.fetch(headers)
        self.assertEqual(code, 200, body)
        record = json.loads(body)
        sent = dict((k.lower(), v) for k, v in record["headers"])
        self.assertNotIn(self.session, json.dumps(record))
        self.assertNotIn("presession-value", json.dumps(record))
        self.assertIn("theme=dark", sent["cookie"])
        self.assertIn("_xsrf=abc", sent["cookie"])
        self.assertEqual(sent["authorization"], "token jupyter-token")

    @defer.inlineCallbacks
    def test_no_cookie_the_proxy_sets_reaches_the_backend(self):  # type: ignore[no-untyped-def]
        # Every cookie name headers.py defines (the device cookie, a browser's standing for
        # password sign-ins, was once left out): a project's server on the main host must see
        # none of them, whatever the visitor's browser holds.
        names = sorted(
            value.decode()
            for key, value in vars(header_policy).items()
            if key.endswith("_COOKIE") and isinstance(value, bytes)
        )
        self.assertIn("__Host-cocalcproxy_device", names)
        cookie = "; ".join(
            [f"{header_policy.SESSION_COOKIE.decode()}={self.session}"]
            + [
                f"{name}=secret-{i}"
                for i, name in enumerate(names)
                if name != header_policy.SESSION_COOKIE.decode()
            ]
            + ["theme=dark"]
        )
        code, body = yield self.fetch({"Cookie": cookie})
        self.assertEqual(code, 200, body)
        sent = dict((k.lower(), v) for k, v in json.loads(body)["headers"])
        self.assertEqual(sent["cookie"], "theme=dark")

    @defer.inlineCallbacks
    def test_refused_requests_never_reach_the_backend(self):  # type: ignore[no-untyped-def]
        refused = [
            {},
            {"Accept": "text/html"},
            {"Authorization": "Bearer forged"},
            {"Authorization": "Basic " + base64.b64encode(b"alice:wrong").decode()},
            {"Authorization": "Basic " + base64.b64encode(b"mallory:x").decode()},
            {"Cookie": "cocalcproxy_session=forged"},
            {"Cookie": f"cocalcproxy_session={self.session}", "Authorization": "Bearer forged"},
        ]
        for headers in refused:
            for method in ("GET", "POST", "DELETE"):
                code, _ = yield self.fetch(headers, method)
                self.assertIn(code, (302, 401), (headers, method))
        self.assertEqual(self.echo.seen, [])
