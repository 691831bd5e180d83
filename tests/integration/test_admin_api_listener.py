"""The admin API's listener: refuses to start with no way to authenticate; TLS (the proxy's
certificate) when the endpoint is TCP beyond loopback, plain HTTP on loopback."""

from __future__ import annotations

import os

from twisted.internet import defer
from twisted.python import usage
from twisted.trial import unittest

from cocalcproxy.ops import admin, adminapi
from cocalcproxy.ops.service import build_service
from tests.processes import ProxyProcess
from tests.support import https_client, options_for, plain_client, start_proxy


def make_admin_token(state_dir: str) -> str:
    import contextlib
    import io
    import json

    out = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()):
        assert admin.main(["--state-dir", state_dir, "init"]) == 0
    with contextlib.redirect_stdout(out):
        status = admin.main(["--state-dir", state_dir, "--json", "admin-token", "create"])
    assert status == 0
    return str(json.loads(out.getvalue())["token"])


class RefusesWithoutAuthentication(unittest.TestCase):
    def test_no_admin_token_no_start(self) -> None:
        state = self.mktemp()
        os.makedirs(state)
        options = options_for(state, "--admin-api", "tcp:0:interface=127.0.0.1")
        with self.assertRaisesRegex(usage.UsageError, "admin-token create"):
            build_service(options)

    def test_an_expired_or_revoked_token_does_not_count(self) -> None:
        state = self.mktemp()
        os.makedirs(state)
        make_admin_token(state)
        import contextlib
        import io
        import json

        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            admin.main(["--state-dir", state, "--json", "admin-token", "list"])
        (token,) = json.loads(out.getvalue())
        with contextlib.redirect_stdout(io.StringIO()):
            self.assertEqual(
                admin.main(["--state-dir", state, "admin-token", "revoke", token["id"]]), 0
            )
        options = options_for(state, "--admin-api", "tcp:0:interface=127.0.0.1")
        with self.assertRaises(usage.UsageError):
            build_service(options)

    def test_twistd_exits_1_with_the_reason(self) -> None:
        state = os.path.abspath(self.mktemp())
        proxy = ProxyProcess(state, "--admin-api", "tcp:0:interface=127.0.0.1").start()
        assert proxy.process is not None
        status = proxy.process.wait(timeout=60)
        self.assertNotEqual(status, 0)
        self.assertIn("admin-token create", proxy.output())


class EndpointKinds(unittest.TestCase):
    def test_needs_tls(self) -> None:
        for description, tls in [
            ("unix:/run/cocalcproxy-admin.sock", False),
            ("tcp:8444:interface=127.0.0.1", False),
            ("tcp:8444:interface=127.1.2.3", False),
            ("tcp6:8444:interface=\\:\\:1", False),
            ("tcp:port=8444:interface=localhost", False),
            ("tcp:8444", True),
            ("tcp:8444:interface=0.0.0.0", True),
            ("tcp:8444:interface=192.0.2.7", True),
            ("tcp6:8444:interface=\\:\\:", True),
            ("systemd:domain=INET:index=1", True),
        ]:
            self.assertEqual(adminapi.needs_tls(description), tls, description)


class ListenerTransport(unittest.TestCase):
    @defer.inlineCallbacks
    def test_tls_beyond_loopback_plain_on_loopback(self):  # type: ignore[no-untyped-def]
        state = self.mktemp()
        os.makedirs(state)
        token = make_admin_token(state)
        headers = {"Authorization": f"Bearer {token}"}
        # every interface: TLS with the proxy's certificate
        proxy = yield start_proxy(self, "--admin-api", "tcp:0", state_dir=state)
        port = proxy.service.admin_api_listener.port.getHost().port
        client = https_client(self, proxy.cert_path, persistent=False)
        response = yield client.get(f"https://localhost:{port}/v1/users", headers=headers)
        self.assertEqual(response.code, 200)
        self.assertEqual((yield response.json()), {"items": [], "next_cursor": None})
        plain = plain_client(self)
        with self.assertRaises(Exception):  # noqa: B017 - any failure: TLS is required
            yield plain.get(f"http://localhost:{port}/v1/users", headers=headers, timeout=3)

    @defer.inlineCallbacks
    def test_plain_http_on_loopback(self):  # type: ignore[no-untyped-def]
        state = self.mktemp()
        os.makedirs(state)
        token = make_admin_token(state)
        proxy = yield start_proxy(self, "--admin-api", "tcp:0:interface=127.0.0.1", state_dir=state)
        port = proxy.service.admin_api_listener.port.getHost().port
        plain = plain_client(self)
        response = yield plain.get(
            f"http://127.0.0.1:{port}/openapi.json",
            headers={"Authorization": f"Bearer {token}"},
        )
        self.assertEqual(response.code, 200)
        self.assertEqual((yield response.json())["openapi"], "3.1.0")
        refused = yield plain.get(f"http://127.0.0.1:{port}/openapi.json")
        self.assertEqual(refused.code, 401)
        yield refused.content()


class NotReachableThroughRoutes(unittest.TestCase):
    @defer.inlineCallbacks
    def test_a_project_route_never_reaches_the_admin_api(self):  # type: ignore[no-untyped-def]
        """The listener is among the proxy's own: even a project on this machine with every port
        allowed gets 404 for it, and nothing reaches the API."""
        import base64

        state = self.mktemp()
        os.makedirs(state)
        token = make_admin_token(state)
        proxy = yield start_proxy(
            self, "--admin-api", "tcp:0:interface=127.0.0.1", "--deny-ports", "none",
            state_dir=state,
        )  # fmt: skip
        port = proxy.service.admin_api_listener.port.getHost().port
        yield proxy.directory.add_user("alice", "alice-password")
        project = yield proxy.directory.add_project("alice", host="127.0.0.1", ports="all")
        client = https_client(self, proxy.cert_path, persistent=False)
        basic = "Basic " + base64.b64encode(b"alice:alice-password").decode()
        for path in (f"/{project.id}/server/{port}/openapi.json", f"/{project.id}/port/{port}/v1"):
            response = yield client.get(
                proxy.url + path,
                headers={"Authorization": basic, "X-Admin": f"Bearer {token}"},
            )
            body = yield response.content()
            self.assertEqual(response.code, 404, path)
            self.assertNotIn(b"openapi", body)
