"""/_/login, /_/logout and / in memory: the form, CSRF, next, the one failure message, limits,
sessions and the project list."""

from __future__ import annotations

import json
import re
from urllib.parse import urlencode

from twisted.trial import unittest

from cocalcproxy.pages import OWN_PAGE_HEADERS
from tests.guardfakes import HTML, OTHER_PID, PID, Response, World, make_world
from tests.test_guard_rules import OPEN_REDIRECTS

FORM = {b"Content-Type": b"application/x-www-form-urlencoded"}
CSRF_COOKIE = "__Host-cocalcproxy_csrf"


def hidden(body: bytes, name: str) -> str:
    m = re.search(rb'name="' + name.encode() + rb'" value="([^"]*)"', body)
    assert m is not None, body
    return m.group(1).decode()


class SignInTestCase(unittest.TestCase):
    def setUp(self) -> None:
        self.world: World = make_world()
        d = self.world.directory
        d.add_user("alice", "alice-password")
        d.add_user("bob", "bob-password")
        d.add_project("alice", PID, title="<img src=x onerror=alert(1)>")
        d.add_project("bob", OTHER_PID)
        d.add_collaborator(OTHER_PID, "alice")

    def form(self, next_path: str | None = None) -> tuple[str, str]:
        """GET the sign-in page: (pre-session cookie, csrf token)."""
        target = "/_/login" + ("?" + urlencode({"next": next_path}) if next_path else "")
        page = self.world.request(b"GET", target.encode(), headers=HTML)
        self.assertEqual(page.status, 200)
        presession = page.cookie_value(CSRF_COOKIE)
        assert presession is not None
        return presession, hidden(page.body, "csrf")

    def post(
        self,
        fields: dict[str, str],
        presession: str | None,
        extra: dict[bytes, bytes] | None = None,
        target: bytes = b"/_/login",
        **kw: object,
    ) -> Response:
        headers = {**FORM, **HTML, **(extra or {})}
        cookies = [f"{CSRF_COOKIE}={presession}"] if presession else []
        if b"Cookie" in headers:
            cookies.append(headers.pop(b"Cookie").decode())
        if cookies:
            headers[b"Cookie"] = "; ".join(cookies).encode()
        return self.world.request(
            b"POST", target, headers=headers, body=urlencode(fields).encode(), **kw
        )

    def sign_in(
        self, name: str = "alice", password: str = "alice-password", next_path: str = "/"
    ) -> Response:
        presession, csrf = self.form()
        return self.post(
            {"csrf": csrf, "next": next_path, "name": name, "password": password}, presession
        )


class TheForm(SignInTestCase):
    def test_form_is_accessible_and_protected(self) -> None:
        page = self.world.request(b"GET", b"/_/login?next=%2Fx", headers=HTML)
        self.assertEqual(page.status, 200)
        body = page.body.decode()
        self.assertTrue(body.startswith("<!DOCTYPE html>"))
        self.assertIn('<label for="name">', body)
        self.assertIn('<label for="password">', body)
        self.assertIn('autocomplete="username"', body)
        self.assertIn('autocomplete="current-password"', body)
        self.assertIn('method="post" action="/_/login"', body)
        self.assertEqual(hidden(page.body, "next"), "/x")
        for name, value in OWN_PAGE_HEADERS:
            self.assertEqual(page.header(name), value)
        self.assertIn(b"frame-ancestors 'none'", page.header(b"content-security-policy") or b"")
        line = page.cookies()[CSRF_COOKIE]
        for attribute in ("Path=/", "Secure", "HttpOnly", "SameSite=strict"):
            self.assertIn(attribute, line)
        self.assertNotIn("Domain", line)

    def test_presession_is_reused(self) -> None:
        presession, csrf = self.form()
        again = self.world.request(
            b"GET", b"/_/login", headers={**HTML, b"Cookie": f"{CSRF_COOKIE}={presession}".encode()}
        )
        self.assertNotIn(CSRF_COOKIE, again.cookies())
        self.assertEqual(hidden(again.body, "csrf"), csrf)

    def test_reflected_next_is_escaped(self) -> None:
        page = self.world.request(
            b"GET", b"/_/login?next=%2Fa%22%3E%3Cscript%3Ealert(1)%3C%2Fscript%3E", headers=HTML
        )
        self.assertNotIn(b"<script>", page.body)
        self.assertIn(b"&lt;script&gt;", page.body)

    def test_other_methods(self) -> None:
        response = self.world.request(b"PUT", b"/_/login")
        self.assertEqual(response.status, 405)
        self.assertEqual(response.header(b"allow"), b"GET, HEAD, POST")
        self.assertEqual(self.world.request(b"HEAD", b"/_/login").body, b"")


class SigningIn(SignInTestCase):
    def test_success_sets_a_session_cookie_and_follows_next(self) -> None:
        target = f"/{PID}/server/8888/lab?x=1"
        response = self.sign_in(next_path=target)
        self.assertEqual(response.status, 303)
        self.assertEqual(response.header(b"location"), target.encode())
        line = response.cookies()["__Host-cocalcproxy_session"]
        for attribute in ("Path=/", "Secure", "HttpOnly", "SameSite=lax", "Max-Age=1209600"):
            self.assertIn(attribute, line)
        self.assertIn("Max-Age=0", response.cookies()[CSRF_COOKIE])
        token = response.cookie_value("__Host-cocalcproxy_session")
        assert token is not None
        self.assertIn(token, self.world.directory.sessions)
        reached = self.world.request(
            b"GET",
            target.encode(),
            headers={b"Cookie": f"__Host-cocalcproxy_session={token}".encode()},
        )
        self.assertEqual(reached.status, 200)

    def test_a_new_session_on_every_sign_in(self) -> None:
        first = self.sign_in().cookie_value("__Host-cocalcproxy_session")
        presession, csrf = self.form()
        second = self.post(
            {"csrf": csrf, "next": "/", "name": "alice", "password": "alice-password"},
            presession,
            {b"Cookie": f"__Host-cocalcproxy_session={first}".encode()},
        ).cookie_value("__Host-cocalcproxy_session")
        self.assertNotEqual(first, second)
        self.assertNotIn(first, self.world.directory.sessions)  # the old one is ended
        self.assertIn(second, self.world.directory.sessions)

    def test_wrong_password_and_unknown_name_are_indistinguishable(self) -> None:
        presession, csrf = self.form()
        fields = {"csrf": csrf, "next": "/", "name": "bob", "password": "not-it"}
        wrong_password = self.post(fields, presession)
        self.world.directory.remove_user("bob")
        self.world.guard.invalidate()
        unknown_name = self.post(fields, presession)
        self.assertEqual(wrong_password.status, 403)
        self.assertEqual(wrong_password.status, unknown_name.status)
        self.assertEqual(wrong_password.body, unknown_name.body)
        drop = {b"date"}
        self.assertEqual(
            {k: v for k, v in wrong_password.headers.items() if k not in drop},
            {k: v for k, v in unknown_name.headers.items() if k not in drop},
        )
        self.assertIn(b"The name or password is not right.", wrong_password.body)
        self.assertNotIn("__Host-cocalcproxy_session", wrong_password.cookies())

    def test_csrf_missing_or_wrong_refused(self) -> None:
        presession, csrf = self.form()
        other_presession, other_csrf = self.form()
        good = {"next": "/", "name": "alice", "password": "alice-password"}
        attempts = [
            ({**good}, presession, None),  # no token
            ({**good, "csrf": ""}, presession, None),
            ({**good, "csrf": csrf + "x"}, presession, None),
            ({**good, "csrf": other_csrf}, presession, None),  # someone else's token
            ({**good, "csrf": csrf}, None, None),  # no pre-session cookie
            ({**good, "csrf": csrf}, presession, {b"Origin": b"https://evil.example"}),
            ({**good, "csrf": csrf}, presession, {b"Sec-Fetch-Site": b"cross-site"}),
        ]
        for fields, cookie, extra in attempts:
            response = self.post(fields, cookie, extra)
            self.assertEqual(response.status, 403, (fields, cookie, extra))
            self.assertNotIn("__Host-cocalcproxy_session", response.cookies())
            self.assertIn(b"expired or came from another site", response.body)
        self.assertEqual(self.world.directory.calls["check_password"], 0)
        self.assertEqual(self.world.directory.sessions, {})
        ok = self.post({**good, "csrf": csrf}, presession, {b"Origin": b"https://proxy.example"})
        self.assertEqual(ok.status, 303)

    def test_open_redirects_refused(self) -> None:
        for attempt in OPEN_REDIRECTS:
            response = self.sign_in(next_path=attempt)
            self.assertEqual(response.status, 303, repr(attempt))
            self.assertEqual(response.header(b"location"), b"/", repr(attempt))
            self.world.directory.sessions.clear()
        page = self.world.request(b"GET", b"/_/login?next=%2F%2Fevil.example", headers=HTML)
        self.assertEqual(hidden(page.body, "next"), "/")

    def test_non_ascii_next_is_encoded(self) -> None:
        response = self.sign_in(next_path="/ü?x=ä")
        self.assertEqual(response.header(b"location"), b"/%C3%BC?x=%C3%A4")

    def test_rate_limit_reached_and_released(self) -> None:
        for i in range(10):
            self.assertEqual(self.sign_in(password=f"guess{i}").status, 403)
        limited = self.sign_in()  # even the right password
        self.assertEqual(limited.status, 429)
        self.assertEqual(limited.header(b"retry-after"), b"600")
        self.assertNotIn("__Host-cocalcproxy_session", limited.cookies())
        self.assertIn(b"Too many failed sign-ins", limited.body)
        self.world.clock.advance(300)
        self.assertEqual(self.sign_in().status, 429)
        self.world.clock.advance(301)
        self.assertEqual(self.sign_in().status, 303)

    def test_rate_limit_per_address(self) -> None:
        for i in range(20):
            self.assertEqual(self.sign_in(name=f"user{i}", password="x").status, 403)
        self.assertEqual(self.sign_in().status, 429)
        presession, csrf = self.form()
        fields = {"csrf": csrf, "next": "/", "name": "alice", "password": "alice-password"}
        self.assertEqual(self.post(fields, presession, peer="10.9.9.9").status, 303)

    def test_malformed_forms(self) -> None:
        presession, csrf = self.form()
        response = self.world.request(
            b"POST", b"/_/login", headers={**HTML, b"Content-Type": b"text/plain"}, body=b"x"
        )
        self.assertEqual(response.status, 415)
        big = self.post({"csrf": csrf, "name": "a" * 20000, "password": "x"}, presession)
        self.assertEqual(big.status, 413)
        twice = self.world.request(
            b"POST",
            b"/_/login",
            headers={**FORM, **HTML, b"Cookie": f"{CSRF_COOKIE}={presession}".encode()},
            body=f"csrf={csrf}&name=a&name=b&password=x".encode(),
        )
        self.assertEqual(twice.status, 400)
        bad_utf8 = self.world.request(
            b"POST", b"/_/login", headers={**FORM, **HTML}, body=b"name=%ff&password=x"
        )
        self.assertEqual(bad_utf8.status, 400)
        empty = self.post({"csrf": csrf, "next": "/", "name": "", "password": ""}, presession)
        self.assertEqual(empty.status, 400)
        for r in (big, twice, bad_utf8, empty):
            self.assertNotIn(b"Traceback", r.body)

    def test_directory_down_is_503(self) -> None:
        presession, csrf = self.form()
        self.world.directory.unavailable = True
        fields = {"csrf": csrf, "next": "/", "name": "alice", "password": "alice-password"}
        response = self.post(fields, presession)
        self.assertEqual(response.status, 503)
        self.assertNotIn(b"Traceback", response.body)
        self.flushLoggedErrors()


class SigningOut(SignInTestCase):
    def signed_in(self) -> tuple[str, str]:
        token = self.sign_in().cookie_value("__Host-cocalcproxy_session")
        assert token is not None
        index = self.world.request(
            b"GET",
            b"/",
            headers={**HTML, b"Cookie": f"__Host-cocalcproxy_session={token}".encode()},
        )
        return token, hidden(index.body, "csrf")

    def logout(
        self, token: str, csrf: str | None, extra: dict[bytes, bytes] | None = None
    ) -> Response:
        fields = {"csrf": csrf} if csrf is not None else {}
        headers = {
            **FORM,
            **HTML,
            b"Cookie": f"__Host-cocalcproxy_session={token}".encode(),
            **(extra or {}),
        }
        return self.world.request(
            b"POST", b"/_/logout", headers=headers, body=urlencode(fields).encode()
        )

    def test_logout_ends_the_session(self) -> None:
        token, csrf = self.signed_in()
        response = self.logout(token, csrf)
        self.assertEqual(response.status, 303)
        self.assertEqual(response.header(b"location"), b"/_/login")
        self.assertIn("Max-Age=0", response.cookies()["__Host-cocalcproxy_session"])
        self.assertNotIn(token, self.world.directory.sessions)
        after = self.world.request(
            b"GET",
            f"/{PID}/port/80/".encode(),
            headers={b"Cookie": f"__Host-cocalcproxy_session={token}".encode()},
        )
        self.assertEqual(after.status, 401)

    def test_logout_needs_its_csrf_token(self) -> None:
        token, csrf = self.signed_in()
        other_token, other_csrf = self.signed_in()
        for bad, extra in [
            (None, None),
            ("", None),
            (other_csrf, None),
            (csrf, {b"Origin": b"https://evil.example"}),
        ]:
            response = self.logout(token, bad, extra)
            self.assertEqual(response.status, 403, bad)
            self.assertIn(token, self.world.directory.sessions)

    def test_get_logout_changes_nothing(self) -> None:
        token, _ = self.signed_in()
        response = self.world.request(
            b"GET",
            b"/_/logout",
            headers={b"Cookie": f"__Host-cocalcproxy_session={token}".encode()},
        )
        self.assertEqual(response.status, 303)
        self.assertIn(token, self.world.directory.sessions)

    def test_logout_without_session(self) -> None:
        response = self.world.request(b"POST", b"/_/logout", headers=FORM, body=b"")
        self.assertEqual(response.status, 303)


class Index(SignInTestCase):
    def test_signed_out_goes_to_sign_in(self) -> None:
        response = self.world.request(b"GET", b"/", headers=HTML)
        self.assertEqual(response.status, 302)
        self.assertEqual(response.header(b"location"), b"/_/login")
        self.assertEqual(self.world.request(b"GET", b"/").status, 401)

    def test_lists_own_and_shared_projects(self) -> None:
        token = self.sign_in().cookie_value("__Host-cocalcproxy_session")
        page = self.world.request(
            b"GET",
            b"/",
            headers={**HTML, b"Cookie": f"__Host-cocalcproxy_session={token}".encode()},
        )
        self.assertEqual(page.status, 200)
        body = page.body.decode()
        self.assertIn(f'href="/{PID}/raw/"', body)
        self.assertIn(f'href="/{OTHER_PID}/raw/"', body)
        self.assertIn("collaborator (owner bob)", body)
        self.assertIn("/&lt;project id&gt;/server/PORT/", body)
        self.assertNotIn("<img src=x", body)
        self.assertIn("&lt;img src=x onerror=alert(1)&gt;", body)
        self.assertIn('action="/_/logout"', body)
        for name, value in OWN_PAGE_HEADERS:
            self.assertEqual(page.header(name), value)

    def test_json_for_programs(self) -> None:
        _, token = self.world.directory.create_token("bob")
        response = self.world.request(
            b"GET", b"/", headers={b"Authorization": f"Bearer {token}".encode()}
        )
        self.assertEqual(response.status, 200)
        document = json.loads(response.body)
        self.assertEqual(document["account"], "bob")
        self.assertEqual([p["id"] for p in document["projects"]], [OTHER_PID])

    def test_other_methods(self) -> None:
        self.assertEqual(self.world.request(b"POST", b"/").status, 405)


class SignedInAtTheForm(SignInTestCase):
    """/_/login for someone who is already signed in (issue #14)."""

    def session(self) -> dict[bytes, bytes]:
        token = self.sign_in().cookie_value("__Host-cocalcproxy_session")
        return {**HTML, b"Cookie": f"__Host-cocalcproxy_session={token}".encode()}

    def test_sent_on_to_next(self) -> None:
        target = f"/{PID}/server/8888/lab?x=1"
        response = self.world.request(
            b"GET", b"/_/login?" + urlencode({"next": target}).encode(), headers=self.session()
        )
        self.assertEqual(response.status, 303)
        self.assertEqual(response.header(b"location"), target.encode())

    def test_unsafe_next_is_not_followed(self) -> None:
        for attempt in OPEN_REDIRECTS:
            response = self.world.request(
                b"GET", b"/_/login?" + urlencode({"next": attempt}).encode(), headers=self.session()
            )
            self.assertEqual(response.status, 200, attempt)
            self.assertIsNone(response.header(b"location"))

    def test_without_next_says_who_they_are(self) -> None:
        self.world.directory.add_user("<b>eve</b>", "eve-password")
        token = self.sign_in("<b>eve</b>", "eve-password").cookie_value(
            "__Host-cocalcproxy_session"
        )
        cookie = f"__Host-cocalcproxy_session={token}".encode()
        page = self.world.request(b"GET", b"/_/login", headers={**HTML, b"Cookie": cookie})
        self.assertEqual(page.status, 200)
        body = page.body.decode()
        self.assertIn("You are signed in as <strong>&lt;b&gt;eve&lt;/b&gt;</strong>", body)
        self.assertIn('href="/"', body)
        self.assertIn('method="post" action="/_/login"', body)  # still a form: switch accounts

    def test_signed_out_or_stale_sees_the_plain_form(self) -> None:
        for headers in (
            HTML,
            {**HTML, b"Cookie": b"__Host-cocalcproxy_session=stale"},
        ):
            page = self.world.request(b"GET", b"/_/login?next=%2Fx", headers=headers)
            self.assertEqual(page.status, 200)
            self.assertNotIn(b"You are signed in", page.body)

    def test_an_api_token_is_not_a_browser_session(self) -> None:
        _, token = self.world.directory.create_token("bob")
        page = self.world.request(
            b"GET",
            b"/_/login?next=%2Fx",
            headers={**HTML, b"Authorization": f"Bearer {token}".encode()},
        )
        self.assertEqual(page.status, 200)
        self.assertNotIn(b"You are signed in", page.body)


class OpenPort(SignInTestCase):
    """The start page's "open port N" form and /_/open (issue #14)."""

    def open(self, **fields: str) -> Response:
        return self.world.request(b"GET", b"/_/open?" + urlencode(fields).encode(), headers=HTML)

    def test_the_start_page_has_a_form_per_project(self) -> None:
        token = self.sign_in().cookie_value("__Host-cocalcproxy_session")
        page = self.world.request(
            b"GET",
            b"/",
            headers={**HTML, b"Cookie": f"__Host-cocalcproxy_session={token}".encode()},
        )
        body = page.body.decode()
        for pid in (PID, OTHER_PID):
            self.assertIn(f'<input type="hidden" name="project" value="{pid}" />', body)
        self.assertEqual(body.count('action="/_/open"'), 2)
        self.assertIn('name="form" value="server"', body)
        self.assertIn('name="form" value="port"', body)
        self.assertNotIn('value="subdomain"', body)  # no --project-domain here

    def test_path_forms(self) -> None:
        for form in ("server", "port"):
            response = self.open(project=PID, port="8888", form=form)
            self.assertEqual(response.status, 303)
            self.assertEqual(response.header(b"location"), f"/{PID}/{form}/8888/".encode())
        typed = self.open(project=PID, port=" 08888 ", form="server")
        self.assertEqual(typed.header(b"location"), f"/{PID}/server/8888/".encode())

    def test_bad_values_are_a_400_never_a_redirect(self) -> None:
        for fields in [
            {"project": PID, "port": "0", "form": "server"},
            {"project": PID, "port": "65536", "form": "server"},
            {"project": PID, "port": "", "form": "server"},
            {"project": PID, "port": "80/../../evil", "form": "server"},
            {"project": PID, "port": "8\u0668", "form": "server"},  # a non-ASCII digit
            {"project": PID, "port": "8888", "form": "raw"},
            {"project": PID, "port": "8888", "form": "subdomain"},  # not configured
            {"project": "//evil.example", "port": "8888", "form": "server"},
            {"project": PID.upper(), "port": "8888", "form": "server"},
            {"project": PID, "port": "8888"},
        ]:
            response = self.open(**fields)
            self.assertEqual(response.status, 400, fields)
            self.assertIsNone(response.header(b"location"), fields)
        twice = self.world.request(
            b"GET", f"/_/open?project={PID}&port=1&port=2&form=server".encode(), headers=HTML
        )
        self.assertEqual(twice.status, 400)
        self.assertEqual(self.world.request(b"POST", b"/_/open").status, 405)


class Favicon(unittest.TestCase):
    def test_served_small_and_cacheable(self) -> None:
        world = make_world()
        response = world.request(b"GET", b"/favicon.ico")
        self.assertEqual(response.status, 200)
        self.assertEqual(response.header(b"content-type"), b"image/x-icon")
        self.assertEqual(response.header(b"cache-control"), b"public, max-age=86400")
        self.assertTrue(response.body.startswith(b"\x00\x00\x01\x00"))  # an ICO header
        self.assertLess(len(response.body), 2048)
        self.assertEqual(world.request(b"HEAD", b"/favicon.ico").body, b"")
