"""The fast lane (cocalcproxy.http.lane) over real TLS: what it takes, what it hands over, and
that an answer through it is the ordinary path's answer.

The whole proxy runs in this process in front of a real backend (Twisted's web server); raw TLS
clients write requests byte for byte. Which path a connection is on is read off the proxy's own
TLS connection: its protocol is the lane until the lane hands the connection over.
"""

from __future__ import annotations

import json
import os
import re

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.web import resource, server

from cocalcproxy.http import lane as lane_module
from cocalcproxy.http.lane import LaneChannel
from tests.forward_harness import poll
from tests.integration.test_connection_close import RawTLSCase, says_close


class Backend(resource.Resource):
    """``/hello``: 13 bytes with a length and hop-by-hop headers of its own; ``/stream``: a body
    without a length (chunked to the proxy); ``/echo``: the request line and headers it got."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.held: list[server.Request] = []

    def render(self, request: server.Request) -> bytes:
        path = request.path
        if path.endswith(b"/held"):
            self.held.append(request)  # answered by the test
            return server.NOT_DONE_YET
        if path.endswith(b"/stream"):
            request.write(b"first,")
            request.write(b"second")
            request.finish()
            return server.NOT_DONE_YET
        if path.endswith(b"/echo"):
            seen = {
                "method": request.method.decode(),
                "uri": request.uri.decode(),
                "headers": [
                    [name.decode(), value.decode()]
                    for name, values in request.requestHeaders.getAllRawHeaders()
                    for value in values
                ],
            }
            request.setHeader(b"Content-Type", b"application/json")
            return json.dumps(seen).encode()
        request.setHeader(b"Content-Type", b"text/plain")
        request.setHeader(b"Connection", b"keep-alive")
        request.setHeader(b"Keep-Alive", b"timeout=5")
        request.setHeader(b"X-Backend", b"yes")
        return b"hello, world\n"


def answers(received: bytes) -> list[tuple[bytes, bytes]]:
    """Every (head, body) in ``received``, framed by Content-Length or chunked encoding."""
    found = []
    rest = received
    while rest:
        head, _, rest = rest.partition(b"\r\n\r\n")
        lower = head.lower()
        length = re.search(rb"\r\ncontent-length: *(\d+)", lower)
        if b"\r\ntransfer-encoding: chunked" in lower:
            body = b""
            while True:
                size_line, _, rest = rest.partition(b"\r\n")
                size = int(size_line, 16)
                body += rest[:size]
                rest = rest[size + 2 :]
                if size == 0:
                    break
        elif length is not None and not lower.startswith(b"head"):
            size = int(length.group(1))
            body, rest = rest[:size], rest[size:]
        else:
            body = b""
        found.append((head, body))
    return found


class LaneCase(RawTLSCase):
    timeout = 60

    extra: tuple[str, ...] = ()

    @defer.inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def]
        self.backend = Backend()
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            server.Site(self.backend)
        )
        self.addCleanup(port.stopListening)
        self.backend_port = port.getHost().port
        from tests.support import start_proxy

        self.proxy = yield start_proxy(self, *self.extra)
        d = self.proxy.directory
        yield d.add_user("alice", "alice-password")
        project = yield d.add_project("alice")
        self.project = project
        self.token_id, token = yield d.create_token("alice")
        self.token = token
        self.auth = f"Authorization: Bearer {token}"
        self.base = f"/{project.id}/server/{self.backend_port}"
        self.path = self.base + "/hello"
        # One request on a connection of its own fills the guard's caches: the lane takes only
        # what they already decide.
        warm = yield self.connect()
        warm.send(self.request(self.path, self.auth, "Connection: close"))
        yield poll(lambda: warm.lost, timeout=10, what="the warm-up answer")
        self.assertIn(b" 200 ", warm.received.split(b"\r\n", 1)[0])
        yield poll(lambda: not self.server_protocols(), timeout=10, what="the warm-up's close")
        self.count_handovers()

    def count_handovers(self) -> None:
        self.handed_over = False
        original = LaneChannel.hand_over

        def hand_over(lane: LaneChannel, data: bytes) -> None:
            self.handed_over = True
            original(lane, data)

        self.patch(LaneChannel, "hand_over", hand_over)

    def server_protocols(self) -> list[object]:
        """What each of the proxy's open TLS connections delivers to."""
        factory = self.proxy.service.listeners[0].factory
        return [p.wrappedProtocol for p in factory.protocols]

    def on_lane(self) -> bool:
        (protocol,) = self.server_protocols()
        return isinstance(protocol, LaneChannel)

    def access_lines(self) -> list[dict[str, object]]:
        path = os.path.join(self.proxy.state_dir, "access.log")
        self.proxy.service.access_log.flush()
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]

    @defer.inlineCallbacks
    def exchange(self, client, data: bytes, count: int = 1):  # type: ignore[no-untyped-def]
        """Send ``data``; wait for ``count`` whole answers more than the client had."""
        before = len(answers(client.received)) if client.received else 0
        client.send(data)

        def whole() -> bool:
            try:
                return len(answers(client.received)) >= before + count
            except ValueError:
                return False

        yield poll(whole, timeout=10, what=f"{count} answer(s)")
        return answers(client.received)[before:]


class Takes(LaneCase):
    @defer.inlineCallbacks
    def test_cached_get_is_answered_on_the_lane_and_kept_alive(self):  # type: ignore[no-untyped-def]
        client = yield self.connect()
        for _ in range(3):
            ((head, body),) = yield self.exchange(client, self.request(self.path, self.auth))
            self.assertTrue(head.startswith(b"HTTP/1.1 200 OK\r\n"), head)
            self.assertEqual(body, b"hello, world\n")
        self.assertTrue(self.on_lane())
        self.assertFalse(client.lost)
        lower = head.lower()
        # The backend's framing, one Date, its own headers; never its hop-by-hop ones, no
        # banner, no Connection header on a kept-alive answer.
        self.assertIn(b"\r\ncontent-length: 13", lower)
        self.assertEqual(lower.count(b"\r\ndate: "), 1)
        self.assertIn(b"\r\nx-backend: yes", lower)
        self.assertNotIn(b"keep-alive", lower)
        self.assertNotIn(b"\r\nconnection:", lower)
        self.assertEqual(lower.count(b"\r\nserver: "), 1)  # the backend's own, only
        self.assertNotIn(b"transfer-encoding", lower)

    @defer.inlineCallbacks
    def test_backend_sees_what_the_ordinary_path_sends(self):  # type: ignore[no-untyped-def]
        """The header policy is the same function on both paths: the proxy's own credential is
        removed, X-Forwarded-* are set, spoofed ones replaced, hop-by-hop ones dropped."""
        lane = yield self.connect()
        sent = self.request(
            self.base + "/echo?q=1",
            self.auth,
            "X-Forwarded-For: 6.6.6.6",
            "Connection: X-Secret",
            "X-Secret: drop me",
            "Accept: */*",
        )
        ((_, lane_body),) = yield self.exchange(lane, sent)
        self.assertTrue(self.on_lane())
        # The same request on a connection the lane has handed over (a body first).
        ordinary = yield self.connect()
        yield self.exchange(
            ordinary,
            b"POST "
            + self.base.encode()
            + b"/echo HTTP/1.1\r\nHost: localhost\r\n"
            + self.auth.encode()
            + b"\r\nContent-Length: 2\r\n\r\nhi",
        )
        ((_, ordinary_body),) = yield self.exchange(ordinary, sent)
        seen_lane, seen_ordinary = json.loads(lane_body), json.loads(ordinary_body)
        self.assertEqual(seen_lane, seen_ordinary)
        names = [name.lower() for name, _ in seen_lane["headers"]]
        self.assertNotIn("authorization", names)
        self.assertNotIn("x-secret", names)
        self.assertIn(["X-Forwarded-For", "127.0.0.1"], seen_lane["headers"])
        self.assertEqual(seen_lane["uri"], "/echo?q=1")

    @defer.inlineCallbacks
    def test_head_has_the_length_and_no_body(self):  # type: ignore[no-untyped-def]
        client = yield self.connect()
        client.send(self.request(self.path, self.auth).replace(b"GET ", b"HEAD ", 1))
        yield poll(lambda: b"\r\n\r\n" in client.received, timeout=10, what="the head")
        ((body, _),) = yield self.exchange(client, self.request(self.path, self.auth))
        head, _, rest = client.received.partition(b"\r\n\r\n")
        self.assertIn(b"\r\ncontent-length: 13", head.lower())
        # Right after the HEAD's head comes the next answer: no body was sent for it.
        self.assertTrue(rest.startswith(b"HTTP/1.1 200 OK\r\n"), rest[:40])
        self.assertTrue(self.on_lane())

    @defer.inlineCallbacks
    def test_body_without_length_is_chunked(self):  # type: ignore[no-untyped-def]
        client = yield self.connect()
        ((head, body),) = yield self.exchange(
            client, self.request(self.base + "/stream", self.auth)
        )
        self.assertIn(b"\r\ntransfer-encoding: chunked", head.lower())
        self.assertEqual(body, b"first,second")
        ((_, body),) = yield self.exchange(client, self.request(self.path, self.auth))
        self.assertEqual(body, b"hello, world\n")
        self.assertTrue(self.on_lane())

    @defer.inlineCallbacks
    def test_head_split_over_several_reads(self):  # type: ignore[no-untyped-def]
        client = yield self.connect()
        data = self.request(self.path, self.auth)
        client.send(data[:7])
        yield poll(lambda: self.server_protocols()[0].buffer, timeout=10, what="a partial head")
        client.send(data[7:30])
        ((_, body),) = yield self.exchange(client, data[30:])
        self.assertEqual(body, b"hello, world\n")
        self.assertTrue(self.on_lane())

    @defer.inlineCallbacks
    def test_connection_close_is_said_and_done(self):  # type: ignore[no-untyped-def]
        client = yield self.connect()
        yield self.exchange(client, self.request(self.path, self.auth))
        self.assertTrue(self.on_lane())
        client.send(self.request(self.path, self.auth, "Connection: TE, Close"))
        yield poll(lambda: client.lost, timeout=10, what="the proxy to close")
        head = answers(client.received)[-1][0].lower()
        self.assertTrue(says_close(head + b"\r\n\r\n"), head)
        self.assertEqual(head.count(b"\r\nconnection:"), 1)

    @defer.inlineCallbacks
    def test_access_log_line(self):  # type: ignore[no-untyped-def]
        client = yield self.connect()
        yield self.exchange(client, self.request(self.path + "?secret=1", self.auth))
        self.assertTrue(self.on_lane())
        line = self.access_lines()[-1]
        self.assertEqual(line["status"], 200)
        self.assertEqual(line["account"], "alice")
        self.assertEqual(line["project"], self.project.id)
        self.assertEqual(line["form"], "server")
        self.assertEqual(line["port"], self.backend_port)
        self.assertEqual(line["path"], self.path)  # the query is never logged
        self.assertEqual(line["bytes_out"], 13)
        self.assertEqual(line["method"], "GET")

    @defer.inlineCallbacks
    def test_nothing_listening_is_the_ordinary_502(self):  # type: ignore[no-untyped-def]
        spare = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            server.Site(Backend())
        )
        dead = spare.getHost().port
        yield spare.stopListening()
        client = yield self.connect()
        yield self.exchange(client, self.request(self.path, self.auth))
        ((head, body),) = yield self.exchange(
            client, self.request(f"/{self.project.id}/server/{dead}/x", self.auth)
        )
        self.assertTrue(head.startswith(b"HTTP/1.1 502 "), head)
        self.assertEqual(json.loads(body)["status"], 502)
        self.assertTrue(self.on_lane())
        ((head, _),) = yield self.exchange(client, self.request(self.path, self.auth))
        self.assertTrue(head.startswith(b"HTTP/1.1 200 "), head)


class Ends(LaneCase):
    @defer.inlineCallbacks
    def test_revoked_token_is_refused_on_a_lane_connection(self):  # type: ignore[no-untyped-def]
        client = yield self.connect()
        yield self.exchange(client, self.request(self.path, self.auth))
        self.assertTrue(self.on_lane())
        yield self.proxy.directory.revoke_token(self.token_id)
        statuses = []

        @defer.inlineCallbacks
        def refused():  # type: ignore[no-untyped-def]
            ((head, _),) = yield self.exchange(client, self.request(self.path, self.auth))
            statuses.append(head.split(b" ")[1])
            return statuses[-1] == b"401"

        deadline = reactor.seconds() + 10
        while not (yield refused()):
            self.assertLess(reactor.seconds(), deadline, statuses)
        self.assertTrue(self.handed_over)

    @defer.inlineCallbacks
    def test_shutdown_finishes_a_lane_request_with_close_and_closes_idle_ones(self):  # type: ignore[no-untyped-def]
        idle = yield self.connect()
        busy = yield self.connect()
        yield self.exchange(idle, self.request(self.path, self.auth))
        yield self.exchange(busy, self.request(self.path, self.auth))
        self.assertTrue(all(isinstance(p, LaneChannel) for p in self.server_protocols()))
        busy.send(self.request(self.base + "/held", self.auth))
        yield poll(lambda: self.backend.held, timeout=10, what="the held request")
        stopped = self.proxy.service.stopService()
        yield poll(lambda: idle.lost, timeout=10, what="the idle connection's close")
        self.assertFalse(busy.lost)
        held = self.backend.held.pop()
        held.write(b"late but whole")
        held.finish()
        yield poll(lambda: busy.lost, timeout=10, what="the busy connection's close")
        head, body = answers(busy.received)[-1]
        self.assertTrue(head.startswith(b"HTTP/1.1 200 "), head)
        self.assertTrue(says_close(head.lower() + b"\r\n\r\n"), head)
        self.assertEqual(body, b"late but whole")
        yield stopped

    @defer.inlineCallbacks
    def test_client_gone_mid_answer_cancels_the_backend_request(self):  # type: ignore[no-untyped-def]
        client = yield self.connect()
        yield self.exchange(client, self.request(self.path, self.auth))
        client.send(self.request(self.base + "/held", self.auth))
        yield poll(lambda: self.backend.held, timeout=10, what="the held request")
        held = self.backend.held.pop()
        gone = held.notifyFinish()
        client.transport.abortConnection()
        try:
            yield gone
        except Exception:
            pass
        else:
            self.fail("the backend request should have been cut")
        yield poll(lambda: self.proxy.service.site.in_flight == set(), timeout=10, what="the end")
        line = self.access_lines()[-1]
        self.assertEqual(line["status"], 200)
        self.assertEqual(line["path"], self.base + "/held")
        self.assertFalse(line["completed"])
        self.assertEqual(line["client"], "127.0.0.1")  # known after the connection went


class Freed(LaneCase):
    @defer.inlineCallbacks
    def test_a_connection_and_its_requests_are_freed_without_the_collector(self):  # type: ignore[no-untyped-def]
        """No reference cycle is left behind (deadlines, the parser, the forwarder's exchange,
        the backend call): under load, cycles wait for the collector and the process grows."""
        import gc

        from cocalcproxy.handlers import backendhttp, forward

        kinds = (
            LaneChannel,
            lane_module.LaneRequest,
            forward._LaneExchange,
            backendhttp._Direct,
            backendhttp.BackendResponse,
        )

        def alive() -> list[str]:
            return [type(o).__name__ for o in gc.get_objects() if isinstance(o, kinds)]

        gc.collect()
        gc.disable()
        self.addCleanup(gc.enable)
        clients = []
        for _ in range(5):
            client = yield self.connect()
            for _ in range(2):
                yield self.exchange(client, self.request(self.path, self.auth))
            clients.append(client)
        self.assertTrue(alive())  # the count below can see them
        for client in clients:
            client.transport.loseConnection()
        yield poll(lambda: not self.server_protocols(), timeout=10, what="the closes")
        yield poll(lambda: not alive(), timeout=10, what=f"nothing left: {alive()}")


class Faults(LaneCase):
    @defer.inlineCallbacks
    def test_a_fault_of_ours_with_the_answer_closes_the_connection(self):  # type: ignore[no-untyped-def]
        """Not a connection left waiting for a finish that never comes."""
        from cocalcproxy.handlers import forward

        client = yield self.connect()
        yield self.exchange(client, self.request(self.path, self.auth))

        def broken(*args: object, **kwargs: object) -> object:
            raise RuntimeError("a bug in the header policy")

        self.patch(forward.headers, "client_response_headers", broken)
        client.send(self.request(self.path, self.auth))
        yield poll(lambda: client.lost, timeout=10, what="the proxy to close the connection")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(len(answers(client.received)), 1, "no second answer, not even half")
        yield poll(lambda: not self.proxy.service.site.in_flight, timeout=10, what="the end")
        self.assertFalse(self.access_lines()[-1]["completed"])


class HandsOver(LaneCase):
    @defer.inlineCallbacks
    def test_body_goes_the_ordinary_way_then_back(self):  # type: ignore[no-untyped-def]
        client = yield self.connect()
        yield self.exchange(client, self.request(self.path, self.auth))
        self.assertTrue(self.on_lane())
        # The head in two reads: the lane holds the first part until the head is whole.
        client.send(b"POST " + self.path.encode() + b" HTTP/1.1\r\nHost: localhost\r\n")
        yield poll(lambda: self.server_protocols()[0].buffer, timeout=10, what="a partial head")
        ((head, _),) = yield self.exchange(
            client, self.auth.encode() + b"\r\nContent-Length: 3\r\n\r\nabc"
        )
        self.assertTrue(head.startswith(b"HTTP/1.1 200 "), head)
        # The ordinary path answered it, and gave the connection back when it was done.
        self.assertTrue(self.handed_over)
        self.assertTrue(self.on_lane())
        self.handed_over = False
        ((_, body),) = yield self.exchange(client, self.request(self.path, self.auth))
        self.assertEqual(body, b"hello, world\n")
        self.assertFalse(self.handed_over)

    @defer.inlineCallbacks
    def test_a_cache_miss_goes_the_ordinary_way_then_back(self):  # type: ignore[no-untyped-def]
        _, other = yield self.proxy.directory.create_token("alice")
        client = yield self.connect()
        auth = f"Authorization: Bearer {other}"
        ((head, _),) = yield self.exchange(client, self.request(self.path, auth))
        self.assertTrue(head.startswith(b"HTTP/1.1 200 "), head)
        self.assertTrue(self.handed_over)
        self.assertTrue(self.on_lane())
        self.handed_over = False
        ((head, _),) = yield self.exchange(client, self.request(self.path, auth))
        self.assertTrue(head.startswith(b"HTTP/1.1 200 "), head)
        self.assertFalse(self.handed_over)  # now from the cache, on the lane

    @defer.inlineCallbacks
    def test_unknown_credentials_get_the_ordinary_refusal(self):  # type: ignore[no-untyped-def]
        client = yield self.connect()
        ((head, _),) = yield self.exchange(
            client, self.request(self.path, "Authorization: Bearer not-a-token")
        )
        self.assertTrue(head.startswith(b"HTTP/1.1 401 "), head)
        self.assertTrue(self.handed_over)

    @defer.inlineCallbacks
    def test_pipelined_requests_are_answered_in_order(self):  # type: ignore[no-untyped-def]
        client = yield self.connect()
        both = self.request(self.base + "/echo?first", self.auth) + self.request(
            self.base + "/echo?second", self.auth
        )
        found = yield self.exchange(client, both, count=2)
        self.assertEqual(
            [json.loads(body)["uri"] for _, body in found], ["/echo?first", "/echo?second"]
        )
        self.assertTrue(self.handed_over)

    @defer.inlineCallbacks
    def test_what_the_lane_does_not_take(self):  # type: ignore[no-untyped-def]
        """Each on a new connection: the answer is the ordinary path's, and the connection
        has been handed over."""
        tail = b"Host: localhost\r\n" + self.auth.encode() + b"\r\n\r\n"
        cases = [
            (self.request(self.path, self.auth, version="HTTP/1.0"), b"200"),
            (self.request("/_/health"), b"200"),
            (self.request(self.path, self.auth, "Host: evil.example"), b"400"),
            (self.request(self.path, self.auth, "Expect: 100-continue"), None),
            (self.request(f"/{self.project.id}/raw/", self.auth), None),
            (self.request(self.path, self.auth, "Upgrade: h2c", "Connection: Upgrade"), None),
            (b"GET https://localhost" + self.path.encode() + b" HTTP/1.1\r\n" + tail, None),
            (b"GET " + self.path.encode() + b" HTTP/1.1\r\nX-Folded: a\r\n b\r\n" + tail, None),
            (b"GET " + self.path.encode() + b" HTTP/1.1\r\nX-Bare: a\nb\r\n" + tail, None),
            (self.request(self.path, self.auth, "Content-Length: 0"), b"200"),
        ]
        for data, status in cases:
            client = yield self.connect()
            client.send(data)
            yield poll(
                lambda c=client: b"\r\n\r\n" in c.received or c.lost,
                timeout=10,
                what="an answer",
            )
            if status is not None:
                self.assertIn(b" " + status + b" ", client.received.split(b"\r\n", 1)[0], data)
            self.assertTrue(self.handed_over, data)
            self.handed_over = False
            if not client.lost:
                client.transport.abortConnection()
            yield poll(lambda: not self.server_protocols(), timeout=10, what="the close")


class Timeouts(LaneCase):
    extra = ("--request-head-timeout", "0.5", "--backend-response-timeout", "0.5")

    @defer.inlineCallbacks
    def test_a_backend_that_never_answers_gets_504_and_the_connection_goes_on(self):  # type: ignore[no-untyped-def]
        client = yield self.connect()
        for _ in range(2):
            yield self.exchange(client, self.request(self.path, self.auth))
        started = reactor.seconds()
        ((head, body),) = yield self.exchange(client, self.request(self.base + "/held", self.auth))
        self.assertGreaterEqual(reactor.seconds() - started, 0.5)
        self.assertTrue(head.startswith(b"HTTP/1.1 504 "), head)
        self.assertEqual(json.loads(body)["status"], 504)
        self.assertEqual(self.access_lines()[-1]["backend"], "response-timeout")
        ((head, body),) = yield self.exchange(client, self.request(self.path, self.auth))
        self.assertEqual(body, b"hello, world\n")
        self.assertTrue(self.on_lane())

    @defer.inlineCallbacks
    def test_a_head_that_never_ends_gets_408(self):  # type: ignore[no-untyped-def]
        client = yield self.connect()
        yield self.exchange(client, self.request(self.path, self.auth))
        client.send(b"GET " + self.path.encode() + b" HTTP/1.1\r\nHost: loc")
        yield poll(lambda: client.lost, timeout=10, what="the proxy to close")
        head = answers(client.received)[-1][0]
        self.assertTrue(head.startswith(b"HTTP/1.1 408 "), head)
        self.assertTrue(says_close(head.lower() + b"\r\n\r\n"))
