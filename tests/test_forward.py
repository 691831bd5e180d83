"""Forwarder glue in memory: a real ProxySite/HTTPChannel over a StringTransport, a Clock, and a
scripted backend in place of the Agent. The same behaviours run over real sockets in
tests/integration/test_forward.py; these pin down timing and failure mapping exactly."""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import error, task
from twisted.internet.defer import Deferred, fail
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest
from twisted.web.client import ResponseDone, ResponseFailed

from cocalcproxy.handlers import forward
from cocalcproxy.handlers.backends import TcpTarget
from cocalcproxy.http.site import ProxySite, Root
from tests.forward_harness import PID, AllowGuard, NoPages

TIMEOUT = 30.0


class FakeResponse:
    def __init__(
        self,
        code: int = 200,
        headers: list[tuple[bytes, bytes]] | None = None,
        length: int | None = None,
        connection_headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        self.code = code
        self.phrase = b"OK"
        # As the backend client hands them over: every header as received, in order.
        self.headers = list(headers or []) + list(connection_headers or [])
        self.length = length
        self.protocol: Any = None

    def deliverBody(self, protocol: Any) -> None:  # noqa: N802
        self.protocol = protocol
        protocol.makeConnection(BackendTransport())


class BackendTransport:
    """Stands for the backend connection behind the response body."""

    def __init__(self) -> None:
        self.events: list[str] = []

    def pauseProducing(self) -> None:  # noqa: N802
        self.events.append("pause")

    def resumeProducing(self) -> None:  # noqa: N802
        self.events.append("resume")

    def stopProducing(self) -> None:  # noqa: N802
        self.events.append("stop")


class ScriptedForwarder(forward.Forwarder):
    """The real Forwarder, with the network call replaced by a recorded Deferred."""

    def __init__(self, clock: task.Clock) -> None:
        super().__init__(
            clock,
            pool=forward.make_pool(clock, 8),
            connect_timeout=5.0,
            response_timeout=TIMEOUT,
            public_hosts=[b"proxy.example"],
        )
        self.calls: list[dict[str, Any]] = []
        self.result: Any = None

    def backend_request(  # type: ignore[override]
        self,
        method: bytes,
        backend: Any,
        target: bytes,
        request_headers: list[tuple[bytes, bytes]],
        content: Any,
        length: int,
        progress: Any,
        sink: Any = None,
        has_host: bool | None = None,
    ) -> Deferred[Any]:
        cancelled: list[bool] = []
        d: Deferred[Any] = (
            self.result if self.result is not None else Deferred(lambda _: cancelled.append(True))
        )
        self.calls.append(
            dict(
                method=method,
                host=backend.host,
                port=backend.port,
                target=target,
                headers=request_headers,
                body=content,
                length=length,
                progress=progress,
                cancelled=cancelled,
                deferred=d,
            )
        )
        return d


class Glue(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = task.Clock()
        self.forwarder = ScriptedForwarder(self.clock)
        root = Root(
            guard=AllowGuard("10.1.2.3"),
            forwarder=self.forwarder,
            relay=self.forwarder,
            raw=self.forwarder,
            own_pages=NoPages(),
        )
        self.site = ProxySite(root, reactor=self.clock)
        self.site.max_body_size = 1024 * 1024
        self.channel = self.site.buildProtocol(None)
        self.transport = StringTransport()
        self.channel.makeConnection(self.transport)

    def tearDown(self) -> None:
        self.channel.connectionLost(Failure(error.ConnectionDone()))

    def send(self, data: bytes) -> None:
        self.channel.dataReceived(data)

    def get(self, rest: bytes = b"/x", extra: bytes = b"") -> None:
        self.send(
            b"GET /" + PID.encode() + b"/server/8000" + rest + b" HTTP/1.1\r\n"
            b"Host: proxy.example\r\n" + extra + b"\r\n"
        )

    def written(self) -> bytes:
        return self.transport.value()

    def json_body(self) -> dict[str, Any]:
        head, _, body = self.written().partition(b"\r\n\r\n")
        if b"chunked" in head.lower():
            body = body.split(b"\r\n", 1)[1].rsplit(b"\r\n0\r\n", 1)[0]
        result: dict[str, Any] = json.loads(body)
        return result

    def test_routes_to_project_host_and_port_byte_for_byte(self) -> None:
        self.get(b"/a%2Fb/../c?d=%00&e")
        [call] = self.forwarder.calls
        self.assertEqual(
            (call["method"], call["host"], call["port"], call["target"]),
            (b"GET", "10.1.2.3", 8000, b"/a%2Fb/../c?d=%00&e"),
        )
        self.assertIsNone(call["body"])
        self.assertNotIn(b"content-length", [n.lower() for n, _ in call["headers"]])

    def test_response_timeout_504_cancels_backend(self) -> None:
        self.get(extra=b"Accept: application/json\r\n")
        [call] = self.forwarder.calls
        self.clock.advance(TIMEOUT - 0.1)
        self.assertEqual(self.written(), b"")
        self.clock.advance(0.2)
        self.assertEqual(call["cancelled"], [True])
        self.assertTrue(self.written().startswith(b"HTTP/1.1 504 "))
        doc = self.json_body()
        self.assertEqual((doc["status"], doc["port"], doc["project"]), (504, 8000, PID))

    def test_timeout_counts_from_last_upload_progress(self) -> None:
        size = 3 * 65536
        self.send(
            b"PUT /" + PID.encode() + b"/server/8000/up HTTP/1.1\r\nHost: h\r\n"
            b"Content-Length: " + str(size).encode() + b"\r\n\r\n" + b"z" * size
        )
        [call] = self.forwarder.calls
        self.assertEqual(call["length"], size)
        self.assertEqual(call["body"].read(), b"z" * size)
        self.clock.advance(TIMEOUT - 1)  # a backend that reads slowly
        call["progress"]()  # a chunk went out: progress re-arms the timer
        self.clock.advance(TIMEOUT - 1)
        self.assertEqual((call["cancelled"], self.written()), ([], b""))
        self.clock.advance(2)
        self.assertEqual(call["cancelled"], [True])
        self.assertIn(b" 504 ", self.written().split(b"\r\n", 1)[0])

    def test_client_going_away_cancels_backend(self) -> None:
        self.get()
        [call] = self.forwarder.calls
        self.channel.connectionLost(Failure(error.ConnectionLost()))
        self.assertEqual(call["cancelled"], [True])
        self.clock.advance(TIMEOUT * 2)
        self.assertEqual(self.written(), b"")

    def answer(self, response: FakeResponse) -> None:
        [call] = self.forwarder.calls
        call["deferred"].callback(response)

    def test_response_headers_and_streaming(self) -> None:
        self.get()
        response = FakeResponse(
            headers=[
                (b"Set-Cookie", b"a=1; Path=/"),
                (b"Set-Cookie", b"b=2; Domain=x.example"),
                (b"X-Named", b"drop"),
                (b"Location", b"/next"),
                (b"Content-Type", b"text/plain"),
            ],
            connection_headers=[(b"Connection", b"X-Named"), (b"Keep-Alive", b"timeout=5")],
            length=10,
        )
        self.answer(response)
        response.protocol.dataReceived(b"0123456789")
        response.protocol.connectionLost(Failure(ResponseDone()))
        head, _, body = self.written().partition(b"\r\n\r\n")
        prefix = b"/" + PID.encode() + b"/server/8000"
        self.assertIn(b"Set-Cookie: a=1; Path=" + prefix + b"/\r\n", head)
        self.assertIn(b"Set-Cookie: b=2\r\n", head)
        self.assertIn(b"Location: " + prefix + b"/next\r\n", head)
        self.assertIn(b"\r\nContent-Length: 10", head)
        self.assertNotIn(b"X-Named", head)
        self.assertNotIn(b"Keep-Alive", head)
        self.assertNotIn(b"Server: TwistedWeb", head)
        self.assertEqual(body, b"0123456789")

    def test_backpressure_reaches_backend(self) -> None:
        self.get()
        response = FakeResponse(headers=[(b"Content-Type", b"application/octet-stream")])
        self.answer(response)
        backend = response.protocol.transport
        response.protocol.dataReceived(b"x" * 1000)
        http_channel = self.channel._channel
        http_channel.pauseProducing()  # what the client transport does when its buffer is full
        http_channel.resumeProducing()
        self.assertEqual(backend.events, ["pause", "resume"])
        self.channel.connectionLost(Failure(error.ConnectionLost()))
        self.assertEqual(backend.events, ["pause", "resume", "stop"])

    def test_mid_body_failure_aborts_client(self) -> None:
        self.get()
        response = FakeResponse(headers=[(b"Content-Type", b"text/plain")])
        self.answer(response)
        response.protocol.dataReceived(b"partial")
        response.protocol.connectionLost(Failure(ResponseFailed([Failure(error.ConnectionLost())])))
        self.assertTrue(self.transport.disconnected, "aborted, not closed cleanly")
        self.assertFalse(self.written().endswith(b"0\r\n\r\n"), "no final chunk")

    def test_complete_chunked_body_finishes(self) -> None:
        self.get()
        response = FakeResponse(headers=[(b"Content-Type", b"text/plain")])
        self.answer(response)
        response.protocol.dataReceived(b"all")
        response.protocol.connectionLost(Failure(ResponseDone()))
        self.assertTrue(self.written().endswith(b"3\r\nall\r\n0\r\n\r\n"))
        self.assertFalse(self.transport.disconnected)

    def failure_page(self, exc: Exception) -> tuple[bytes, dict[str, Any]]:
        self.forwarder.result = fail(exc)
        self.get(extra=b"Accept: application/json\r\n")
        status = self.written().split(b"\r\n", 1)[0]
        return status, self.json_body()

    def test_refused_is_502_with_advice(self) -> None:
        status, doc = self.failure_page(error.ConnectionRefusedError())
        self.assertIn(b" 502 ", status)
        self.assertIn("Nothing answered on port 8000 of this project", doc["detail"])
        self.assertIn("--bind 0.0.0.0", doc["detail"])

    def test_connect_timeout_is_504(self) -> None:
        status, doc = self.failure_page(error.TimeoutError())
        self.assertIn(b" 504 ", status)
        self.assertIn("5 seconds", doc["detail"])

    def test_closed_without_answer_is_502(self) -> None:
        status, doc = self.failure_page(ResponseFailed([Failure(error.ConnectionDone())]))
        self.assertIn(b" 502 ", status)
        self.assertIn("closed the connection", doc["detail"])

    def test_unexpected_error_is_502_without_traceback(self) -> None:
        status, doc = self.failure_page(RuntimeError("secret internals"))
        self.assertIn(b" 502 ", status)
        self.assertNotIn(b"secret internals", self.written())
        self.assertNotIn(b"Traceback", self.written())
        self.flushLoggedErrors(RuntimeError)

    def test_body_over_limit_is_413_and_never_forwarded(self) -> None:
        self.send(
            b"POST /" + PID.encode() + b"/server/8000/ HTTP/1.1\r\nHost: h\r\n"
            b"Content-Length: 1048577\r\nExpect: 100-continue\r\n\r\n"
        )
        self.assertTrue(self.written().startswith(b"HTTP/1.1 413 "))
        self.assertNotIn(b"100 Continue", self.written())
        self.assertTrue(self.transport.disconnecting)
        self.send(b"x" * 1048577)
        self.assertEqual(self.forwarder.calls, [])

    def test_chunked_body_over_limit_is_413(self) -> None:
        self.send(
            b"POST /" + PID.encode() + b"/server/8000/ HTTP/1.1\r\nHost: h\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        chunk = b"y" * 65536
        for _ in range(16):
            self.send(b"10000\r\n" + chunk + b"\r\n")
        self.assertEqual(self.written(), b"")
        self.send(b"1\r\nz\r\n")
        self.assertTrue(self.written().startswith(b"HTTP/1.1 413 "))
        self.send(b"0\r\n\r\n")
        self.assertEqual(self.forwarder.calls, [])


class Endpoints(unittest.TestCase):
    def test_one_endpoint_per_backend_reused(self) -> None:
        clock = MemoryReactorClock()
        forwarder = forward.Forwarder(clock, pool=forward.make_pool(clock, 8))
        endpoint = forwarder.backends.endpoint
        first = endpoint(TcpTarget("127.0.0.1", 8000))
        self.assertIs(endpoint(TcpTarget("127.0.0.1", 8000)), first)
        self.assertIsNot(endpoint(TcpTarget("127.0.0.1", 8001)), first)
        # An IPv4 literal is connected to as it is: no name resolution in a thread.
        self.assertIsInstance(first, TCP4ClientEndpoint)
        self.assertEqual(forwarder._host_bytes("::1"), b"::1")
        self.assertEqual(forwarder._host_bytes("bücher.example"), b"xn--bcher-kva.example")
