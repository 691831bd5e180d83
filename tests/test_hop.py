"""The sign-in hop for project subdomains: the pure rules (where ``to`` may lead, cookie tags,
sealed tickets) and the whole flow through an in-memory site."""

from __future__ import annotations

import base64
from urllib.parse import parse_qs, quote, unquote, urlsplit

from twisted.trial import unittest

from cocalcproxy.guard.hop import Hop
from cocalcproxy.guard.hopkeys import LANDING_PATH, HopKeys, Target, new_state, parse_target
from cocalcproxy.http import routing
from tests.guardfakes import HTML, FakeDirectory, World, make_world, parse_response

DOMAIN = "projects.example"
PID = "5f0e3a0c-9d1b-4c2e-8f3a-7b6c5d4e3f21"
OTHER = "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d"
LABEL = f"{PID}-8000"


SESSION = "__Host-cocalcproxy_session"
STATE = "s" * 22


class TargetRules(unittest.TestCase):
    def parse(self, to: str, port: int | None = 8443) -> Target | None:
        return parse_target(to, DOMAIN, port)

    def test_paths_on_project_hosts_are_accepted(self) -> None:
        self.assertEqual(
            self.parse(f"https://{PID}-8000.{DOMAIN}:8443/nb/x?a=1&b=%2F"),
            Target(PID, f"{PID}-8000", "/nb/x?a=1&b=%2F"),
        )
        self.assertEqual(
            self.parse(f"https://{PID}-raw.{DOMAIN}/", port=None), Target(PID, f"{PID}-raw", "/")
        )
        # Host names are case-insensitive: the result is the canonical (lower-case) host.
        self.assertEqual(
            self.parse(f"HTTPS://{PID.upper()}-8000.{DOMAIN.upper()}:8443/A"),
            Target(PID, f"{PID}-8000", "/A"),
        )
        self.assertEqual(
            self.parse(f"https://{PID}-443.{DOMAIN}:443/", port=None),
            Target(PID, f"{PID}-443", "/"),
        )

    def test_open_redirect_attempts_are_refused(self) -> None:
        host = f"{PID}-8000.{DOMAIN}:8443"
        for to in [
            "",
            "https://evil.example/",
            f"https://evil.example\\@{host}/",
            f"https://evil.example@{host}/",
            f"https://user:pw@{host}/",
            f"https://{host}@evil.example/",
            f"http://{host}/",
            f"javascript://{host}/%0aalert(1)",
            "javascript:alert(1)",
            f"//{host}/",
            f"/{host}/",
            f"https:/{host}/",
            f"https:\\\\{host}/",
            f"https://{host}",  # no path
            f"https://{host}?x=1",
            f"https://{host}//evil.example/",  # a path that browsers read as a host
            f"https://{host}/\\evil.example",
            f"https://{host}/a b",
            f"https://{host}/a\tb",
            f"https://{host}/\u00e9",
            f"https://{host}/#frag",
            f"https://{PID}-8000.{DOMAIN}.evil.example:8443/",
            f"https://x.{PID}-8000.{DOMAIN}:8443/",
            f"https://{PID}-8000.other{DOMAIN}:8443/",
            f"https://{PID}-8000.{DOMAIN}.:8443/",
            f"https://{DOMAIN}:8443/",
            f"https://{PID}-8000.{DOMAIN}:8444/",  # not the public port
            f"https://{PID}-8000.{DOMAIN}:08443/",
            f"https://{PID}-8000.{DOMAIN}:/",
            f"https://{PID}-8000.{DOMAIN}:8443:8443/",
            f"https://{PID}-0.{DOMAIN}:8443/",
            f"https://{PID}-08000.{DOMAIN}:8443/",
            f"https://{PID}-65536.{DOMAIN}:8443/",
            f"https://{PID}-server.{DOMAIN}:8443/",
            f"https://{PID.replace('-', '')}-8000.{DOMAIN}:8443/",
            f"https://{{{PID}}}-8000.{DOMAIN}:8443/",
            f"https://{PID[:-1]}-8000.{DOMAIN}:8443/",
            f"https://{PID}0-8000.{DOMAIN}:8443/",
            "https://[::1]:8443/",
            f"https://{host}/" + "a" * 5000,
        ]:
            self.assertIsNone(self.parse(to), to)

    def test_port_rules_follow_the_public_port(self) -> None:
        self.assertIsNone(self.parse(f"https://{PID}-8000.{DOMAIN}:8443/", port=None))
        self.assertIsNotNone(self.parse(f"https://{PID}-8000.{DOMAIN}/", port=None))


class Keys(unittest.TestCase):
    def test_cookie_tags_bind_a_token_to_one_host(self) -> None:
        keys = HopKeys(b"k" * 32)
        value = keys.bind(LABEL, "tok")
        self.assertEqual(keys.unbind(LABEL, value), "tok")
        self.assertIsNone(keys.unbind(f"{PID}-8001", value))
        self.assertIsNone(keys.unbind(LABEL, "tok"))
        self.assertIsNone(keys.unbind(LABEL, value[:-1]))
        self.assertIsNone(keys.unbind(LABEL, "other." + value.rsplit(".", 1)[1]))
        self.assertIsNone(HopKeys(b"x" * 32).unbind(LABEL, value))
        self.assertEqual(keys.first_bound(LABEL, ["junk", "a.b", value]), "tok")

    def test_tickets_are_sealed_for_one_host_and_one_browser(self) -> None:
        keys = HopKeys(b"k" * 32)
        ticket = keys.seal(LABEL, "secret-session", STATE)
        self.assertNotIn("secret-session", ticket)
        self.assertEqual(keys.open(LABEL, ticket, STATE), "secret-session")
        self.assertIsNone(keys.open(f"{PID}-raw", ticket, STATE))
        self.assertIsNone(HopKeys(b"x" * 32).open(LABEL, ticket, STATE))
        # Issue #11 item 5: another browser's state (or none) does not open it.
        self.assertIsNone(keys.open(LABEL, ticket, new_state()))
        self.assertIsNone(keys.open(LABEL, ticket, None))
        self.assertIsNone(keys.open(LABEL, ticket, STATE[:-1]))
        flipped = ticket[:-2] + ("A" if ticket[-2] != "A" else "B") + ticket[-1]
        for bad in [None, "", flipped, "!!!", "a" * 600, ticket + "="]:
            self.assertIsNone(keys.open(LABEL, bad, STATE), bad)


class Routing(unittest.TestCase):
    def test_hop_pages_are_the_proxys_own(self) -> None:
        self.assertEqual(
            routing.parse(b"proxy.example", b"/_/hop?to=x", DOMAIN), routing.OwnPage("hop")
        )
        host = f"{PID}-8000.{DOMAIN}".encode()
        self.assertEqual(
            routing.parse(host, LANDING_PATH.encode() + b"?ticket=t", DOMAIN),
            routing.OwnPage("hop_landing", LABEL.encode()),
        )
        raw_host = f"{PID}-raw.{DOMAIN}".encode()
        self.assertEqual(
            routing.parse(raw_host, LANDING_PATH.encode(), DOMAIN),
            routing.OwnPage("hop_landing", f"{PID}-raw".encode()),
        )
        # Only that exact path is reserved; the rest of the project's paths stay the project's.
        self.assertIsInstance(routing.parse(host, b"/.cocalcproxy/hop/x", DOMAIN), routing.Route)
        self.assertIsInstance(routing.parse(host, b"/.cocalcproxy/", DOMAIN), routing.Route)
        # A project subdomain of a port out of range is not a landing place either.
        self.assertIsInstance(
            routing.parse(f"{PID}-70000.{DOMAIN}".encode(), LANDING_PATH.encode(), DOMAIN),
            routing.NotFound,
        )


def hop_world(directory: FakeDirectory | None = None) -> tuple[World, Hop]:
    """A proxy with the hop; with ``directory``, a second process on that world's directory."""
    world = make_world(project_domain=DOMAIN, directory=directory)
    hop = Hop(
        world.guard,
        world.directory,  # type: ignore[arg-type]
        HopKeys(b"k" * 32),
        world.clock,
        hostname="proxy.example",
        public_port=lambda: 8443,
        project_domain=DOMAIN,
        session_lifetime=3600.0,
    )
    hop.install(world.guard_pages)
    if directory is not None:
        return world, hop
    world.directory.add_user("alice", "pw")
    world.directory.add_user("mallory", "pw")
    world.directory.add_project("alice", PID)
    world.directory.add_project("alice", OTHER)
    return world, hop


SUB = f"{PID}-8000.{DOMAIN}".encode()


class Flow(unittest.TestCase):
    def setUp(self) -> None:
        self.world, self.hop = hop_world()
        self.main = self.world.directory.add_session("alice")

    def hop_to(
        self, to: str, session: str | None = None, state: str | None = STATE
    ) -> tuple[int, bytes]:
        headers = {**HTML, b"Cookie": f"__Host-cocalcproxy_session={session or self.main}".encode()}
        target = b"/_/hop?to=" + quote(to, safe="").encode()
        if state is not None:
            target += b"&state=" + state.encode()
        r = self.world.request(b"GET", target, headers=headers)
        return r.status, r.header(b"location") or b""

    def ticket_for(self, label: str = LABEL, path: str = "/nb?x=1") -> str:
        status, location = self.hop_to(f"https://{label}.{DOMAIN}:8443{path}")
        self.assertEqual(status, 302)
        return parse_qs(urlsplit(location.decode()).query)["ticket"][0]

    def land(  # type: ignore[no-untyped-def]
        self,
        ticket: str,
        next_path: str = "/nb?x=1",
        host: bytes = SUB,
        cookie: str = "",
        state: str | None = STATE,
    ):
        target = f"{LANDING_PATH}?ticket={ticket}&next={quote(next_path, safe='')}".encode()
        if state is not None:
            cookie = "; ".join(c for c in (cookie, f"__Host-cocalcproxy_hop={state}") if c)
        headers = {**HTML, **({b"Cookie": cookie.encode()} if cookie else {})}
        return self.world.request(b"GET", target, headers=headers, host=host)

    def test_signed_out_navigation_on_a_subdomain_goes_to_the_hop(self) -> None:
        r = self.world.request(b"GET", b"/nb/x?a=1&b=%2F", headers=HTML, host=SUB)
        self.assertEqual(r.status, 302)
        location = (r.header(b"location") or b"").decode()
        self.assertTrue(location.startswith("https://proxy.example:8443/_/hop?to="), location)
        query = parse_qs(urlsplit(location).query)
        self.assertEqual(query["to"], [f"https://{PID}-8000.{DOMAIN}:8443/nb/x?a=1&b=%2F"])
        # Item 5: the hop's state, also set in this browser's host-only cookie on the host.
        (state,) = query["state"]
        line = r.cookies()["__Host-cocalcproxy_hop"]
        self.assertTrue(line.startswith(f"__Host-cocalcproxy_hop={state};"), line)
        attributes = [a.strip().lower() for a in line.split(";")[1:]]
        for wanted in ("secure", "httponly", "path=/", "samesite=lax"):
            self.assertIn(wanted, attributes)
        self.assertFalse([a for a in attributes if a.startswith("domain")], line)
        # A browser that has a state already keeps it (two tabs hopping at once both land).
        again = self.world.request(
            b"GET",
            b"/nb",
            headers={**HTML, b"Cookie": f"__Host-cocalcproxy_hop={state}".encode()},
            host=SUB,
        )
        self.assertNotIn("__Host-cocalcproxy_hop", again.cookies())
        self.assertIn(f"state={state}".encode(), again.header(b"location") or b"")
        self.assertEqual(r.header(b"referrer-policy"), b"no-referrer")
        self.assertEqual(r.header(b"cache-control"), b"no-store")
        # Scripts and WebSockets still get the Basic challenge.
        script = self.world.request(b"GET", b"/api", host=SUB)
        self.assertEqual(script.status, 401)
        post = self.world.request(b"POST", b"/nb", headers=HTML, host=SUB)
        self.assertEqual(post.status, 401)

    def test_the_hop_needs_the_main_session(self) -> None:
        to = quote(f"https://{SUB.decode()}:8443/nb", safe="")
        r = self.world.request(b"GET", b"/_/hop?to=" + to.encode(), headers=HTML)
        self.assertEqual(r.status, 302)
        location = r.header(b"location") or b""
        self.assertTrue(location.startswith(b"/_/login?next="), location)
        self.assertEqual(
            unquote(unquote(location.split(b"next=")[1].decode())), "/_/hop?to=" + unquote(to)
        )

    def test_whole_flow_and_one_time_ticket(self) -> None:
        sessions_before = set(self.world.directory.sessions)
        status, location = self.hop_to(f"https://{PID}-8000.{DOMAIN}:8443/nb?x=1")
        self.assertEqual(status, 302)
        parts = urlsplit(location.decode())
        self.assertEqual(
            (parts.scheme, parts.netloc, parts.path),
            ("https", f"{SUB.decode()}:8443", LANDING_PATH),
        )
        query = parse_qs(parts.query)
        self.assertEqual(query["next"], ["/nb?x=1"])
        (one_time,) = set(self.world.directory.sessions) - sessions_before
        self.assertNotIn(one_time, location.decode())  # sealed, never the token itself
        self.assertLessEqual(
            self.world.directory.sessions[one_time].expires, self.world.clock.seconds() + 60
        )

        landed = self.land(query["ticket"][0])
        self.assertEqual(landed.status, 302)
        self.assertEqual(landed.header(b"location"), b"/nb?x=1")
        self.assertEqual(landed.header(b"referrer-policy"), b"no-referrer")
        self.assertEqual(landed.header(b"cache-control"), b"no-store")
        self.assertNotIn(one_time, self.world.directory.sessions)
        line = landed.cookies()["__Host-cocalcproxy_session"]
        attributes = [a.strip().lower() for a in line.split(";")[1:]]
        self.assertIn("secure", attributes)
        self.assertIn("httponly", attributes)
        self.assertIn("samesite=lax", attributes)
        self.assertIn("path=/", attributes)
        self.assertFalse([a for a in attributes if a.startswith("domain")], line)
        cookie = "__Host-cocalcproxy_session=" + (
            landed.cookie_value("__Host-cocalcproxy_session") or ""
        )

        again = self.land(query["ticket"][0])
        self.assertEqual(again.status, 403)
        self.assertIn(f'href="https://{SUB.decode()}:8443/nb?x=1"'.encode(), again.body)
        self.assertNotIn(b"set-cookie", again.headers)

        ok = self.world.request(
            b"GET", b"/nb?x=1", headers={**HTML, b"Cookie": cookie.encode()}, host=SUB
        )
        self.assertEqual(ok.status, 200)
        self.assertEqual(self.world.handler.seen[-1][1].project.id, PID)
        self.assertFalse(self.world.handler.seen[-1][0].authorization_is_proxy_credential)

        # The cookie is bound to its host: refused on a neighbour, on another project, and on
        # the main host (where the tagged value names no session).
        for host in (f"{PID}-8001.{DOMAIN}", f"{PID}-raw.{DOMAIN}", f"{OTHER}-8000.{DOMAIN}"):
            r = self.world.request(
                b"GET", b"/nb", headers={**HTML, b"Cookie": cookie.encode()}, host=host.encode()
            )
            self.assertEqual(r.status, 302, host)
            self.assertIn(b"/_/hop?to=", r.header(b"location") or b"")
        main = self.world.request(b"GET", b"/", headers={**HTML, b"Cookie": cookie.encode()})
        self.assertEqual((main.status, main.header(b"location")), (302, b"/_/login"))

    def test_a_ticket_is_redeemed_once_across_processes(self) -> None:
        # Issue #10: two proxy processes (workers, machines) on one directory, the same ticket
        # landing on both at once (both in flight before the directory answers either). Only
        # the directory's claim can tell them apart; before it, both got a session.
        other, _ = hop_world(self.world.directory)
        ticket = self.ticket_for()
        sessions_before = set(self.world.directory.sessions)
        self.world.directory.hold = True
        target = f"{LANDING_PATH}?ticket={ticket}&next=%2F".encode()
        headers = {**HTML, b"Cookie": f"__Host-cocalcproxy_hop={STATE}".encode()}
        first = self.world.send(b"GET", target, headers=headers, host=SUB)
        second = other.send(b"GET", target, headers=headers, host=SUB)
        while self.world.directory.held:
            self.world.directory.release()
        self.world.directory.hold = False
        answers = sorted(
            [parse_response(t.value()) for t in (first, second)], key=lambda r: r.status
        )
        self.assertEqual([r.status for r in answers], [302, 403])
        self.assertIn("__Host-cocalcproxy_session", answers[0].cookies())
        self.assertNotIn(b"set-cookie", answers[1].headers)
        # One new session on the project host, and the ticket's own session gone.
        self.assertEqual(len(set(self.world.directory.sessions) - sessions_before), 1)
        # Later, through either process: refused.
        self.assertEqual(self.land(ticket, next_path="/").status, 403)
        self.assertEqual(other.request(b"GET", target, headers=headers, host=SUB).status, 403)

    def test_a_landing_link_used_by_another_browser_is_refused(self) -> None:
        # Issue #11 item 5 (login CSRF): a member's own landing link, sent to someone else.
        ticket = self.ticket_for()
        for other in (None, new_state()):
            r = self.land(ticket, state=other)
            self.assertEqual(r.status, 403, other)
            self.assertIn(b"another browser", r.body)
            self.assertNotIn("__Host-cocalcproxy_session", r.cookies())
        # The browser that started the hop still lands (the refusals did not use the ticket).
        self.assertEqual(self.land(ticket).status, 302)

    def test_a_hop_without_state_is_started_again_on_the_project_host(self) -> None:
        sessions_before = set(self.world.directory.sessions)
        status, location = self.hop_to(f"https://{SUB.decode()}:8443/nb?x=1", state=None)
        self.assertEqual((status, location), (302, f"https://{SUB.decode()}:8443/nb?x=1".encode()))
        self.assertEqual(set(self.world.directory.sessions), sessions_before)
        status, _ = self.hop_to(f"https://{SUB.decode()}:8443/nb", state="short")
        self.assertEqual(status, 302)
        self.assertEqual(set(self.world.directory.sessions), sessions_before)

    def test_the_main_hosts_cookie_does_not_work_on_a_subdomain(self) -> None:
        r = self.world.request(
            b"GET",
            b"/nb",
            headers={**HTML, b"Cookie": f"__Host-cocalcproxy_session={self.main}".encode()},
            host=SUB,
        )
        self.assertEqual(r.status, 302)
        self.assertEqual(self.world.handler.seen, [])

    def test_a_cookie_tossed_in_by_a_sibling_does_not_shadow_the_real_one(self) -> None:
        landed = self.land(self.ticket_for())
        value = landed.cookie_value("__Host-cocalcproxy_session")
        cookie = f"__Host-cocalcproxy_session=junk; __Host-cocalcproxy_session={value}".encode()
        r = self.world.request(b"GET", b"/nb", headers={**HTML, b"Cookie": cookie}, host=SUB)
        self.assertEqual(r.status, 200)

    def test_signing_in_again_on_a_subdomain_ends_the_previous_session_there(self) -> None:
        first = self.land(self.ticket_for())
        old = first.cookie_value("__Host-cocalcproxy_session") or ""
        second = self.land(self.ticket_for(), cookie=f"__Host-cocalcproxy_session={old}")
        self.assertEqual(second.status, 302)
        r = self.world.request(
            b"GET",
            b"/nb",
            headers={**HTML, b"Cookie": f"__Host-cocalcproxy_session={old}".encode()},
            host=SUB,
        )
        self.assertEqual(r.status, 302)

    def test_signing_out_on_the_main_host_ends_the_hosts_sessions(self) -> None:
        self.world.guard.poll()  # a running proxy has read the change counter before
        landed = self.land(self.ticket_for())
        cookie = f"{SESSION}={landed.cookie_value(SESSION)}".encode()
        other_sub = f"{PID}-8001.{DOMAIN}"
        other = self.land(self.ticket_for(label=f"{PID}-8001"), host=other_sub.encode())
        other_cookie = f"{SESSION}={other.cookie_value(SESSION)}".encode()
        # Another sign-in of the same person (another browser) and its host session stay.
        elsewhere = self.world.directory.add_session("alice")
        status, location = self.hop_to(f"https://{LABEL}.{DOMAIN}:8443/", session=elsewhere)
        ticket = parse_qs(urlsplit(location.decode()).query)["ticket"][0]
        kept = self.land(ticket)
        kept_cookie = f"{SESSION}={kept.cookie_value(SESSION)}".encode()
        ok = self.world.request(b"GET", b"/nb", headers={**HTML, b"Cookie": cookie}, host=SUB)
        self.assertEqual(ok.status, 200)

        csrf = self.world.guard_pages.csrf.logout_token(self.main)
        out = self.world.request(
            b"POST",
            b"/_/logout",
            headers={
                b"Content-Type": b"application/x-www-form-urlencoded",
                b"Cookie": f"__Host-cocalcproxy_session={self.main}".encode(),
            },
            body=f"csrf={csrf}".encode(),
        )
        self.assertEqual(out.status, 303)
        self.world.guard.poll()  # what every proxy does each second: the counter moved
        for host, value in ((SUB, cookie), (other_sub.encode(), other_cookie)):
            r = self.world.request(b"GET", b"/nb", headers={**HTML, b"Cookie": value}, host=host)
            self.assertEqual(r.status, 302, host)
            self.assertIn(b"/_/hop?to=", r.header(b"location") or b"")
        r = self.world.request(b"GET", b"/nb", headers={**HTML, b"Cookie": kept_cookie}, host=SUB)
        self.assertEqual(r.status, 200)

    def test_basic_or_bearer_credentials_do_not_hop(self) -> None:
        to = quote(f"https://{SUB.decode()}:8443/nb", safe="")
        basic = b"Basic " + base64.b64encode(b"alice:pw")
        r = self.world.request(
            b"GET", b"/_/hop?to=" + to.encode(), headers={**HTML, b"Authorization": basic}
        )
        self.assertEqual(r.status, 302)
        self.assertTrue((r.header(b"location") or b"").startswith(b"/_/login?next="))
        r = self.world.request(
            b"GET", b"/_/hop?to=" + to.encode(), headers={b"Authorization": basic}
        )
        self.assertEqual(r.status, 401)

    def test_a_ticket_for_one_host_is_refused_on_another(self) -> None:
        ticket = self.ticket_for()
        for host in (f"{OTHER}-8000.{DOMAIN}", f"{PID}-8001.{DOMAIN}"):
            r = self.land(ticket, host=host.encode())
            self.assertEqual(r.status, 403, host)
        self.assertEqual(self.land(ticket).status, 302)  # still good where it was meant to go

    def test_an_expired_ticket_is_refused(self) -> None:
        ticket = self.ticket_for()
        self.world.clock.advance(61)
        r = self.land(ticket)
        self.assertEqual(r.status, 403)
        self.assertIn(b"expired", r.body)

    def test_outsiders_get_the_usual_404_and_no_ticket(self) -> None:
        mallory = self.world.directory.add_session("mallory")
        before = len(self.world.directory.sessions)
        status, location = self.hop_to(f"https://{PID}-8000.{DOMAIN}:8443/", session=mallory)
        self.assertEqual((status, location), (404, b""))
        self.assertEqual(len(self.world.directory.sessions), before)

    def test_a_collaborator_removed_between_hop_and_landing_gets_no_cookie(self) -> None:
        self.world.directory.add_collaborator(PID, "mallory")
        mallory = self.world.directory.add_session("mallory")
        status, location = self.hop_to(f"https://{PID}-8000.{DOMAIN}:8443/", session=mallory)
        self.assertEqual(status, 302)
        ticket = parse_qs(urlsplit(location.decode()).query)["ticket"][0]
        self.world.directory.remove_collaborator(PID, "mallory")
        r = self.land(ticket, next_path="/")
        self.assertEqual(r.status, 404)
        self.assertNotIn(b"set-cookie", r.headers)
        # No session was left behind for the host.
        self.assertEqual(set(self.world.directory.sessions), {self.main, mallory})

    def test_bad_targets_are_a_400_page_not_a_redirect(self) -> None:
        for to in ["https://evil.example/", f"//{SUB.decode()}/", "javascript:alert(1)"]:
            status, location = self.hop_to(to)
            self.assertEqual((status, location), (400, b""), to)
        twice = self.world.request(
            b"GET",
            b"/_/hop?to=a&to=b",
            headers={**HTML, b"Cookie": f"__Host-cocalcproxy_session={self.main}".encode()},
        )
        self.assertEqual(twice.status, 400)
        self.assertEqual(self.world.request(b"POST", b"/_/hop", headers=HTML).status, 405)

    def test_landing_next_is_only_ever_a_path_on_this_host(self) -> None:
        for evil in [
            "//evil.example/",
            "https://evil.example/",
            "/\\evil.example",
            "/\t/evil.example",
        ]:
            r = self.land(self.ticket_for(), next_path=evil)
            self.assertEqual((r.status, r.header(b"location")), (302, b"/"), evil)

    def test_the_landing_path_is_never_forwarded(self) -> None:
        r = self.world.request(b"GET", LANDING_PATH.encode(), headers=HTML, host=SUB)
        self.assertEqual(r.status, 403)
        self.assertEqual(self.world.handler.seen, [])
        post = self.world.request(b"POST", LANDING_PATH.encode(), headers=HTML, host=SUB)
        self.assertEqual(post.status, 405)
        self.assertEqual(self.world.handler.seen, [])


class LoginPageAllowsTheHop(unittest.TestCase):
    def test_form_action_names_the_project_hosts_only_with_the_hop(self) -> None:
        world, _ = hop_world()
        csp = world.request(b"GET", b"/_/login", headers=HTML).header(b"content-security-policy")
        self.assertIn(b"form-action 'self' https://*.projects.example:8443;", csp or b"")
        self.assertIn(b"frame-ancestors 'none'", csp or b"")
        plain = make_world().request(b"GET", b"/_/login", headers=HTML)
        self.assertIn(b"form-action 'self';", plain.header(b"content-security-policy") or b"")


class SubdomainCookieEverywhereOnItsHost(unittest.TestCase):
    def test_websockets_and_raw_files_accept_the_hosts_own_cookie(self) -> None:
        world, hop = hop_world()
        upgrade = {b"Upgrade": b"websocket", b"Connection": b"Upgrade", **HTML}
        refused = world.request(b"GET", b"/ws", headers=upgrade, host=SUB)
        self.assertEqual(refused.status, 401)  # a handshake is not a page load: no redirect
        token = world.directory.add_session("alice")
        cookie = f"__Host-cocalcproxy_session={hop.keys.bind(LABEL, token)}".encode()
        world.request(b"GET", b"/ws", headers={**upgrade, b"Cookie": cookie}, host=SUB)
        self.assertEqual(len(world.handler.seen), 1)
        raw_label = f"{PID}-raw"
        raw_cookie = f"__Host-cocalcproxy_session={hop.keys.bind(raw_label, token)}".encode()
        raw_host = f"{raw_label}.{DOMAIN}".encode()
        ok = world.request(b"GET", b"/f.txt", headers={b"Cookie": raw_cookie}, host=raw_host)
        self.assertEqual(ok.status, 200)
        wrong = world.request(b"GET", b"/f.txt", headers={b"Cookie": cookie}, host=raw_host)
        self.assertEqual(wrong.status, 401)
        self.assertEqual(len(world.handler.seen), 2)


class OpenOnASubdomain(unittest.TestCase):
    """The start page's "open port N" form offers the project's subdomain (issue #14)."""

    def test_index_offers_it_and_open_goes_there(self) -> None:
        world, _ = hop_world()
        session = world.directory.add_session("alice")
        page = world.request(
            b"GET",
            b"/",
            headers={**HTML, b"Cookie": f"__Host-cocalcproxy_session={session}".encode()},
        )
        self.assertEqual(page.status, 200)
        self.assertIn(b'name="form" value="subdomain"', page.body)
        r = world.request(
            b"GET", f"/_/open?project={PID}&port=8888&form=subdomain".encode(), headers=HTML
        )
        self.assertEqual(r.status, 303)
        self.assertEqual(r.header(b"location"), f"https://{PID}-8888.{DOMAIN}:8443/".encode())
