"""Shared ports end to end: the real proxy as its own process with project subdomains, the admin
command sharing and unsharing as other processes, real TLS, real HTTP and WebSocket backends.

Visitors: anonymous (no credentials), an outsider (a signed-up user who is not a member), a
member (the owner). Members and outsiders present Basic credentials, which are the proxy's own
and so must never reach a backend, shared or not.
"""

from __future__ import annotations

import base64
import json
import socket
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from twisted.trial import unittest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from tests.api_support import ECHO_WS_BACKEND, HTTP_ECHO_BACKEND, ProxyClient, start_backend
from tests.processes import ProxyProcess, admin, wait_for

DOMAIN = "proj.test"
PID = "7d4c2b1a-0f9e-4d8c-b7a6-5e4d3c2b1a09"
DEADLINE = 2.0


def basic(name: str, secret: str) -> str:
    return "Basic " + base64.b64encode(f"{name}:{secret}".encode()).decode()


ALICE = {"Authorization": basic("alice", "alice-pw")}  # the owner
BOB = {"Authorization": basic("bob", "bob-pw")}  # signed up, not a member


class SharingCase(unittest.TestCase):
    allow = "public"

    def setUp(self) -> None:
        self.state = str(Path(self.mktemp()).absolute())
        Path(self.state).mkdir(parents=True)
        self.cli("init")
        self.cli("user", "add", "alice", "--password-stdin", stdin="alice-pw\n")
        self.cli("user", "add", "bob", "--password-stdin", stdin="bob-pw\n")
        self.cli("project", "add", "--owner", "alice", "--id", PID)
        self.proxy = ProxyProcess(
            self.state, "--project-domain", DOMAIN, "--allow-sharing", self.allow
        ).start()
        self.addCleanup(self.proxy.stop)
        self.client = ProxyClient(self.proxy.port, Path(self.state) / "tls" / "cert.pem")
        wait_for(lambda: self.client.get("localhost", "/_/health").status == 200, 60, "proxy")
        self.port = start_backend(self, HTTP_ECHO_BACKEND)
        self.host = f"{PID}-{self.port}.{DOMAIN}"

    def cli(self, *args: str, stdin: str | None = None) -> Any:
        done = admin(self.state, "--json", *args, stdin=stdin)
        self.assertEqual(done.returncode, 0, done.stderr)
        return json.loads(done.stdout) if done.stdout.strip() else {}

    def share(self, port: int, visibility: str, *extra: str) -> Any:
        return self.cli(
            "project", "share", PID, str(port), "--visibility", visibility,
            "--project-domain", DOMAIN, *extra,
        )  # fmt: skip

    def get(self, headers: dict[str, str] | None = None, host: str | None = None, path: str = "/"):  # type: ignore[no-untyped-def]
        return self.client.get(host or self.host, path, headers or {})

    def assert_no_proxy_cookie_set(self, response: Any) -> None:
        for value in response.headers.get_all("Set-Cookie") or []:
            self.assertNotIn("cocalcproxy", value)

    def access_log(self) -> list[dict[str, Any]]:
        path = Path(self.state) / "access.log"
        if not path.exists():
            # the process logs to standard output, into its output file
            lines = [line for line in self.proxy.output().splitlines() if line.startswith("{")]
        else:
            lines = path.read_text().splitlines()
        return [json.loads(line) for line in lines if line.strip().startswith("{")]


class PrivateAndPublicTests(SharingCase):
    def test_private_is_members_only(self) -> None:
        self.assertEqual(self.get().status, 401)
        self.assertEqual(self.get(BOB).status, 404)
        member = self.get(ALICE)
        self.assertEqual(member.status, 200)
        self.assertEqual(member.json()["authorization"], [], "member's credentials forwarded")

    def test_public_for_everyone_with_no_credentials_forwarded(self) -> None:
        self.share(self.port, "public")
        for who in ({}, BOB, ALICE):
            response = self.get(who, path="/page?x=1")
            self.assertEqual(response.status, 200, who)
            seen = response.json()
            self.assertEqual(seen["path"], "/page?x=1")
            self.assertEqual(seen["authorization"], [], f"credentials of {who} forwarded")
            self.assertEqual(seen["cookie"], [])
            self.assert_no_proxy_cookie_set(response)
            self.assertEqual(response.headers.get_all("Set-Cookie"), ["backend=1; Path=/"])
        # a proxy session cookie sent to the shared host is not forwarded either
        response = self.get({"Cookie": "__Host-cocalcproxy_session=abc; mine=1"})
        self.assertEqual(response.json()["cookie"], ["mine=1"])
        # the backend's own Basic credentials (not the proxy's) pass
        own = {"Authorization": basic("backend-user", "backend-pw")}
        self.assertEqual(self.get(own).json()["authorization"], [own["Authorization"]])
        # never another port, the files host or the main host
        other = start_backend(self, HTTP_ECHO_BACKEND)
        self.assertEqual(self.get(host=f"{PID}-{other}.{DOMAIN}").status, 401)
        self.assertEqual(self.get(host=f"{PID}-raw.{DOMAIN}").status, 401)
        self.assertEqual(self.get(host="localhost", path=f"/{PID}/server/{self.port}/").status, 401)
        self.assertEqual(self.get(host="localhost", path=f"/{PID}/port/{self.port}/").status, 401)
        self.assertEqual(
            self.get(BOB, host="localhost", path=f"/{PID}/server/{self.port}/").status, 404
        )
        # the access log marks shared traffic and names no account for it
        wait_for(lambda: any(r.get("share") == "public" for r in self.access_log()), 10, "log line")
        shared = [r for r in self.access_log() if r.get("share") == "public"]
        self.assertTrue(all(r.get("account") in (None, "") for r in shared), shared)

    def test_unsharing_cuts_requests_and_websockets_within_2_seconds(self) -> None:
        ws_port = start_backend(self, ECHO_WS_BACKEND)
        self.share(ws_port, "public")
        host = f"{PID}-{ws_port}.{DOMAIN}"
        sock = socket.create_connection(("127.0.0.1", self.proxy.port), timeout=10)
        with connect(
            f"wss://{host}/socket",
            sock=sock,
            ssl=self.client.context,
            server_hostname="localhost",
            open_timeout=10,
        ) as ws:
            ws.send("hello")
            self.assertEqual(ws.recv(timeout=10), "hello")
            self.cli("project", "unshare", PID, str(ws_port))
            changed = time.monotonic()
            with self.assertRaises(ConnectionClosed):
                while True:
                    ws.recv(timeout=10)
            self.assertLess(time.monotonic() - changed, DEADLINE)
        self.assertEqual(self.get(host=host).status, 401)


class LinkTests(SharingCase):
    def land(self, link_path: str, host: str | None = None) -> Any:
        return self.get(host=host, path=link_path, headers={"Accept": "text/html"})

    def link_path(self, made: dict[str, Any]) -> str:
        parts = urlsplit(made["link"])
        self.assertEqual(parts.hostname, self.host)
        return f"{parts.path}?{parts.query}"

    def test_link_without_with_and_revoked(self) -> None:
        made = self.share(self.port, "link")
        path = self.link_path(made)
        self.assertEqual(self.get().status, 401, "no secret: not shared")
        self.assertEqual(self.get(BOB).status, 404)
        self.assertEqual(self.get(ALICE).status, 200, "members need no link")
        wrong = self.land(path[:-4] + "AAAA")
        self.assertEqual(wrong.status, 404)
        self.assertEqual(wrong.headers["Referrer-Policy"], "no-referrer")
        self.assertIsNone(wrong.headers.get("Set-Cookie"))
        landed = self.land(path + "&next=/deep/page%3Fq")
        self.assertEqual(landed.status, 303)
        self.assertEqual(landed.headers["Location"], "/deep/page?q")
        self.assertNotIn(made["secret"], landed.headers["Location"], "secret left in the URL")
        self.assertEqual(landed.headers["Referrer-Policy"], "no-referrer")
        (set_cookie,) = landed.headers.get_all("Set-Cookie")
        name, _, rest = set_cookie.partition("=")
        self.assertEqual(name, "__Host-cocalcproxy_share")
        value = rest.split(";")[0]
        self.assertNotIn(made["secret"], set_cookie, "the cookie is not the secret")
        attributes = [a.strip().lower() for a in rest.split(";")[1:]]
        self.assertIn("secure", attributes)
        self.assertIn("httponly", attributes)
        self.assertIn("path=/", attributes)
        self.assertFalse([a for a in attributes if a.startswith("domain")])
        cookie = {"Cookie": f"__Host-cocalcproxy_share={value}; app=2"}
        response = self.get(cookie)
        self.assertEqual(response.status, 200)
        self.assertEqual(response.json()["cookie"], ["app=2"], "share cookie forwarded")
        self.assert_no_proxy_cookie_set(response)
        # the cookie is for this host only: not another port of the project
        other = start_backend(self, HTTP_ECHO_BACKEND)
        self.share(other, "link")
        self.assertEqual(self.get(cookie, host=f"{PID}-{other}.{DOMAIN}").status, 401)
        self.assertEqual(self.land(path, host=f"{PID}-{other}.{DOMAIN}").status, 404)
        # sharing again makes a new link: the old secret and cookie stop working
        again = self.share(self.port, "link")
        self.assertNotEqual(again["secret"], made["secret"])
        wait_for(lambda: self.get(cookie).status == 401, 10, "old cookie refused")
        self.assertEqual(self.land(path).status, 404)
        # revoked: within 2 seconds
        landed = self.land(self.link_path(again))
        fresh = {"Cookie": landed.headers["Set-Cookie"].split(";")[0]}
        self.assertEqual(self.get(fresh).status, 200)
        self.cli("project", "unshare", PID, str(self.port))
        changed = time.monotonic()
        wait_for(lambda: self.get(fresh).status == 401, 10, "revoked cookie refused")
        self.assertLess(time.monotonic() - changed, DEADLINE)
        self.assertEqual(self.land(self.link_path(again)).status, 404)

    def test_expired_link(self) -> None:
        made = self.share(self.port, "link", "--expires-in", "0.00004")  # about 3.5 s
        path = self.link_path(made)
        landed = self.land(path)
        self.assertEqual(landed.status, 303)
        self.assertIn("Max-Age=", landed.headers["Set-Cookie"])
        cookie = {"Cookie": landed.headers["Set-Cookie"].split(";")[0]}
        self.assertEqual(self.get(cookie).status, 200)
        wait_for(lambda: self.get(cookie).status == 401, 15, "expired share refused")
        self.assertEqual(self.land(path).status, 404)
        self.assertEqual(self.get(ALICE).status, 200)

    def test_link_share_websocket_cut_by_expiry_of_the_link(self) -> None:
        ws_port = start_backend(self, ECHO_WS_BACKEND)
        made = self.share(ws_port, "link")
        host = f"{PID}-{ws_port}.{DOMAIN}"
        parts = urlsplit(made["link"])
        landed = self.land(f"{parts.path}?{parts.query}", host=host)
        cookie = landed.headers["Set-Cookie"].split(";")[0]
        sock = socket.create_connection(("127.0.0.1", self.proxy.port), timeout=10)
        with connect(
            f"wss://{host}/",
            sock=sock,
            ssl=self.client.context,
            server_hostname="localhost",
            additional_headers={"Cookie": cookie},
            open_timeout=10,
        ) as ws:
            ws.send("through the link")
            self.assertEqual(ws.recv(timeout=10), "through the link")
            self.share(ws_port, "private")
            changed = time.monotonic()
            with self.assertRaises(ConnectionClosed):
                while True:
                    ws.recv(timeout=10)
            self.assertLess(time.monotonic() - changed, DEADLINE)


class OperatorForbidsTests(SharingCase):
    allow = "link"

    def test_public_share_not_served_when_only_links_are_allowed(self) -> None:
        # stored by a command that did not know this proxy's options ...
        self.cli("project", "share", PID, str(self.port), "--visibility", "public")
        # ... but this proxy does not serve it
        wait_for(lambda: self.get(ALICE).status == 200, 10, "proxy")
        self.assertEqual(self.get().status, 401)
        self.assertEqual(self.get(BOB).status, 404)
