"""The forwarder's backend client (cocalcproxy.handlers.backendhttp): pool, framing, reuse.

Connections here are real protocol objects over StringTransports, made by an endpoint that
records them, with a Clock for the idle sweep; the integration tests (test_forward,
test_stale_connection, test_response_head) run the same client over real sockets.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import error, task
from twisted.internet.defer import succeed
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest
from twisted.web.client import ResponseDone, ResponseFailed, ResponseNeverReceived
from twisted.web.http import PotentialDataLoss

from cocalcproxy.handlers import backendhttp
from cocalcproxy.handlers.backendhttp import BackendPool, BadRequestForBackend, request_head

KEY = (b"http", b"10.0.0.1", 8000)
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class Endpoint:
    """Connects at once; keeps every connection made."""

    def __init__(self) -> None:
        self.made: list[Any] = []

    def __call__(self) -> Endpoint:
        return self

    def connect(self, factory: Any) -> Any:
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.made.append(protocol)
        return succeed(protocol)


class Body:
    def __init__(self) -> None:
        self.data = b""
        self.reason: Failure | None = None
        self.transport: Any = None

    def makeConnection(self, transport: Any) -> None:  # noqa: N802
        self.transport = transport

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.data += data

    def connectionLost(self, reason: Failure) -> None:  # noqa: N802
        self.reason = reason


def lose(protocol: Any, reason: Exception | None = None) -> None:
    protocol.connectionLost(Failure(reason or error.ConnectionDone()))


class Client(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = task.Clock()
        self.pool = BackendPool(self.clock, pool_size=2, idle_timeout=60.0)
        self.endpoint = Endpoint()

    def get(self, method: bytes = b"GET", content: Any = None, length: int = 0) -> Any:
        head = request_head(method, b"/x", [(b"Host", b"h")], length if content else None)
        results: list[Any] = []
        self.pool.request(
            KEY, self.endpoint, head, content, length, head_only=method == b"HEAD"
        ).addBoth(results.append)
        return results

    def answer(self, protocol: Any, data: bytes = OK) -> Any:
        protocol.dataReceived(data)

    def test_request_head_is_exact_and_framed(self) -> None:
        self.assertEqual(
            request_head(b"GET", b"/a?b", [(b"Host", b"h"), (b"X", b"1")], None),
            b"GET /a?b HTTP/1.1\r\nHost: h\r\nX: 1\r\n\r\n",
        )
        self.assertIn(b"Content-Length: 0\r\n", request_head(b"POST", b"/", [], None))
        self.assertIn(b"Content-Length: 5\r\n", request_head(b"PUT", b"/", [], 5))
        for method, target in ((b"G T", b"/"), (b"GET", b"/a b"), (b"GET", b"/\x7f"), (b"", b"/")):
            with self.assertRaises(BadRequestForBackend):
                request_head(method, target, [], None)

    def test_answer_body_and_reuse(self) -> None:
        results = self.get()
        [conn] = self.endpoint.made
        self.assertTrue(conn.transport.value().startswith(b"GET /x HTTP/1.1\r\n"))
        self.answer(conn, b"HTTP/1.1 200 Fine\r\nContent-Length: 2\r\nX-A: b\r\n\r\n")
        [response] = results
        self.assertEqual((response.code, response.phrase, response.length), (200, b"Fine", 2))
        self.assertEqual(response.headers, [(b"Content-Length", b"2"), (b"X-A", b"b")])
        body = Body()
        response.deliverBody(body)
        conn.dataReceived(b"ok")
        self.assertEqual(body.data, b"ok")
        assert body.reason is not None
        self.assertTrue(body.reason.check(ResponseDone))
        self.assertEqual(self.pool.idle_count(KEY), 1)
        self.get()
        self.assertEqual(len(self.endpoint.made), 1, "the idle connection is reused")

    def test_body_before_deliver_is_kept(self) -> None:
        results = self.get()
        [conn] = self.endpoint.made
        self.answer(conn, OK)
        body = Body()
        results[0].deliverBody(body)
        self.assertEqual(body.data, b"ok")
        assert body.reason is not None
        self.assertTrue(body.reason.check(ResponseDone))

    def test_interim_responses_skipped(self) -> None:
        results = self.get()
        [conn] = self.endpoint.made
        self.answer(conn, b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early\r\nLink: x\r\n\r\n")
        self.assertEqual(results, [])
        self.answer(conn, OK)
        self.assertEqual(results[0].code, 200)

    def test_connection_close_and_http10_not_reused(self) -> None:
        for answer in (
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
            b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
        ):
            results = self.get()
            conn = self.endpoint.made[-1]
            self.answer(conn, answer)
            results[0].deliverBody(Body())
            self.assertEqual(self.pool.idle_count(KEY), 0)
            self.assertTrue(conn.transport.disconnecting or conn.gone)

    def test_close_delimited_body_ends_at_close(self) -> None:
        results = self.get()
        [conn] = self.endpoint.made
        self.answer(conn, b"HTTP/1.1 200 OK\r\n\r\nsome")
        [response] = results
        self.assertIsNone(response.length)
        body = Body()
        response.deliverBody(body)
        conn.dataReceived(b" more")
        lose(conn)
        self.assertEqual(body.data, b"some more")
        assert body.reason is not None
        self.assertTrue(body.reason.check(PotentialDataLoss))
        self.assertEqual(self.pool.idle_count(KEY), 0)

    def test_length_body_cut_short_fails(self) -> None:
        results = self.get()
        [conn] = self.endpoint.made
        self.answer(conn, b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort")
        body = Body()
        results[0].deliverBody(body)
        lose(conn)
        assert body.reason is not None
        self.assertTrue(body.reason.check(ResponseFailed))

    def test_head_answer_ends_at_its_head_and_is_not_reused(self) -> None:
        results = self.get(b"HEAD")
        [conn] = self.endpoint.made
        self.answer(conn, b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
        [response] = results
        body = Body()
        response.deliverBody(body)
        assert body.reason is not None
        self.assertTrue(body.reason.check(ResponseDone))
        self.assertEqual(self.pool.idle_count(KEY), 0)

    def test_conflicting_lengths_and_garbage_fail(self) -> None:
        for answer in (
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok",
            b"HTTP/1.1 200 OK\r\nContent-Length: 2, 3\r\n\r\nok",
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"NOT HTTP\r\n\r\n",
        ):
            results = self.get()
            self.answer(self.endpoint.made[-1], answer)
            [result] = results
            self.assertIsInstance(result, Failure, answer)
            self.assertTrue(result.check(ResponseFailed), answer)

    def test_unsolicited_bytes_close_an_idle_connection(self) -> None:
        results = self.get()
        [conn] = self.endpoint.made
        self.answer(conn, OK)
        results[0].deliverBody(Body())
        self.assertEqual(self.pool.idle_count(KEY), 1)
        conn.dataReceived(b"HTTP/1.1 200 OK\r\n")
        self.assertEqual(self.pool.idle_count(KEY), 0)
        self.assertTrue(conn.transport.disconnecting or conn.gone)

    def test_reused_connection_dying_unanswered_is_retried_once(self) -> None:
        results = self.get()
        [first] = self.endpoint.made
        self.answer(first, OK)
        results[0].deliverBody(Body())
        results = self.get(b"POST", _Spool(b"data"), 4)
        self.assertTrue(first.transport.value().endswith(b"data"))
        lose(first, error.ConnectionLost())
        second = self.endpoint.made[-1]
        self.assertIsNot(second, first)
        self.assertTrue(second.transport.value().endswith(b"\r\n\r\ndata"), "body sent again")
        lose(second, error.ConnectionLost())
        [result] = results
        self.assertTrue(result.check(ResponseNeverReceived), "a fresh connection is not retried")

    def test_pool_grows_with_demand_and_sweeps(self) -> None:
        waiting = [self.get() for _ in range(5)]
        self.assertEqual(len(self.endpoint.made), 5)
        for conn, results in zip(self.endpoint.made, waiting):
            self.answer(conn, OK)
            results[0].deliverBody(Body())
        self.assertEqual(self.pool.idle_count(KEY), 5, "five were busy at once: five kept")

        self.clock.advance(61)
        self.assertEqual(self.pool.idle_count(KEY), 0, "idle over a minute: closed")
        results = self.get()
        conn = self.endpoint.made[-1]
        self.answer(conn, OK)
        results[0].deliverBody(Body())
        self.clock.advance(31)
        self.assertEqual(self.pool.idle_count(KEY), 1)

    def test_growth_has_a_ceiling(self) -> None:
        self.patch(backendhttp, "IDLE_CEILING", 3)
        waiting = [self.get() for _ in range(5)]
        for conn, results in zip(self.endpoint.made, waiting):
            self.answer(conn, OK)
            results[0].deliverBody(Body())
        self.assertEqual(self.pool.idle_count(KEY), 3, "five busy at once, but at most three kept")

    def test_cancel_closes_the_connection(self) -> None:
        head = request_head(b"GET", b"/", [(b"Host", b"h")], None)
        d = self.pool.request(KEY, self.endpoint, head)
        results: list[Any] = []
        d.addErrback(results.append)
        d.cancel()
        [conn] = self.endpoint.made
        self.assertTrue(conn.gone)
        self.assertTrue(results[0].check(backendhttp.CancelledError))

    # --- the direct form (receiver=): what the fast lane's forwarder uses -------------------

    def direct(self) -> tuple[Any, list[Any], list[Failure]]:
        head = request_head(b"GET", b"/", [(b"Host", b"h")], None)
        answers: list[Any] = []
        failures: list[Failure] = []
        pending = self.pool.request(
            KEY, self.endpoint, head, receiver=(answers.append, failures.append)
        )
        return pending, answers, failures

    def test_direct_answer_goes_to_the_receiver_once(self) -> None:
        pending, answers, failures = self.direct()
        self.assertNotIsInstance(pending, backendhttp.Deferred)
        [conn] = self.endpoint.made
        self.answer(conn, OK)
        [response] = answers
        self.assertEqual((response.code, response.length), (200, 2))
        self.assertEqual(failures, [])
        with self.assertRaises(backendhttp.AlreadyCalledError):
            pending.callback(response)
        pending.cancel()  # after the answer: nothing happens
        self.assertEqual(failures, [])
        self.assertFalse(conn.gone)

    def test_direct_failure_and_cancel(self) -> None:
        pending, answers, failures = self.direct()
        [conn] = self.endpoint.made
        pending.cancel()
        self.assertTrue(conn.gone, "cancelling closes the backend connection")
        [failure] = failures
        self.assertTrue(failure.check(backendhttp.CancelledError))
        pending, answers, failures = self.direct()
        lose(self.endpoint.made[-1], error.ConnectionLost())
        [failure] = failures
        self.assertTrue(failure.check(ResponseNeverReceived))
        self.assertEqual(answers, [])

    def test_direct_receiver_that_raises_is_logged_not_lost(self) -> None:
        head = request_head(b"GET", b"/", [(b"Host", b"h")], None)

        def broken(response: Any) -> None:
            raise RuntimeError("receiver bug")

        failures: list[Failure] = []
        self.pool.request(KEY, self.endpoint, head, receiver=(broken, failures.append))
        self.answer(self.endpoint.made[0], OK)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(failures, [], "an answer is never also a failure")

    def test_close_cached_connections(self) -> None:
        results = self.get()
        [conn] = self.endpoint.made
        self.answer(conn, OK)
        results[0].deliverBody(Body())
        closed: list[Any] = []
        self.pool.closeCachedConnections().addCallback(closed.append)
        self.assertEqual(closed, [])
        self.assertTrue(conn.transport.disconnecting)
        lose(conn)
        self.assertEqual(closed, [None])


class _Spool:
    def __init__(self, data: bytes) -> None:
        import io

        self._io = io.BytesIO(data)

    def seek(self, *a: Any) -> int:
        return self._io.seek(*a)

    def read(self, n: int = -1) -> bytes:
        return self._io.read(n)
