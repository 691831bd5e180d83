"""The response-head bound, fed in every possible split."""

from __future__ import annotations

from hypothesis import given
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
