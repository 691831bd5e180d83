"""Unit tests for cocalcproxy.http.prebody: the pure plan, and the one place that reads Twisted's
private channel state, checked against a real HTTPChannel (so a Twisted upgrade that moves it
fails here, not in production)."""

from __future__ import annotations

from typing import Any

from twisted.internet import task
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest
from twisted.web import http

from cocalcproxy.http import prebody, routing

PID = "0b0e5c1a-3d4f-4a5b-8c6d-7e8f9a0b1c2d"


class Plan(unittest.TestCase):
    def test_project_routes_are_judged(self) -> None:
        decision = prebody.plan(b"POST", f"/{PID}/server/8000/x".encode(), [b"h"], None)
        self.assertIsInstance(decision, prebody.Judge)
        assert isinstance(decision, prebody.Judge)
        self.assertEqual(decision.route.project_id, PID)

    def test_subdomain_routes_are_judged(self) -> None:
        decision = prebody.plan(b"PUT", b"/x", [f"{PID}-8000.p.example".encode()], "p.example")
        self.assertIsInstance(decision, prebody.Judge)

    def test_forms_get_a_small_cap(self) -> None:
        for path in (b"/_/login", b"/_/logout"):
            self.assertEqual(
                prebody.plan(b"POST", path, [b"h"], None), prebody.Cap(prebody.FORM_BODY_LIMIT)
            )

    def test_other_own_pages_take_no_body(self) -> None:
        self.assertEqual(prebody.plan(b"POST", b"/_/health", [], None), prebody.AnswerNow(405))
        self.assertEqual(prebody.plan(b"GET", b"/_/health", [], None), prebody.AnswerNow(413))
        self.assertEqual(prebody.plan(b"PUT", b"/", [], None), prebody.AnswerNow(405))
        self.assertEqual(prebody.plan(b"POST", b"/_/hop", [], None), prebody.AnswerNow(405))
        landing = prebody.plan(b"POST", b"/.cocalcproxy/hop", [f"{PID}-80.p.x".encode()], "p.x")
        self.assertEqual(landing, prebody.AnswerNow(405))

    def test_everything_else_answered_like_root(self) -> None:
        for target in (b"/nowhere", f"/{PID}/server/8000".encode(), b"/_/../x"):
            self.assertEqual(prebody.plan(b"POST", target, [b"h"], None), prebody.AnswerNow())
        doubled = prebody.plan(b"POST", f"/{PID}/server/8000/".encode(), [b"a", b"b"], None)
        self.assertEqual(doubled, prebody.AnswerNow())

    def test_route_matches_what_root_parses(self) -> None:
        target = f"/{PID}/port/9/a?b".encode()
        decision = prebody.plan(b"POST", target, [b"h"], None)
        assert isinstance(decision, prebody.Judge)
        self.assertEqual(decision.route, routing.parse(b"h", target, None))


class Recording(http.Request):
    seen: list[Any] = []

    def gotLength(self, length: int | None) -> None:  # noqa: N802
        Recording.seen.append((prebody.request_line(self.channel), length))
        super().gotLength(length)

    def process(self) -> None:
        self.setResponseCode(204)
        self.finish()


class ChannelState(unittest.TestCase):
    def feed(self, data: bytes) -> tuple[http.HTTPChannel, StringTransport]:
        Recording.seen = []
        channel = http.HTTPChannel()
        channel.requestFactory = Recording  # type: ignore[assignment]
        self.clock = task.Clock()
        channel.callLater = self.clock.callLater  # type: ignore[method-assign]
        transport = StringTransport()
        channel.makeConnection(transport)
        channel.dataReceived(data)
        return channel, transport

    def test_request_line_is_there_when_the_headers_end(self) -> None:
        self.feed(b"POST /a/b?c HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\n")
        self.assertEqual(Recording.seen, [((b"POST", b"/a/b?c", b"HTTP/1.1"), 3)])

    def test_chunked_announces_an_unknown_length(self) -> None:
        self.feed(b"PUT / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        self.assertEqual(Recording.seen, [((b"PUT", b"/", b"HTTP/1.1"), None)])

    def test_none_when_the_state_is_gone(self) -> None:
        self.assertIsNone(prebody.request_line(object()))
        channel, _ = self.feed(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertIsNone(prebody.request_line(channel))  # consumed by allContentReceived

    def test_stop_parsing_ignores_everything_after(self) -> None:
        channel, transport = self.feed(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(transport.value().count(b"HTTP/1.1 204"), 1)
        prebody.stop_parsing(channel)
        channel.dataReceived(b"GET /again HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(transport.value().count(b"HTTP/1.1 204"), 1)
        self.assertEqual(len(Recording.seen), 1)

    def test_stop_parsing_reads_a_bounded_amount_then_aborts(self) -> None:
        # Issue #11 item 6: at most DRAIN_LIMIT more bytes are read after a refusal.
        channel, transport = self.feed(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        prebody.stop_parsing(channel)
        channel.dataReceived(b"x" * prebody.DRAIN_LIMIT)
        self.assertFalse(transport.disconnecting)
        channel.dataReceived(b"x")
        self.assertTrue(transport.disconnecting)

    def test_stop_parsing_lingers_a_bounded_time(self) -> None:
        channel, transport = self.feed(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        prebody.stop_parsing(channel)
        self.clock.advance(prebody.LINGER_SECONDS - 0.1)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.2)
        self.assertTrue(transport.disconnecting)

    def test_linger_timer_cancelled_when_the_client_closes(self) -> None:
        channel, transport = self.feed(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        prebody.stop_parsing(channel)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        channel.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.clock.getDelayedCalls(), [])
