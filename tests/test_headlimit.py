"""The response-head bound, fed in every possible split."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from cocalcproxy.http.headlimit import HeadLimit, HeadTooLarge


def feed_in(limit: HeadLimit, data: bytes, cuts: list[int]) -> bool:
    done = False
    position = 0
    for cut in sorted(set(c % (len(data) + 1) for c in cuts)) + [len(data)]:
        if cut > position:
            done = limit.feed(data[position:cut])
            position = cut
    return done


HEAD = b"HTTP/1.1 200 OK\r\nA: 1\r\n folded\r\nB: 2\r\n\r\n"


class HeadLimitTests(unittest.TestCase):
    @given(st.lists(st.integers(min_value=0, max_value=10_000), max_size=8))
    def test_done_at_the_blank_line_whatever_the_split(self, cuts: list[int]) -> None:
        limit = HeadLimit(max_bytes=len(HEAD), max_fields=2)
        self.assertTrue(feed_in(limit, HEAD + b"body bytes are not counted", cuts))
        self.assertEqual(limit.size, len(HEAD))
        self.assertEqual(limit.fields, 2)

    @given(st.lists(st.integers(min_value=0, max_value=10_000), max_size=8))
    def test_one_byte_over_is_refused_whatever_the_split(self, cuts: list[int]) -> None:
        limit = HeadLimit(max_bytes=len(HEAD) - 1, max_fields=10)
        with self.assertRaises(HeadTooLarge):
            feed_in(limit, HEAD, cuts)

    def test_bare_lf_lines(self) -> None:
        limit = HeadLimit(max_fields=1)
        self.assertTrue(limit.feed(b"HTTP/1.1 204 No Content\nA: 1\n\n"))
        with self.assertRaises(HeadTooLarge):
            HeadLimit(max_fields=1).feed(b"HTTP/1.1 204 No Content\nA: 1\nB: 2\n\n")

    def test_interim_responses_count_towards_the_bytes(self) -> None:
        interim = b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
        limit = HeadLimit(max_bytes=10 * len(interim), max_fields=1)
        self.assertFalse(limit.feed(interim * 5))
        self.assertTrue(limit.feed(b"HTTP/1.1 200 OK\r\nLink: </a>\r\n\r\n"))
        with self.assertRaises(HeadTooLarge):
            HeadLimit(max_bytes=10 * len(interim)).feed(interim * 11)

    def test_fields_over_the_bound(self) -> None:
        limit = HeadLimit(max_fields=3)
        limit.feed(b"HTTP/1.1 200 OK\r\nA: 1\r\nB: 1\r\nC: 1\r\n")
        with self.assertRaises(HeadTooLarge) as caught:
            limit.feed(b"D: 1\r\n")
        self.assertIn("more than 3 header fields", str(caught.exception))


class _LineByLine(HeadLimit):
    """The bound without its whole-head shortcut: the reference the shortcut must agree with."""

    def _fits_whole(self, data: bytes) -> bool:
        return False


def verdict(limit: HeadLimit, data: bytes) -> str:
    try:
        return "done" if limit.feed(data) else "more"
    except HeadTooLarge as e:
        return str(e)


_LINE = st.sampled_from([b"A: 1", b" folded", b"\tfolded", b"", b"Long: " + b"x" * 40])
_END = st.sampled_from([b"\r\n", b"\n"])


class WholeHeadShortcutTests(unittest.TestCase):
    @given(
        st.sampled_from([b"HTTP/1.1 200 OK", b"HTTP/1.1 103 Early Hints", b"HTTP/1.0 101 Up"]),
        st.lists(st.tuples(_LINE, _END), max_size=12),
        st.binary(max_size=20),
        st.sampled_from([30, 60, 120, 400, 65536]),
        st.integers(min_value=0, max_value=8),
    )
    @settings(max_examples=500)
    def test_agrees_with_counting_line_by_line(  # type: ignore[no-untyped-def]
        self, status, lines, tail, max_bytes, max_fields
    ) -> None:
        data = status + b"\r\n" + b"".join(line + end for line, end in lines) + tail
        fast = HeadLimit(max_bytes=max_bytes, max_fields=max_fields)
        slow = _LineByLine(max_bytes=max_bytes, max_fields=max_fields)
        self.assertEqual(verdict(fast, data), verdict(slow, data), data)

    def test_a_usual_head_is_taken_at_once(self) -> None:
        limit = HeadLimit()
        self.assertTrue(limit.feed(b"HTTP/1.1 200 OK\r\nA: 1\r\n\r\nbody"))
        self.assertEqual(limit.size, len(b"HTTP/1.1 200 OK\r\nA: 1\r\n\r\n"))

    def test_the_bounds_are_exact_on_the_shortcut(self) -> None:
        head = b"HTTP/1.1 200 OK\r\nA: 1\r\nB: 2\r\nC: 3\r\n\r\n"
        self.assertTrue(HeadLimit(max_bytes=len(head), max_fields=3).feed(head + b"body"))
        with self.assertRaises(HeadTooLarge):
            HeadLimit(max_bytes=len(head) - 1, max_fields=3).feed(head + b"body")
        with self.assertRaises(HeadTooLarge):
            HeadLimit(max_bytes=len(head), max_fields=2).feed(head + b"body")
