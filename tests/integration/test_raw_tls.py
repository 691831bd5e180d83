"""The raw file server end to end: the whole proxy on real TLS, the real directory (SQLite),
the real guard with Basic credentials, treq, byte-exact TLS requests and curl."""

from __future__ import annotations

import base64
import hashlib
import json
import os
from typing import Any

from twisted.internet import defer, reactor, ssl
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial import unittest

from tests.rawsupport import Exchange, parse_response, request_bytes
from tests.support import https_client, start_proxy

SECRET = b"TOP SECRET outside the home"


def basic(name: str, password: str) -> bytes:
    return b"Basic " + base64.b64encode(f"{name}:{password}".encode())


class RawOverTLS(unittest.TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def]
        base = os.path.abspath(self.mktemp())
        self.home = os.path.join(base, "home")
        self.outside = os.path.join(base, "outside")
        os.makedirs(os.path.join(self.home, "docs"))
        os.makedirs(self.outside)
        with open(os.path.join(self.outside, "secret.txt"), "wb") as f:
            f.write(SECRET)
        self.write("hello.txt", b"hello over TLS\n")
        self.write("docs/<img src=x onerror=alert(1)> & ✓.md", b"# odd name\n")
        os.symlink(os.path.join(self.outside, "secret.txt"), os.path.join(self.home, "leak"))
        os.symlink(self.outside, os.path.join(self.home, "leak-dir"))
        os.symlink("loop", os.path.join(self.home, "loop"))
        os.mkfifo(os.path.join(self.home, "pipe"))

        self.proxy = yield start_proxy(self)
        directory = self.proxy.directory
        yield directory.add_user("alice", "alice-password")
        yield directory.add_user("carol", "carol-password")
        yield directory.add_user("mallory", "mallory-password")
        project = yield directory.add_project("alice", home=self.home, title="files")
        yield directory.add_collaborator(project.id, "carol")
        bare = yield directory.add_project("alice", title="no home")
        self.pid, self.bare_pid = project.id, bare.id
        self.http = https_client(self, self.proxy.cert_path)

    def write(self, rel: str, data: bytes) -> str:
        path = os.path.join(self.home, rel)
        with open(path, "wb") as f:
            f.write(data)
        return path

    def url(self, rest: str, pid: str | None = None) -> str:
        return f"{self.proxy.url}/{pid or self.pid}/raw{rest}"

    @defer.inlineCallbacks
    def get(self, rest: str, who: tuple[str, str] | None = ("alice", "alice-password"), **kw: Any):  # type: ignore[no-untyped-def]
        headers = dict(kw.pop("headers", {}))
        if who is not None:
            headers["Authorization"] = basic(*who).decode()
        response = yield self.http.request(
            kw.pop("method", "GET"), self.url(rest, kw.pop("pid", None)), headers=headers,
            allow_redirects=False, **kw,
        )  # fmt: skip
        body = yield response.content()
        return response, body

    @defer.inlineCallbacks
    def exact(self, target: bytes, headers: dict[bytes, bytes] | None = None):  # type: ignore[no-untyped-def]
        """Send a request-target byte for byte over TLS (clients would normalise ``..``)."""
        with open(self.proxy.cert_path, "rb") as f:
            authority = ssl.Certificate.loadPEM(f.read())
        endpoint = wrapClientTLS(
            ssl.optionsForClientTLS("localhost", trustRoot=authority),
            TCP4ClientEndpoint(reactor, "127.0.0.1", self.proxy.port),
        )
        all_headers = {b"Authorization": basic("alice", "alice-password"), **(headers or {})}
        exchange = yield connectProtocol(
            endpoint, Exchange(request_bytes(b"GET", target, all_headers))
        )
        raw = yield exchange.closed
        return parse_response(raw)

    @defer.inlineCallbacks
    def curl(self, *args: str):  # type: ignore[no-untyped-def]
        out, err, code = yield getProcessOutputAndValue(
            "curl",
            ["--silent", "--show-error", "--cacert", self.proxy.cert_path,
             "--user", "alice:alice-password", *args],
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        )  # fmt: skip
        self.assertEqual(code, 0, err)
        return out

    # -- who gets in --------------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_owner_and_collaborator_read_files(self):  # type: ignore[no-untyped-def]
        for who in (("alice", "alice-password"), ("carol", "carol-password")):
            response, body = yield self.get("/hello.txt", who)
            self.assertEqual((response.code, body), (200, b"hello over TLS\n"), who)
            h = response.headers
            self.assertEqual(h.getRawHeaders(b"content-type"), [b"text/plain; charset=utf-8"])
            self.assertEqual(h.getRawHeaders(b"x-content-type-options"), [b"nosniff"])
            self.assertEqual(h.getRawHeaders(b"content-security-policy"), [b"sandbox"])
            self.assertEqual(len(h.getRawHeaders(b"etag", [])), 1)

    @defer.inlineCallbacks
    def test_outsider_refused(self):  # type: ignore[no-untyped-def]
        response, body = yield self.get("/hello.txt", ("mallory", "mallory-password"))
        self.assertEqual(response.code, 404)
        self.assertNotIn(b"hello", body)
        listing, body = yield self.get("/", ("mallory", "mallory-password"))
        self.assertEqual(listing.code, 404)
        self.assertNotIn(b"hello.txt", body)

    @defer.inlineCallbacks
    def test_anonymous_refused(self):  # type: ignore[no-untyped-def]
        response, body = yield self.get("/hello.txt", None)
        self.assertEqual(response.code, 401)
        self.assertNotIn(b"hello", body)
        browser, _ = yield self.get("/hello.txt", None, headers={"Accept": "text/html"})
        self.assertEqual(browser.code, 302)
        wrong, _ = yield self.get("/hello.txt", ("alice", "not-her-password"))
        self.assertEqual(wrong.code, 401)

    # -- what is served -----------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_listings(self):  # type: ignore[no-untyped-def]
        page, body = yield self.get("/docs/", headers={"Accept": "text/html"})
        self.assertEqual(page.code, 200)
        self.assertNotIn(b"<img", body)
        self.assertIn("&lt;img src=x onerror=alert(1)&gt; &amp; ✓.md".encode(), body)
        doc, body = yield self.get("/docs/", headers={"Accept": "application/json"})
        entries = json.loads(body)["entries"]
        self.assertEqual([e["name"] for e in entries], ["<img src=x onerror=alert(1)> & ✓.md"])
        # the link in the listing fetches the file
        response, content = yield self.get("/docs/" + entries[0]["href"])
        self.assertEqual((response.code, content), (200, b"# odd name\n"))

    @defer.inlineCallbacks
    def test_folder_redirect(self):  # type: ignore[no-untyped-def]
        response, _ = yield self.get("/docs?sort=name")
        self.assertEqual(response.code, 301)
        self.assertEqual(
            response.headers.getRawHeaders(b"location"),
            [f"/{self.pid}/raw/docs/?sort=name".encode()],
        )
        bare = yield self.http.get(f"{self.proxy.url}/{self.pid}/raw", allow_redirects=False)
        yield bare.content()
        self.assertEqual(bare.headers.getRawHeaders(b"location"), [f"/{self.pid}/raw/".encode()])

    @defer.inlineCallbacks
    def test_conditional_and_download(self):  # type: ignore[no-untyped-def]
        first, _ = yield self.get("/hello.txt")
        etag = first.headers.getRawHeaders(b"etag")[0].decode()
        again, body = yield self.get("/hello.txt", headers={"If-None-Match": etag})
        self.assertEqual((again.code, body), (304, b""))
        response, _ = yield self.get("/hello.txt?download")
        self.assertEqual(
            response.headers.getRawHeaders(b"content-disposition"),
            [b"attachment; filename=\"hello.txt\"; filename*=UTF-8''hello.txt"],
        )

    @defer.inlineCallbacks
    def test_head_and_methods(self):  # type: ignore[no-untyped-def]
        head, body = yield self.get("/hello.txt", method="HEAD")
        self.assertEqual((head.code, body), (200, b""))
        self.assertEqual(head.headers.getRawHeaders(b"content-length"), [b"15"])
        put, _ = yield self.get("/hello.txt", method="PUT", data=b"overwrite")
        self.assertEqual(put.code, 405)
        self.assertEqual(put.headers.getRawHeaders(b"allow"), [b"GET, HEAD"])
        with open(os.path.join(self.home, "hello.txt"), "rb") as f:
            self.assertEqual(f.read(), b"hello over TLS\n")

    @defer.inlineCallbacks
    def test_project_without_home(self):  # type: ignore[no-untyped-def]
        response, body = yield self.get("/", pid=self.bare_pid, headers={"Accept": "text/html"})
        self.assertEqual(response.code, 404)
        self.assertIn(b"This project has no home directory configured.", body)

    @defer.inlineCallbacks
    def test_fifo_does_not_hang_the_proxy(self):  # type: ignore[no-untyped-def]
        response, _ = yield self.get("/pipe")
        self.assertEqual(response.code, 403)
        after, body = yield self.get("/hello.txt")
        self.assertEqual((after.code, body), (200, b"hello over TLS\n"))

    # -- traversal over the wire ----------------------------------------------------------------

    @defer.inlineCallbacks
    def test_traversal_matrix(self):  # type: ignore[no-untyped-def]
        prefix = f"/{self.pid}/raw".encode()
        attacks = [
            b"/../../outside/secret.txt", b"/docs/../../outside/secret.txt",
            b"/%2e%2e/outside/secret.txt", b"/%2E%2e/%2e%2E/outside/secret.txt",
            b"/%252e%252e/outside/secret.txt", b"/..%2foutside%2fsecret.txt",
            b"/%2e%2e%2f%2e%2e%2fetc%2fpasswd", b"/..\\outside\\secret.txt",
            b"/..%5c..%5coutside%5csecret.txt", b"/hello.txt%00", b"/%00/x",
            b"//etc/passwd", b"/%2fetc/passwd", b"/leak", b"/leak-dir/secret.txt",
            b"/leak-dir/", b"/loop", b"/loop/x",
        ]  # fmt: skip
        for attack in attacks:
            r = yield self.exact(prefix + attack)
            self.assertIn(r.status, (400, 404), attack)
            self.assertNotIn(SECRET, r.raw, attack)
            self.assertNotIn(b"root:", r.raw, attack)
            self.assertNotIn(self.outside.encode(), r.raw, attack)
            self.assertNotIn(self.home.encode(), r.raw, attack)
        # the same connection style does read a legitimate file, so the refusals above are real
        ok = yield self.exact(prefix + b"/hello.txt")
        self.assertEqual((ok.status, ok.body), (200, b"hello over TLS\n"))

    # -- curl: ranges, a big sparse file, a full download ------------------------------------------

    @defer.inlineCallbacks
    def test_curl_ranges_on_a_two_gigabyte_sparse_file(self):  # type: ignore[no-untyped-def]
        size = 2 * 1024**3 + 3
        self.addCleanup(os.remove, os.path.join(self.home, "disk.img"))
        with open(os.path.join(self.home, "disk.img"), "wb") as f:
            os.truncate(f.fileno(), size)
            os.pwrite(f.fileno(), b"HEAD", 0)
            os.pwrite(f.fileno(), b"TAIL", size - 4)
        url = self.url("/disk.img")
        out = yield self.curl("--range", "-4", url)
        self.assertEqual(out, b"TAIL")
        out = yield self.curl("--range", "0-3", "--dump-header", "-", url)
        self.assertIn(b"HTTP/1.1 206", out)
        self.assertIn(b"Content-Range: bytes 0-3/%d" % size, out)
        self.assertTrue(out.endswith(b"\r\n\r\nHEAD"))
        out = yield self.curl("--range", f"0-1,{size - 5}-", "--dump-header", "-", url)
        self.assertIn(b"multipart/byteranges; boundary=", out)
        self.assertIn(b"Content-Range: bytes 0-1/%d\r\n\r\nHE\r\n" % size, out)
        self.assertIn(
            b"Content-Range: bytes %d-%d/%d\r\n\r\n\0TAIL\r\n" % (size - 5, size - 1, size), out
        )
        out = yield self.curl("--head", url)
        self.assertIn(b"Content-Length: %d" % size, out)

    @defer.inlineCallbacks
    def test_curl_full_download_is_exact(self):  # type: ignore[no-untyped-def]
        data = os.urandom(8 * 1024 * 1024 + 3)
        self.write("blob.bin", data)
        target = os.path.join(self.outside, "downloaded")
        yield self.curl("--output", target, self.url("/blob.bin"))
        with open(target, "rb") as f:
            self.assertEqual(hashlib.sha256(f.read()).digest(), hashlib.sha256(data).digest())
