"""Absolute URLs from apps in the server form (issue #14): the pure decision in routing, then
the Root's answers in memory (307, or a 404 that explains), escaping and caching headers."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial import unittest

from cocalcproxy.http import routing
from cocalcproxy.http.routing import AbsoluteUrl, absolute_url, parse, referer_prefix
from tests.guardfakes import HTML, make_world

PID = "5f0e3a0c-9d1b-4c2e-8f3a-7b6c5d4e3f21"
HOST = b"proxy.example:8443"
PREFIX = f"/{PID}/server/8888".encode()
REFERER = b"https://proxy.example:8443" + PREFIX + b"/lab?reset"


def decide(
    target: bytes,
    referers: list[bytes] | None = None,
    sites: list[bytes] | None = None,
    host: bytes | None = HOST,
    **kw: bool,
) -> AbsoluteUrl | None:
    outcome = parse(host, target, "projects.example", "proxy.example")
    return absolute_url(
        outcome, host, target, [REFERER] if referers is None else referers, sites or [], **kw
    )


class RefererPrefix(unittest.SynchronousTestCase):
    def test_same_origin_server_form(self) -> None:
        self.assertEqual(referer_prefix(REFERER, HOST), PREFIX)
        self.assertEqual(referer_prefix(REFERER, b"PROXY.example:8443"), PREFIX)
        self.assertEqual(
            referer_prefix(b"https://proxy.example" + PREFIX + b"/", b"proxy.example"), PREFIX
        )

    def test_anything_else_is_none(self) -> None:
        for referer, host in [
            (REFERER, b"proxy.example"),  # another port is another origin
            (REFERER, b"evil.example:8443"),
            (REFERER.replace(b"https", b"http"), HOST),
            (b"https://proxy.example:8443" + PREFIX, HOST),  # no slash after the port
            (b"https://proxy.example:8443" + PREFIX.replace(b"server", b"port") + b"/", HOST),
            (b"https://proxy.example:8443/" + PID.upper().encode() + b"/server/8888/", HOST),
            (b"https://proxy.example:8443/" + PID.encode() + b"/server/65536/", HOST),
            (b"https://proxy.example:8443/" + PID.encode() + b"/server/08888/", HOST),
            (b"https://proxy.example:8443/x" + PREFIX + b"/", HOST),
            (b"https://user@proxy.example:8443" + PREFIX + b"/", HOST),
            (b"https://proxy.example:8443", HOST),
            (b"", HOST),
            (REFERER, None),
        ]:
            self.assertIsNone(referer_prefix(referer, host), (referer, host))


class Decision(unittest.SynchronousTestCase):
    def test_redirect_keeps_path_and_query(self) -> None:
        found = decide(b"/static/lab/main.js?v=1")
        target = b"/static/lab/main.js?v=1"
        self.assertEqual(found, AbsoluteUrl(PREFIX, PREFIX + target, target))

    def test_only_unrouted_main_host_paths(self) -> None:
        for target in [
            b"/",  # the start page
            b"/_/login",
            b"/_/nope",  # the proxy's own namespace is never an app's
            b"/favicon.ico",
            f"/{PID}/server/8000/x".encode(),  # a route of its own
            f"/{PID}/server/99999/x".encode(),  # a malformed route is a plain 404
            b"/a b",
        ]:
            self.assertIsNone(decide(target), target)
        # Project subdomains pass every path to their backend; never redirected.
        sub = f"{PID}-8888.projects.example:8443".encode()
        self.assertIsNone(decide(b"/static/x.js", host=sub))

    def test_referer_must_be_one_same_origin_and_not_cross_site(self) -> None:
        self.assertIsNone(decide(b"/x.js", referers=[]))
        self.assertIsNone(decide(b"/x.js", referers=[REFERER, REFERER]))
        self.assertIsNone(decide(b"/x.js", referers=[b"https://evil.example" + PREFIX + b"/"]))
        self.assertIsNone(decide(b"/x.js", sites=[b"cross-site"]))
        self.assertIsNone(decide(b"/x.js", sites=[b"same-site"]))
        self.assertIsNone(decide(b"/x.js", sites=[b"same-origin", b"same-origin"]))
        self.assertIsNotNone(decide(b"/x.js", sites=[b"same-origin"]))

    def test_websocket_and_off_explain_instead(self) -> None:
        self.assertEqual(decide(b"/ws", websocket=True), AbsoluteUrl(PREFIX, None, b"/ws"))
        self.assertEqual(decide(b"/x", redirect=False), AbsoluteUrl(PREFIX, None, b"/x"))
        # Browsers send no Referer with a WebSocket: still explained, without a prefix.
        self.assertEqual(
            decide(b"/ws", referers=[], websocket=True), AbsoluteUrl(None, None, b"/ws")
        )
        self.assertIsNone(decide(b"/x", referers=[], redirect=False))

    @given(st.binary(min_size=0, max_size=200))
    def test_location_is_always_under_the_prefix(self, tail: bytes) -> None:
        target = b"/" + tail
        found = decide(target)
        if found is None:
            return
        assert found.location is not None
        self.assertTrue(found.location.startswith(PREFIX + b"/"))
        self.assertFalse(found.location.startswith(b"//"))
        self.assertEqual(found.location, PREFIX + target)
        # The redirected request is a server-form route of that project and port.
        route = parse(HOST, found.location, "projects.example", "proxy.example")
        self.assertIsInstance(route, routing.Route)
        assert isinstance(route, routing.Route)
        self.assertEqual((route.project_id, route.kind, route.port), (PID, "server", 8888))
        self.assertEqual(route.backend_target, target)


class Answers(unittest.SynchronousTestCase):
    def headers(self, extra: dict[bytes, bytes] | None = None) -> dict[bytes, bytes]:
        return {b"Referer": b"https://proxy.example" + PREFIX + b"/lab", **(extra or {})}

    def test_307_for_any_method_not_cacheable(self) -> None:
        world = make_world()
        for method in (b"GET", b"POST", b"PUT", b"DELETE"):
            r = world.request(method, b"/api/x?y=1", headers=self.headers(), host=b"proxy.example")
            self.assertEqual(r.status, 307, method)
            self.assertEqual(r.header(b"location"), PREFIX + b"/api/x?y=1")
            self.assertEqual(r.header(b"vary"), b"Referer")
            self.assertEqual(r.header(b"cache-control"), b"no-store")
        # Nothing reached a handler: the redirect is all.
        self.assertEqual(world.handler.seen, [])

    def test_off_explains_in_html_for_browsers_escaped(self) -> None:
        world = make_world()
        world.site.resource.absolute_url_redirect = False  # type: ignore[attr-defined]
        target = b"/x/%22%3E<script>alert(1)</script>"
        r = world.request(b"GET", target, headers=self.headers(HTML), host=b"proxy.example")
        self.assertEqual(r.status, 404)
        self.assertEqual(r.header(b"content-type"), b"text/html; charset=utf-8")
        self.assertEqual(r.header(b"vary"), b"Referer")
        body = r.body.decode()
        self.assertNotIn("<script>", body)
        self.assertIn("&lt;script&gt;", body)
        self.assertIn(f"https://proxy.example/{PID}/server/8888/x/%22%3E&lt;script&gt;", body)
        self.assertIn(f"https://proxy.example/{PID}/port/8888/", body)
        self.assertIn("base-URL option", body)

    def test_scripts_get_text_never_json(self) -> None:
        world = make_world(project_domain="projects.example")
        world.site.resource.absolute_url_redirect = False  # type: ignore[attr-defined]
        for accept in (b"*/*", b"text/css,*/*;q=0.1", b"application/json"):
            r = world.request(
                b"GET",
                b"/static/main.js",
                headers={b"Referer": REFERER, b"Accept": accept, b"Sec-Fetch-Dest": b"script"},
                host=b"proxy.example:8443",
            )
            self.assertEqual(r.status, 404)
            self.assertEqual(r.header(b"content-type"), b"text/plain; charset=utf-8")
            text = r.body.decode()
            self.assertIn(f"https://proxy.example:8443/{PID}/server/8888/static/main.js", text)
            self.assertIn(f"https://{PID}-8888.projects.example:8443/", text)

    def test_websocket_gets_the_explaining_404(self) -> None:
        world = make_world()
        ws = {b"Upgrade": b"websocket", b"Connection": b"Upgrade", b"Sec-WebSocket-Version": b"13"}
        r = world.request(b"GET", b"/api/kernels/1/channels", headers={**self.headers(), **ws})
        self.assertEqual(r.status, 404)
        self.assertEqual(r.header(b"content-type"), b"text/plain; charset=utf-8")
        self.assertIn(b"cannot follow a redirect", r.body)
        # Without a Referer (as browsers send WebSocket handshakes) it still says what to do.
        r = world.request(b"GET", b"/api/kernels/1/channels", headers=ws)
        self.assertEqual(r.status, 404)
        self.assertIn(b"/<project id>/port/<port>/", r.body)

    def test_plain_404s_for_scripts_are_text(self) -> None:
        world = make_world()
        r = world.request(b"GET", b"/nothing.js", headers={b"Sec-Fetch-Dest": b"script"})
        self.assertEqual(r.status, 404)
        self.assertEqual(r.header(b"content-type"), b"text/plain; charset=utf-8")
        r = world.request(b"GET", b"/nothing")
        self.assertEqual(r.header(b"content-type"), b"application/json")
