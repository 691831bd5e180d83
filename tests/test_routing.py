"""routing.parse: every form of the contract, every edge, and properties over generated input."""

from __future__ import annotations

import uuid

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from cocalcproxy.http.routing import MAX_TARGET, NotFound, OwnPage, Redirect, Route, parse

PID = "0b0e5c1a-3d4f-4a5b-8c6d-7e8f9a0b1c2d"
P = PID.encode()

pids = st.uuids().map(lambda u: str(u))
ports = st.integers(min_value=1, max_value=65535)
# Visible ASCII without '?' and '#': the characters a path after the prefix may hold.
path_chars = st.sampled_from([chr(c) for c in range(0x21, 0x7F) if chr(c) not in "?#"])
rests = st.text(path_chars, max_size=60).map(lambda s: ("/" + s).encode())
queries = st.one_of(
    st.just(b""),
    st.text(st.sampled_from([chr(c) for c in range(0x21, 0x7F) if chr(c) != "#"]), max_size=40).map(
        lambda s: ("?" + s).encode()
    ),
)


class MainHostForms(unittest.TestCase):
    def test_server_strips_prefix(self) -> None:
        r = parse(b"localhost", b"/" + P + b"/server/8888/lab/tree?x=1&y=%20")
        self.assertEqual(
            r, Route(PID, "server", 8888, b"/" + P + b"/server/8888", b"/lab/tree?x=1&y=%20")
        )

    def test_port_keeps_whole_target(self) -> None:
        target = b"/" + P + b"/port/3000/a/b?q"
        r = parse(b"localhost", target)
        self.assertEqual(r, Route(PID, "port", 3000, b"/" + P + b"/port/3000", target))

    def test_server_root(self) -> None:
        r = parse(None, b"/" + P + b"/server/1/")
        assert isinstance(r, Route)
        self.assertEqual(r.backend_target, b"/")
        self.assertEqual((r.path, r.query), (b"/", b""))

    def test_server_root_with_query(self) -> None:
        r = parse(None, b"/" + P + b"/server/80/?a=b")
        assert isinstance(r, Route)
        self.assertEqual(r.backend_target, b"/?a=b")
        self.assertEqual((r.path, r.query), (b"/", b"?a=b"))

    def test_missing_slash_redirects_keeping_query(self) -> None:
        for kind in (b"server", b"port"):
            self.assertEqual(
                parse(None, b"/" + P + b"/" + kind + b"/8888"),
                Redirect(b"/" + P + b"/" + kind + b"/8888/"),
            )
            self.assertEqual(
                parse(None, b"/" + P + b"/" + kind + b"/8888?a=1"),
                Redirect(b"/" + P + b"/" + kind + b"/8888/?a=1"),
            )

    def test_raw(self) -> None:
        r = parse(None, b"/" + P + b"/raw/dir/a%20b.txt?download")
        self.assertEqual(r, Route(PID, "raw", None, b"/" + P + b"/raw", b"/dir/a%20b.txt?download"))
        self.assertEqual(parse(None, b"/" + P + b"/raw"), Redirect(b"/" + P + b"/raw/"))
        self.assertEqual(parse(None, b"/" + P + b"/raw?x"), Redirect(b"/" + P + b"/raw/?x"))
        r = parse(None, b"/" + P + b"/raw/")
        assert isinstance(r, Route)
        self.assertEqual(r.backend_target, b"/")

    def test_raw_traversal_is_404(self) -> None:
        for rest in (
            b"/..",
            b"/../etc/passwd",
            b"/a/../../b",
            b"/%2e%2e/x",
            b"/%2E%2e",
            b"/.%2e/x",
            b"/./x",
            b"/a%2fb",
            b"/a%2F..",
            b"/a%00b",
            b"/a%5cb",
            b"/a\\b",
        ):
            self.assertIsInstance(parse(None, b"/" + P + b"/raw" + rest), NotFound, repr(rest))

    def test_own_pages(self) -> None:
        self.assertEqual(parse(None, b"/"), OwnPage("index"))
        self.assertEqual(parse(None, b"/?next=x"), OwnPage("index"))
        self.assertEqual(parse(None, b"/_/login?next=%2F"), OwnPage("login"))
        self.assertEqual(parse(None, b"/_/logout"), OwnPage("logout"))
        self.assertEqual(parse(None, b"/_/health"), OwnPage("health"))
        self.assertEqual(parse(None, b"/_/static/style.css"), OwnPage("static", b"style.css"))

    def test_own_page_edges_are_404(self) -> None:
        for target in (
            b"/_/",
            b"/_/login/",
            b"/_/nothing",
            b"/_/static/",
            b"/_/static/../x",
            b"/_/static/a/b.css",
            b"/_/static/.hidden",
            b"/_/static/%2e%2e",
            b"/_/static/a..b",
        ):
            self.assertIsInstance(parse(None, target), NotFound, repr(target))


class MainHostRefusals(unittest.TestCase):
    def test_pid_must_be_canonical(self) -> None:
        for pid in (
            PID.upper().encode(),
            PID.replace("-", "").encode(),
            b"{" + P + b"}",
            P[:-1],
            P + b"0",
            b"not-a-project",
            P.replace(b"0", b"%30", 1),
        ):
            self.assertIsInstance(parse(None, b"/" + pid + b"/server/8888/"), NotFound, repr(pid))

    def test_port_must_be_plain_decimal_in_range(self) -> None:
        for port in (
            b"0",
            b"00",
            b"08888",
            b"65536",
            b"99999",
            b"123456",
            b"+80",
            b"-1",
            b"8o",
            b"%38%30",
            b"",
            b" 80",
            b"80 ",
            b"0x50",
        ):
            self.assertIsInstance(
                parse(None, b"/" + P + b"/server/" + port + b"/"), NotFound, repr(port)
            )
        self.assertIsInstance(parse(None, b"/" + P + b"/server/65535/"), Route)
        self.assertIsInstance(parse(None, b"/" + P + b"/port/1/"), Route)

    def test_prefix_tricks_are_404(self) -> None:
        for target in (
            b"//" + P + b"/server/8888/",
            b"/" + P + b"//server/8888/",
            b"/" + P + b"/server//8888/",
            b"/" + P + b"/./server/8888/",
            b"/x/../" + P + b"/server/8888/",
            b"/" + P + b"/server/8888%2f",
            b"/" + P + b"/server/8888%2F",
            b"/" + P + b"%2fserver%2f8888/",
            b"/" + P + b"/%73erver/8888/",
            b"/" + P + b"/Server/8888/",
            b"/" + P + b"/server/8888;x/",
            b"/" + P + b"/server/8888.",
            b"/" + P + b"/other/8888/",
            b"/" + P + b"/raw.txt",
            b"/" + P,
            b"/" + P + b"/",
        ):
            self.assertIsInstance(parse(None, target), NotFound, repr(target))

    def test_non_origin_targets_are_404(self) -> None:
        for target in (
            b"http://evil.example/" + P + b"/server/8888/",
            b"https://localhost/" + P + b"/server/8888/",
            b"localhost:8888",
            b"*",
            b"",
        ):
            self.assertIsInstance(parse(b"localhost", target), NotFound, repr(target))

    def test_bad_bytes_are_404(self) -> None:
        base = b"/" + P + b"/server/8888/"
        for bad in (b"\x00", b" ", b"\t", b"\r", b"\n", b"\x7f", b"\x80", "é".encode(), b"#frag"):
            self.assertIsInstance(parse(None, base + b"a" + bad), NotFound, repr(bad))

    def test_over_long_target_is_404(self) -> None:
        base = b"/" + P + b"/server/8888/"
        self.assertIsInstance(parse(None, base + b"a" * (MAX_TARGET - len(base))), Route)
        self.assertIsInstance(parse(None, base + b"a" * (MAX_TARGET - len(base) + 1)), NotFound)

    def test_after_prefix_is_opaque_and_byte_for_byte(self) -> None:
        """Dot segments, %2f, doubled slashes after the prefix only ever reach the same backend."""
        for rest in (b"/../../etc/passwd", b"/a%2fb", b"//x", b"/%2e%2e/", b"/a/./b", b"/;x"):
            r = parse(None, b"/" + P + b"/server/8888" + rest + b"?q=%00")
            assert isinstance(r, Route)
            self.assertEqual((r.project_id, r.port), (PID, 8888))
            self.assertEqual(r.backend_target, rest + b"?q=%00")

    def test_host_does_not_steer_main_host_routes(self) -> None:
        target = b"/" + P + b"/server/8888/x"
        expected = parse(None, target)
        for host in (b"evil.example", b"127.0.0.1:22", b"[::1]:8888", b"projects.example", b""):
            self.assertEqual(parse(host, target), expected)
            self.assertEqual(parse(host, target, "projects.example"), expected)
        # Under the project domain, a host that names no project route is 404, not the main host.
        self.assertIsInstance(
            parse(b"other-1.projects.example", target, "projects.example"), NotFound
        )


class Subdomains(unittest.TestCase):
    def test_port_subdomain(self) -> None:
        r = parse(P + b"-8888.projects.example", b"/a/b?c", "projects.example")
        self.assertEqual(r, Route(PID, "port", 8888, b"", b"/a/b?c", subdomain=True))
        r = parse(P + b"-8888.PROJECTS.example:8443", b"/", "projects.example")
        self.assertEqual(r, Route(PID, "port", 8888, b"", b"/", subdomain=True))

    def test_raw_subdomain(self) -> None:
        r = parse(P + b"-raw.projects.example", b"/f.txt", "projects.example")
        self.assertEqual(r, Route(PID, "raw", None, b"", b"/f.txt", subdomain=True))
        self.assertIsInstance(
            parse(P + b"-raw.projects.example", b"/../x", "projects.example"), NotFound
        )

    def test_bad_subdomains_are_404(self) -> None:
        for label in (
            P + b"-0",
            P + b"-08888",
            P + b"-65536",
            P + b"-x",
            b"www",
            P,
            b"a." + P + b"-80",
        ):
            self.assertIsInstance(
                parse(label + b".projects.example", b"/", "projects.example"), NotFound, repr(label)
            )

    def test_main_host_under_the_project_domain_stays_the_main_host(self) -> None:
        main = "proxy.example.org"
        self.assertEqual(parse(b"proxy.example.org", b"/", "example.org", main), OwnPage("index"))
        self.assertEqual(
            parse(b"Proxy.Example.org.:8443", b"/_/login?next=/", "example.org", main),
            OwnPage("login"),
        )
        route = parse(b"proxy.example.org", f"/{PID}/server/80/x".encode(), "example.org", main)
        self.assertIsInstance(route, Route)
        self.assertFalse(route.subdomain)
        r = parse(P + b"-80.example.org", b"/", "example.org", main)
        self.assertEqual(r, Route(PID, "port", 80, b"", b"/", subdomain=True))
        self.assertIsInstance(parse(b"www.example.org", b"/", "example.org", main), NotFound)
        # Without knowing the main host it would have been taken for a (bad) project host.
        self.assertIsInstance(parse(b"proxy.example.org", b"/", "example.org"), NotFound)

    def test_host_names_are_case_insensitive(self) -> None:
        r = parse(P.upper() + b"-80.Projects.Example.", b"/", "projects.example")
        self.assertEqual(r, Route(PID, "port", 80, b"", b"/", subdomain=True))

    def test_main_host_still_works_with_project_domain(self) -> None:
        self.assertEqual(parse(b"projects.example", b"/", "projects.example"), OwnPage("index"))
        self.assertEqual(parse(b"proxy.example", b"/_/login", "projects.example"), OwnPage("login"))

    def test_without_project_domain_subdomains_are_main_host(self) -> None:
        self.assertEqual(parse(P + b"-8888.projects.example", b"/"), OwnPage("index"))


class Properties(unittest.TestCase):
    @settings(max_examples=300, deadline=None)
    @given(pids, ports, rests, queries)
    def test_server_form(self, pid: str, port: int, rest: bytes, query: bytes) -> None:
        prefix = f"/{pid}/server/{port}".encode()
        r = parse(b"localhost", prefix + rest + query)
        self.assertEqual(r, Route(pid, "server", port, prefix, rest + query))

    @settings(max_examples=300, deadline=None)
    @given(pids, ports, rests, queries)
    def test_port_form(self, pid: str, port: int, rest: bytes, query: bytes) -> None:
        prefix = f"/{pid}/port/{port}".encode()
        r = parse(b"localhost", prefix + rest + query)
        self.assertEqual(r, Route(pid, "port", port, prefix, prefix + rest + query))

    @settings(max_examples=200, deadline=None)
    @given(pids, ports, st.sampled_from([b"server", b"port"]), queries)
    def test_missing_slash(self, pid: str, port: int, kind: bytes, query: bytes) -> None:
        prefix = f"/{pid}/".encode() + kind + f"/{port}".encode()
        self.assertEqual(parse(None, prefix + query), Redirect(prefix + b"/" + query))

    @settings(max_examples=500, deadline=None)
    @given(st.binary(max_size=200), st.one_of(st.none(), st.binary(max_size=40)))
    def test_never_raises_and_routes_are_sane(self, target: bytes, host: bytes | None) -> None:
        for t in (target, b"/" + target, b"/" + P + b"/server/8888" + target):
            r = parse(host, t, "projects.example")
            self.assertIsInstance(r, (Route, OwnPage, Redirect, NotFound))
            if isinstance(r, Route):
                self.assertEqual(str(uuid.UUID(r.project_id)), r.project_id)
                if r.kind != "raw":
                    assert r.port is not None
                    self.assertTrue(1 <= r.port <= 65535)
                self.assertTrue(r.backend_target.startswith(b"/"))
                self.assertTrue(t.endswith(r.backend_target))
                self.assertTrue(all(0x21 <= c <= 0x7E for c in r.backend_target))
            if isinstance(r, Redirect):
                self.assertTrue(r.location.startswith(b"/"))
                self.assertFalse(r.location.startswith(b"//"))

    @settings(max_examples=300, deadline=None)
    @given(st.text(max_size=8).map(str.encode), ports)
    def test_anything_but_a_canonical_uuid_is_404(self, junk: bytes, port: int) -> None:
        pid = P[: len(P) // 2] + junk
        if pid == P:
            return
        r = parse(None, b"/" + pid + f"/server/{port}/".encode())
        self.assertIsInstance(r, NotFound)
