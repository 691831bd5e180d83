"""The guard over real TLS with the real directory (SQLite, Argon2id): signing in through the
form, every credential kind, the one failure answer, security headers, signing out."""

from __future__ import annotations

import base64
import re
import time
from typing import Any
from urllib.parse import quote, urlencode

from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.trial import unittest

from tests.support import https_client, start_proxy

HTML = {"Accept": "text/html"}
FORM = {"Content-Type": "application/x-www-form-urlencoded", **HTML}


class Recorder:
    """Stands in for the forwarder: records who got through, answers 200."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, bool]] = []

    def handle(self, request: Any, route: Any, access: Any) -> None:
        self.seen.append(
            (access.account.name, access.project.id, request.authorization_is_proxy_credential)
        )
        request.setHeader(b"Content-Type", b"text/plain")
        request.setHeader(b"Content-Length", b"7")
        request.write(b"through")
        request.finish()


def hidden(body: bytes, name: str) -> str:
    m = re.search(rb'name="' + name.encode() + rb'" value="([^"]*)"', body)
    assert m is not None, body
    return m.group(1).decode()


def set_cookies(response: Any) -> dict[str, str]:
    out = {}
    for line in response.headers.getRawHeaders(b"set-cookie", []):
        text = line.decode()
        out[text.split("=", 1)[0]] = text
    return out


def cookie_value(line: str) -> str:
    return line.split("=", 1)[1].split(";", 1)[0]


class GuardOverTLS(unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def]
        self.proxy = yield start_proxy(self)
        directory = self.proxy.directory
        yield directory.add_user("alice", "alice-password")
        yield directory.add_user("bob", "bob-password")
        project = yield directory.add_project("alice", title="Alice & co")
        self.pid = project.id
        self.recorder = Recorder()
        self.proxy.service.site.resource.forwarder = self.recorder
        self.http = https_client(self, self.proxy.cert_path)
        self.target = f"/{self.pid}/server/8000/lab?x=1"

    def url(self, path: str) -> str:
        return self.proxy.url + path

    @defer.inlineCallbacks
    def get(
        self,
        path: str,
        headers: dict[str, str] | None = None,
        cookies: dict[str, str] | None = None,
    ):  # type: ignore[no-untyped-def]
        response = yield self.http.get(
            self.url(path), headers=headers or {}, cookies=cookies or {}, allow_redirects=False
        )
        body = yield response.content()
        return response, body

    @defer.inlineCallbacks
    def sign_in(self, name: str, password: str, next_path: str):  # type: ignore[no-untyped-def]
        page, body = yield self.get("/_/login?next=" + quote(next_path, safe=""), HTML)
        self.assertEqual(page.code, 200)
        presession = cookie_value(set_cookies(page)["__Host-cocalcproxy_csrf"])
        fields = {"csrf": hidden(body, "csrf"), "next": hidden(body, "next")}
        fields.update(name=name, password=password)
        response = yield self.http.post(
            self.url("/_/login"),
            data=urlencode(fields).encode(),
            headers={**FORM, "Origin": self.proxy.origin},
            cookies={"__Host-cocalcproxy_csrf": presession},
            allow_redirects=False,
        )
        body = yield response.content()
        return response, body

    @defer.inlineCallbacks
    def test_browser_flow(self):  # type: ignore[no-untyped-def]
        first, _ = yield self.get(self.target, HTML)
        self.assertEqual(first.code, 302)
        location = first.headers.getRawHeaders(b"location")[0].decode()
        self.assertEqual(location, "/_/login?next=" + quote(self.target, safe=""))

        response, _ = yield self.sign_in("alice", "alice-password", self.target)
        self.assertEqual(response.code, 303)
        self.assertEqual(response.headers.getRawHeaders(b"location"), [self.target.encode()])
        line = set_cookies(response)["__Host-cocalcproxy_session"]
        for attribute in ("Secure", "HttpOnly", "SameSite=lax", "Path=/"):
            self.assertIn(attribute, line)
        session = {"__Host-cocalcproxy_session": cookie_value(line)}

        reached, body = yield self.get(self.target, HTML, session)
        self.assertEqual((reached.code, body), (200, b"through"))
        self.assertEqual(self.recorder.seen, [("alice", self.pid, False)])
        self.assertEqual(
            reached.headers.getRawHeaders(b"strict-transport-security"), [b"max-age=31536000"]
        )

        index, body = yield self.get("/", HTML, session)
        self.assertEqual(index.code, 200)
        self.assertIn(f'href="/{self.pid}/raw/"'.encode(), body)
        self.assertIn(b"Alice &amp; co", body)

        out = yield self.http.post(
            self.url("/_/logout"),
            data=urlencode({"csrf": hidden(body, "csrf")}).encode(),
            headers={**FORM, "Origin": self.proxy.origin},
            cookies=session,
            allow_redirects=False,
        )
        yield out.content()
        self.assertEqual(out.code, 303)
        after, _ = yield self.get(self.target, {}, session)
        self.assertEqual(after.code, 401)

    @defer.inlineCallbacks
    def test_each_credential_kind(self):  # type: ignore[no-untyped-def]
        _, token = yield self.proxy.directory.create_token("alice")
        basic_pw = base64.b64encode(b"alice:alice-password").decode()
        basic_token = base64.b64encode(f"alice:{token}".encode()).decode()
        for headers in (
            {"Authorization": f"Bearer {token}"},
            {"Authorization": f"Basic {basic_pw}"},
            {"Authorization": f"Basic {basic_token}"},
        ):
            response, body = yield self.get(self.target, headers)
            self.assertEqual((response.code, body), (200, b"through"), headers)
        self.assertEqual([s[2] for s in self.recorder.seen], [True, True, True])

        for headers in (
            {"Authorization": "Bearer forged"},
            {"Authorization": "Basic " + base64.b64encode(b"alice:nope").decode()},
            {"Authorization": "Basic " + base64.b64encode(b"bob:" + token.encode()).decode()},
        ):
            response, _ = yield self.get(self.target, headers)
            self.assertEqual(response.code, 401, headers)

    @defer.inlineCallbacks
    def test_expired_token_and_session_refused(self):  # type: ignore[no-untyped-def]
        directory = self.proxy.directory
        _, token = yield directory.create_token("alice", expires_in_days=1 / 86400)
        session = yield directory.create_session(1, 1.0)
        expired_at = time.time() + 1.0
        # wait for the clock, not for a server: both are past their end after one second
        yield deferLater(reactor, max(0.0, expired_at - time.time()) + 0.1, lambda: None)
        response, _ = yield self.get(self.target, {"Authorization": f"Bearer {token}"})
        self.assertEqual(response.code, 401)
        response, _ = yield self.get(self.target, {}, {"__Host-cocalcproxy_session": session})
        self.assertEqual(response.code, 401)
        self.assertEqual(self.recorder.seen, [])

    @defer.inlineCallbacks
    def test_not_a_member_and_unknown_project_alike(self):  # type: ignore[no-untyped-def]
        bob = {"Authorization": "Basic " + base64.b64encode(b"bob:bob-password").decode()}
        forbidden, body1 = yield self.get(self.target, bob)
        unknown, body2 = yield self.get(
            "/00000000-0000-4000-8000-000000000000/server/8000/lab?x=1", bob
        )
        self.assertEqual((forbidden.code, unknown.code), (404, 404))
        self.assertEqual(body1, body2)
        self.assertEqual(self.recorder.seen, [])

    @defer.inlineCallbacks
    def test_wrong_password_and_unknown_name_indistinguishable(self):  # type: ignore[no-untyped-def]
        page, body = yield self.get("/_/login", HTML)
        presession = cookie_value(set_cookies(page)["__Host-cocalcproxy_csrf"])
        csrf = hidden(body, "csrf")

        @defer.inlineCallbacks
        def attempt(name: str):  # type: ignore[no-untyped-def]
            started = time.monotonic()
            response = yield self.http.post(
                self.url("/_/login"),
                data=urlencode({"csrf": csrf, "name": name, "password": "x"}).encode(),
                headers=FORM,
                cookies={"__Host-cocalcproxy_csrf": presession},
                allow_redirects=False,
            )
            body = yield response.content()
            return response.code, body, time.monotonic() - started

        wrong, unknown = [], []
        for _ in range(3):
            wrong.append((yield attempt("bob")))
        yield self.proxy.directory.remove_user("bob")
        for _ in range(3):
            unknown.append((yield attempt("bob")))
        self.assertEqual({a[:2] for a in wrong}, {a[:2] for a in unknown})
        self.assertEqual(len({a[:2] for a in wrong}), 1)
        self.assertEqual(wrong[0][0], 403)
        # Both run a full Argon2id verification (a dummy one for the unknown name), so neither
        # is much quicker: compare the fastest of three of each.
        fast_wrong = min(a[2] for a in wrong)
        fast_unknown = min(a[2] for a in unknown)
        self.assertGreater(fast_unknown, 0.5 * fast_wrong, (fast_wrong, fast_unknown))

    @defer.inlineCallbacks
    def test_own_pages_carry_security_headers(self):  # type: ignore[no-untyped-def]
        for path in ("/_/login", "/", "/nowhere", "/_/health"):
            response, _ = yield self.get(path, HTML)
            headers = response.headers
            self.assertEqual(
                headers.getRawHeaders(b"strict-transport-security"), [b"max-age=31536000"], path
            )
            self.assertIn(
                b"frame-ancestors 'none'", headers.getRawHeaders(b"content-security-policy")[0]
            )
            self.assertEqual(headers.getRawHeaders(b"x-content-type-options"), [b"nosniff"])
            self.assertEqual(headers.getRawHeaders(b"referrer-policy"), [b"same-origin"])
