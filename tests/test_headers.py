"""headers: the policy both ways, Location and Set-Cookie rewriting, with hypothesis properties."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from cocalcproxy.http.headers import (
    HOP_BY_HOP,
    backend_request_headers,
    client_response_headers,
    cookie_core_name,
    is_proxy_cookie_name,
    rewrite_location,
    rewrite_set_cookie,
    set_cookie_name,
    strip_proxy_cookies,
)
from cocalcproxy.http.routing import Route

PID = "0b0e5c1a-3d4f-4a5b-8c6d-7e8f9a0b1c2d"
SERVER = Route(PID, "server", 8888, f"/{PID}/server/8888".encode(), b"/x")
PORT = Route(PID, "port", 8888, f"/{PID}/port/8888".encode(), f"/{PID}/port/8888/x".encode())
SUB = Route(PID, "port", 8888, b"", b"/x", subdomain=True)
SP = SERVER.prefix
PP = PORT.prefix


def names(headers: list[tuple[bytes, bytes]]) -> list[bytes]:
    return [n.lower() for n, _ in headers]


def values(headers: list[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    return [v for n, v in headers if n.lower() == name]


def to_backend(headers: list[tuple[bytes, bytes]], **kw: object) -> list[tuple[bytes, bytes]]:
    args: dict[str, object] = dict(
        route=SERVER, client_ip="203.0.113.7", host=b"proxy.example:8443", strip_authorization=False
    )
    args.update(kw)
    return backend_request_headers(headers, **args)  # type: ignore[arg-type]


class RequestHeaders(unittest.TestCase):
    def test_hop_by_hop_and_connection_named_dropped(self) -> None:
        out = to_backend(
            [
                (b"Connection", b"keep-alive, X-Secret, x-other"),
                (b"Keep-Alive", b"timeout=5"),
                (b"X-Secret", b"1"),
                (b"X-Other", b"2"),
                (b"TE", b"trailers"),
                (b"Transfer-Encoding", b"chunked"),
                (b"Upgrade", b"h2c"),
                (b"Proxy-Authorization", b"Basic eA=="),
                (b"Proxy-Connection", b"keep-alive"),
                (b"Trailer", b"X"),
                (b"Expect", b"100-continue"),
                (b"Accept", b"*/*"),
            ]
        )
        got = set(names(out))
        for gone in HOP_BY_HOP | {b"x-secret", b"x-other", b"expect"}:
            self.assertNotIn(gone, got)
        self.assertEqual(values(out, b"accept"), [b"*/*"])

    def test_host_kept_and_forwarding_set_not_appended(self) -> None:
        out = to_backend(
            [
                (b"Host", b"ignored-duplicate"),
                (b"X-Forwarded-For", b"1.2.3.4"),
                (b"x-forwarded-host", b"evil.example"),
                (b"X-Forwarded-Proto", b"http"),
                (b"X-Forwarded-Prefix", b"/elsewhere"),
                (b"X-Forwarded-Port", b"1"),
                (b"Forwarded", b"for=1.2.3.4"),
                (b"X-Real-IP", b"1.2.3.4"),
            ]
        )
        self.assertEqual(values(out, b"host"), [b"proxy.example:8443"])
        self.assertEqual(values(out, b"x-forwarded-for"), [b"203.0.113.7"])
        self.assertEqual(values(out, b"x-forwarded-host"), [b"proxy.example:8443"])
        self.assertEqual(values(out, b"x-forwarded-proto"), [b"https"])
        self.assertEqual(values(out, b"x-forwarded-prefix"), [SP])
        for gone in (b"x-forwarded-port", b"forwarded", b"x-real-ip"):
            self.assertEqual(values(out, gone), [])

    def test_prefix_only_for_server_form(self) -> None:
        self.assertEqual(values(to_backend([], route=PORT), b"x-forwarded-prefix"), [])
        self.assertEqual(values(to_backend([], route=SUB), b"x-forwarded-prefix"), [])

    def test_no_client_address(self) -> None:
        out = to_backend([(b"X-Forwarded-For", b"6.6.6.6")], client_ip="")
        self.assertEqual(values(out, b"x-forwarded-for"), [])

    def test_no_host(self) -> None:
        out = to_backend([], host=None)
        self.assertEqual(values(out, b"host"), [])
        self.assertEqual(values(out, b"x-forwarded-host"), [])

    def test_session_cookie_removed_others_byte_for_byte(self) -> None:
        out = to_backend([(b"Cookie", b'a=1; cocalcproxy_session=SECRET; b="x y";c=3')])
        self.assertEqual(values(out, b"cookie"), [b'a=1; b="x y"; c=3'])
        self.assertNotIn(b"SECRET", b"".join(v for _, v in out))
        out = to_backend([(b"Cookie", b"a=1;b=2")])
        self.assertEqual(values(out, b"cookie"), [b"a=1;b=2"])
        out = to_backend([(b"Cookie", b"cocalcproxy_session=SECRET")])
        self.assertEqual(values(out, b"cookie"), [])
        out = to_backend([(b"Cookie", b"x=1"), (b"Cookie", b" COCALCPROXY_SESSION =S; y=2")])
        self.assertEqual(values(out, b"cookie"), [b"x=1", b"y=2"])

    def test_underscore_spellings_never_reach_the_backend(self) -> None:
        # Issue #11 item 3: a WSGI backend reads X_Forwarded_For as HTTP_X_FORWARDED_FOR.
        sent = [
            (b"X_Forwarded_For", b"1.2.3.4"),
            (b"X_Real_IP", b"1.2.3.4"),
            (b"x_forwarded-proto", b"http"),
            (b"X-Cocalcproxy_Identity", b"forged"),
            (b"Authorization_", b"Bearer x"),
            (b"Transfer_Encoding", b"chunked"),
            (b"Content_Length", b"5"),
            (b"X-App", b"kept"),
        ]
        for websocket in (False, True):
            out = to_backend(sent, websocket=websocket)
            self.assertFalse([n for n in names(out) if b"_" in n], out)
            self.assertEqual(values(out, b"x-app"), [b"kept"])
            self.assertEqual(values(out, b"x-forwarded-for"), [b"203.0.113.7"])

    def test_cookie2_dropped(self) -> None:
        out = to_backend([(b"Cookie2", b"cocalcproxy_session=secret"), (b"Cookie", b"a=1")])
        self.assertEqual(names(out)[1:2], [b"cookie"])
        self.assertNotIn(b"cookie2", names(out))

    def test_proxy_cookie_variants_stripped(self) -> None:
        value = b"a=1; __Host-cocalcproxy_session=s; __Secure-cocalcproxy_session=t; b=2"
        self.assertEqual(strip_proxy_cookies(value), b"a=1; b=2")

    def test_authorization(self) -> None:
        h = [(b"Authorization", b"Bearer app-token")]
        self.assertEqual(values(to_backend(h), b"authorization"), [b"Bearer app-token"])
        self.assertEqual(values(to_backend(h, strip_authorization=True), b"authorization"), [])

    def test_identity_assertion_only_from_the_proxy(self) -> None:
        sent = [
            (b"X-Cocalcproxy-Identity", b"forged"),
            (b"x_cocalcproxy_identity", b"forged"),
            (b"X-COCALCPROXY_IDENTITY", b"forged"),
            (b"X-Other", b"kept"),
        ]
        for websocket in (False, True):
            out = to_backend(sent, websocket=websocket)
            self.assertNotIn(b"forged", [v for _, v in out])
            self.assertEqual(values(out, b"x-other"), [b"kept"])
            out = to_backend(sent, websocket=websocket, identity=b"signed")
            self.assertEqual(
                [(n, v) for n, v in out if b"identity" in n.lower()],
                [(b"X-Cocalcproxy-Identity", b"signed")],
            )

    def test_repetition_and_order_survive(self) -> None:
        h = [(b"X-A", b"1"), (b"Accept", b"x"), (b"X-A", b"2"), (b"X-A", b"3")]
        self.assertEqual(values(to_backend(h), b"x-a"), [b"1", b"2", b"3"])

    def test_websocket_keeps_handshake(self) -> None:
        h = [
            (b"Connection", b"keep-alive, Upgrade, Sec-WebSocket-Key"),
            (b"Upgrade", b"websocket"),
            (b"Sec-WebSocket-Key", b"dGhlIHNhbXBsZSBub25jZQ=="),
            (b"Sec-WebSocket-Version", b"13"),
            (b"Sec-WebSocket-Protocol", b"chat"),
            (b"Origin", b"https://proxy.example:8443"),
            (b"Cookie", b"cocalcproxy_session=S; a=1"),
        ]
        out = to_backend(h, websocket=True)
        self.assertEqual(values(out, b"connection"), [b"Upgrade"])
        self.assertEqual(values(out, b"upgrade"), [b"websocket"])
        self.assertEqual(values(out, b"sec-websocket-key"), [b"dGhlIHNhbXBsZSBub25jZQ=="])
        self.assertEqual(values(out, b"sec-websocket-protocol"), [b"chat"])
        self.assertEqual(values(out, b"cookie"), [b"a=1"])
        self.assertEqual(values(out, b"origin"), [b"https://proxy.example:8443"])
        # Without websocket=True the same headers lose the upgrade.
        plain = to_backend(h)
        self.assertEqual(values(plain, b"upgrade"), [])
        self.assertEqual(values(plain, b"connection"), [])

    @settings(max_examples=300, deadline=None)
    @given(
        st.lists(
            st.tuples(
                st.sampled_from(
                    [
                        b"Cookie",
                        b"Connection",
                        b"X-Forwarded-For",
                        b"Authorization",
                        b"Upgrade",
                        b"Host",
                        b"X-A",
                        b"Te",
                        b"Forwarded",
                        b"Set-Cookie",
                        b"Keep-Alive",
                    ]
                ),
                st.binary(max_size=40),
            ),
            max_size=12,
        ),
        st.booleans(),
        st.booleans(),
    )
    def test_properties(self, h: list[tuple[bytes, bytes]], strip: bool, ws: bool) -> None:
        out = to_backend(h, strip_authorization=strip, websocket=ws)
        ns = names(out)
        self.assertEqual(values(out, b"x-forwarded-for"), [b"203.0.113.7"])
        self.assertEqual(values(out, b"host"), [b"proxy.example:8443"])
        self.assertEqual(ns.count(b"forwarded"), 0)
        if strip:
            self.assertNotIn(b"authorization", ns)
        if not ws:
            self.assertNotIn(b"upgrade", ns)
            self.assertNotIn(b"connection", ns)
        for value in values(out, b"cookie"):
            for piece in value.split(b";"):
                self.assertNotEqual(piece.split(b"=", 1)[0].strip().lower(), b"cocalcproxy_session")
        self.assertNotIn(b"te", ns)
        self.assertNotIn(b"keep-alive", ns)

    @settings(max_examples=300, deadline=None)
    @given(st.lists(st.text(st.sampled_from('abcxyz_=" '), max_size=8), max_size=6))
    def test_cookie_stripping_keeps_other_pairs(self, pieces: list[str]) -> None:
        raw = [p.encode() for p in pieces]
        value = b";".join(raw + [b" cocalcproxy_session=s"])
        out = strip_proxy_cookies(value)
        kept = [p.strip(b" \t") for p in raw if p.strip()]
        self.assertEqual(out, b"; ".join(kept) if kept else None)


class Locations(unittest.TestCase):
    def loc(self, value: bytes, route: Route = SERVER, host: str = "127.0.0.1") -> bytes:
        return rewrite_location(
            value, route=route, project_host=host, proxy_hosts=[b"proxy.example:8443"]
        )

    def test_server_form(self) -> None:
        self.assertEqual(self.loc(b"/login"), SP + b"/login")
        self.assertEqual(self.loc(b"/"), SP + b"/")
        self.assertEqual(self.loc(b"/a?b=/c"), SP + b"/a?b=/c")
        self.assertEqual(self.loc(SP + b"/already"), SP + b"/already")
        self.assertEqual(self.loc(b"/\\evil.example"), SP + b"/\\evil.example")
        self.assertEqual(self.loc(b"http://127.0.0.1:8888/login?x"), SP + b"/login?x")
        self.assertEqual(self.loc(b"http://localhost:8888"), SP + b"/")
        self.assertEqual(self.loc(b"//localhost:8888/a"), SP + b"/a")
        self.assertEqual(self.loc(b"http://[::1]:8888/a"), SP + b"/a")
        self.assertEqual(self.loc(b"https://proxy.example:8443/login"), SP + b"/login")
        self.assertEqual(self.loc(b"http://PROXY.example/login"), SP + b"/login")
        self.assertEqual(self.loc(b"https://proxy.example:8443" + SP + b"/x"), SP + b"/x")

    def test_left_alone(self) -> None:
        for value in (
            b"login",
            b"../x",
            b"?q=1",
            b"",
            b"https://github.com/login",
            b"//evil.example/x",
            b"http://127.0.0.1:9999/other-port",
            b"http://user@127.0.0.1:8888/x",
            b"javascript:alert(1)",
            b"mailto:a@b",
            b"http://127.0.0.1:bad/x",
        ):
            self.assertEqual(self.loc(value), value, value)

    def test_backend_on_other_host(self) -> None:
        self.assertEqual(self.loc(b"http://10.0.0.5:8888/a", host="10.0.0.5"), SP + b"/a")
        self.assertEqual(
            self.loc(b"http://127.0.0.1:8888/a", host="10.0.0.5"), b"http://127.0.0.1:8888/a"
        )
        self.assertEqual(self.loc(b"http://Box.Example:8888/a", host="box.example"), SP + b"/a")

    def test_port_form_only_backend_urls(self) -> None:
        self.assertEqual(self.loc(b"/login", PORT), b"/login")
        self.assertEqual(self.loc(PP + b"/x", PORT), PP + b"/x")
        self.assertEqual(self.loc(b"http://127.0.0.1:8888" + PP + b"/x?y", PORT), PP + b"/x?y")
        self.assertEqual(
            self.loc(b"https://proxy.example:8443/x", PORT), b"https://proxy.example:8443/x"
        )
        self.assertEqual(self.loc(b"login", PORT), b"login")

    def test_subdomain(self) -> None:
        self.assertEqual(self.loc(b"/login", SUB), b"/login")
        self.assertEqual(self.loc(b"http://localhost:8888/a", SUB), b"/a")

    @settings(max_examples=500, deadline=None)
    @given(st.binary(max_size=80), st.sampled_from([SERVER, PORT, SUB]))
    def test_never_raises_and_never_points_elsewhere(self, value: bytes, route: Route) -> None:
        out = self.loc(value, route)
        if out != value:
            # A rewrite always yields a path on the proxy itself, under the prefix (server form).
            self.assertTrue(out.startswith(b"/"))
            self.assertFalse(out.startswith(b"//"))
            if route is SERVER:
                self.assertTrue(out.startswith(SP + b"/") or out == SP)

    @settings(max_examples=300, deadline=None)
    @given(st.text(st.sampled_from("abc/._-%?=&"), max_size=30))
    def test_absolute_paths_get_prefix_once(self, tail: str) -> None:
        path = ("/" + tail.lstrip("/")).encode()
        once = self.loc(path)
        self.assertEqual(once, path if path.startswith(SP) else SP + path)
        self.assertEqual(self.loc(once), once)


class SetCookies(unittest.TestCase):
    def test_server_form(self) -> None:
        self.assertEqual(
            rewrite_set_cookie(b"a=1; Path=/; Domain=.example.com; HttpOnly", route=SERVER),
            b"a=1; Path=" + SP + b"/; HttpOnly",
        )
        self.assertEqual(
            rewrite_set_cookie(b"a=1; path=/app", route=SERVER), b"a=1; Path=" + SP + b"/app"
        )
        self.assertEqual(
            rewrite_set_cookie(b"a=1; Path=" + SP + b"/in", route=SERVER),
            b"a=1; Path=" + SP + b"/in",
        )
        self.assertEqual(rewrite_set_cookie(b"a=1", route=SERVER), b"a=1")
        self.assertEqual(
            rewrite_set_cookie(b"a=1; Path=x", route=SERVER), b"a=1; Path=" + SP + b"/"
        )

    def test_port_form_narrows_to_prefix(self) -> None:
        self.assertEqual(
            rewrite_set_cookie(b"a=1; Path=/other; Secure", route=PORT),
            b"a=1; Path=" + PP + b"/; Secure",
        )
        self.assertEqual(
            rewrite_set_cookie(b"a=1; Path=" + PP + b"/deep", route=PORT),
            b"a=1; Path=" + PP + b"/deep",
        )
        # A sibling prefix is outside: /pid/port/88 must not cover /pid/port/8888.
        sibling = f"/{PID}/port/888".encode()
        self.assertEqual(
            rewrite_set_cookie(b"a=1; Path=" + sibling, route=PORT), b"a=1; Path=" + PP + b"/"
        )

    def test_subdomain_drops_domain_only(self) -> None:
        self.assertEqual(
            rewrite_set_cookie(b"a=1; Domain=projects.example; Path=/", route=SUB),
            b"a=1; Path=/",
        )

    def test_proxy_cookie_refused(self) -> None:
        self.assertIsNone(rewrite_set_cookie(b"cocalcproxy_session=x; Path=/", route=SERVER))
        self.assertIsNone(rewrite_set_cookie(b" CocalcProxy_Session=x", route=PORT))

    def test_proxy_cookie_refused_under_any_spelling_a_browser_reads(self) -> None:
        # Issue #11 item 8: each of these comes back from some browser as a proxy cookie.
        for value in (
            b"=cocalcproxy_session=x; Path=/",  # nameless: sent back as its value alone
            b"= cocalcproxy_session=x",
            b"  cocalcproxy_session  =x",
            b"\tcocalcproxy_session=x",
            b"__Host-cocalcproxy_session=x; Path=/; Secure",
            b"__Secure-cocalcproxy_session=x; Secure",
            b"__HOST-COCALCPROXY_SESSION=x",
            b"__secure-__host-cocalcproxy_session=x",
            b"=__Host-cocalcproxy_csrf=x",
            b"__Host-cocalcproxy_csrf=x",
            b"cocalcproxy_session",
        ):
            for route in (SERVER, PORT, SUB):
                self.assertIsNone(rewrite_set_cookie(value, route=route), (value, route.kind))
        # Other cookies, even similar ones, pass.
        self.assertEqual(rewrite_set_cookie(b"=app=1", route=SUB), b"=app=1")
        self.assertEqual(
            rewrite_set_cookie(b"cocalcproxy_sessions=1", route=SUB), b"cocalcproxy_sessions=1"
        )

    def test_names_helpers(self) -> None:
        self.assertEqual(set_cookie_name(b"=a=b; Path=/"), b"a")
        self.assertEqual(set_cookie_name(b"a=b=c"), b"a")
        self.assertEqual(set_cookie_name(b"lonely; Path=/"), b"lonely")
        self.assertEqual(cookie_core_name(b" __Secure-__Host-X "), b"x")
        self.assertTrue(is_proxy_cookie_name(b"__host-cocalcproxy_SESSION"))
        self.assertFalse(is_proxy_cookie_name(b"cocalcproxy"))

    @settings(max_examples=500, deadline=None)
    @given(
        st.lists(
            st.one_of(
                st.sampled_from([b"HttpOnly", b"Secure", b"SameSite=Lax", b"Max-Age=5"]),
                st.binary(max_size=20).map(lambda b: b"Path=" + b.replace(b";", b"")),
                st.binary(max_size=20).map(lambda b: b" domain=" + b.replace(b";", b"")),
            ),
            max_size=6,
        ),
        st.sampled_from([SERVER, PORT, SUB]),
    )
    def test_properties(self, attributes: list[bytes], route: Route) -> None:
        value = b";".join([b"n=v", *attributes])
        out = rewrite_set_cookie(value, route=route)
        assert out is not None
        parts = out.split(b";")
        self.assertEqual(parts[0], b"n=v")
        for attribute in parts[1:]:
            name, _, attr_value = attribute.partition(b"=")
            self.assertNotEqual(name.strip().lower(), b"domain")
            if name.strip().lower() == b"path" and not route.subdomain:
                path = attr_value.strip()
                self.assertTrue(path == route.prefix or path.startswith(route.prefix + b"/"), path)


class ResponseHeaders(unittest.TestCase):
    def test_policy(self) -> None:
        out = client_response_headers(
            [
                (b"Connection", b"close, X-Hop"),
                (b"X-Hop", b"1"),
                (b"Transfer-Encoding", b"chunked"),
                (b"Keep-Alive", b"timeout=5"),
                (b"Set-Cookie", b"a=1; Path=/"),
                (b"Set-Cookie", b"b=2; Domain=example.com"),
                (b"Set-Cookie", b"cocalcproxy_session=evil"),
                (b"Vary", b"Accept"),
                (b"Vary", b"Cookie"),
                (b"Location", b"/next"),
                (b"Content-Encoding", b"gzip"),
                (b"Content-Length", b"10"),
                (b"Alt-Svc", b'h2=":9999"'),
                (b"Clear-Site-Data", b'"cookies"'),
                (b"Upgrade", b"h2c"),
            ],
            route=SERVER,
            project_host="127.0.0.1",
            proxy_hosts=[b"proxy.example:8443"],
        )
        self.assertEqual(values(out, b"set-cookie"), [b"a=1; Path=" + SP + b"/", b"b=2"])
        self.assertEqual(values(out, b"vary"), [b"Accept", b"Cookie"])
        self.assertEqual(values(out, b"location"), [SP + b"/next"])
        self.assertEqual(values(out, b"content-encoding"), [b"gzip"])
        self.assertEqual(values(out, b"content-length"), [b"10"])
        for gone in (
            b"connection",
            b"x-hop",
            b"transfer-encoding",
            b"keep-alive",
            b"alt-svc",
            b"clear-site-data",
            b"upgrade",
        ):
            self.assertEqual(values(out, gone), [], gone)

    def test_service_worker_scope_never_widened_on_the_shared_origin(self) -> None:
        backend = [(b"Service-Worker-Allowed", b"/"), (b"Content-Type", b"text/javascript")]
        for route in (SERVER, PORT):
            out = client_response_headers(backend, route=route, project_host="127.0.0.1")
            self.assertEqual(values(out, b"service-worker-allowed"), [], route.kind)
            self.assertEqual(values(out, b"content-type"), [b"text/javascript"])
        out = client_response_headers(backend, route=SUB, project_host="127.0.0.1")
        self.assertEqual(values(out, b"service-worker-allowed"), [b"/"], "own origin: allowed")

    def test_reporting_headers_only_on_a_project_subdomain(self) -> None:
        # Issue #11 item 2: NEL / Report-To / Reporting-Endpoints act on the whole origin.
        backend = [
            (b"NEL", b'{"report_to":"x","max_age":31536000,"include_subdomains":true}'),
            (b"Report-To", b'{"group":"x","max_age":31536000,"endpoints":[{"url":"https://e"}]}'),
            (b"Reporting-Endpoints", b'x="https://e"'),
            (b"Set-Cookie2", b"cocalcproxy_session=x"),
            (b"Content-Type", b"text/html"),
        ]
        for route in (SERVER, PORT):
            out = client_response_headers(backend, route=route, project_host="127.0.0.1")
            self.assertEqual(names(out), [b"content-type"], route.kind)
        out = client_response_headers(backend, route=SUB, project_host="127.0.0.1")
        self.assertEqual(
            names(out), [b"nel", b"report-to", b"reporting-endpoints", b"content-type"]
        )

    def test_websocket_101(self) -> None:
        out = client_response_headers(
            [
                (b"Upgrade", b"websocket"),
                (b"Connection", b"Upgrade"),
                (b"Sec-WebSocket-Accept", b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
                (b"Sec-WebSocket-Protocol", b"chat"),
            ],
            route=SERVER,
            project_host="127.0.0.1",
            websocket=True,
        )
        self.assertEqual(values(out, b"upgrade"), [b"websocket"])
        self.assertEqual(values(out, b"connection"), [b"Upgrade"])
        self.assertEqual(values(out, b"sec-websocket-accept"), [b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="])
        self.assertEqual(values(out, b"sec-websocket-protocol"), [b"chat"])
