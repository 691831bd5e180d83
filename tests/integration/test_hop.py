"""The sign-in hop end to end: real TLS (one certificate for the main host and ``*.<domain>``),
the real directory, a real backend, and a client that behaves like a browser: it follows every
redirect itself and keeps its cookies per host, honouring only host-only cookies."""

from __future__ import annotations

import html
import json
import os
import re
import socket
import ssl as stdlib_ssl
import subprocess
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urljoin, urlsplit

from treq.client import HTTPClient
from twisted.internet import defer, reactor, ssl, threads
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, wrapClientTLS
from twisted.trial import unittest
from twisted.web import resource, server
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.iweb import IAgentEndpointFactory
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as ws_connect
from zope.interface import implementer

from tests.relay_support import WSBackend
from tests.relay_support import wait_for as relay_wait_for
from tests.support import start_proxy
from tests.tlsutil import key_pem, make_ca, make_leaf, pem

DOMAIN = "proj.test"
PID = "5f0e3a0c-9d1b-4c2e-8f3a-7b6c5d4e3f21"


class Echo(resource.Resource):
    """The backend: answers with the request it got, as JSON, and keeps a copy."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[dict[str, Any]] = []

    def render(self, request: server.Request) -> bytes:
        record = {
            "uri": request.uri.decode("latin-1"),
            "headers": [
                [k.decode("latin-1"), v.decode("latin-1")]
                for k, vs in request.requestHeaders.getAllRawHeaders()
                for v in vs
            ],
        }
        self.seen.append(record)
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps(record).encode()


@implementer(IAgentEndpointFactory)
class Loopback:
    """Every host name resolves to the proxy on 127.0.0.1; TLS checks the name asked for."""

    def __init__(self, port: int, authority: ssl.Certificate) -> None:
        self.port = port
        self.authority = authority

    def endpointForURI(self, uri: Any) -> Any:  # noqa: N802
        options = ssl.optionsForClientTLS(uri.host.decode(), trustRoot=self.authority)
        return wrapClientTLS(options, TCP4ClientEndpoint(reactor, "127.0.0.1", self.port))


class Browser:
    """Follows redirects and keeps cookies per host; refuses any cookie with a Domain."""

    def __init__(self, case: unittest.TestCase, port: int, authority: ssl.Certificate) -> None:
        self.case = case
        pool = HTTPConnectionPool(reactor, persistent=False)
        case.addCleanup(pool.closeCachedConnections)
        self.http = HTTPClient(Agent.usingEndpointFactory(reactor, Loopback(port, authority), pool))
        self.jar: dict[str, dict[str, str]] = {}
        self.visited: list[tuple[str, int]] = []

    def _cookie_header(self, host: str) -> dict[str, str]:
        cookies = self.jar.get(host, {})
        if not cookies:
            return {}
        return {"Cookie": "; ".join(f"{k}={v}" for k, v in cookies.items())}

    def _keep(self, host: str, response: Any) -> None:
        for line in response.headers.getRawHeaders(b"set-cookie", []):
            text = line.decode("latin-1")
            attributes = [a.strip().lower() for a in text.split(";")[1:]]
            self.case.assertFalse(
                [a for a in attributes if a.startswith("domain")], f"not host-only: {text}"
            )
            name, _, value = text.split(";", 1)[0].partition("=")
            if "max-age=0" in attributes:
                self.jar.get(host, {}).pop(name, None)
            else:
                self.jar.setdefault(host, {})[name] = value

    @defer.inlineCallbacks
    def request(
        self,
        method: str,
        url: str,
        data: bytes | None = None,
        headers: dict[str, str] | None = None,
    ):  # type: ignore[no-untyped-def]
        host = urlsplit(url).hostname or ""
        response = yield self.http.request(
            method,
            url,
            headers={"Accept": "text/html", **self._cookie_header(host), **(headers or {})},
            data=data,
            allow_redirects=False,
        )
        body = yield response.content()
        self._keep(host, response)
        self.visited.append((url, response.code))
        return response, body

    @defer.inlineCallbacks
    def go(self, url: str, limit: int = 10):  # type: ignore[no-untyped-def]
        """GET ``url`` and follow redirects; the final response and its body."""
        for _ in range(limit):
            response, body = yield self.request("GET", url)
            location = response.headers.getRawHeaders(b"location", [None])[0]
            if response.code not in (301, 302, 303, 307, 308) or location is None:
                return url, response, body
            url = urljoin(url, location.decode("ascii"))
        raise AssertionError(f"redirect loop: {self.visited}")

    @defer.inlineCallbacks
    def sign_in(self, url: str, body: bytes, name: str, password: str):  # type: ignore[no-untyped-def]
        """Fill in the sign-in form served at ``url`` and follow where it leads."""

        def hidden(field: str) -> str:
            m = re.search(rb'name="' + field.encode() + rb'" value="([^"]*)"', body)
            assert m is not None, body
            return html.unescape(m.group(1).decode())

        form = {"csrf": hidden("csrf"), "next": hidden("next"), "name": name, "password": password}
        response, _ = yield self.request(
            "POST",
            urljoin(url, "/_/login"),
            data=urlencode(form).encode(),
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        self.case.assertEqual(response.code, 303)
        location = response.headers.getRawHeaders(b"location")[0].decode("ascii")
        result = yield self.go(urljoin(url, location))
        return result


class HopOverTLS(unittest.TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def]
        self.echo = Echo()
        listening = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            server.Site(self.echo)
        )
        self.addCleanup(listening.stopListening)
        self.backend_port = listening.getHost().port

        base = Path(os.path.abspath(self.mktemp()))
        base.mkdir(parents=True)
        ca = make_ca("hop CA")
        leaf, key = make_leaf(ca, f"*.{DOMAIN}")  # SANs: *.proj.test and localhost
        (base / "cert.pem").write_bytes(pem(leaf) + pem(ca[0]))
        (base / "key.pem").write_bytes(key_pem(key))
        self.authority = ssl.Certificate.loadPEM(pem(ca[0]))
        self.proxy = yield start_proxy(
            self,
            "--tls-cert", str(base / "cert.pem"), "--tls-key", str(base / "key.pem"),
            "--project-domain", DOMAIN, "--hostname", "localhost",
        )  # fmt: skip
        d = self.proxy.directory
        yield d.add_user("alice", "alice-password")
        yield d.add_user("mallory", "mallory-password")
        yield d.add_project("alice", project_id=PID)
        self.label = f"{PID}-{self.backend_port}"
        self.origin = f"https://{self.label}.{DOMAIN}:{self.proxy.port}"
        self.main = f"https://localhost:{self.proxy.port}"

    def browser(self) -> Browser:
        return Browser(self, self.proxy.port, self.authority)

    @defer.inlineCallbacks
    def test_the_whole_hop_and_the_ticket_only_once(self):  # type: ignore[no-untyped-def]
        b = self.browser()
        url, response, body = yield b.go(self.origin + "/app/page?x=1&y=%2F")
        self.assertEqual(urlsplit(url).path, "/_/login")
        self.assertEqual(urlsplit(url).hostname, "localhost")
        self.assertEqual(response.code, 200)
        first_steps = [u for u, _ in b.visited]
        self.assertTrue(first_steps[1].startswith(self.main + "/_/hop?to="), first_steps)

        url, response, body = yield b.sign_in(url, body, "alice", "alice-password")
        self.assertEqual(response.code, 200, body)
        self.assertEqual(url, self.origin + "/app/page?x=1&y=%2F")
        record = json.loads(body)
        self.assertEqual(record["uri"], "/app/page?x=1&y=%2F")

        # The path the browser took, and the headers of the hop's own answers.
        landing = [u for u, _ in b.visited if urlsplit(u).path == "/.cocalcproxy/hop"]
        self.assertEqual(len(landing), 1)
        self.assertTrue(landing[0].startswith(self.origin + "/.cocalcproxy/hop?ticket="))

        # Each host has its own session cookie; the main host's and the subdomain's differ.
        main_cookie = b.jar["localhost"]["__Host-cocalcproxy_session"]
        sub_cookie = b.jar[f"{self.label}.{DOMAIN}"]["__Host-cocalcproxy_session"]
        self.assertNotEqual(main_cookie, sub_cookie)

        # Nothing of the proxy's reached the backend: no session cookie, no ticket, no token.
        ticket = parse_qs(urlsplit(landing[0]).query)["ticket"][0]
        for seen in self.echo.seen:
            text = json.dumps(seen)
            for secret in (main_cookie, sub_cookie, sub_cookie.split(".")[0], ticket):
                self.assertNotIn(secret, text)
            self.assertNotIn("__Host-cocalcproxy_session", text)
            self.assertNotIn(".cocalcproxy", seen["uri"])

        # Later visits go straight through on the subdomain's own cookie.
        before = len(b.visited)
        url, response, body = yield b.go(self.origin + "/again")
        self.assertEqual((response.code, len(b.visited) - before), (200, 1))
        self.assertEqual(json.loads(body)["uri"], "/again")

        # The ticket works once.
        replay = self.browser()
        response, body = yield replay.request("GET", landing[0])
        self.assertEqual(response.code, 403)
        self.assertEqual(response.headers.getRawHeaders(b"referrer-policy"), [b"no-referrer"])
        self.assertIn(b"Sign in again", body)
        self.assertEqual(replay.jar, {})

        # The subdomain's cookie is no good anywhere else, even if stolen and replayed.
        thief = self.browser()
        other = f"{PID}-{self.backend_port + 1 if self.backend_port < 65535 else 1}.{DOMAIN}"
        thief.jar[other] = {"__Host-cocalcproxy_session": sub_cookie}
        thief.jar["localhost"] = {"__Host-cocalcproxy_session": sub_cookie}
        response, _ = yield thief.request("GET", f"https://{other}:{self.proxy.port}/")
        self.assertEqual(response.code, 302)
        self.assertIn(b"/_/hop?to=", response.headers.getRawHeaders(b"location")[0])
        response, _ = yield thief.request("GET", self.main + "/")
        self.assertEqual(response.code, 302)
        self.assertEqual(response.headers.getRawHeaders(b"location")[0], b"/_/login")

    @defer.inlineCallbacks
    def test_an_outsider_is_refused_at_the_hop(self):  # type: ignore[no-untyped-def]
        b = self.browser()
        url, response, body = yield b.go(self.origin + "/secret")
        url, response, body = yield b.sign_in(url, body, "mallory", "mallory-password")
        self.assertEqual(response.code, 404)
        self.assertEqual(urlsplit(url).path, "/_/hop")
        # No session on the project host (only the hop's state cookie).
        self.assertNotIn("__Host-cocalcproxy_session", b.jar.get(f"{self.label}.{DOMAIN}", {}))
        self.assertEqual(self.echo.seen, [])

    @defer.inlineCallbacks
    def test_the_hop_refuses_to_lead_anywhere_else(self):  # type: ignore[no-untyped-def]
        b = self.browser()
        url, response, body = yield b.go(self.main + "/_/login")
        url, response, body = yield b.sign_in(url, body, "alice", "alice-password")
        self.assertEqual(response.code, 200)
        for to in (
            "https://evil.example/",
            f"https://evil.example\\@{self.label}.{DOMAIN}:{self.proxy.port}/",
            f"https://{self.label}.{DOMAIN}:{self.proxy.port}//evil.example/",
            f"https://{self.label}.{DOMAIN}:{self.proxy.port + 1}/",
        ):
            response, _ = yield b.request("GET", self.main + "/_/hop?" + urlencode({"to": to}))
            self.assertEqual(response.code, 400, to)
            self.assertIsNone(response.headers.getRawHeaders(b"location"))


class SignOutEndsHostSessions(unittest.TestCase):
    """Signing out on the main host ends the project hosts' sessions made from it, open
    WebSocket relays included, within 2 seconds (issue #14)."""

    timeout = 120
    setUp = HopOverTLS.setUp
    browser = HopOverTLS.browser

    @defer.inlineCallbacks
    def test_sign_out_cuts_a_subdomain_websocket_and_its_cookie(self):  # type: ignore[no-untyped-def]
        async def echo(ws: Any) -> None:
            async for message in ws:
                await ws.send(message)

        ws_port = WSBackend(echo).start(self)
        label = f"{PID}-{ws_port}"
        host = f"{label}.{DOMAIN}"
        origin = f"https://{host}:{self.proxy.port}"
        b = self.browser()
        url, response, body = yield b.go(origin + "/")
        url, response, body = yield b.sign_in(url, body, "alice", "alice-password")
        cookie = b.jar[host]["__Host-cocalcproxy_session"]
        context = stdlib_ssl.create_default_context(cadata=pem_of(self.authority))
        opened = threading.Event()

        def websocket() -> float:
            sock = socket.create_connection(("127.0.0.1", self.proxy.port), timeout=20)
            with ws_connect(
                f"wss://{host}:{self.proxy.port}/",
                sock=sock,
                ssl=context,
                server_hostname=host,
                additional_headers={"Cookie": f"__Host-cocalcproxy_session={cookie}"},
                open_timeout=20,
            ) as ws:
                ws.send("hello")
                assert ws.recv(timeout=20) == "hello"
                opened.set()
                try:
                    while True:
                        ws.recv(timeout=20)
                except ConnectionClosed:
                    return time.monotonic()
            raise AssertionError("not closed")

        closed = threads.deferToThread(websocket)
        yield relay_wait_for(opened.is_set, 30)

        # Sign out on the main host with the start page's form.
        url, response, index = yield b.go(self.main + "/")
        csrf = re.search(rb'name="csrf" value="([^"]*)"', index)
        assert csrf is not None, index
        response, _ = yield b.request(
            "POST",
            self.main + "/_/logout",
            data=urlencode({"csrf": html.unescape(csrf.group(1).decode())}).encode(),
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        self.assertEqual(response.code, 303)
        signed_out = time.monotonic()
        closed_at = yield closed
        self.assertLess(closed_at - signed_out, 2.0)
        # The host's cookie is no longer a session: a page load is sent to sign in again.
        thief = self.browser()
        thief.jar[host] = {"__Host-cocalcproxy_session": cookie}
        response, _ = yield thief.request("GET", origin + "/")
        self.assertEqual(response.code, 302)
        self.assertIn(b"/_/hop?to=", response.headers.getRawHeaders(b"location")[0])


def pem_of(certificate: ssl.Certificate) -> str:
    return certificate.dumpPEM().decode("ascii")


class GeneratedCertificateCoversProjectHosts(unittest.TestCase):
    """With --project-domain and no --tls-cert, the README's ``curl --cacert`` works on project
    hosts too: the generated certificate names ``*.DOMAIN`` (issue #14)."""

    timeout = 60

    @defer.inlineCallbacks
    def test_curl_cacert_on_a_project_host(self):  # type: ignore[no-untyped-def]
        proxy = yield start_proxy(self, "--project-domain", DOMAIN)
        results = []
        for host in (f"{PID}-8000.{DOMAIN}", f"{PID}-raw.{DOMAIN}", "localhost"):
            result = yield threads.deferToThread(
                subprocess.run,
                [
                    "curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}",
                    "--cacert", proxy.cert_path,
                    "--resolve", f"{host}:{proxy.port}:127.0.0.1",
                    f"https://{host}:{proxy.port}/",
                ],
                capture_output=True, text=True, timeout=30,
            )  # fmt: skip
            results.append((host, result.returncode, result.stdout, result.stderr))
        for host, code, status, error in results:
            self.assertEqual(code, 0, f"{host}: {error}")  # the TLS name check passed
            self.assertIn(status, ("200", "401"), host)
