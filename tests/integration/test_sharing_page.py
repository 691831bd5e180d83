"""Members set a port's visibility on the start page: a CSRF-protected POST to ``/_/share`` over
real TLS, with a real session; public shares are shown on the page."""

from __future__ import annotations

import html
import re
from typing import Any
from urllib.parse import urlencode

from twisted.internet import defer
from twisted.trial import unittest

from tests.support import https_client, start_proxy

DOMAIN = "proj.test"
SESSION = "__Host-cocalcproxy_session"


class PageCase(unittest.TestCase):
    timeout = 60
    extra: tuple[str, ...] = ("--project-domain", DOMAIN, "--allow-sharing", "public")

    @defer.inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def]
        self.proxy = yield start_proxy(self, *self.extra)
        d = self.proxy.directory
        alice = yield d.add_user("alice", "alice-pw")
        bob = yield d.add_user("bob", "bob-pw")
        self.project = yield d.add_project("alice", title="Demo")
        self.alice = yield d.create_session(alice.id, 3600)
        self.bob = yield d.create_session(bob.id, 3600)
        self.http = https_client(self, self.proxy.cert_path)

    @defer.inlineCallbacks
    def start_page(self, session: str):  # type: ignore[no-untyped-def]
        response = yield self.http.get(
            self.proxy.url + "/",
            headers={"Cookie": f"{SESSION}={session}", "Accept": "text/html"},
        )
        body = yield response.text()
        self.assertEqual(response.code, 200)
        return body

    def csrf_of(self, page: str) -> str | None:
        forms = re.findall(r'<form[^>]*action="/_/share".*?</form>', page, re.S)
        for form in forms:
            found = re.search(r'name="share_csrf" value="([^"]+)"', form)
            if found:
                return html.unescape(found.group(1))
        return None

    @defer.inlineCallbacks
    def post(self, session: str, fields: dict[str, str], **headers: str):  # type: ignore[no-untyped-def]
        sent = {
            "Cookie": f"{SESSION}={session}",
            "Content-Type": "application/x-www-form-urlencoded",
            "Accept": "text/html",
            **headers,
        }
        response = yield self.http.post(
            self.proxy.url + "/_/share", data=urlencode(fields).encode(), headers=sent
        )
        body = yield response.text()
        return response, body

    @defer.inlineCallbacks
    def shares(self):  # type: ignore[no-untyped-def]
        found: list[Any] = yield self.proxy.directory.list_shares(None)
        return [(s.project_id, s.port, s.visibility) for s in found]


class StartPageSharing(PageCase):
    @defer.inlineCallbacks
    def test_member_shares_and_unshares_with_csrf(self):  # type: ignore[no-untyped-def]
        page = yield self.start_page(self.alice)
        csrf = self.csrf_of(page)
        self.assertIsNotNone(csrf)
        pid = self.project.id
        fields = {"share_csrf": csrf, "project": pid, "port": "8000", "visibility": "link"}
        response, body = yield self.post(self.alice, fields)
        self.assertEqual(response.code, 200, body)
        self.assertEqual(response.headers.getRawHeaders("Referrer-Policy"), ["no-referrer"])
        self.assertIn(f"https://{pid}-8000.{DOMAIN}/.cocalcproxy/share?s=", body)
        self.assertEqual((yield self.shares()), [(pid, 8000, "link")])
        # public: shown on the start page so members see what is exposed
        response, body = yield self.post(
            self.alice, {**fields, "port": "9000", "visibility": "public"}
        )
        self.assertEqual(response.code, 200, body)
        page = yield self.start_page(self.alice)
        self.assertIn("PUBLIC", page)
        self.assertIn(f"https://{pid}-9000.{DOMAIN}/", page)
        response = yield self.http.get(
            self.proxy.url + "/", headers={"Cookie": f"{SESSION}={self.alice}"}
        )
        listed = yield response.json()
        self.assertEqual(
            [(s["port"], s["visibility"]) for s in listed["projects"][0]["shared_ports"]],
            [(8000, "link"), (9000, "public")],
        )
        response, body = yield self.post(self.alice, {**fields, "visibility": "private"})
        self.assertEqual(response.code, 200, body)
        self.assertEqual((yield self.shares()), [(pid, 9000, "public")])

    @defer.inlineCallbacks
    def test_refusals_change_nothing(self):  # type: ignore[no-untyped-def]
        page = yield self.start_page(self.alice)
        csrf = self.csrf_of(page)
        assert csrf is not None
        pid = self.project.id
        good = {"share_csrf": csrf, "project": pid, "port": "8000", "visibility": "public"}
        cases = [
            (self.alice, {**good, "share_csrf": "forged"}, {}, 403),
            (self.alice, {k: v for k, v in good.items() if k != "share_csrf"}, {}, 403),
            (self.alice, good, {"Origin": "https://evil.example"}, 403),
            (self.alice, good, {"Sec-Fetch-Site": "cross-site"}, 403),
            (self.alice, {**good, "port": "0"}, {}, 400),
            (self.alice, {**good, "port": "65536"}, {}, 400),
            (self.alice, {**good, "visibility": "everyone"}, {}, 400),
            (self.alice, {**good, "project": pid.upper()}, {}, 404),
        ]
        bob_page = yield self.start_page(self.bob)
        self.assertIsNone(self.csrf_of(bob_page), "bob has no project, so no form")
        # bob, signed in but not a member, with a token made for his own session
        bob_csrf = self.proxy.service.site.resource.own_pages.guard_pages.csrf.share_token(self.bob)
        cases.append((self.bob, {**good, "share_csrf": bob_csrf}, {}, 404))
        cases.append(("not-a-session", good, {}, 401))
        for session, fields, headers, status in cases:
            response, body = yield self.post(session, fields, **headers)
            self.assertEqual(response.code, status, (fields, headers, body[:300]))
        self.assertEqual((yield self.shares()), [])


class StartPageWithoutProjectDomain(PageCase):
    extra = ()

    @defer.inlineCallbacks
    def test_sharing_refused_saying_why(self):  # type: ignore[no-untyped-def]
        """No form on the page, and a hand-made POST is refused saying why."""
        page = yield self.start_page(self.alice)
        self.assertIsNone(self.csrf_of(page))
        csrf = self.proxy.service.site.resource.own_pages.guard_pages.csrf.share_token(self.alice)
        fields = {
            "share_csrf": csrf,
            "project": self.project.id,
            "port": "8000",
            "visibility": "link",
        }
        response, body = yield self.post(self.alice, fields)
        self.assertEqual(response.code, 403)
        self.assertIn("project-domain", body)
        self.assertEqual((yield self.shares()), [])
