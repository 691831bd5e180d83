"""The WebSocket relay over real loopback sockets: ``websockets`` (PyPI) on both ends."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import os
import weakref
from typing import Any

from twisted.internet import defer
from twisted.trial import unittest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from cocalcproxy.http import site
from tests.relay_support import (
    TOKEN,
    MiniProxy,
    WSBackend,
    free_port,
    in_thread,
    on_reactor,
    wait_for,
)

AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def echo(ws: Any) -> None:
    async for message in ws:
        await ws.send(message)


def client(url: str, **options: Any) -> Any:
    options.setdefault("additional_headers", AUTH)
    options.setdefault("proxy", None)
    options.setdefault("open_timeout", 10)
    return connect(url, **options)


class MessagesTests(unittest.TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.proxy = MiniProxy(self)

    @defer.inlineCallbacks
    def test_text_and_binary(self):  # type: ignore[no-untyped-def]
        port = WSBackend(echo).start(self)
        url = self.proxy.url(port, "/echo?x=1")

        async def scenario() -> list[Any]:
            async with client(url) as ws:
                await ws.send("héllo")
                text = await ws.recv()
                await ws.send(b"\x00\x01\xff")
                binary = await ws.recv()
                return [text, binary]

        got = yield in_thread(scenario)
        self.assertEqual(got, ["héllo", b"\x00\x01\xff"])

    @defer.inlineCallbacks
    def test_sixteen_megabyte_message(self):  # type: ignore[no-untyped-def]
        port = WSBackend(echo, max_size=None, compression=None).start(self)
        payload = os.urandom(16 * 1024 * 1024)

        async def scenario() -> bytes:
            async with client(self.proxy.url(port), max_size=None, compression=None) as ws:
                await ws.send(payload)
                return await ws.recv()  # type: ignore[no-any-return]

        got = yield in_thread(scenario)
        self.assertEqual(hashlib.sha256(got).digest(), hashlib.sha256(payload).digest())

    @defer.inlineCallbacks
    def test_fragmented_message_keeps_its_fragments(self):  # type: ignore[no-untyped-def]
        seen: list[list[str]] = []

        async def count_fragments(ws: Any) -> None:
            fragments = [fragment async for fragment in ws.recv_streaming()]
            seen.append(fragments)
            await ws.send(iter(fragments))

        port = WSBackend(count_fragments).start(self)

        async def scenario() -> list[str]:
            async with client(self.proxy.url(port)) as ws:
                await ws.send(iter(["one ", "two ", "three"]))
                return [fragment async for fragment in ws.recv_streaming()]

        got = yield in_thread(scenario)
        # websockets ends a message sent from an iterable with an empty final frame.
        self.assertEqual(seen, [["one ", "two ", "three", ""]])
        self.assertEqual([f for f in got if f], ["one ", "two ", "three"])

    @defer.inlineCallbacks
    def test_ping_pong_both_ways(self):  # type: ignore[no-untyped-def]
        backend_pong: list[float] = []

        async def ping_back(ws: Any) -> None:
            waiter = await ws.ping(b"from-backend")
            backend_pong.append(await asyncio.wait_for(waiter, 10))
            await echo(ws)

        port = WSBackend(ping_back).start(self)

        async def scenario() -> str:
            async with client(self.proxy.url(port)) as ws:
                waiter = await ws.ping(b"from-client")
                await asyncio.wait_for(waiter, 10)
                await ws.send("after pings")
                return await ws.recv()  # type: ignore[no-any-return]

        got = yield in_thread(scenario)
        self.assertEqual(got, "after pings")
        self.assertEqual(len(backend_pong), 1)

    @defer.inlineCallbacks
    def test_backend_chooses_the_subprotocol(self):  # type: ignore[no-untyped-def]
        port = WSBackend(echo, subprotocols=["beta", "gamma"]).start(self)

        async def scenario() -> Any:
            async with client(self.proxy.url(port), subprotocols=["alpha", "beta"]) as ws:
                return ws.subprotocol

        got = yield in_thread(scenario)
        self.assertEqual(got, "beta")

    @defer.inlineCallbacks
    def test_permessage_deflate_end_to_end(self):  # type: ignore[no-untyped-def]
        extensions: list[str] = []

        async def note_extensions(ws: Any) -> None:
            extensions.extend(type(e).__name__ for e in ws.protocol.extensions)
            await echo(ws)

        port = WSBackend(note_extensions).start(self)
        message = "compress me " * 70_000  # 840 KB that deflates to a few KB

        async def scenario() -> tuple[list[str], str, list[tuple[int, int]]]:
            async with client(self.proxy.url(port), compression="deflate") as ws:
                await ws.send(message)
                echoed = await ws.recv()
                wire = on_reactor(
                    lambda: [(s.bytes_up, s.bytes_down) for s in self.proxy.relay.open_relays]
                )
                return [type(e).__name__ for e in ws.protocol.extensions], echoed, wire

        ours, echoed, wire = yield in_thread(scenario)
        self.assertEqual(echoed, message)
        # The proxy carried the compressed frames untouched: far fewer bytes than the text.
        [(up, down)] = wire
        self.assertLess(up, 50_000)
        self.assertLess(down, 50_000)
        self.assertEqual(ours, ["PerMessageDeflate"])
        self.assertEqual(extensions, ["PerMessageDeflate"])
        self.assertEqual(self.proxy.relay.opened_total, 1)

    @defer.inlineCallbacks
    def test_two_hundred_concurrent_relays(self):  # type: ignore[no-untyped-def]
        port = WSBackend(echo).start(self)
        url = self.proxy.url(port)
        count = 200

        async def scenario() -> tuple[int, list[str]]:
            ready = asyncio.Event()
            opened = 0

            async def one(i: int) -> str:
                nonlocal opened
                async with client(url, open_timeout=60) as ws:
                    opened += 1
                    if opened == count:
                        ready.set()
                    await ready.wait()
                    await ws.send(f"message {i}")
                    return await ws.recv()  # type: ignore[no-any-return]

            tasks = [asyncio.ensure_future(one(i)) for i in range(count)]
            await asyncio.wait_for(ready.wait(), 60)
            peak = on_reactor(lambda: self.proxy.relay.open_count())
            return peak, list(await asyncio.gather(*tasks))

        peak, answers = yield in_thread(scenario)
        self.assertEqual(peak, count)
        self.assertEqual(answers, [f"message {i}" for i in range(count)])
        yield wait_for(lambda: self.proxy.relay.open_count() == 0)


class RefusalTests(unittest.TestCase):
    timeout = 30

    def setUp(self) -> None:
        self.proxy = MiniProxy(self)

    @defer.inlineCallbacks
    def status_of(self, url: str, **options: Any):  # type: ignore[no-untyped-def]
        async def scenario() -> tuple[int, bytes, dict[str, str]]:
            try:
                async with client(url, **options):
                    pass
            except InvalidStatus as e:
                r = e.response
                return r.status_code, r.body or b"", dict(r.headers.raw_items())
            raise AssertionError("the handshake succeeded")

        return (yield in_thread(scenario))

    @defer.inlineCallbacks
    def test_cross_origin_refused_before_the_backend(self):  # type: ignore[no-untyped-def]
        backend = WSBackend(echo)
        port = backend.start(self)
        status, body, _ = yield self.status_of(self.proxy.url(port), origin="https://evil.example")
        self.assertEqual(status, 403)
        self.assertIn(b"another site", body)
        self.assertEqual(backend.connections, 0)

    @defer.inlineCallbacks
    def test_own_origin_allowed(self):  # type: ignore[no-untyped-def]
        port = WSBackend(echo).start(self)
        url = self.proxy.url(port)
        origin = f"HTTP://127.0.0.1:{self.proxy.port}"

        async def scenario() -> str:
            async with client(url, origin=origin) as ws:
                await ws.send("same site")
                return await ws.recv()  # type: ignore[no-any-return]

        self.assertEqual((yield in_thread(scenario)), "same site")

    @defer.inlineCallbacks
    def test_unauthenticated_refused_before_the_backend(self):  # type: ignore[no-untyped-def]
        backend = WSBackend(echo)
        port = backend.start(self)
        status, _, _ = yield self.status_of(self.proxy.url(port), additional_headers={})
        self.assertEqual(status, 401)
        self.assertEqual(backend.connections, 0)

    @defer.inlineCallbacks
    def test_backend_down_is_502(self):  # type: ignore[no-untyped-def]
        reasons: list[object] = []
        self.proxy.site.on_request_done.append(
            lambda request: reasons.append(request.log_info.extra.get("backend"))
        )
        port = free_port()
        status, body, _ = yield self.status_of(self.proxy.url(port))
        self.assertEqual(status, 502)
        self.assertIn(f"port {port}".encode(), body)
        self.assertIn(b"0.0.0.0", body)
        self.assertEqual(reasons, ["refused"], "counted as a backend failure in the metrics")

    @defer.inlineCallbacks
    def test_backend_answering_403_is_passed_on(self):  # type: ignore[no-untyped-def]
        from http import HTTPStatus

        def refuse(connection: Any, request: Any) -> Any:
            response = connection.respond(HTTPStatus.FORBIDDEN, "not for you\n")
            response.headers["X-Backend"] = "said no"
            return response

        port = WSBackend(echo, process_request=refuse).start(self)
        status, body, headers = yield self.status_of(self.proxy.url(port))
        self.assertEqual(status, 403)
        self.assertEqual(body, b"not for you\n")
        self.assertEqual(headers.get("X-Backend"), "said no")
        self.assertEqual(self.proxy.relay.open_count(), 0)

    @defer.inlineCallbacks
    def test_backend_answering_200_is_passed_on(self):  # type: ignore[no-untyped-def]
        from http import HTTPStatus

        def plain_page(connection: Any, request: Any) -> Any:
            return connection.respond(HTTPStatus.OK, "just a page\n")

        port = WSBackend(echo, process_request=plain_page).start(self)
        status, body, _ = yield self.status_of(self.proxy.url(port))
        self.assertEqual(status, 200)
        self.assertEqual(body, b"just a page\n")
        self.assertEqual(self.proxy.relay.opened_total, 0)


class EndingTests(unittest.TestCase):
    timeout = 30

    def setUp(self) -> None:
        self.proxy = MiniProxy(self)

    @defer.inlineCallbacks
    def test_revocation_closes_an_open_relay_with_a_close_frame(self):  # type: ignore[no-untyped-def]
        backend_codes: list[int | None] = []

        async def hold(ws: Any) -> None:
            try:
                await echo(ws)
            except ConnectionClosed:
                pass
            backend_codes.append(ws.close_code)

        port = WSBackend(hold).start(self)

        async def scenario() -> tuple[float, int | None, str | None]:
            async with client(self.proxy.url(port)) as ws:
                await ws.send("before")
                assert await ws.recv() == "before"
                loop = asyncio.get_running_loop()
                started = loop.time()
                on_reactor(lambda: self.proxy.guard.accesses[-1].revoke())
                try:
                    await asyncio.wait_for(ws.recv(), 5)
                except ConnectionClosed as e:
                    rcvd = e.rcvd
                    return (
                        loop.time() - started,
                        rcvd.code if rcvd else None,
                        rcvd.reason if rcvd else None,
                    )
                return -1.0, None, "still open"

        elapsed, code, reason = yield in_thread(scenario)
        self.assertEqual((code, reason), (1008, "access revoked"))
        self.assertGreaterEqual(elapsed, 0)
        self.assertLess(elapsed, 2)
        yield wait_for(lambda: backend_codes == [1008] and self.proxy.relay.open_count() == 0)

    @defer.inlineCallbacks
    def test_client_close_reaches_the_backend(self):  # type: ignore[no-untyped-def]
        codes: list[int | None] = []

        async def note_close(ws: Any) -> None:
            try:
                await echo(ws)
            except ConnectionClosed:
                pass
            codes.append(ws.close_code)

        port = WSBackend(note_close).start(self)

        async def scenario() -> None:
            async with client(self.proxy.url(port)) as ws:
                await ws.send("x")
                await ws.recv()
                await ws.close(4001, "bye")

        yield in_thread(scenario)
        yield wait_for(lambda: codes == [4001])
        yield wait_for(lambda: self.proxy.relay.open_count() == 0)

    @defer.inlineCallbacks
    def test_backend_close_reaches_the_client(self):  # type: ignore[no-untyped-def]
        async def close_soon(ws: Any) -> None:
            await ws.recv()
            await ws.close(4002, "done here")

        port = WSBackend(close_soon).start(self)

        async def scenario() -> tuple[int | None, str | None]:
            async with client(self.proxy.url(port)) as ws:
                await ws.send("x")
                try:
                    await ws.recv()
                except ConnectionClosed as e:
                    return (e.rcvd.code, e.rcvd.reason) if e.rcvd else (None, None)
            return None, None

        got = yield in_thread(scenario)
        self.assertEqual(got, (4002, "done here"))
        yield wait_for(lambda: self.proxy.relay.open_count() == 0)

    @defer.inlineCallbacks
    def test_close_all_ends_relays_and_refuses_new_ones(self):  # type: ignore[no-untyped-def]
        port = WSBackend(echo).start(self)
        url = self.proxy.url(port)

        async def scenario() -> tuple[str, int | None, Any]:
            async with client(url) as ws:
                await ws.send("x")
                await ws.recv()
                closing = on_reactor(lambda: [self.proxy.relay.close_all()])[0]
                try:
                    await asyncio.wait_for(ws.recv(), 5)
                    first = "still open"
                except ConnectionClosed as e:
                    first = f"closed {e.rcvd.code if e.rcvd else None}"
            try:
                async with client(url):
                    return first, None, closing
            except InvalidStatus as e:
                return first, e.response.status_code, closing

        first, status, closing = yield in_thread(scenario)
        self.assertEqual((first, status), ("closed 1001", 503))
        yield closing
        self.assertEqual(self.proxy.relay.open_count(), 0)


class HeldStateTests(unittest.TestCase):
    """What an open relay keeps: an idle WebSocket may stay open for hours, thousands at once."""

    timeout = 30

    def setUp(self) -> None:
        self.proxy = MiniProxy(self)

    @defer.inlineCallbacks
    def test_an_open_relay_holds_nothing_of_http_nor_of_its_handshake(self):  # type: ignore[no-untyped-def]
        port = WSBackend(echo).start(self)
        relay_handler = self.proxy.relay
        seen: dict[str, Any] = {}
        handle = relay_handler.handle

        def recording(request: Any, route: Any, access: Any) -> None:
            seen["channel"] = weakref.ref(request.channel)
            seen["request"] = request
            handle(request, route, access)
            [handshake] = relay_handler._pending
            seen["handshake"] = weakref.ref(handshake)
            seen["h11"] = weakref.ref(handshake.conn)

        relay_handler.handle = recording  # type: ignore[method-assign]
        # All of it is freed by reference counting, when it is let go: no cycle waits for the
        # collector (which, with the thresholds ops.service sets, may not run for long).
        gc.disable()
        self.addCleanup(gc.enable)

        ended: list[Any] = []

        def held() -> dict[str, Any]:
            request = seen["request"]
            waiters = len(request.notifications)
            request.notifyFinish().addBoth(ended.append)
            [splice] = relay_handler.open_relays
            return {
                # The site's (in flight, access log); not the handshake's any more.
                "notifyFinish waiters": waiters,
                "channel": seen["channel"]() is None,
                "handshake": seen["handshake"]() is None,
                "h11": seen["h11"]() is None,
                "backend knows the handshake": splice.backend.handshake is not None,
                "request.channel": request.channel,
                # Twisted's thirty-odd attributes, less all but those read until the end.
                "request attributes": set(vars(request)) - set(site._KEPT_AFTER_TAKEOVER),
                "request headers": list(request.requestHeaders.getAllRawHeaders()),
                "response headers": list(request.responseHeaders.getAllRawHeaders()),
            }

        async def scenario() -> tuple[dict[str, Any], str]:
            async with client(self.proxy.url(port, "/echo")) as ws:
                await ws.send("one")
                assert await ws.recv() == "one"
                facts = on_reactor(held)
                await ws.send("still relaying")
                return facts, await ws.recv()

        facts, echoed = yield in_thread(scenario)
        self.assertEqual(echoed, "still relaying")
        self.assertEqual(
            facts,
            {
                "notifyFinish waiters": 1,
                "channel": True,
                "handshake": True,
                "h11": True,
                "backend knows the handshake": False,
                "request.channel": None,
                "request attributes": {"requestHeaders", "responseHeaders"},
                "request headers": [(b"Host", [f"127.0.0.1:{self.proxy.port}".encode()])],
                "response headers": [],
            },
        )
        # The end still reaches the request (the access log's notifyFinish waiters).
        yield wait_for(lambda: bool(ended))
        self.assertTrue(seen["request"]._disconnected)
