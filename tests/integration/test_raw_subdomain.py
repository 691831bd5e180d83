"""The raw file server on a project subdomain (``https://<pid>-raw.<domain>/``) over real TLS:
each project has its own origin there, so active content is not sandboxed; everything else
(traversal refusals, listings, redirects, who gets in) is the same as on the main host."""

from __future__ import annotations

import base64
import os
from pathlib import Path

from twisted.internet import defer, reactor, ssl
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial import unittest

from tests.rawsupport import Exchange, Response, parse_response, request_bytes
from tests.support import start_proxy
from tests.tlsutil import key_pem, make_ca, make_leaf, pem

DOMAIN = "proj.test"
PID = "5f0e3a0c-9d1b-4c2e-8f3a-7b6c5d4e3f21"
HOST = f"{PID}-raw.{DOMAIN}"


def basic(name: str, password: str) -> bytes:
    return b"Basic " + base64.b64encode(f"{name}:{password}".encode())


class RawOnSubdomain(unittest.TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def]
        base = Path(os.path.abspath(self.mktemp()))
        self.home = base / "home"
        (self.home / "docs").mkdir(parents=True)
        (base / "outside").mkdir()
        (base / "outside" / "secret.txt").write_bytes(b"TOP SECRET")
        (self.home / "page.html").write_bytes(b"<script>document.title='runs'</script>")
        os.symlink(base / "outside" / "secret.txt", self.home / "leak")

        ca = make_ca("raw subdomain CA")
        leaf, key = make_leaf(ca, HOST)

        self.ca_path = base / "ca.pem"
        self.ca_path.write_bytes(pem(ca[0]))
        (base / "cert.pem").write_bytes(pem(leaf) + pem(ca[0]))
        (base / "key.pem").write_bytes(key_pem(key))
        self.proxy = yield start_proxy(
            self,
            "--tls-cert", str(base / "cert.pem"), "--tls-key", str(base / "key.pem"),
            "--project-domain", DOMAIN,
        )  # fmt: skip
        directory = self.proxy.directory
        yield directory.add_user("alice", "alice-password")
        yield directory.add_user("mallory", "mallory-password")
        yield directory.add_project("alice", home=str(self.home), project_id=PID)

    @defer.inlineCallbacks
    def fetch(self, target: bytes, who: tuple[str, str] = ("alice", "alice-password")):  # type: ignore[no-untyped-def]
        authority = ssl.Certificate.loadPEM(self.ca_path.read_bytes())
        endpoint = wrapClientTLS(
            ssl.optionsForClientTLS(HOST, trustRoot=authority),
            TCP4ClientEndpoint(reactor, "127.0.0.1", self.proxy.port),
        )
        data = request_bytes(b"GET", target, {b"Authorization": basic(*who)})
        data = data.replace(b"Host: localhost", b"Host: " + f"{HOST}:{self.proxy.port}".encode())
        exchange = yield connectProtocol(endpoint, Exchange(data))
        raw = yield exchange.closed
        response: Response = parse_response(raw)
        return response

    @defer.inlineCallbacks
    def test_active_content_is_not_sandboxed_on_its_own_origin(self):  # type: ignore[no-untyped-def]
        r = yield self.fetch(b"/page.html")
        self.assertEqual(r.status, 200)
        self.assertEqual(r.body, b"<script>document.title='runs'</script>")
        self.assertEqual(r.header(b"content-type"), b"text/html; charset=utf-8")
        self.assertEqual(r.header(b"x-content-type-options"), b"nosniff")
        self.assertIsNone(r.header(b"content-security-policy"))

    @defer.inlineCallbacks
    def test_listing_redirect_and_refusals(self):  # type: ignore[no-untyped-def]
        listing = yield self.fetch(b"/")
        self.assertEqual(listing.status, 200)
        self.assertIn(b'href="page.html"', listing.body)
        redirect = yield self.fetch(b"/docs?a=1")
        self.assertEqual((redirect.status, redirect.header(b"location")), (301, b"/docs/?a=1"))
        for attack in (b"/../outside/secret.txt", b"/%2e%2e/outside/secret.txt", b"/leak"):
            r = yield self.fetch(attack)
            self.assertIn(r.status, (400, 404), attack)
            self.assertNotIn(b"TOP SECRET", r.raw, attack)
        outsider = yield self.fetch(b"/page.html", ("mallory", "mallory-password"))
        self.assertEqual(outsider.status, 404)
        self.assertNotIn(b"<script>", outsider.body)

    @defer.inlineCallbacks
    def test_curl_with_the_subdomain_name(self):  # type: ignore[no-untyped-def]
        out, err, code = yield getProcessOutputAndValue(
            "curl",
            ["--silent", "--show-error", "--cacert", str(self.ca_path),
             "--resolve", f"{HOST}:{self.proxy.port}:127.0.0.1", "--user", "alice:alice-password",
             "--range", "8-15", f"https://{HOST}:{self.proxy.port}/page.html"],
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        )  # fmt: skip
        self.assertEqual(code, 0, err)
        self.assertEqual(out, b"document")
