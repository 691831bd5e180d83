"""rawpath: the URL path of a raw request becomes checked name segments, decoded exactly once."""

from __future__ import annotations

from urllib.parse import quote_from_bytes

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial import unittest

from cocalcproxy.handlers.rawpath import BadPath, RawPath, has_query_flag, parse, percent_decode


class Parse(unittest.TestCase):
    def test_root(self) -> None:
        self.assertEqual(parse(b"/"), RawPath((), True))

    def test_file_and_folder_forms(self) -> None:
        self.assertEqual(parse(b"/a/b.txt"), RawPath((b"a", b"b.txt"), False))
        self.assertEqual(parse(b"/a/b/"), RawPath((b"a", b"b"), True))

    def test_decoded_once(self) -> None:
        self.assertEqual(parse(b"/a%20b/%E2%9C%93"), RawPath((b"a b", "✓".encode()), False))
        # Double-encoded dots stay the literal three-character name "%2e": never decoded twice.
        self.assertEqual(parse(b"/%252e%252e/x"), RawPath((b"%2e%2e", b"x"), False))
        self.assertEqual(parse(b"/%25"), RawPath((b"%",), False))

    def test_traversal_refused(self) -> None:
        for path in (
            b"/..", b"/../etc/passwd", b"/a/../../etc", b"/a/..", b"/./a", b"/a/./b",
            b"/%2e%2e/etc", b"/%2E%2E/etc", b"/.%2e/etc", b"/%2e./x", b"/%2e",
            b"/a%2f..%2f..%2fetc", b"/%2fetc%2fpasswd", b"/a%2Fb",
            b"/..%5c..%5cetc", b"/a\\b", b"/%5c", b"/a%00.txt", b"/%00",
            b"//etc/passwd", b"/a//b", b"///",
        ):  # fmt: skip
            with self.subTest(path=path):
                self.assertIsInstance(parse(path), BadPath)

    def test_malformed_escapes_refused(self) -> None:
        for path in (b"/%", b"/a%2", b"/%zz", b"/%g0", b"/x%%41"):
            with self.subTest(path=path):
                self.assertIsInstance(parse(path), BadPath)

    def test_must_start_with_slash(self) -> None:
        self.assertIsInstance(parse(b"a/b"), BadPath)
        self.assertIsInstance(parse(b""), BadPath)

    def test_reasons_never_echo_input(self) -> None:
        result = parse(b"/<script>/%2e%2e/x")
        assert isinstance(result, BadPath)
        self.assertNotIn("<", result.reason)

    @given(st.binary(max_size=80))
    def test_segments_are_always_safe_names(self, raw: bytes) -> None:
        result = parse(b"/" + raw)
        if isinstance(result, RawPath):
            for segment in result.segments:
                self.assertNotIn(segment, (b"", b".", b".."))
                self.assertNotIn(b"/", segment)
                self.assertNotIn(b"\\", segment)
                self.assertNotIn(b"\x00", segment)

    @given(st.lists(st.binary(min_size=1, max_size=20), min_size=1, max_size=5))
    def test_any_file_name_round_trips_through_quoting(self, names: list[bytes]) -> None:
        names = [n for n in names if n not in (b".", b"..") and not set(n) & {0, 0x2F, 0x5C}]
        if not names:
            return
        path = b"".join(b"/" + quote_from_bytes(n, safe="").encode() for n in names)
        self.assertEqual(parse(path), RawPath(tuple(names), False))


class Helpers(unittest.TestCase):
    def test_percent_decode(self) -> None:
        self.assertEqual(percent_decode(b"a%41%2f"), b"aA/")
        self.assertIsNone(percent_decode(b"%4"))

    def test_query_flag(self) -> None:
        self.assertTrue(has_query_flag(b"download", b"download"))
        self.assertTrue(has_query_flag(b"x=1&download=1", b"download"))
        self.assertTrue(has_query_flag(b"%64ownload", b"download"))
        self.assertFalse(has_query_flag(b"", b"download"))
        self.assertFalse(has_query_flag(b"downloads", b"download"))
        self.assertFalse(has_query_flag(b"x=download", b"download"))
