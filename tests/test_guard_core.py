"""The guard in front of proxied routes, in memory: every credential kind, refusals, the one 404,
cached decisions, and revocation when the directory's change counter moves."""

from __future__ import annotations

import base64
import json
from typing import Any

from twisted.trial import unittest

from tests.guardfakes import HTML, OTHER_PID, PID, UNKNOWN_PID, World, make_world

TARGET = f"/{PID}/server/8000/some/path?q=1".encode()


def basic(name: str, secret: str) -> dict[bytes, bytes]:
    return {b"Authorization": b"Basic " + base64.b64encode(f"{name}:{secret}".encode())}


def bearer(token: str) -> dict[bytes, bytes]:
    return {b"Authorization": b"Bearer " + token.encode()}


def cookie(token: str) -> dict[bytes, bytes]:
    return {b"Cookie": b"theme=dark; cocalcproxy_session=" + token.encode()}


def capture_log(case: unittest.TestCase) -> list[str]:
    from twisted.logger import formatEventAsClassicLogText, globalLogPublisher

    events: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        events.append(formatEventAsClassicLogText(event) or "")

    globalLogPublisher.addObserver(observe)
    case.addCleanup(globalLogPublisher.removeObserver, observe)
    return events


class GuardTestCase(unittest.TestCase):
    def setUp(self) -> None:
        self.world: World = make_world()
        d = self.world.directory
        self.alice = d.add_user("alice", "alice-password")
        self.bob = d.add_user("bob", "bob-password")
        self.carol = d.add_user("carol", "carol-password")
        d.add_project("alice", PID, title="Alice's")
        d.add_collaborator(PID, "bob")
        d.add_project("carol", OTHER_PID)
        self.poll()

    def poll(self) -> None:
        d = self.world.guard.poll()
        self.assertTrue(d.called)

    def get(self, headers: dict[bytes, bytes] | None = None, target: bytes = TARGET, **kw):  # type: ignore[no-untyped-def]
        return self.world.request(b"GET", target, headers=headers, **kw)

    def assert_reached_backend(self, response, account: str) -> None:  # type: ignore[no-untyped-def]
        self.assertEqual(response.status, 200, response.body)
        self.assertEqual(response.body, b"backend says hello")
        request, access = self.world.handler.seen[-1]
        self.assertEqual(access.account.name, account)
        self.assertEqual(access.project.id, PID)


class EachCredentialKind(GuardTestCase):
    def test_session_cookie(self) -> None:
        token = self.world.directory.add_session("bob")
        self.assert_reached_backend(self.get(cookie(token)), "bob")
        request, _ = self.world.handler.seen[-1]
        self.assertFalse(request.authorization_is_proxy_credential)

    def test_bearer_token(self) -> None:
        _, token = self.world.directory.create_token("alice")
        self.assert_reached_backend(self.get(bearer(token)), "alice")
        request, _ = self.world.handler.seen[-1]
        self.assertTrue(request.authorization_is_proxy_credential)

    def test_basic_password(self) -> None:
        self.assert_reached_backend(self.get(basic("bob", "bob-password")), "bob")
        self.assertTrue(self.world.handler.seen[-1][0].authorization_is_proxy_credential)

    def test_basic_with_api_token(self) -> None:
        _, token = self.world.directory.create_token("bob")
        self.assert_reached_backend(self.get(basic("bob", token)), "bob")

    def test_basic_with_someone_elses_token_refused(self) -> None:
        _, token = self.world.directory.create_token("bob")
        response = self.get(basic("alice", token))
        self.assertEqual(response.status, 401)
        self.assertEqual(self.world.handler.seen, [])

    def test_every_method_and_websocket_upgrades_are_checked(self) -> None:
        for method in [
            b"GET",
            b"HEAD",
            b"POST",
            b"PUT",
            b"PATCH",
            b"DELETE",
            b"OPTIONS",
            b"PROPFIND",
        ]:
            response = self.world.request(method, TARGET)
            self.assertEqual(response.status, 401, method)
        upgrade = {b"Upgrade": b"websocket", b"Connection": b"Upgrade", **HTML}
        self.assertEqual(self.get(upgrade).status, 401)  # not a navigation: Upgrade is a GET
        self.assertEqual(self.world.handler.seen, [])

    def test_foreign_authorization_scheme_passes_with_cookie(self) -> None:
        token = self.world.directory.add_session("alice")
        headers = {**cookie(token), b"Authorization": b"token jupyter-secret"}
        self.assert_reached_backend(self.get(headers), "alice")
        self.assertFalse(self.world.handler.seen[-1][0].authorization_is_proxy_credential)


class NoOrBadCredentials(GuardTestCase):
    def test_browser_navigation_goes_to_sign_in(self) -> None:
        response = self.get(HTML)
        self.assertEqual(response.status, 302)
        self.assertEqual(
            response.header(b"location"),
            b"/_/login?next=%2F" + PID.encode() + b"%2Fserver%2F8000%2Fsome%2Fpath%3Fq%3D1",
        )
        self.assertEqual(self.world.request(b"HEAD", TARGET, headers=HTML).status, 302)

    def test_programs_get_401(self) -> None:
        for headers in [None, {b"Accept": b"application/json"}, {b"Accept": b"*/*"}]:
            response = self.get(headers)
            self.assertEqual(response.status, 401)
            self.assertIn(b"Basic", response.header(b"www-authenticate") or b"")
        self.assertEqual(self.world.request(b"POST", TARGET, headers=HTML).status, 401)

    def test_forged_credentials_refused(self) -> None:
        self.assertEqual(self.get(bearer("cpt_forged")).status, 401)
        self.assertEqual(self.get(basic("alice", "wrong")).status, 401)
        self.assertEqual(self.get(basic("nobody", "wrong")).status, 401)
        self.assertEqual(self.get(cookie("forged-session")).status, 401)
        self.assertEqual(self.get({b"Authorization": b"Basic %%%"}).status, 401)
        self.assertEqual(self.world.handler.seen, [])

    def test_forged_proxy_credentials_refused_even_with_a_good_cookie(self) -> None:
        token = self.world.directory.add_session("alice")
        headers = {**cookie(token), **bearer("cpt_forged")}
        self.assertEqual(self.get(headers).status, 401)
        self.assertEqual(self.world.handler.seen, [])

    def test_two_authorization_headers_refused(self) -> None:
        _, token = self.world.directory.create_token("alice")
        headers = {b"Authorization": [b"Bearer " + token.encode(), b"token x"]}
        self.assertEqual(self.get(headers).status, 401)  # type: ignore[arg-type]

    def test_stale_session_cookie_is_cleared_and_browser_sent_to_sign_in(self) -> None:
        response = self.get({**cookie("no-such-session"), **HTML})
        self.assertEqual(response.status, 302)
        line = response.cookies()["cocalcproxy_session"]
        self.assertIn("Max-Age=0", line)

    def test_expired_session_refused(self) -> None:
        token = self.world.directory.add_session("alice", lifetime=60)
        self.assert_reached_backend(self.get(cookie(token)), "alice")
        self.world.clock.advance(61 + self.world.guard.credential_ttl)
        self.assertEqual(self.get(cookie(token)).status, 401)

    def test_expired_token_refused(self) -> None:
        now = self.world.clock.seconds()
        _, token = self.world.directory.create_token("alice", expires_at=now + 10)
        self.assert_reached_backend(self.get(bearer(token)), "alice")
        self.world.clock.advance(11 + self.world.guard.credential_ttl)
        self.assertEqual(self.get(bearer(token)).status, 401)

    def test_basic_guessing_is_limited(self) -> None:
        for i in range(10):
            self.assertEqual(self.get(basic("alice", f"guess{i}")).status, 401)
        limited = self.get(basic("alice", "alice-password"))
        self.assertEqual(limited.status, 429)
        self.assertGreater(int(limited.header(b"retry-after") or b"0"), 0)
        self.assertEqual(self.world.handler.seen, [])
        self.world.clock.advance(601)
        self.assert_reached_backend(self.get(basic("alice", "alice-password")), "alice")

    def test_repeating_one_wrong_password_is_not_new_guessing(self) -> None:
        for _ in range(30):
            self.assertEqual(self.get(basic("alice", "stale")).status, 401)
        self.assert_reached_backend(self.get(basic("alice", "alice-password")), "alice")


class OneNotFound(GuardTestCase):
    def test_unknown_and_forbidden_projects_answer_alike(self) -> None:
        token = self.world.directory.add_session("bob")
        forbidden = self.get(cookie(token), target=f"/{OTHER_PID}/port/80/".encode())
        unknown = self.get(cookie(token), target=f"/{UNKNOWN_PID}/port/80/".encode())
        self.assertEqual(forbidden.status, 404)
        self.assertEqual(unknown.status, 404)
        self.assertEqual(forbidden.body, unknown.body)
        for name in (b"content-type", b"content-length", b"content-security-policy"):
            self.assertEqual(forbidden.header(name), unknown.header(name))
        self.assertEqual(self.world.handler.seen, [])


class Caching(GuardTestCase):
    def test_common_request_costs_no_query(self) -> None:
        token = self.world.directory.add_session("bob")
        self.poll()
        self.assert_reached_backend(self.get(cookie(token)), "bob")
        before = self.world.directory.queries()
        for _ in range(20):
            self.assert_reached_backend(self.get(cookie(token)), "bob")
        self.assertEqual(self.world.directory.queries(), before)

    def test_cached_path_counts_each_cache_once_and_keeps_revocation(self) -> None:
        counted: list[tuple[str, str]] = []

        class Observer:
            def cache_hit(self, cache: str) -> None:
                counted.append(("hit", cache))

            def cache_miss(self, cache: str) -> None:
                counted.append(("miss", cache))

        guard = self.world.guard
        guard.identities.observer = guard.projects.observer = Observer()
        token = self.world.directory.add_session("bob")
        self.poll()
        self.assert_reached_backend(self.get(cookie(token)), "bob")
        self.assertEqual([kind for kind, _ in counted], ["miss", "miss"])
        del counted[:]
        self.assert_reached_backend(self.get(cookie(token)), "bob")
        names = {guard.identities.name, guard.projects.name}
        self.assertEqual(sorted(counted), sorted(("hit", name) for name in names))
        _, access = self.world.handler.seen[-1]
        revoked: list[bool] = []
        access.on_revoked(lambda: revoked.append(True))  # a cached decision can be revoked
        self.world.directory.remove_collaborator(PID, "bob")
        self.poll()
        self.assertEqual(revoked, [True])

    def test_password_verified_once_then_cached(self) -> None:
        self.get(basic("bob", "bob-password"))
        self.get(basic("bob", "bob-password"))
        self.get(basic("bob", "nope"))
        self.get(basic("bob", "nope"))
        self.assertEqual(self.world.directory.calls["check_password"], 2)

    def test_negative_answers_cached(self) -> None:
        token = self.world.directory.add_session("bob")
        self.poll()
        for _ in range(5):
            self.get(cookie(token), target=f"/{OTHER_PID}/port/80/".encode())
            self.get(bearer("cpt_forged"))
        self.assertEqual(self.world.directory.calls["project_for"], 1)
        self.assertEqual(self.world.directory.calls["account_for_token"], 1)

    def test_change_drops_the_cache(self) -> None:
        token = self.world.directory.add_session("bob")
        self.poll()
        self.assert_reached_backend(self.get(cookie(token)), "bob")
        self.world.directory.remove_collaborator(PID, "bob")
        self.assert_reached_backend(self.get(cookie(token)), "bob")  # not yet polled
        self.poll()
        self.assertEqual(self.get(cookie(token)).status, 404)

    def test_concurrent_misses_share_one_lookup(self) -> None:
        token = self.world.directory.add_session("bob")
        self.poll()
        self.world.directory.hold = True
        transports = [self.world.send(b"GET", TARGET, headers=cookie(token)) for _ in range(5)]
        self.assertEqual(self.world.directory.calls["account_for_session"], 1)
        self.world.directory.hold = False
        while self.world.directory.held:
            self.world.directory.release()
        for t in transports:
            self.assertIn(b"backend says hello", t.value())

    def test_answer_from_before_a_change_is_not_cached(self) -> None:
        token = self.world.directory.add_session("bob")
        self.poll()
        self.world.directory.hold = True
        pending = self.world.send(b"GET", TARGET, headers=cookie(token))
        self.world.directory.hold = False
        # the session ends while the lookup is in flight; the proxy notices the change ...
        self.world.directory.delete_session(token)
        self.poll()
        self.world.directory.release()  # ... then the old (positive) answer arrives
        self.world.directory.release()
        self.assertIn(b"200", pending.value().split(b"\r\n")[0])
        self.assertEqual(self.get(cookie(token)).status, 401)

    def test_directory_down_serves_cached_decisions_for_the_grace_only(self) -> None:
        token = self.world.directory.add_session("bob")
        fresh = self.world.directory.add_session("bob")
        self.poll()
        self.assert_reached_backend(self.get(cookie(token)), "bob")
        events = capture_log(self)
        self.world.directory.unavailable = True
        self.poll()
        self.poll()
        # Past the credentials' own 10 s lifetime in the cache, still within the grace.
        self.world.clock.advance(60)
        self.assert_reached_backend(self.get(cookie(token)), "bob")
        calls = self.world.directory.calls["account_for_session"]
        # Undecided (never cached) credentials: a clear 503, without asking the directory.
        refused = self.get(cookie(fresh))
        self.assertEqual(refused.status, 503)
        self.assertIn(b"account directory", refused.body)
        self.assertEqual(self.world.directory.calls["account_for_session"], calls)
        self.assertEqual(self.world.guard.directory_status(), "degraded")
        # The grace (300 s from the last answer) ends: nothing cached is used any more.
        self.world.clock.advance(300 - 60 + 1)
        self.poll()
        self.assertEqual(self.get(cookie(token)).status, 503)
        self.assertEqual(self.world.guard.directory_status(), "unavailable")
        # Back: one line, and decisions are taken afresh.
        self.world.directory.unavailable = False
        self.poll()
        self.assertEqual(self.world.guard.directory_status(), "ok")
        self.assert_reached_backend(self.get(cookie(token)), "bob")
        lines = [e for e in events if "directory" in e]
        self.assertEqual(len(lines), 3, lines)
        self.assertIn("directory unreachable: database down", lines[0])
        self.assertIn("no longer used", lines[1])
        self.assertIn("directory reachable again after 301 s", lines[2])
        self.assertFalse([e for e in events if "Traceback" in e])

    def test_revocation_during_the_outage_applies_when_it_ends(self) -> None:
        token = self.world.directory.add_session("bob")
        self.poll()
        self.assert_reached_backend(self.get(cookie(token)), "bob")
        self.world.directory.unavailable = True
        self.poll()
        # Ended elsewhere (another proxy reaches the database; this one does not).
        self.world.directory.unavailable = False
        self.world.directory.delete_session(token)
        self.world.directory.unavailable = True
        self.assert_reached_backend(self.get(cookie(token)), "bob")
        self.world.directory.unavailable = False
        self.poll()
        self.assertEqual(self.get(cookie(token)).status, 401)

    def test_a_file_gone_during_an_outage_ends_its_grace(self) -> None:
        """Deleting the SQLite file can first fail a call some other way (halfway through the
        deletion); once the directory says the file is gone, the grace ends all the same."""
        from twisted.python.failure import Failure

        from cocalcproxy.directory.model import Gone, Unavailable

        token = self.world.directory.add_session("bob")
        self.poll()
        self.assert_reached_backend(self.get(cookie(token)), "bob")
        self.world.guard.directory_failed(Failure(Unavailable("disk I/O error")))
        self.assertEqual(self.world.guard.directory_status(), "degraded")
        self.world.guard.directory_failed(Failure(Gone("the directory file was deleted")))
        self.assertEqual(self.world.guard.directory_status(), "unavailable")
        self.world.directory.unavailable = True
        self.assertEqual(self.get(cookie(token)).status, 503)

    def test_no_grace_with_zero(self) -> None:
        world = make_world(outage_grace=0.0)
        world.directory.add_user("alice", "alice-password")
        world.directory.add_user("bob", "bob-password")
        world.directory.add_project("alice", PID)
        world.directory.add_collaborator(PID, "bob")
        token = world.directory.add_session("bob")
        world.guard.poll()
        self.assertEqual(world.request(b"GET", TARGET, headers=cookie(token)).status, 200)
        world.directory.unavailable = True
        world.guard.poll()
        self.assertEqual(world.request(b"GET", TARGET, headers=cookie(token)).status, 503)
        self.assertEqual(world.guard.directory_status(), "unavailable")

    def test_poll_runs_every_second_on_the_clock(self) -> None:
        guard = self.world.guard
        guard.start()
        self.addCleanup(guard.stop)
        before = self.world.directory.calls["change_counter"]
        self.world.clock.advance(1.0)
        self.world.clock.advance(1.0)
        self.assertEqual(self.world.directory.calls["change_counter"], before + 2)

    def test_wake_polls_at_once(self) -> None:
        """A change notification (PostgreSQL NOTIFY) makes the guard read the counter now."""
        token = self.world.directory.add_session("bob")
        self.poll()
        self.assert_reached_backend(self.get(cookie(token)), "bob")
        self.world.directory.remove_collaborator(PID, "bob")
        self.world.guard.wake()  # no clock tick
        self.assertEqual(self.get(cookie(token)).status, 404)

    def test_wakes_during_a_poll_make_one_more_poll_not_a_pile(self) -> None:
        directory = self.world.directory
        before = directory.calls["change_counter"]
        directory.hold = True
        self.world.guard.wake()
        for _ in range(5):
            self.world.guard.wake()
        self.assertEqual(directory.calls["change_counter"], before + 1)
        # The change behind the later wakes may have come after the first read: read again,
        # once, wake_spacing after the first poll began.
        directory.remove_collaborator(PID, "bob")
        directory.hold = False
        directory.release()
        self.assertEqual(directory.calls["change_counter"], before + 1)
        self.world.clock.advance(self.world.guard.wake_spacing)
        self.assertEqual(directory.calls["change_counter"], before + 2)
        self.world.clock.advance(10 * self.world.guard.wake_spacing)
        self.assertEqual(directory.calls["change_counter"], before + 2)
        self.assertEqual(self.get(basic("bob", "bob-password")).status, 404)

    def test_a_burst_of_wakes_polls_at_most_every_wake_spacing(self) -> None:
        """A class signing in at once: a change every millisecond for a second drops the
        caches about 20 times, not 1000, and the last change is still read within 50 ms."""
        directory = self.world.directory
        guard = self.world.guard
        before = directory.calls["change_counter"]
        for _ in range(1000):
            directory._bump()
            guard.wake()
            self.world.clock.advance(0.001)
        polls = directory.calls["change_counter"] - before
        self.assertLessEqual(polls, 21)
        self.assertGreaterEqual(polls, 19)
        self.world.clock.advance(guard.wake_spacing)
        self.assertEqual(guard.last_counter, directory.counter)

    def test_an_overtaken_poll_is_not_a_change(self) -> None:
        """A notification's poll overtakes a periodic one that read the counter before the
        change: the older answer, arriving last, must not look like a change (a cache drop)."""
        directory = self.world.directory
        guard = self.world.guard
        self.poll()
        directory.hold = True
        slow = guard.poll()  # reads the counter before the change ...
        directory._bump()
        guard.wake()  # ... the notification's poll reads it after
        directory.hold = False
        (old_read, old_value), (new_read, new_value) = directory.held
        directory.held = []
        generation = guard.generation
        new_read.callback(new_value)
        self.assertEqual(guard.generation, generation + 1)
        old_read.callback(old_value)  # the overtaken answer arrives last
        self.assertTrue(slow.called)
        self.assertEqual(guard.generation, generation + 1)
        self.assertEqual(guard.last_counter, directory.counter)
        self.poll()
        self.assertEqual(guard.generation, generation + 1)

    def test_stop_cancels_a_due_wake(self) -> None:
        guard = self.world.guard
        guard.wake()
        guard.wake()  # due in wake_spacing
        before = self.world.directory.calls["change_counter"]
        guard.stop()
        self.world.clock.advance(1.0)
        self.assertEqual(self.world.directory.calls["change_counter"], before)


class Revocation(GuardTestCase):
    def watched_access(self, headers: dict[bytes, bytes]):  # type: ignore[no-untyped-def]
        """An Access for bob with a revocation watcher, as a WebSocket relay would hold it."""
        self.assert_reached_backend(self.get(headers), "bob")
        _, access = self.world.handler.seen[-1]
        revoked: list[bool] = []
        access.on_revoked(lambda: revoked.append(True))
        return access, revoked

    def test_removed_collaborator(self) -> None:
        access, revoked = self.watched_access(basic("bob", "bob-password"))
        self.poll()
        self.assertEqual(revoked, [])
        self.world.directory.remove_collaborator(PID, "bob")
        self.poll()
        self.assertEqual(revoked, [True])
        self.assertTrue(access.revoked)

    def test_removed_user(self) -> None:
        token = self.world.directory.add_session("bob")
        _, revoked = self.watched_access(cookie(token))
        self.world.directory.remove_user("bob")
        self.poll()
        self.assertEqual(revoked, [True])

    def test_revoked_token(self) -> None:
        token_id, token = self.world.directory.create_token("bob")
        _, revoked = self.watched_access(bearer(token))
        self.world.directory.revoke_token(token_id)
        self.poll()
        self.assertEqual(revoked, [True])

    def test_ended_session_and_changed_password(self) -> None:
        token = self.world.directory.add_session("bob")
        _, by_session = self.watched_access(cookie(token))
        _, by_password = self.watched_access(basic("bob", "bob-password"))
        self.world.directory.set_password("bob", "new-password")
        self.poll()
        self.assertEqual((by_session, by_password), ([True], [True]))

    def test_unrelated_change_keeps_access(self) -> None:
        token = self.world.directory.add_session("bob")
        access, revoked = self.watched_access(cookie(token))
        self.world.directory.add_user("dave", "x")
        self.poll()
        self.assertEqual(revoked, [])
        self.assertFalse(access.revoked)

    def test_session_expiry_cuts_watched_access(self) -> None:
        token = self.world.directory.add_session("bob", lifetime=5)
        _, revoked = self.watched_access(cookie(token))
        self.world.clock.advance(6 + self.world.guard.credential_ttl)
        self.poll()
        self.assertEqual(revoked, [True])

    def test_unwatched_accesses_cost_nothing(self) -> None:
        token = self.world.directory.add_session("bob")
        for _ in range(10):
            self.assert_reached_backend(self.get(cookie(token)), "bob")
        self.world.directory.add_user("erin", "x")
        before = self.world.directory.queries()
        self.poll()
        self.assertEqual(self.world.directory.queries(), before)

    def test_directory_down_does_not_cut_open_connections(self) -> None:
        token = self.world.directory.add_session("bob")
        _, revoked = self.watched_access(cookie(token))
        self.world.directory.unavailable = True
        self.poll()
        self.world.directory.unavailable = False
        self.poll()
        self.assertEqual(revoked, [])
        self.flushLoggedErrors()


class Subdomains(unittest.TestCase):
    def test_no_sign_in_redirect_loop_on_a_project_subdomain(self) -> None:
        world = make_world(project_domain="projects.example")
        world.directory.add_user("alice", "pw")
        world.directory.add_project("alice", PID)
        host = f"{PID}-8000.projects.example".encode()
        response = world.request(b"GET", b"/notebook", headers=HTML, host=host)
        self.assertEqual(response.status, 401)
        self.assertIn(b"Basic", response.header(b"www-authenticate") or b"")
        passed = world.request(b"GET", b"/notebook", headers=basic("alice", "pw"), host=host)
        self.assertEqual(passed.status, 200)
        self.assertTrue(world.handler.seen[-1][0].authorization_is_proxy_credential)


class BodiesAreNotParsedBeforeTheGuard(unittest.TestCase):
    def test_multipart_and_urlencoded_bodies_are_left_alone(self) -> None:
        world = make_world()
        world.directory.add_user("alice", "pw")
        world.directory.add_project("alice", PID)
        for content_type, body in [
            (b"multipart/form-data; boundary=x", b"--x\r\nnot really multipart"),
            (b"application/x-www-form-urlencoded", b"a=1&b=2"),
        ]:
            response = world.request(
                b"POST",
                TARGET,
                headers={**basic("alice", "pw"), b"Content-Type": content_type},
                body=body,
            )
            self.assertEqual(response.status, 200, content_type)
            self.assertEqual(world.handler.args[-1], {b"q": [b"1"]})  # the query only
            self.assertEqual(world.handler.bodies[-1], body)


class TransportSecurity(unittest.TestCase):
    def test_hsts_on_every_https_answer(self) -> None:
        world = make_world(hsts_max_age=31536000)
        world.directory.add_user("alice", "pw")
        world.directory.add_project("alice", PID)
        answers = [
            world.request(b"GET", TARGET, headers=basic("alice", "pw")),  # proxied
            world.request(b"GET", TARGET),  # 401
            world.request(b"GET", b"/_/login"),
            world.request(b"GET", b"/nowhere"),
            world.request(b"HEAD", b"/_/login"),
        ]
        for response in answers:
            # one header, ours: a backend's own value is replaced
            self.assertEqual(response.headers[b"strict-transport-security"], [b"max-age=31536000"])

    def test_no_hsts_when_off_or_plain(self) -> None:
        world = make_world(hsts_max_age=0)
        self.assertIsNone(world.request(b"GET", b"/_/login").header(b"strict-transport-security"))
        world = make_world(hsts_max_age=100)
        plain = world.request(b"GET", b"/_/login", secure=False)
        self.assertIsNone(plain.header(b"strict-transport-security"))

    def test_json_refusals_are_json(self) -> None:
        world = make_world()
        response = world.request(b"GET", TARGET)
        self.assertEqual(json.loads(response.body)["status"], 401)
