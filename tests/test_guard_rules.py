"""The guard's pure rules: credential parsing, ``next`` safety, rate limits, cache, CSRF tokens."""

from __future__ import annotations

import base64
import os
from urllib.parse import parse_qs, urljoin, urlsplit

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from cocalcproxy.directory.store import open_sync_directory
from cocalcproxy.guard import credentials as c
from cocalcproxy.guard.cache import ExpiringCache
from cocalcproxy.guard.csrf import CsrfTokens, legacy_key, new_presession, shared_key
from cocalcproxy.guard.policy import location, login_location, safe_next, same_origin_post
from cocalcproxy.guard.ratelimit import SignInLimits, SlidingWindow, address_key
from tests.directory_support import new_sqlite_url


def basic(text: str) -> bytes:
    return b"Basic " + base64.b64encode(text.encode())


class AuthorizationParsing(unittest.TestCase):
    def test_bearer(self) -> None:
        self.assertEqual(
            c.parse_authorization([b"Bearer abc.DEF-1_~+/="]), c.APIToken("abc.DEF-1_~+/=")
        )
        self.assertEqual(c.parse_authorization([b"bearer  tok"]), c.APIToken("tok"))

    def test_basic_password_or_token(self) -> None:
        self.assertEqual(
            c.parse_authorization([basic("alice:pa:ss")]), c.NameAndSecret("alice", "pa:ss")
        )
        self.assertEqual(
            c.parse_authorization([basic("zoë:pässword")]), c.NameAndSecret("zoë", "pässword")
        )

    def test_not_ours_is_left_alone(self) -> None:
        self.assertIsNone(c.parse_authorization([]))
        self.assertIsNone(c.parse_authorization([b"token jupyter-token"]))
        self.assertIsNone(c.parse_authorization([b"Digest username=x"]))

    def test_malformed(self) -> None:
        for value in [
            b"Basic",
            b"Basic !!!notbase64",
            basic("no-colon"),
            basic(":password"),
            basic("alice:"),
            b"Basic " + base64.b64encode(b"\xff\xfe:x"),
            b"Bearer",
            b"Bearer a b",
            b"Bearer \xc3\xa9",
            b"Bearer " + b"a" * 5000,
            basic("a" * 300 + ":x"),
        ]:
            self.assertIsInstance(c.parse_authorization([value]), c.Malformed, value)

    def test_two_headers_with_one_ours_is_malformed(self) -> None:
        self.assertIsInstance(c.parse_authorization([b"Bearer x", b"token y"]), c.Malformed)
        self.assertIsInstance(c.parse_authorization([b"Bearer x", b"Bearer x"]), c.Malformed)
        self.assertIsNone(c.parse_authorization([b"token y", b"Digest z"]))

    def test_cookie_values(self) -> None:
        headers = [
            b"a=1; __Host-cocalcproxy_session=first; b=2",
            b'__Host-cocalcproxy_session="second"',
        ]
        self.assertEqual(
            c.cookie_values(headers, "__Host-cocalcproxy_session"), ["first", "second"]
        )
        self.assertEqual(c.session_cookie(headers), "first")
        self.assertEqual(c.session_cookie([b"__Host-cocalcproxy_session=; x=1"]), None)
        self.assertEqual(c.session_cookie([b"xcocalcproxy_session=1"]), None)

    def test_host_prefixed_session_cookie_always_wins(self) -> None:
        # Issue #11 item 9: an old-name cookie (which another host could have tossed in, with
        # a more specific Path so that it comes first) never wins over the __Host- one.
        tossed = b"cocalcproxy_session=planted"
        real = b"__Host-cocalcproxy_session=real"
        for legacy in (False, True):
            self.assertEqual(c.session_cookie([tossed + b"; " + real], legacy), "real")
            self.assertEqual(c.session_cookie([tossed, real], legacy), "real")
            self.assertEqual(c.session_cookie([real + b"; " + tossed], legacy), "real")
            # Even an empty __Host- cookie shuts the old name out.
            self.assertIsNone(c.session_cookie([tossed + b"; __Host-cocalcproxy_session="], legacy))

    def test_old_name_only_where_it_cannot_have_been_tossed(self) -> None:
        old = [b"cocalcproxy_session=old"]
        self.assertIsNone(c.session_cookie(old))
        self.assertEqual(c.session_cookie(old, legacy=True), "old")
        # Two old-name values: one was planted; neither counts.
        two = [b"cocalcproxy_session=a; cocalcproxy_session=b"]
        self.assertIsNone(c.session_cookie(two, legacy=True))
        self.assertEqual(
            c.extract([], old, legacy=True),
            c.Presented(c.SessionToken("old"), from_authorization=False),
        )
        self.assertIsNone(c.extract([], old))

    def test_legacy_cookie_safe(self) -> None:
        safe = c.legacy_cookie_safe
        self.assertTrue(safe("proxy.example.com", None))
        self.assertTrue(safe("proxy.example.com", "example-projects.net"))
        self.assertTrue(safe("proxy.example.com", "usercontent.com"))  # only the TLD shared
        self.assertTrue(safe("localhost", "proj.test"))
        self.assertTrue(safe("localhost", "proj.localhost"))
        self.assertTrue(safe("10.0.0.1", "projects.example.com"))
        self.assertFalse(safe("proxy.example.com", "projects.example.com"))
        self.assertFalse(safe("proxy.example.com", "example.com"))
        self.assertFalse(safe("example.com", "projects.example.com"))
        self.assertFalse(safe("Proxy.Example.COM.", "p.example.com"))
        self.assertFalse(safe("proxy.example.co.uk", "p.example.co.uk"))

    def test_extract_precedence(self) -> None:
        cookie = [b"__Host-cocalcproxy_session=s"]
        got = c.extract([b"Bearer t"], cookie)
        self.assertEqual(got, c.Presented(c.APIToken("t"), from_authorization=True))
        got = c.extract([b"token jupyter"], cookie)
        self.assertEqual(got, c.Presented(c.SessionToken("s"), from_authorization=False))
        self.assertIsNone(c.extract([], [b"other=1"]))
        self.assertIsInstance(c.extract([b"Basic ???"], cookie), c.Malformed)

    def test_cache_key_is_keyed_and_distinct(self) -> None:
        k1, k2 = b"1" * 32, b"2" * 32
        token = "super-secret-token"
        a = c.cache_key(k1, c.APIToken(token))
        self.assertNotEqual(a, c.cache_key(k2, c.APIToken(token)))
        self.assertNotEqual(a, c.cache_key(k1, c.SessionToken(token)))
        self.assertNotIn(token.encode(), a)
        self.assertNotEqual(
            c.cache_key(k1, c.NameAndSecret("a:b", "c")),
            c.cache_key(k1, c.NameAndSecret("a", "b:c")),
        )

    def test_repr_hides_secrets(self) -> None:
        for cred in [
            c.SessionToken("s3cret"),
            c.APIToken("s3cret"),
            c.NameAndSecret("n", "s3cret"),
        ]:
            self.assertNotIn("s3cret", repr(cred))

    def test_cookie_token_shape(self) -> None:
        self.assertTrue(c.well_formed_cookie_token("abc-DEF_123"))
        for bad in ["", "a b", "a;b", 'a"b', "a\\b", "é", "x" * 2000]:
            self.assertFalse(c.well_formed_cookie_token(bad), bad)


OPEN_REDIRECTS = [
    "//evil.example",
    "//evil.example/path",
    "/\\evil.example",
    "\\\\evil.example",
    "\\/evil.example",
    "https://evil.example/",
    "http:evil.example",
    "javascript:alert(1)",
    "evil.example",
    "/\t/evil.example",
    "/\n/evil.example",
    "/\r\n/evil.example",
    " //evil.example",
    "/ /evil.example",
    "/\x00/evil.example",
    "/\u0085/evil.example",
    "/\u2028/evil.example",
    "",
    "/_/login",
    "/_/logout?x=1",
    "/" + "a" * 5000,
]


class NextIsAPathOnThisHost(unittest.TestCase):
    def test_open_redirect_attempts_refused(self) -> None:
        for attempt in OPEN_REDIRECTS:
            self.assertEqual(safe_next(attempt), "/", repr(attempt))
        self.assertEqual(safe_next(None), "/")

    def test_paths_kept(self) -> None:
        for path in ["/", "/x/server/8000/", "/a?b=c&d=%2F%2Fe", "/%2F%2Fevil", "/ü"]:
            self.assertEqual(safe_next(path), path)

    @settings(max_examples=500)
    @given(st.text())
    def test_never_leaves_the_host(self, value: str) -> None:
        result = safe_next(value)
        url = urljoin("https://proxy.example/", location(result).decode("ascii"))
        self.assertEqual(urlsplit(url).netloc, "proxy.example")
        self.assertTrue(result.startswith("/") and not result.startswith("//"))
        self.assertNotIn("\\", result)

    @given(st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E)))
    def test_login_location_round_trip(self, tail: str) -> None:
        target = ("/" + tail.lstrip("/")).encode()
        loc = login_location(target).decode()
        self.assertTrue(loc.startswith("/_/login"))
        query = parse_qs(urlsplit(loc).query)
        if target != b"/":
            (back,) = query["next"]
            self.assertTrue(back.startswith("/"))
            self.assertFalse(back.startswith("//"))

    def test_login_location_of_absolute_form(self) -> None:
        self.assertEqual(login_location(b"https://evil.example/x"), b"/_/login")
        self.assertEqual(login_location(b"//evil.example/x"), b"/_/login")

    def test_same_origin_post(self) -> None:
        host = b"proxy.example:8443"
        self.assertTrue(same_origin_post(None, None, host))
        self.assertTrue(same_origin_post(b"https://proxy.example:8443", b"same-origin", host))
        self.assertFalse(same_origin_post(b"https://evil.example", None, host))
        self.assertFalse(same_origin_post(b"http://proxy.example:8443", None, host))
        self.assertFalse(same_origin_post(b"null", None, host))
        self.assertFalse(same_origin_post(None, b"cross-site", host))
        self.assertFalse(same_origin_post(None, b"same-site", host))


class Limits(unittest.TestCase):
    def test_reached_and_released(self) -> None:
        w = SlidingWindow(3, 60.0)
        for t in (0.0, 10.0, 20.0):
            self.assertIsNone(w.retry_after("k", t))
            w.failed("k", t)
        self.assertEqual(w.retry_after("k", 30.0), 30.0)
        self.assertEqual(w.retry_after("k", 59.0), 1.0)
        self.assertIsNone(w.retry_after("k", 60.0))
        self.assertIsNone(w.retry_after("other", 30.0))

    def test_forgive_and_reset(self) -> None:
        w = SlidingWindow(2, 60.0)
        w.failed("k", 1.0)
        w.failed("k", 2.0)
        self.assertIsNotNone(w.retry_after("k", 3.0))
        w.forgive("k", 2.0)
        self.assertIsNone(w.retry_after("k", 3.0))
        w.reset("k")
        self.assertIsNone(w.retry_after("k", 3.0))

    def test_memory_bounded(self) -> None:
        w = SlidingWindow(1, 60.0, max_keys=10)
        for i in range(100):
            w.failed(str(i), 0.0)
        self.assertEqual(len(w._failures), 10)

    def test_sign_in_limits_per_name_and_address(self) -> None:
        limits = SignInLimits(
            per_address=SlidingWindow(5, 100.0),
            per_name=SlidingWindow(2, 100.0),
            per_device=SlidingWindow(3, 100.0),
        )
        self.assertIsNone(limits.begin("10.0.0.1", "Alice", 0.0))
        self.assertIsNone(limits.begin("10.0.0.2", "alice ", 1.0))
        # the name is limited whatever the address and however it is spelt
        self.assertEqual(limits.begin("10.0.0.3", "ALICE", 2.0), 98)
        # a right password takes its own attempt back and clears the name
        limits.succeeded("10.0.0.2", "alice", 1.0)
        self.assertIsNone(limits.begin("10.0.0.3", "alice", 3.0))
        # the address: one failure at 0.0, four more names, then it waits for the first to expire
        for i, name in enumerate(["b", "c", "d", "e"]):
            self.assertIsNone(limits.begin("10.0.0.1", name, 4.0 + i))
        self.assertEqual(limits.begin("10.0.0.1", "f", 10.0), 90)
        self.assertIsNone(limits.begin("10.0.0.1", "f", 100.0))

    def test_a_known_device_is_never_locked_out_by_strangers(self) -> None:
        # Issue #11 item 1: 20 wrong guesses over two addresses lock unknown clients out of
        # "alice" (and at most 10 per 10 minutes get through), but not her own browser.
        limits = SignInLimits.default()
        for i in range(20):
            limits.begin(f"10.0.0.{1 + i % 2}", "alice", float(i))
        self.assertIsNotNone(limits.begin("10.0.0.3", "alice", 30.0))
        self.assertEqual(
            sum(limits.begin(f"10.9.{i}.1", "alice", 31.0) is None for i in range(100)), 0
        )
        self.assertIsNone(limits.begin("10.0.0.1", "alice", 32.0, device="her-browser"))
        limits.succeeded("10.0.0.1", "alice", 32.0, device="her-browser")
        # A device's own failures lock out that device only.
        for t in range(10):
            self.assertIsNone(limits.begin("10.0.0.1", "alice", 40.0 + t, device="stolen"))
        self.assertIsNotNone(limits.begin("10.0.0.1", "alice", 50.0, device="stolen"))
        self.assertIsNone(limits.begin("10.0.0.1", "alice", 50.0, device="her-browser"))

    def test_unknown_clients_bounded_per_name_per_hour(self) -> None:
        limits = SignInLimits.default()
        allowed = 0
        for second in range(3600):
            # a new address every second, guessing all the time
            if limits.begin(f"10.{second // 250}.{second % 250}.1", "alice", float(second)) is None:
                allowed += 1
        self.assertLessEqual(allowed, 60)
        self.assertGreaterEqual(allowed, 50)

    def test_address_keys(self) -> None:
        self.assertEqual(address_key("2001:db8::1"), address_key("2001:db8::ffff:1"))
        self.assertNotEqual(address_key("2001:db8::1"), address_key("2001:db8:0:1::1"))
        self.assertEqual(address_key("::ffff:10.0.0.1"), "10.0.0.1")
        self.assertEqual(address_key("10.0.0.1"), "10.0.0.1")
        self.assertEqual(address_key("unix"), "unix")


class Cache(unittest.TestCase):
    def test_expiry_and_eviction(self) -> None:
        cache: ExpiringCache[str, int] = ExpiringCache(2)
        cache.put("a", 1, 10.0)
        self.assertEqual(cache.get("a", 9.9).value, 1)  # type: ignore[union-attr]
        self.assertIsNone(cache.get("a", 10.0))
        cache.put("a", 1, 100.0)
        cache.put("b", 2, 100.0)
        cache.get("a", 0.0)
        cache.put("c", 3, 100.0)
        self.assertIsNone(cache.get("b", 0.0))
        self.assertIsNotNone(cache.get("a", 0.0))
        cache.clear()
        self.assertEqual(len(cache), 0)


class Csrf(unittest.TestCase):
    def test_login_token_bound_to_presession(self) -> None:
        tokens = CsrfTokens(b"k" * 32)
        p1, p2 = new_presession(), new_presession()
        t1 = tokens.login_token(p1)
        self.assertTrue(tokens.check_login(p1, t1))
        self.assertFalse(tokens.check_login(p2, t1))
        self.assertFalse(tokens.check_login(None, t1))
        self.assertFalse(tokens.check_login(p1, None))
        self.assertFalse(tokens.check_login(p1, ""))
        self.assertFalse(tokens.check_login(p1, t1 + "é"))
        self.assertFalse(tokens.check_login("short", tokens.login_token("short")))
        self.assertFalse(CsrfTokens(b"j" * 32).check_login(p1, t1))

    def test_logout_token_bound_to_session(self) -> None:
        tokens = CsrfTokens(b"k" * 32)
        t = tokens.logout_token("session-a")
        self.assertTrue(tokens.check_logout("session-a", t))
        self.assertFalse(tokens.check_logout("session-b", t))
        self.assertFalse(tokens.check_logout("session-a", tokens.login_token("x" * 43)))
        self.assertNotIn("session-a", t)

    def test_key_in_the_directory_shared_by_every_process(self) -> None:
        # Issue #10: the key is the directory's, not a state directory's: two proxies with
        # their own state directories on one directory make each other's tokens.
        url = new_sqlite_url(self)
        one = open_sync_directory(url)
        two = open_sync_directory(url)
        self.addCleanup(one.close)
        self.addCleanup(two.close)
        key = shared_key(one, self.mktemp())
        self.assertEqual(len(key), 32)
        self.assertEqual(shared_key(two, self.mktemp()), key)
        self.assertEqual(shared_key(one, self.mktemp()), key)  # a restart keeps it

    def test_an_old_key_file_is_adopted_on_upgrade(self) -> None:
        # Forms open in browsers and subdomain cookies made with the old key keep working.
        state = self.mktemp()
        os.makedirs(os.path.join(state, "secrets"), mode=0o700)
        old = bytes(range(32))
        with open(os.path.join(state, "secrets", "csrf.key"), "wb") as f:
            f.write(old)
        url = new_sqlite_url(self)
        d = open_sync_directory(url)
        self.addCleanup(d.close)
        presession = new_presession()
        token = CsrfTokens(old).login_token(presession)
        key = shared_key(d, state)
        self.assertEqual(key, old)
        self.assertTrue(CsrfTokens(shared_key(d, self.mktemp())).check_login(presession, token))
        # A short or unreadable file is not a key: a fresh one is made instead.
        short = self.mktemp()
        os.makedirs(os.path.join(short, "secrets"))
        with open(os.path.join(short, "secrets", "csrf.key"), "wb") as f:
            f.write(b"short")
        self.assertIsNone(legacy_key(short))
        other = open_sync_directory(new_sqlite_url(self))
        self.addCleanup(other.close)
        self.assertNotEqual(shared_key(other, short), b"short")
        self.assertEqual(len(shared_key(other, short)), 32)


class Devices(unittest.TestCase):
    """Issue #11 item 1: device cookies bound to one account."""

    def test_bound_to_the_exact_account(self) -> None:
        from cocalcproxy.guard.devices import MAX_ENTRIES, DeviceCookies

        devices = DeviceCookies(b"k" * 32)
        value = devices.issue([], "alice")
        cookie = [b"__Host-cocalcproxy_device=" + value.encode()]
        nonce = devices.device_for(cookie, "alice")
        self.assertIsNotNone(nonce)
        for other in ("Alice", "alice ", "bob"):
            self.assertIsNone(devices.device_for(cookie, other), other)
        self.assertIsNone(DeviceCookies(b"x" * 32).device_for(cookie, "alice"))
        self.assertIsNone(devices.device_for([b"cocalcproxy_device=" + value.encode()], "alice"))
        forged = value[:-1] + ("A" if value[-1] != "A" else "B")
        self.assertIsNone(
            devices.device_for([b"__Host-cocalcproxy_device=" + forged.encode()], "alice")
        )
        # Signing in again keeps the device; other accounts join the same cookie, up to a bound.
        again = devices.issue(cookie, "alice")
        self.assertEqual(
            devices.device_for([b"__Host-cocalcproxy_device=" + again.encode()], "alice"), nonce
        )
        both = devices.issue(cookie, "bob")
        jar = [b"__Host-cocalcproxy_device=" + both.encode()]
        self.assertEqual(devices.device_for(jar, "alice"), nonce)
        self.assertIsNotNone(devices.device_for(jar, "bob"))
        for i in range(10):
            both = devices.issue([b"__Host-cocalcproxy_device=" + both.encode()], f"u{i}")
        self.assertEqual(len(both.split("~")), MAX_ENTRIES)
