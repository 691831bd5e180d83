"""The admin API end to end: the real proxy as its own process (``twistd -n cocalcproxy``) with
``--admin-api unix:PATH``, the admin command as other processes on the same directory, real
HTTP over the Unix socket, real TLS to the proxy, real WebSocket and HTTP backends.

Every answer is also checked against the schema the OpenAPI document gives for it.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator
from openapi_spec_validator import validate as validate_openapi
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012
from twisted.trial import unittest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from cocalcproxy.ops.openapi import document
from tests.api_support import (
    ECHO_WS_BACKEND,
    HTTP_ECHO_BACKEND,
    ProxyClient,
    Response,
    UnixHTTP,
    start_backend,
)
from tests.processes import ProxyProcess, admin, wait_for

DEADLINE = 2.0
PID = "3c2b1a09-8f7e-4d6c-9b5a-4e3f2d1c0b9a"
DOMAIN = "proj.test"

_REGISTRY = Registry().with_resource(
    "urn:cocalcproxy-api", Resource.from_contents(document(), default_specification=DRAFT202012)
)


def conforms(response: Response, status: int, schema: str) -> Any:
    """The answer has ``status`` and a body valid against components/schemas/``schema``."""
    assert response.status == status, (response.status, response.body[:500])
    assert response.headers["Content-Type"] == "application/json"
    body = response.json()
    validator = Draft202012Validator(
        {"$ref": f"urn:cocalcproxy-api#/components/schemas/{schema}"}, registry=_REGISTRY
    )
    validator.validate(body)
    return body


def basic(name: str, secret: str) -> str:
    return "Basic " + base64.b64encode(f"{name}:{secret}".encode()).decode()


class AdminApiProcess(unittest.TestCase):
    """A proxy process with the admin API on a Unix socket and one admin token."""

    extra: tuple[str, ...] = ()

    def setUp(self) -> None:
        self.state = str(Path(self.mktemp()).absolute())
        Path(self.state).mkdir(parents=True)
        # A short directory for the socket: AF_UNIX names are limited to 108 bytes.
        self.sockdir = tempfile.mkdtemp(prefix="ccp-api-")
        self.addCleanup(shutil.rmtree, self.sockdir, True)
        self.socket = os.path.join(self.sockdir, "admin.sock")
        self.cli("init")
        created = self.cli("admin-token", "create", "--description", "tests")
        self.token = created["token"]
        self.token_id = created["id"]
        self.proxy = ProxyProcess(
            self.state, "--admin-api", f"unix:{self.socket}", *self.extra
        ).start()
        self.addCleanup(self.proxy.stop)
        self.api = UnixHTTP(self.socket, self.token)
        self.https = ProxyClient(self.proxy.port, Path(self.state) / "tls" / "cert.pem")
        wait_for(self._api_up, 60, "the admin API to answer")
        wait_for(lambda: self.https.get("localhost", "/_/health").status == 200, 60, "the proxy")

    def _api_up(self) -> bool:
        assert self.proxy.process is not None
        if self.proxy.process.poll() is not None:
            raise AssertionError(f"proxy exited:\n{self.proxy.output()[-3000:]}")
        return os.path.exists(self.socket) and self.api.request("GET", "/v1/users").status == 200

    def cli(self, *args: str, stdin: str | None = None) -> Any:
        done = admin(self.state, "--json", *args, stdin=stdin)
        self.assertEqual(done.returncode, 0, done.stderr)
        return json.loads(done.stdout) if done.stdout.strip() else {}

    def error(self, response: Response, status: int, code: str) -> str:
        body = conforms(response, status, "Error")
        self.assertEqual(body["error"]["code"], code, body)
        return str(body["error"]["message"])


class AuthenticationTests(AdminApiProcess):
    def test_no_token_wrong_token_malformed_header(self) -> None:
        for response in (
            self.api.request("GET", "/v1/users", token=""),
            self.api.request("GET", "/v1/users", token="not-a-token"),
            self.api.request("GET", "/openapi.json", token=""),
            self.api.request("POST", "/v1/users", body={"name": "x"}, token="wrong"),
            self.api.request(
                "GET", "/v1/users", token="", headers={"Authorization": basic("a", self.token)}
            ),
        ):
            self.error(response, 401, "unauthorized")
            self.assertIn("Bearer", response.headers["WWW-Authenticate"])
        # nothing was created by the refused POST
        self.assertEqual(self.cli("user", "list"), [])

    def test_revoked_admin_token_is_refused_at_once(self) -> None:
        self.assertEqual(self.api.request("GET", "/v1/projects").status, 200)
        self.cli("admin-token", "revoke", self.token_id)
        self.error(self.api.request("GET", "/v1/projects"), 401, "unauthorized")

    def test_admin_tokens_through_the_api(self) -> None:
        made = conforms(
            self.api.request("POST", "/v1/admin-tokens", body={"description": "platform"}),
            201,
            "NewAdminToken",
        )
        other = UnixHTTP(self.socket, made["token"])
        listed = conforms(other.request("GET", "/v1/admin-tokens"), 200, "AdminTokenPage")
        self.assertEqual(
            sorted(t["id"] for t in listed["items"]), sorted([self.token_id, made["id"]])
        )
        self.assertNotIn("token", json.dumps(listed["items"]))
        conforms(self.api.request("DELETE", f"/v1/admin-tokens/{made['id']}"), 200, "Revoked")
        self.error(other.request("GET", "/v1/users"), 401, "unauthorized")
        self.error(self.api.request("DELETE", f"/v1/admin-tokens/{made['id']}"), 404, "not_found")

    def test_openapi_document_validates(self) -> None:
        response = self.api.request("GET", "/openapi.json")
        self.assertEqual(response.status, 200)
        spec = response.json()
        validate_openapi(spec)
        self.assertEqual(spec["openapi"], "3.1.0")
        self.assertIn("/v1/projects/{pid}", spec["paths"])


class OperationTests(AdminApiProcess):
    def test_users(self) -> None:
        made = conforms(
            self.api.request("POST", "/v1/users", body={"name": "alice"}), 201, "NewUser"
        )
        self.assertEqual(made["name"], "alice")
        generated = made["password"]
        conforms(
            self.api.request("POST", "/v1/users", body={"name": "bob", "password": "bob-pw"}),
            201,
            "NewUser",
        )
        self.error(self.api.request("POST", "/v1/users", body={"name": "Alice"}), 409, "conflict")
        self.assertEqual(
            conforms(self.api.request("GET", "/v1/users/alice"), 200, "User")["name"], "alice"
        )
        self.error(self.api.request("GET", "/v1/users/nobody"), 404, "not_found")
        linked = conforms(
            self.api.request("PUT", "/v1/users/bob/oidc-subject", body={"oidc_subject": "sub-123"}),
            200,
            "User",
        )
        self.assertEqual(linked["oidc_subject"], "sub-123")
        oidc_only = conforms(
            self.api.request("POST", "/v1/users", body={"name": "olga", "oidc_subject": "s-9"}),
            201,
            "NewUser",
        )
        self.assertNotIn("password", oidc_only)
        self.assertEqual(
            self.api.request("PUT", "/v1/users/alice/password", body={"password": "new-pw"}).json(),
            {"name": "alice"},
        )
        # the new password works against the proxy, the generated one no longer does
        pid = self.cli("project", "add", "--owner", "alice")["id"]
        path = f"/{pid}/server/{start_backend(self, HTTP_ECHO_BACKEND)}/"
        self.assertEqual(
            self.https.get("localhost", path, {"Authorization": basic("alice", "new-pw")}).status,
            200,
        )
        self.assertEqual(
            self.https.get("localhost", path, {"Authorization": basic("alice", generated)}).status,
            401,
        )
        self.error(self.api.request("DELETE", "/v1/users/alice"), 409, "conflict")
        self.assertEqual(self.api.request("DELETE", f"/v1/projects/{pid}").json(), {"removed": pid})
        self.assertEqual(self.api.request("DELETE", "/v1/users/alice").json(), {"removed": "alice"})
        self.assertEqual([u["name"] for u in self.cli("user", "list")], ["bob", "olga"])

    def test_user_list_pages_in_a_stable_order(self) -> None:
        names = [f"user{i:02d}" for i in range(7)]
        for name in reversed(names):
            self.cli("user", "add", name, "--password-stdin", stdin="pw\n")
        seen: list[str] = []
        cursor = None
        pages = 0
        while True:
            target = "/v1/users?limit=3" + (f"&cursor={cursor}" if cursor else "")
            page = conforms(self.api.request("GET", target), 200, "UserPage")
            seen += [u["name"] for u in page["items"]]
            pages += 1
            cursor = page["next_cursor"]
            if cursor is None:
                break
        self.assertEqual(seen, names)
        self.assertEqual(pages, 3)
        self.error(self.api.request("GET", "/v1/users?limit=0"), 400, "bad_query")
        self.error(self.api.request("GET", "/v1/users?cursor=%20bad"), 400, "invalid_cursor")
        self.error(self.api.request("GET", "/v1/users?colour=red"), 400, "bad_query")

    def test_tokens(self) -> None:
        self.cli("user", "add", "alice", "--password-stdin", stdin="pw\n")
        pid = self.cli("project", "add", "--owner", "alice")["id"]
        path = f"/{pid}/server/{start_backend(self, HTTP_ECHO_BACKEND)}/"
        made = conforms(
            self.api.request("POST", "/v1/tokens", body={"user": "alice", "expires_in_days": 1}),
            201,
            "NewToken",
        )
        self.assertIsNotNone(made["expires"])
        bearer = {"Authorization": f"Bearer {made['token']}"}
        self.assertEqual(self.https.get("localhost", path, bearer).status, 200)
        listed = conforms(self.api.request("GET", "/v1/tokens?user=alice"), 200, "TokenPage")
        self.assertEqual([t["id"] for t in listed["items"]], [made["id"]])
        self.error(self.api.request("GET", "/v1/tokens?user=nobody"), 404, "not_found")
        conforms(self.api.request("DELETE", f"/v1/tokens/{made['id']}"), 200, "Revoked")
        wait_for(
            lambda: self.https.get("localhost", path, bearer).status == 401, 10, "token refused"
        )
        self.error(self.api.request("DELETE", f"/v1/tokens/{made['id']}"), 404, "not_found")
        self.error(self.api.request("DELETE", "/v1/tokens/XYZ"), 422, "invalid_input")

    def test_projects_and_collaborators(self) -> None:
        for name in ("alice", "bob", "carol"):
            self.cli("user", "add", name, "--password-stdin", stdin="pw\n")
        made = conforms(
            self.api.request(
                "POST", "/v1/projects", body={"owner": "alice", "title": "Demo", "home": "/tmp"}
            ),
            201,
            "Project",
        )
        pid = made["id"]
        self.assertEqual((made["host"], made["home"], made["title"]), ("127.0.0.1", "/tmp", "Demo"))
        got = conforms(self.api.request("GET", f"/v1/projects/{pid}"), 200, "Project")
        self.assertEqual(got, made)
        patched = conforms(
            self.api.request("PATCH", f"/v1/projects/{pid}", body={"home": None, "title": "T2"}),
            200,
            "Project",
        )
        self.assertEqual((patched["home"], patched["title"]), (None, "T2"))
        self.error(self.api.request("PATCH", f"/v1/projects/{pid}", body={}), 422, "invalid_input")
        after = conforms(
            self.api.request("PUT", f"/v1/projects/{pid}/collaborators/bob"), 200, "Project"
        )
        self.assertEqual(after["collaborators"], ["bob"])
        # idempotent
        again = conforms(
            self.api.request("PUT", f"/v1/projects/{pid}/collaborators/bob"), 200, "Project"
        )
        self.assertEqual(again["collaborators"], ["bob"])
        self.error(
            self.api.request("PUT", f"/v1/projects/{pid}/collaborators/alice"), 409, "conflict"
        )
        removed = conforms(
            self.api.request("DELETE", f"/v1/projects/{pid}/collaborators/bob"), 200, "Project"
        )
        self.assertEqual(removed["collaborators"], [])
        self.error(
            self.api.request("DELETE", f"/v1/projects/{pid}/collaborators/bob"), 404, "not_found"
        )
        self.assertEqual(self.api.request("DELETE", f"/v1/projects/{pid}").json(), {"removed": pid})
        self.error(self.api.request("GET", f"/v1/projects/{pid}"), 404, "not_found")
        self.error(self.api.request("DELETE", f"/v1/projects/{pid}"), 404, "not_found")

    def test_put_project_is_idempotent_and_syncs_the_collaborator_set(self) -> None:
        for name in ("alice", "bob", "carol"):
            self.cli("user", "add", name, "--password-stdin", stdin="pw\n")
        wanted = {"owner": "alice", "host": "127.0.0.1", "collaborators": ["carol", "bob"]}
        created = conforms(
            self.api.request("PUT", f"/v1/projects/{PID}", body=wanted), 201, "Project"
        )
        self.assertEqual(created["collaborators"], ["bob", "carol"])
        counter = self.change_counter()
        same = conforms(self.api.request("PUT", f"/v1/projects/{PID}", body=wanted), 200, "Project")
        self.assertEqual(same, created)
        self.assertEqual(self.change_counter(), counter, "an idempotent PUT changed something")
        moved = conforms(
            self.api.request(
                "PUT",
                f"/v1/projects/{PID}",
                body={"owner": "alice", "host": "10.1.2.3", "collaborators": ["carol"]},
            ),
            200,
            "Project",
        )
        self.assertEqual((moved["host"], moved["collaborators"]), ("10.1.2.3", ["carol"]))
        self.error(
            self.api.request(
                "PUT", f"/v1/projects/{PID}", body={"owner": "alice", "collaborators": ["alice"]}
            ),
            422,
            "invalid_input",
        )
        self.error(
            self.api.request(
                "PUT", f"/v1/projects/{PID}", body={"owner": "alice", "collaborators": ["zed"]}
            ),
            404,
            "not_found",
        )
        self.assertEqual(self.cli("project", "list")[0]["collaborators"], ["carol"])

    def test_ports_and_socket_folders(self) -> None:
        self.cli("user", "add", "alice", "--password-stdin", stdin="pw\n")
        body = {"owner": "alice", "ports": "8888, 8000-8099", "socket_dir": None}
        made = conforms(self.api.request("PUT", f"/v1/projects/{PID}", body=body), 201, "Project")
        self.assertEqual((made["ports"], made["socket_dir"]), ("8000-8099,8888", None))
        self.assertEqual(
            conforms(self.api.request("PUT", f"/v1/projects/{PID}", body=body), 200, "Project"),
            made,
        )
        patched = conforms(
            self.api.request(
                "PATCH", f"/v1/projects/{PID}", body={"ports": None, "socket_owner": 1000}
            ),
            200,
            "Project",
        )
        self.assertEqual((patched["ports"], patched["socket_owner"]), (None, 1000))
        self.error(
            self.api.request("PATCH", f"/v1/projects/{PID}", body={"ports": "80-x"}),
            422,
            "invalid_input",
        )
        self.error(
            self.api.request("PATCH", f"/v1/projects/{PID}", body={"socket_dir": "relative"}),
            422,
            "invalid_input",
        )
        self.assertEqual(self.cli("project", "list")[0]["socket_owner"], 1000)

    def test_project_list_pages(self) -> None:
        self.cli("user", "add", "alice", "--password-stdin", stdin="pw\n")
        ids = sorted(self.cli("project", "add", "--owner", "alice")["id"] for _ in range(5))
        first = conforms(self.api.request("GET", "/v1/projects?limit=4"), 200, "ProjectPage")
        self.assertEqual([p["id"] for p in first["items"]], ids[:4])
        rest = conforms(
            self.api.request("GET", f"/v1/projects?limit=4&cursor={first['next_cursor']}"),
            200,
            "ProjectPage",
        )
        self.assertEqual([p["id"] for p in rest["items"]], ids[4:])
        self.assertIsNone(rest["next_cursor"])

    def change_counter(self) -> int:
        import sqlite3

        with sqlite3.connect(os.path.join(self.state, "directory.sqlite3")) as db:
            return int(db.execute("SELECT value FROM change_counter").fetchone()[0])


class BadInputTests(AdminApiProcess):
    def test_bad_inputs_change_nothing(self) -> None:
        self.cli("user", "add", "alice", "--password-stdin", stdin="pw\n")
        before = self.snapshot()
        cases: list[tuple[Response, int, str]] = [
            (self.api.request("POST", "/v1/projects", raw=b"{not json",
                              headers={"Content-Type": "application/json"}), 400, "bad_json"),
            (self.api.request("POST", "/v1/projects", raw=b'{"owner": "alice", "owner": "x"}',
                              headers={"Content-Type": "application/json"}), 400, "bad_json"),
            (self.api.request("POST", "/v1/projects", raw=b'{"owner": "alice", "x": NaN}',
                              headers={"Content-Type": "application/json"}), 400, "bad_json"),
            (self.api.request("POST", "/v1/projects", raw=b"[1, 2]",
                              headers={"Content-Type": "application/json"}), 400, "bad_json"),
            (self.api.request("POST", "/v1/projects", raw=b"\xff\xfe",
                              headers={"Content-Type": "application/json"}), 400, "bad_json"),
            (self.api.request("POST", "/v1/projects", body={"owner": 7}), 422, "invalid_input"),
            (self.api.request("POST", "/v1/projects", body={"owner": "alice", "title": ["x"]}),
             422, "invalid_input"),
            (self.api.request("POST", "/v1/projects", body={"owner": "alice", "colour": "red"}),
             422, "invalid_input"),
            (self.api.request("POST", "/v1/projects", body={"host": "x"}), 422, "invalid_input"),
            (self.api.request("POST", "/v1/projects",
                              body={"owner": "alice", "id": PID.upper()}), 422, "invalid_input"),
            (self.api.request("POST", "/v1/projects",
                              body={"owner": "alice", "host": "http://evil/"}),
             422, "invalid_input"),
            (self.api.request("POST", "/v1/projects",
                              body={"owner": "alice", "title": "a\u202eb"}), 422, "invalid_input"),
            (self.api.request("PUT", f"/v1/projects/{PID.upper()}", body={"owner": "alice"}),
             422, "invalid_input"),
            (self.api.request("PUT", "/v1/projects/{" + PID + "}", body={"owner": "alice"}),
             422, "invalid_input"),
            (self.api.request("POST", "/v1/users", body={"name": "-rf"}), 422, "invalid_input"),
            (self.api.request("POST", "/v1/users", body={"name": "ok", "password": ""}),
             422, "invalid_input"),
            (self.api.request("POST", "/v1/tokens", body={"user": "alice",
                                                          "expires_in_days": True}),
             422, "invalid_input"),
            (self.api.request("POST", "/v1/tokens", body={"user": "alice",
                                                          "expires_in_days": -1}),
             422, "invalid_input"),
            (self.api.request("POST", "/v1/projects", raw=b'{"owner": "alice"}',
                              headers={"Content-Type": "text/plain"}), 415,
             "unsupported_media_type"),
            (self.api.request("POST", "/v1/projects",
                              body={"owner": "alice", "title": "x" * 70000}), 413,
             "body_too_large"),
            (self.api.request("DELETE", "/v1/projects"), 405, "method_not_allowed"),
            (self.api.request("GET", "/v1/nothing"), 404, "not_found"),
            (self.api.request("DELETE", f"/v1/projects/{PID}", body={"x": 1}), 400,
             "unexpected_body"),
        ]  # fmt: skip
        for response, status, code in cases:
            self.error(response, status, code)
        self.assertEqual(self.snapshot(), before)
        # the 405 says what the path takes
        response = self.api.request("DELETE", "/v1/projects")
        self.assertEqual(response.headers["Allow"], "GET, POST")

    def test_oversized_chunked_body_is_cut(self) -> None:
        conn_body = b'{"owner": "' + b"a" * 100_000 + b'"}'
        response = self.api.request(
            "POST",
            "/v1/projects",
            raw=iter([conn_body[:50_000], conn_body[50_000:]]),  # type: ignore[arg-type]
            headers={"Content-Type": "application/json"},  # no length: http.client chunks it
        )
        self.error(response, 413, "body_too_large")

    def snapshot(self) -> Any:
        return (
            self.cli("user", "list"),
            self.cli("project", "list"),
            self.cli("token", "list"),
            self.cli("project", "shares"),
        )


class RelayCutByApiTests(AdminApiProcess):
    def test_removing_a_collaborator_through_the_api_cuts_the_relay(self) -> None:
        self.cli("user", "add", "alice", "--password-stdin", stdin="pw\n")
        self.cli("user", "add", "bob", "--password-stdin", stdin="bob-pw\n")
        body = {"owner": "alice", "collaborators": ["bob"]}
        conforms(self.api.request("PUT", f"/v1/projects/{PID}", body=body), 201, "Project")
        backend = start_backend(self, ECHO_WS_BACKEND)
        with connect(
            f"wss://localhost:{self.proxy.port}/{PID}/port/{backend}/",
            ssl=self.https.context,
            additional_headers={"Authorization": basic("bob", "bob-pw")},
            open_timeout=10,
        ) as ws:
            ws.send("hello")
            self.assertEqual(ws.recv(timeout=10), "hello")
            body = {"owner": "alice", "collaborators": []}
            conforms(self.api.request("PUT", f"/v1/projects/{PID}", body=body), 200, "Project")
            changed = time.monotonic()
            with self.assertRaises(ConnectionClosed):
                while True:
                    ws.recv(timeout=10)
            self.assertLess(time.monotonic() - changed, DEADLINE)


class SharingPolicyTests(AdminApiProcess):
    """The proxy has no --project-domain: sharing is refused, saying why."""

    def test_sharing_refused_without_project_domain(self) -> None:
        self.cli("user", "add", "alice", "--password-stdin", stdin="pw\n")
        self.cli("project", "add", "--owner", "alice", "--id", PID)
        message = self.error(
            self.api.request(
                "PUT", f"/v1/projects/{PID}/shares/8000", body={"visibility": "public"}
            ),
            403,
            "forbidden",
        )
        self.assertIn("--project-domain", message)
        self.assertEqual(self.cli("project", "shares"), [])


class SharingThroughApiTests(AdminApiProcess):
    extra = ("--project-domain", DOMAIN, "--allow-sharing", "link")

    def test_share_set_list_remove(self) -> None:
        self.cli("user", "add", "alice", "--password-stdin", stdin="pw\n")
        self.cli("project", "add", "--owner", "alice", "--id", PID)
        made = conforms(
            self.api.request(
                "PUT",
                f"/v1/projects/{PID}/shares/8000",
                body={"visibility": "link", "expires_in_days": 2},
            ),
            200,
            "Share",
        )
        self.assertEqual(made["url"], f"https://{PID}-8000.{DOMAIN}/")
        self.assertTrue(
            made["link"].startswith(f"https://{PID}-8000.{DOMAIN}/.cocalcproxy/share?s=")
        )
        self.error(
            self.api.request(
                "PUT", f"/v1/projects/{PID}/shares/8001", body={"visibility": "public"}
            ),
            403,
            "forbidden",
        )
        for target in ("/v1/shares", f"/v1/projects/{PID}/shares"):
            listed = conforms(self.api.request("GET", target), 200, "SharePage")
            self.assertEqual(
                [(s["port"], s["visibility"]) for s in listed["items"]], [(8000, "link")]
            )
            self.assertNotIn("secret", listed["items"][0])
        self.error(
            self.api.request("PUT", f"/v1/projects/{PID}/shares/0", body={"visibility": "link"}),
            422,
            "invalid_input",
        )
        self.error(
            self.api.request("PUT", f"/v1/projects/{PID}/shares/80", body={"visibility": "open"}),
            422,
            "invalid_input",
        )
        self.assertEqual(
            self.api.request("DELETE", f"/v1/projects/{PID}/shares/8000").json(),
            {"project": PID, "port": 8000, "visibility": "private"},
        )
        self.error(self.api.request("DELETE", f"/v1/projects/{PID}/shares/8000"), 404, "not_found")
