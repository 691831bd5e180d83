"""RawHandler driven over a real loopback socket: files, listings, HTTP semantics, traversal."""

from __future__ import annotations

import json
import os
import re
import time

from twisted.internet import defer, reactor
from twisted.trial import unittest

from cocalcproxy.handlers import rawhttp
from cocalcproxy.handlers.raw import FileSender, RawHandler
from tests.rawsupport import PREFIX, RawSiteCase, parse_response, poll

HELLO = b"Hello, raw world!\n"


class Tree(RawSiteCase):
    """A home with a few files and folders; a secret next to it, outside."""

    def setUp(self) -> None:
        base = os.path.abspath(self.mktemp())
        self.home = os.path.join(base, "home")
        self.outside = os.path.join(base, "outside")
        os.makedirs(os.path.join(self.home, "docs", "sub"))
        os.makedirs(self.outside)
        self.put("hello.txt", HELLO)
        self.put("docs/note.md", b"# note\n")
        with open(os.path.join(self.outside, "secret.txt"), "wb") as f:
            f.write(b"TOP SECRET")
        self.start()

    def put(self, rel: str, data: bytes) -> str:
        assert self.home is not None
        path = os.path.join(self.home, rel)
        with open(path, "wb") as f:
            f.write(data)
        return path

    def assert_raw_headers(self, response: object) -> None:
        from tests.rawsupport import Response

        assert isinstance(response, Response)
        self.assertEqual(response.header(b"x-content-type-options"), b"nosniff")
        csp = response.header(b"content-security-policy") or b""
        self.assertIn(b"sandbox", csp)


class Files(Tree):
    @defer.inlineCallbacks
    def test_get(self):  # type: ignore[no-untyped-def]
        r = yield self.fetch(b"/hello.txt")
        self.assertEqual(r.status, 200)
        self.assertEqual(r.body, HELLO)
        self.assertEqual(r.header(b"content-type"), b"text/plain; charset=utf-8")
        self.assertEqual(r.header(b"content-length"), b"%d" % len(HELLO))
        self.assertEqual(r.header(b"accept-ranges"), b"bytes")
        self.assertEqual(r.header(b"cache-control"), b"private, no-cache")
        self.assertEqual(r.header(b"content-security-policy"), b"sandbox")
        self.assertIsNone(r.header(b"content-disposition"))
        st = os.stat(os.path.join(self.home or "", "hello.txt"))
        self.assertEqual(
            r.header(b"etag"), rawhttp.etag_for(st.st_ino, st.st_size, st.st_mtime_ns).encode()
        )
        self.assertEqual(r.header(b"last-modified"), rawhttp.http_date(st.st_mtime).encode())
        self.assert_raw_headers(r)

    @defer.inlineCallbacks
    def test_head(self):  # type: ignore[no-untyped-def]
        get = yield self.fetch(b"/hello.txt")
        head = yield self.fetch(b"/hello.txt", b"HEAD")
        self.assertEqual(head.status, 200)
        self.assertEqual(head.body, b"")
        for name in (b"content-length", b"content-type", b"etag", b"last-modified"):
            self.assertEqual(head.header(name), get.header(name))

    @defer.inlineCallbacks
    def test_head_on_listing_and_errors(self):  # type: ignore[no-untyped-def]
        listing = yield self.fetch(b"/", b"HEAD")
        self.assertEqual((listing.status, listing.body), (200, b""))
        self.assertGreater(int(listing.header(b"content-length") or 0), 0)
        missing = yield self.fetch(b"/nope", b"HEAD")
        self.assertEqual((missing.status, missing.body), (404, b""))

    @defer.inlineCallbacks
    def test_download(self):  # type: ignore[no-untyped-def]
        self.put("Grüße & <b>.txt", b"x")
        r = yield self.fetch(b"/Gr%C3%BC%C3%9Fe%20%26%20%3Cb%3E.txt?download")
        self.assertEqual(r.status, 200)
        self.assertEqual(
            r.header(b"content-disposition"),
            b'attachment; filename="Gr__e & <b>.txt"; '
            b"filename*=UTF-8''Gr%C3%BC%C3%9Fe%20&%20%3Cb%3E.txt",
        )
        other = yield self.fetch(b"/hello.txt?x=1&download=yes")
        self.assertTrue((other.header(b"content-disposition") or b"").startswith(b"attachment;"))

    @defer.inlineCallbacks
    def test_names_with_spaces_and_unicode(self):  # type: ignore[no-untyped-def]
        self.put("a b ✓.txt", b"unicode")
        r = yield self.fetch(b"/a%20b%20%E2%9C%93.txt")
        self.assertEqual((r.status, r.body), (200, b"unicode"))

    @defer.inlineCallbacks
    def test_double_encoded_name_is_a_literal_name(self):  # type: ignore[no-untyped-def]
        self.put("%2e%2e", b"literal")
        r = yield self.fetch(b"/%252e%252e")
        self.assertEqual((r.status, r.body), (200, b"literal"))

    @defer.inlineCallbacks
    def test_content_types(self):  # type: ignore[no-untyped-def]
        self.put("page.html", b"<script>alert(1)</script>")
        self.put("pic.svg", b"<svg/>")
        r = yield self.fetch(b"/page.html")
        self.assertEqual(r.header(b"content-type"), b"text/html; charset=utf-8")
        self.assertEqual(r.header(b"content-security-policy"), b"sandbox")
        r = yield self.fetch(b"/pic.svg")
        self.assertEqual(r.header(b"content-type"), b"image/svg+xml")
        self.assertEqual(r.header(b"content-security-policy"), b"sandbox")

    @defer.inlineCallbacks
    def test_empty_file(self):  # type: ignore[no-untyped-def]
        self.put("empty.txt", b"")
        r = yield self.fetch(b"/empty.txt")
        self.assertEqual((r.status, r.body, r.header(b"content-length")), (200, b"", b"0"))
        r = yield self.fetch(b"/empty.txt", headers={b"Range": b"bytes=0-"})
        self.assertEqual((r.status, r.header(b"content-range")), (416, b"bytes */0"))

    @defer.inlineCallbacks
    def test_large_file_streams_in_many_chunks(self):  # type: ignore[no-untyped-def]
        data = os.urandom(3 * 1024 * 1024 + 17)
        self.put("big.bin", data)
        r = yield self.fetch(b"/big.bin")
        self.assertEqual(r.status, 200)
        self.assertEqual(r.header(b"content-type"), b"application/octet-stream")
        self.assertEqual(r.body, data)

    @defer.inlineCallbacks
    def test_methods(self):  # type: ignore[no-untyped-def]
        for method in (b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH", b"PROPFIND"):
            r = yield self.fetch(b"/hello.txt", method)
            self.assertEqual(r.status, 405, method)
            self.assertEqual(r.header(b"allow"), b"GET, HEAD")
            self.assert_raw_headers(r)
        self.assertEqual(open(os.path.join(self.home or "", "hello.txt"), "rb").read(), HELLO)


class Conditional(Tree):
    @defer.inlineCallbacks
    def validators(self):  # type: ignore[no-untyped-def]
        r = yield self.fetch(b"/hello.txt")
        return r.header(b"etag"), r.header(b"last-modified")

    @defer.inlineCallbacks
    def test_if_none_match(self):  # type: ignore[no-untyped-def]
        etag, _ = yield self.validators()
        r = yield self.fetch(b"/hello.txt", headers={b"If-None-Match": etag})
        self.assertEqual((r.status, r.body), (304, b""))
        self.assertEqual(r.header(b"etag"), etag)
        self.assert_raw_headers(r)
        r = yield self.fetch(b"/hello.txt", b"HEAD", headers={b"If-None-Match": b'"x", ' + etag})
        self.assertEqual(r.status, 304)
        r = yield self.fetch(b"/hello.txt", headers={b"If-None-Match": b'"stale"'})
        self.assertEqual((r.status, r.body), (200, HELLO))

    @defer.inlineCallbacks
    def test_if_modified_since(self):  # type: ignore[no-untyped-def]
        _, last_modified = yield self.validators()
        r = yield self.fetch(b"/hello.txt", headers={b"If-Modified-Since": last_modified})
        self.assertEqual(r.status, 304)
        old = rawhttp.http_date(time.time() - 86400 * 400).encode()
        r = yield self.fetch(b"/hello.txt", headers={b"If-Modified-Since": old})
        self.assertEqual(r.status, 200)

    @defer.inlineCallbacks
    def test_changed_file_gets_a_new_etag(self):  # type: ignore[no-untyped-def]
        etag, _ = yield self.validators()
        path = os.path.join(self.home or "", "hello.txt")
        st = os.stat(path)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1000))
        r = yield self.fetch(b"/hello.txt", headers={b"If-None-Match": etag})
        self.assertEqual(r.status, 200)
        self.assertNotEqual(r.header(b"etag"), etag)

    @defer.inlineCallbacks
    def test_if_match(self):  # type: ignore[no-untyped-def]
        etag, _ = yield self.validators()
        r = yield self.fetch(b"/hello.txt", headers={b"If-Match": etag})
        self.assertEqual(r.status, 200)
        r = yield self.fetch(b"/hello.txt", headers={b"If-Match": b'"other"'})
        self.assertEqual(r.status, 412)


class Ranges(Tree):
    def setUp(self) -> None:
        super().setUp()
        self.data = bytes(range(256)) * 40  # 10240 bytes
        self.put("data.bin", self.data)

    @defer.inlineCallbacks
    def test_single(self):  # type: ignore[no-untyped-def]
        r = yield self.fetch(b"/data.bin", headers={b"Range": b"bytes=100-199"})
        self.assertEqual(r.status, 206)
        self.assertEqual(r.body, self.data[100:200])
        self.assertEqual(r.header(b"content-range"), b"bytes 100-199/10240")
        self.assertEqual(r.header(b"content-type"), b"application/octet-stream")
        r = yield self.fetch(b"/data.bin", headers={b"Range": b"bytes=-10"})
        self.assertEqual((r.status, r.body), (206, self.data[-10:]))

    @defer.inlineCallbacks
    def test_multiple(self):  # type: ignore[no-untyped-def]
        r = yield self.fetch(b"/data.bin", headers={b"Range": b"bytes=0-9, 5000-5099, -5"})
        self.assertEqual(r.status, 206)
        ctype = r.header(b"content-type") or b""
        m = re.fullmatch(rb"multipart/byteranges; boundary=([0-9a-f]{32})", ctype)
        assert m is not None, ctype
        boundary = m.group(1)
        parts = r.body.split(b"\r\n--" + boundary)
        self.assertEqual(parts[0], b"")
        self.assertEqual(parts[-1], b"--\r\n")
        got = []
        for part in parts[1:-1]:
            head, _, body = part.partition(b"\r\n\r\n")
            self.assertIn(b"Content-Type: application/octet-stream", head)
            span = re.search(rb"Content-Range: bytes (\d+)-(\d+)/10240", head)
            assert span is not None
            first, last = int(span.group(1)), int(span.group(2))
            self.assertEqual(body, self.data[first : last + 1])
            got.append((first, last))
        self.assertEqual(got, [(0, 9), (5000, 5099), (10235, 10239)])

    @defer.inlineCallbacks
    def test_multiple_with_tiny_chunks(self):  # type: ignore[no-untyped-def]
        """Part boundaries and chunk boundaries at odd places give the same bytes."""
        self.start(RawHandler(reactor, chunk_size=7))
        r = yield self.fetch(b"/data.bin", headers={b"Range": b"bytes=3-40,1000-1003"})
        self.assertEqual(r.status, 206)
        self.assertIn(b"\r\n\r\n" + self.data[3:41] + b"\r\n--", r.body)
        self.assertIn(b"\r\n\r\n" + self.data[1000:1004] + b"\r\n--", r.body)

    @defer.inlineCallbacks
    def test_unsatisfiable(self):  # type: ignore[no-untyped-def]
        r = yield self.fetch(b"/data.bin", headers={b"Range": b"bytes=20000-"})
        self.assertEqual(r.status, 416)
        self.assertEqual(r.header(b"content-range"), b"bytes */10240")
        self.assert_raw_headers(r)

    @defer.inlineCallbacks
    def test_invalid_range_ignored(self):  # type: ignore[no-untyped-def]
        r = yield self.fetch(b"/data.bin", headers={b"Range": b"bytes=9-1"})
        self.assertEqual((r.status, len(r.body)), (200, 10240))

    @defer.inlineCallbacks
    def test_head_ignores_range(self):  # type: ignore[no-untyped-def]
        r = yield self.fetch(b"/data.bin", b"HEAD", headers={b"Range": b"bytes=0-0"})
        self.assertEqual((r.status, r.header(b"content-length")), (200, b"10240"))

    @defer.inlineCallbacks
    def test_if_range(self):  # type: ignore[no-untyped-def]
        full = yield self.fetch(b"/data.bin")
        etag, last_modified = full.header(b"etag"), full.header(b"last-modified")
        for validator, status in ((etag, 206), (last_modified, 206), (b'"old"', 200)):
            r = yield self.fetch(
                b"/data.bin", headers={b"Range": b"bytes=0-1", b"If-Range": validator}
            )
            self.assertEqual(r.status, status, validator)

    @defer.inlineCallbacks
    def test_two_gigabyte_sparse_file(self):  # type: ignore[no-untyped-def]
        size = 2**31 + 5
        path = os.path.join(self.home or "", "sparse.img")
        self.addCleanup(os.remove, path)
        with open(path, "wb") as f:
            os.truncate(f.fileno(), size)
            os.pwrite(f.fileno(), b"START", 0)
            os.pwrite(f.fileno(), b"MIDDLE", 2**30)
            os.pwrite(f.fileno(), b"THE END", size - 7)
        head = yield self.fetch(b"/sparse.img", b"HEAD")
        self.assertEqual(head.header(b"content-length"), b"%d" % size)
        r = yield self.fetch(b"/sparse.img", headers={b"Range": b"bytes=-7"})
        self.assertEqual((r.status, r.body), (206, b"THE END"))
        self.assertEqual(r.header(b"content-range"), b"bytes %d-%d/%d" % (size - 7, size - 1, size))
        r = yield self.fetch(b"/sparse.img", headers={b"Range": b"bytes=2147483645-2147483651"})
        self.assertEqual(r.body, b"\0THE EN")
        r = yield self.fetch(
            b"/sparse.img", headers={b"Range": b"bytes=0-4,1073741824-1073741829,-3"}
        )
        self.assertEqual(r.status, 206)
        for piece in (b"\r\n\r\nSTART\r\n", b"\r\n\r\nMIDDLE\r\n", b"\r\n\r\nEND\r\n"):
            self.assertIn(piece, r.body)
        r = yield self.fetch(b"/sparse.img", headers={b"Range": b"bytes=%d-" % size})
        self.assertEqual(r.status, 416)


class Listings(Tree):
    def setUp(self) -> None:
        super().setUp()
        self.put("<script>alert(1)<\\script>.txt", b"")
        self.put("q\"uote's & amp.txt", b"")
        self.put("a:b?c#d%e.txt", b"1234")
        self.put("Zürich ✓.txt", b"")
        os.mkdir(os.path.join(self.home or "", "z folder"))

    @defer.inlineCallbacks
    def test_html(self):  # type: ignore[no-untyped-def]
        r = yield self.fetch(b"/", headers={b"Accept": b"text/html,*/*;q=0.8"})
        self.assertEqual(r.status, 200)
        self.assertEqual(r.header(b"content-type"), b"text/html; charset=utf-8")
        self.assertEqual(r.header(b"vary"), b"Accept")
        self.assert_raw_headers(r)
        page = r.body.decode()
        self.assertNotIn("<script>", page)
        self.assertIn("&lt;script&gt;alert(1)&lt;\\script&gt;.txt", page)
        self.assertIn('href="%3Cscript%3Ealert%281%29%3C%5Cscript%3E.txt"', page)
        self.assertIn('href="a%3Ab%3Fc%23d%25e.txt"', page)
        self.assertIn("q&quot;uote&#x27;s &amp; amp.txt", page)
        self.assertIn('href="q%22uote%27s%20%26%20amp.txt"', page)
        self.assertIn("Zürich ✓.txt", page)
        self.assertIn('href="z%20folder/"', page)
        # folders first
        self.assertLess(page.index('href="docs/"'), page.index('href="hello.txt"'))
        self.assertLess(page.index('href="z%20folder/"'), page.index('href="a%3Ab'))
        self.assertNotIn(self.home or "???", page)

    @defer.inlineCallbacks
    def test_listing_links_work(self):  # type: ignore[no-untyped-def]
        r = yield self.fetch(b"/", headers={b"Accept": b"application/json"})
        entries = {e["name"]: e for e in json.loads(r.body)["entries"]}
        link = entries["a:b?c#d%e.txt"]["href"].encode()
        got = yield self.fetch(b"/" + link)
        self.assertEqual((got.status, got.body), (200, b"1234"))

    @defer.inlineCallbacks
    def test_json(self):  # type: ignore[no-untyped-def]
        r = yield self.fetch(b"/docs/", headers={b"Accept": b"application/json"})
        self.assertEqual(r.status, 200)
        self.assertEqual(r.header(b"content-type"), b"application/json; charset=utf-8")
        doc = json.loads(r.body)
        self.assertEqual(doc["path"], "/docs/")
        self.assertEqual([e["name"] for e in doc["entries"]], ["sub", "note.md"])
        sub, note = doc["entries"]
        self.assertEqual((sub["type"], sub["href"], sub["size"]), ("directory", "sub/", None))
        self.assertEqual((note["type"], note["href"], note["size"]), ("file", "note.md", 7))
        self.assertRegex(note["modified"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
        self.assertFalse(doc["truncated"])

    @defer.inlineCallbacks
    def test_nested_html_has_parent_link(self):  # type: ignore[no-untyped-def]
        r = yield self.fetch(b"/docs/sub/", headers={b"Accept": b"text/html"})
        self.assertIn(b'href="../"', r.body)
        self.assertIn(b'<a href="../../">files</a>', r.body)

    @defer.inlineCallbacks
    def test_folder_without_slash_redirects_keeping_query(self):  # type: ignore[no-untyped-def]
        r = yield self.fetch(b"/docs?x=1&y=%20")
        self.assertEqual(r.status, 301)
        self.assertEqual(r.header(b"location"), PREFIX + b"/docs/?x=1&y=%20")
        self.assert_raw_headers(r)
        r = yield self.fetch(b"/z%20folder")
        self.assertEqual(r.header(b"location"), PREFIX + b"/z%20folder/")

    @defer.inlineCallbacks
    def test_empty_target_redirects_to_root(self):  # type: ignore[no-untyped-def]
        r = yield self.fetch(b"?a")
        self.assertEqual((r.status, r.header(b"location")), (301, PREFIX + b"/?a"))

    @defer.inlineCallbacks
    def test_index_html_is_not_served(self):  # type: ignore[no-untyped-def]
        self.put("docs/index.html", b"<h1>site</h1>")
        r = yield self.fetch(b"/docs/", headers={b"Accept": b"text/html"})
        self.assertIn(b'href="index.html"', r.body)
        self.assertNotIn(b"<h1>site</h1>", r.body)

    @defer.inlineCallbacks
    def test_file_with_slash_is_not_found(self):  # type: ignore[no-untyped-def]
        r = yield self.fetch(b"/hello.txt/")
        self.assertEqual(r.status, 404)


class Traversal(Tree):
    """No request reads anything outside the home, whatever the encoding or the links."""

    ATTACKS = (
        b"/../outside/secret.txt",
        b"/docs/../../outside/secret.txt",
        b"/%2e%2e/outside/secret.txt",
        b"/%2E%2E/outside/secret.txt",
        b"/.%2e/outside/secret.txt",
        b"/%252e%252e/outside/secret.txt",
        b"/%2e%2e%2foutside%2fsecret.txt",
        b"/..%2foutside%2fsecret.txt",
        b"/docs%2f..%2f..%2foutside%2fsecret.txt",
        b"/..\\outside\\secret.txt",
        b"/..%5coutside%5csecret.txt",
        b"/%5c..%5coutside%5csecret.txt",
        b"/hello.txt%00.png",
        b"/%00",
        b"//etc/passwd",
        b"//%2e%2e/outside/secret.txt",
        b"/%2fetc%2fpasswd",
        b"/abs-file",
        b"/rel-file",
        b"/abs-dir/secret.txt",
        b"/rel-dir/secret.txt",
        b"/abs-dir/",
        b"/root/etc/passwd",
        b"/docs/up/outside/secret.txt",
        b"/loop",
        b"/loop/x",
        b"/%zz",
        b"/x%2",
    )

    def setUp(self) -> None:
        super().setUp()
        home = self.home or ""
        os.symlink(os.path.join(self.outside, "secret.txt"), os.path.join(home, "abs-file"))
        os.symlink("../outside/secret.txt", os.path.join(home, "rel-file"))
        os.symlink(self.outside, os.path.join(home, "abs-dir"))
        os.symlink("../outside", os.path.join(home, "rel-dir"))
        os.symlink("/", os.path.join(home, "root"))
        os.symlink("../..", os.path.join(home, "docs", "up"))
        os.symlink("loop", os.path.join(home, "loop"))

    @defer.inlineCallbacks
    def test_matrix(self):  # type: ignore[no-untyped-def]
        for attack in self.ATTACKS:
            r = yield self.fetch(attack)
            self.assertIn(r.status, (400, 404), attack)
            self.assertNotIn(b"TOP SECRET", r.raw, attack)
            self.assertNotIn(b"root:", r.raw, attack)
            self.assertNotIn((self.home or "???").encode(), r.raw, attack)
            self.assertNotIn(self.outside.encode(), r.raw, attack)
            self.assert_raw_headers(r)
            self.assertEqual(r.header(b"content-type"), b"application/json", attack)

    @defer.inlineCallbacks
    def test_refusals_are_clear(self):  # type: ignore[no-untyped-def]
        r = yield self.fetch(b"/../x", headers={b"Accept": b"text/html"})
        self.assertEqual(r.status, 400)
        self.assertIn(b"The path contains a &#x27;.&#x27; or &#x27;..&#x27; segment.", r.body)
        r = yield self.fetch(b"/loop", headers={b"Accept": b"application/json"})
        self.assertEqual(
            json.loads(r.body),
            {"status": 404, "error": "Not found", "detail": "Too many levels of symbolic links."},
        )

    @defer.inlineCallbacks
    def test_links_inside_still_work(self):  # type: ignore[no-untyped-def]
        os.symlink("hello.txt", os.path.join(self.home or "", "inside"))
        r = yield self.fetch(b"/inside")
        self.assertEqual((r.status, r.body), (200, HELLO))


class Special(Tree):
    timeout = 15

    @defer.inlineCallbacks
    def test_fifo_answers_at_once(self):  # type: ignore[no-untyped-def]
        os.mkfifo(os.path.join(self.home or "", "pipe"))
        started = time.monotonic()
        r = yield self.fetch(b"/pipe")
        self.assertEqual(r.status, 403)
        self.assertLess(time.monotonic() - started, 5)
        # and the server is still serving
        r = yield self.fetch(b"/hello.txt")
        self.assertEqual(r.body, HELLO)

    @defer.inlineCallbacks
    def test_no_home(self):  # type: ignore[no-untyped-def]
        self.home = None
        self.start()
        r = yield self.fetch(b"/hello.txt", headers={b"Accept": b"text/html"})
        self.assertEqual(r.status, 404)
        self.assertIn(b"This project has no home directory configured.", r.body)
        self.assert_raw_headers(r)

    @defer.inlineCallbacks
    def test_home_vanished(self):  # type: ignore[no-untyped-def]
        self.home = os.path.join(self.outside, "gone")
        self.start()
        r = yield self.fetch(b"/")
        self.assertEqual(r.status, 404)
        self.assertEqual(
            json.loads(r.body)["detail"], "The project's home directory is not available."
        )
        self.assertNotIn(b"gone", r.body)


class Subdomain(Tree):
    subdomain = True

    @defer.inlineCallbacks
    def test_active_content_may_run_on_its_own_origin(self):  # type: ignore[no-untyped-def]
        r = yield self.fetch(b"/hello.txt")
        self.assertEqual((r.status, r.body), (200, HELLO))
        self.assertEqual(r.header(b"x-content-type-options"), b"nosniff")
        self.assertIsNone(r.header(b"content-security-policy"))

    @defer.inlineCallbacks
    def test_redirect_has_no_prefix(self):  # type: ignore[no-untyped-def]
        r = yield self.fetch(b"/docs")
        self.assertEqual((r.status, r.header(b"location")), (301, b"/docs/"))


class RecordingSender(FileSender):
    instances: list[FileSender] = []

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.read_bytes = 0
        RecordingSender.instances.append(self)

    def _read(self, data: bytes) -> None:
        self.read_bytes += len(data)
        super()._read(data)


class Backpressure(Tree):
    timeout = 30

    def setUp(self) -> None:
        super().setUp()
        RecordingSender.instances = []
        self.handler.sender_factory = RecordingSender
        self.size = 256 * 1024 * 1024
        self.path = os.path.join(self.home or "", "huge.bin")
        self.addCleanup(os.remove, self.path)
        with open(self.path, "wb") as f:
            os.truncate(f.fileno(), self.size)

    @defer.inlineCallbacks
    def paused_download(self):  # type: ignore[no-untyped-def]
        exchange = yield self.connect(
            b"GET " + PREFIX + b"/huge.bin HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            pause=True,
        )
        yield poll(lambda: RecordingSender.instances, "the download to start")
        sender = RecordingSender.instances[0]
        yield poll(lambda: sender.paused, "the slow client to pause the file producer")
        return exchange, sender

    @defer.inlineCallbacks
    def test_slow_client_pauses_reading_and_disconnect_closes_the_file(self):  # type: ignore[no-untyped-def]
        exchange, sender = yield self.paused_download()
        read_while_paused = sender.read_bytes
        # Whatever the socket buffers hold, it is a tiny part of the file.
        self.assertLess(read_while_paused, 32 * 1024 * 1024)
        self.assertFalse(sender.opened.closed)
        exchange.transport.abortConnection()
        yield exchange.closed
        yield poll(lambda: sender.opened.closed, "the file to be closed after the disconnect")
        self.assertLess(sender.read_bytes, 64 * 1024 * 1024)

    @defer.inlineCallbacks
    def test_revoked_access_cuts_a_running_download(self):  # type: ignore[no-untyped-def]
        exchange, sender = yield self.paused_download()
        access = self.root.accesses[-1]
        self.assertTrue(access.watched)
        access.revoke()
        exchange.transport.resumeProducing()
        raw = yield exchange.closed
        self.assertLess(len(parse_response(raw).body), self.size)
        yield poll(lambda: sender.opened.closed, "the file to be closed")
        self.assertFalse(access.watched)

    @defer.inlineCallbacks
    def test_finished_download_stops_watching_access(self):  # type: ignore[no-untyped-def]
        r = yield self.fetch(b"/hello.txt")
        self.assertEqual(r.body, HELLO)
        self.assertFalse(self.root.accesses[-1].watched)

    @defer.inlineCallbacks
    def test_file_shrinking_mid_transfer_cuts_the_connection(self):  # type: ignore[no-untyped-def]
        exchange, sender = yield self.paused_download()
        os.truncate(self.path, 1024)
        exchange.transport.resumeProducing()
        raw = yield exchange.closed
        response = parse_response(raw)
        self.assertEqual(response.header(b"content-length"), b"%d" % self.size)
        self.assertLess(len(response.body), self.size)
        yield poll(lambda: sender.opened.closed, "the file to be closed")


class Unexpected(unittest.TestCase):
    def test_fail_after_disconnect_is_silent(self) -> None:
        from twisted.web.test.requesthelper import DummyRequest

        from cocalcproxy.handlers.raw import fail
        from cocalcproxy.http.routing import Route

        request = DummyRequest([b""])
        request._disconnected = True
        fail(request, Route("p", "raw", None, b"", b"/"), 404, "x", "y")  # type: ignore[arg-type]
        self.assertEqual(request.written, [])
