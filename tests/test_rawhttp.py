"""rawhttp: validators, preconditions (RFC 9110 13), ranges (14), negotiation, file names."""

from __future__ import annotations

from urllib.parse import unquote

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial import unittest

from cocalcproxy.handlers.rawhttp import (
    MAX_RANGES,
    UNSATISFIABLE,
    Validators,
    content_disposition,
    content_type,
    etag_for,
    http_date,
    if_range_allows,
    multipart_layout,
    parse_etags,
    parse_http_date,
    parse_ranges,
    preconditions,
    prefers_json,
)

V = Validators(etag_for(12, 34, 1_700_000_000_123_456_789), 1_700_000_000)
LM = http_date(1_700_000_000)


def pre(method: bytes = b"GET", **headers: str) -> int | None:
    return preconditions(method, {k.replace("_", "-"): v for k, v in headers.items()}, V)


class Validators_(unittest.TestCase):
    def test_etag_is_strong_and_changes_with_each_input(self) -> None:
        tag = etag_for(1, 2, 3)
        self.assertTrue(tag.startswith('"') and tag.endswith('"'))
        self.assertEqual(len({tag, etag_for(9, 2, 3), etag_for(1, 9, 3), etag_for(1, 2, 9)}), 4)

    def test_dates(self) -> None:
        self.assertEqual(LM, "Tue, 14 Nov 2023 22:13:20 GMT")
        for text in (LM, "Tuesday, 14-Nov-23 22:13:20 GMT", "Tue Nov 14 22:13:20 2023"):
            self.assertEqual(parse_http_date(text), 1_700_000_000)
        for bad in (None, "", "yesterday", "Tue, 14 Nov 2023"):
            self.assertIsNone(parse_http_date(bad))

    def test_etag_lists(self) -> None:
        self.assertEqual(parse_etags("*"), [])
        self.assertEqual(
            parse_etags('"a", W/"b" ,"c"'), [(False, '"a"'), (True, '"b"'), (False, '"c"')]
        )
        self.assertIsNone(parse_etags("a"))
        self.assertIsNone(parse_etags('"a" "b"'))


class Preconditions(unittest.TestCase):
    def test_none(self) -> None:
        self.assertIsNone(pre())

    def test_if_none_match(self) -> None:
        self.assertEqual(pre(if_none_match=V.etag), 304)
        self.assertEqual(pre(b"HEAD", if_none_match=V.etag), 304)
        self.assertEqual(pre(if_none_match='"other", ' + V.etag), 304)
        self.assertEqual(pre(if_none_match="W/" + V.etag), 304)  # weak comparison
        self.assertEqual(pre(if_none_match="*"), 304)
        self.assertIsNone(pre(if_none_match='"other"'))
        self.assertIsNone(pre(if_none_match="garbage"))

    def test_if_none_match_beats_if_modified_since(self) -> None:
        self.assertIsNone(pre(if_none_match='"other"', if_modified_since=LM))

    def test_if_modified_since(self) -> None:
        self.assertEqual(pre(if_modified_since=LM), 304)
        self.assertEqual(pre(if_modified_since=http_date(1_800_000_000)), 304)
        self.assertIsNone(pre(if_modified_since=http_date(1_600_000_000)))
        self.assertIsNone(pre(if_modified_since="not a date"))

    def test_if_match_and_unmodified_since(self) -> None:
        self.assertIsNone(pre(if_match=V.etag))
        self.assertIsNone(pre(if_match="*"))
        self.assertEqual(pre(if_match='"other"'), 412)
        self.assertEqual(pre(if_match="W/" + V.etag), 412)  # strong comparison
        self.assertEqual(pre(if_unmodified_since=http_date(1_600_000_000)), 412)
        self.assertIsNone(pre(if_unmodified_since=LM))

    def test_if_range(self) -> None:
        self.assertTrue(if_range_allows(None, V))
        self.assertTrue(if_range_allows(V.etag, V))
        self.assertTrue(if_range_allows(LM, V))
        self.assertFalse(if_range_allows('"old"', V))
        self.assertFalse(if_range_allows("W/" + V.etag, V))
        self.assertFalse(if_range_allows(http_date(1_600_000_000), V))
        self.assertFalse(if_range_allows("nonsense", V))


class Ranges(unittest.TestCase):
    def test_single_forms(self) -> None:
        self.assertEqual(parse_ranges("bytes=0-9", 100), [(0, 9)])
        self.assertEqual(parse_ranges("bytes=90-", 100), [(90, 99)])
        self.assertEqual(parse_ranges("bytes=-10", 100), [(90, 99)])
        self.assertEqual(parse_ranges("bytes=-1000", 100), [(0, 99)])
        self.assertEqual(parse_ranges("bytes=95-1000", 100), [(95, 99)])
        self.assertEqual(parse_ranges("Bytes = 0-0", 100), [(0, 0)])

    def test_ignored(self) -> None:
        for value in (
            None,
            "",
            "bytes",
            "items=0-1",
            "bytes=",
            "bytes=a-b",
            "bytes=5-1",
            "bytes=--1",
            "bytes=1-2-3",
            "bytes=0x1-2",
            "bytes= 1 - 2",
        ):
            with self.subTest(value=value):
                self.assertIsNone(parse_ranges(value, 100))
        many = "bytes=" + ",".join(f"{i * 3}-{i * 3}" for i in range(MAX_RANGES + 1))
        self.assertIsNone(parse_ranges(many, 10_000))

    def test_unsatisfiable(self) -> None:
        self.assertIs(parse_ranges("bytes=100-", 100), UNSATISFIABLE)
        self.assertIs(parse_ranges("bytes=100-200,300-", 100), UNSATISFIABLE)
        self.assertIs(parse_ranges("bytes=-0", 100), UNSATISFIABLE)
        self.assertIs(parse_ranges("bytes=0-", 0), UNSATISFIABLE)
        self.assertIs(parse_ranges("bytes=-5", 0), UNSATISFIABLE)

    def test_unsatisfiable_parts_dropped(self) -> None:
        self.assertEqual(parse_ranges("bytes=200-300,0-1", 100), [(0, 1)])

    def test_multiple_keep_order_unless_overlapping(self) -> None:
        self.assertEqual(parse_ranges("bytes=50-59,0-9", 100), [(50, 59), (0, 9)])
        self.assertEqual(parse_ranges("bytes=0-9,5-20,21-30,40-", 100), [(0, 30), (40, 99)])
        self.assertEqual(parse_ranges("bytes=" + "0-0," * 50 + "0-0", 10), [(0, 0)])

    @given(
        st.integers(0, 10**6),
        st.lists(
            st.tuples(st.integers(0, 2 * 10**6), st.integers(0, 2 * 10**6)), min_size=1, max_size=20
        ),
    )
    def test_ranges_lie_inside_the_file(self, size: int, pairs: list[tuple[int, int]]) -> None:
        value = "bytes=" + ",".join(f"{min(a, b)}-{max(a, b)}" for a, b in pairs)
        result = parse_ranges(value, size)
        if isinstance(result, list):
            total = 0
            for first, last in result:
                self.assertTrue(0 <= first <= last < size)
                total += last - first + 1
            self.assertLessEqual(total, size)  # coalesced: never more than the whole file

    def test_multipart_length_is_exact(self) -> None:
        data = bytes(range(256)) * 4
        ranges = [(0, 9), (500, 599), (1000, 1023)]
        parts, closing, length = multipart_layout(ranges, len(data), b"text/plain", b"XYZ")
        body = b"".join(p.head + data[p.offset : p.offset + p.length] for p in parts) + closing
        self.assertEqual(len(body), length)
        self.assertIn(
            b"\r\n--XYZ\r\nContent-Type: text/plain\r\nContent-Range: bytes 500-599/1024\r\n\r\n",
            body,
        )
        self.assertTrue(body.endswith(b"\r\n--XYZ--\r\n"))


class Negotiation(unittest.TestCase):
    def test_prefers_json(self) -> None:
        self.assertTrue(prefers_json("application/json"))
        self.assertTrue(prefers_json("application/json, text/html;q=0.9"))
        self.assertTrue(prefers_json("application/*"))
        self.assertFalse(prefers_json(None))
        self.assertFalse(prefers_json("*/*"))
        self.assertFalse(
            prefers_json("text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8")
        )
        self.assertFalse(prefers_json("application/json;q=0, */*"))
        self.assertFalse(prefers_json("text/html, application/json"))
        self.assertFalse(prefers_json("application/json;q=bad"))


class FileNames(unittest.TestCase):
    def test_content_types(self) -> None:
        self.assertEqual(content_type(b"a.txt"), b"text/plain; charset=utf-8")
        self.assertEqual(content_type(b"a.HTML"), b"text/html; charset=utf-8")
        self.assertEqual(content_type(b"a.png"), b"image/png")
        self.assertEqual(content_type(b"a.json"), b"application/json; charset=utf-8")
        self.assertEqual(content_type(b"a.md"), b"text/markdown; charset=utf-8")
        self.assertEqual(content_type(b"a.ipynb"), b"application/x-ipynb+json; charset=utf-8")
        self.assertEqual(content_type(b"a.tar.gz"), b"application/gzip")
        self.assertEqual(content_type(b"noext"), b"application/octet-stream")
        self.assertEqual(content_type(b"\xff\xfe.bin"), b"application/octet-stream")

    def test_disposition(self) -> None:
        self.assertEqual(
            content_disposition(b"report.pdf"),
            b"attachment; filename=\"report.pdf\"; filename*=UTF-8''report.pdf",
        )
        value = content_disposition('Über "quoted"\\ 100% <x>.txt'.encode())
        self.assertEqual(
            value,
            b'attachment; filename="_ber _quoted__ 100_ <x>.txt"; '
            b"filename*=UTF-8''%C3%9Cber%20%22quoted%22%5C%20100%25%20%3Cx%3E.txt",
        )
        self.assertNotIn(b"\r", content_disposition(b"a\r\nSet-Cookie: x"))
        self.assertNotIn(b"\n", content_disposition(b"a\r\nSet-Cookie: x"))

    @given(st.binary(max_size=40))
    def test_disposition_is_always_a_safe_header(self, name: bytes) -> None:
        value = content_disposition(name)
        self.assertTrue(all(0x20 <= b < 0x7F for b in value))
        exact = value.split(b"filename*=UTF-8''", 1)[1].decode()
        self.assertEqual(unquote(exact, errors="strict"), name.decode("utf-8", "replace"))
