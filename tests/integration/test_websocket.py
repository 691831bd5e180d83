"""WebSockets through the whole proxy over real TLS: real directory, real guard, ``websockets``
(PyPI) as client and backend, and a raw TLS socket where the bytes themselves matter."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import socket
import ssl
import struct
from typing import Any

from twisted.internet import defer
from twisted.trial import unittest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.relay_support import WSBackend, in_thread, on_reactor, wait_for
from tests.support import start_proxy


async def echo(ws: Any) -> None:
    try:
        async for message in ws:
            await ws.send(message)
    except ConnectionClosed:
        pass


def basic(name: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{name}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


class WebSocketEndToEndTests(unittest.TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def]
        self.proxy = yield start_proxy(self)
        directory = self.proxy.directory
        yield directory.add_user("alice", "alice-password")
        yield directory.add_user("bob", "bob-password")
        yield directory.add_user("eve", "eve-password")
        project = yield directory.add_project("alice", host="127.0.0.1")
        self.pid = project.id
        yield directory.add_collaborator(self.pid, "bob")
        self.tls = ssl.create_default_context(cafile=self.proxy.cert_path)

    @property
    def relay(self) -> Any:
        return self.proxy.service.relay

    def url(self, backend_port: int, path: str = "/", form: str = "server") -> str:
        return f"wss://localhost:{self.proxy.port}/{self.pid}/{form}/{backend_port}{path}"

    def client(self, url: str, user: str = "bob", **options: Any) -> Any:
        options.setdefault("additional_headers", basic(user, f"{user}-password"))
        options.setdefault("proxy", None)
        options.setdefault("open_timeout", 20)
        return connect(url, ssl=self.tls, **options)

    @defer.inlineCallbacks
    def refused(self, url: str, **options: Any):  # type: ignore[no-untyped-def]
        async def scenario() -> int:
            try:
                async with self.client(url, **options):
                    pass
            except InvalidStatus as e:
                return int(e.response.status_code)
            return 101

        return (yield in_thread(scenario))

    @defer.inlineCallbacks
    def test_messages_subprotocol_and_deflate_over_tls(self):  # type: ignore[no-untyped-def]
        seen: list[Any] = []

        async def handler(ws: Any) -> None:
            seen.append((ws.request.path, ws.request.headers.get("Authorization")))
            await echo(ws)

        backend = WSBackend(handler, subprotocols=["chat.v2"])
        port = backend.start(self)

        async def scenario() -> list[Any]:
            async with self.client(
                self.url(port, "/socket?token=abc", form="port"),
                subprotocols=["chat.v1", "chat.v2"],
                origin=self.proxy.origin,
            ) as ws:
                await ws.send("text ✓")
                text = await ws.recv()
                blob = os.urandom(70_000)
                await ws.send(blob)
                same = await ws.recv() == blob
                extensions = [type(e).__name__ for e in ws.protocol.extensions]
                return [text, same, ws.subprotocol, extensions]

        got = yield in_thread(scenario)
        self.assertEqual(got, ["text ✓", True, "chat.v2", ["PerMessageDeflate"]])
        # Port form: the backend sees the whole path; the proxy's Basic credentials do not pass.
        [(path, authorization)] = seen
        self.assertEqual(path, f"/{self.pid}/port/{port}/socket?token=abc")
        self.assertIsNone(authorization)
        headers = backend.request_headers[0]
        self.assertEqual(headers["Host"], f"localhost:{self.proxy.port}")
        # The access log has the relay: status 101 and the bytes spliced both ways.
        log_path = os.path.join(self.proxy.state_dir, "access.log")

        def relay_lines() -> list[dict[str, Any]]:
            with open(log_path, encoding="utf-8") as f:
                lines = [json.loads(line) for line in f if line.strip()]
            return [line for line in lines if line["status"] == 101]

        yield wait_for(lambda: bool(relay_lines()))
        [line] = relay_lines()
        self.assertEqual(line["account"], "bob")
        # What the relay kept of the request once it was taken over (shed_http_state).
        self.assertEqual(line["client"], "127.0.0.1")
        self.assertEqual(line["method"], "GET")
        self.assertEqual(line["host"], f"localhost:{self.proxy.port}")
        self.assertEqual(line["path"], f"/{self.pid}/port/{port}/socket")
        self.assertTrue(line["query"])
        self.assertEqual(line["form"], "port")
        self.assertEqual(line["port"], port)
        self.assertIn(line["websocket_end"], ("client closed", "backend closed"))
        self.assertTrue(line["completed"])
        self.assertGreater(line["bytes_in"], 70_000 * 0.9)
        self.assertGreater(line["bytes_out"], 70_000 * 0.9)
        self.assertEqual(headers["X-Forwarded-Proto"], "https")
        self.assertEqual(headers["X-Forwarded-For"], "127.0.0.1")

    @defer.inlineCallbacks
    def test_cross_origin_refused(self):  # type: ignore[no-untyped-def]
        backend = WSBackend(echo)
        port = backend.start(self)
        for origin in (
            "https://evil.example",
            f"http://localhost:{self.proxy.port}",  # same host, wrong scheme
            f"https://localhost:{self.proxy.port + 1}",  # same host, other port
            "null",
        ):
            status = yield self.refused(self.url(port), origin=origin)
            self.assertEqual(status, 403, origin)
        self.assertEqual(backend.connections, 0)

    @defer.inlineCallbacks
    def test_unauthenticated_and_outsiders_refused(self):  # type: ignore[no-untyped-def]
        backend = WSBackend(echo)
        port = backend.start(self)
        status = yield self.refused(self.url(port), additional_headers={})
        self.assertEqual(status, 401)
        status = yield self.refused(self.url(port), user="eve")
        self.assertEqual(status, 404)
        status = yield self.refused(
            self.url(port), additional_headers=basic("bob", "wrong-password")
        )
        self.assertEqual(status, 401)
        self.assertEqual(backend.connections, 0)

    @defer.inlineCallbacks
    def test_removed_collaborator_is_cut_within_two_seconds(self):  # type: ignore[no-untyped-def]
        port = WSBackend(echo).start(self)
        directory = self.proxy.directory

        async def scenario() -> tuple[float, str, int | None]:
            async with (
                self.client(self.url(port)) as bobs,
                self.client(self.url(port), user="alice") as alices,
            ):
                await bobs.send("hello")
                assert await bobs.recv() == "hello"
                loop = asyncio.get_running_loop()
                started = loop.time()
                on_reactor(lambda: directory.remove_collaborator(self.pid, "bob"))
                try:
                    await asyncio.wait_for(bobs.recv(), 10)
                    return -1.0, "still open", None
                except ConnectionClosed as e:
                    elapsed = loop.time() - started
                    code = e.rcvd.code if e.rcvd else None
                # The owner's relay to the same project is untouched.
                await alices.send("still here")
                return elapsed, await alices.recv(), code

        elapsed, alice_got, code = yield in_thread(scenario)
        self.assertEqual(code, 1008)  # policy violation: the proxy says why it closed
        self.assertEqual(alice_got, "still here")
        self.assertGreaterEqual(elapsed, 0)
        self.assertLess(elapsed, 2.0)

    @defer.inlineCallbacks
    def test_first_frame_in_the_handshake_packet_and_close_notify(self):  # type: ignore[no-untyped-def]
        port = WSBackend(echo).start(self)
        path = f"/{self.pid}/server/{port}/raw"
        host = f"localhost:{self.proxy.port}"

        key = base64.b64encode(os.urandom(16))
        guid = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
        expected = base64.b64encode(hashlib.sha1(key + guid).digest())  # noqa: S324

        def raw_client() -> tuple[bytes, bytes, bytes, bytes]:
            auth = basic("bob", "bob-password")["Authorization"]
            handshake = (
                f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                f"Authorization: {auth}\r\nSec-WebSocket-Key: {key.decode()}\r\n\r\n"
            ).encode()
            with socket.create_connection(("127.0.0.1", self.proxy.port), timeout=20) as raw:
                with self.tls.wrap_socket(
                    raw, server_hostname="localhost", suppress_ragged_eofs=False
                ) as s:
                    # One write: the handshake and the first frame travel together.
                    s.sendall(handshake + client_frame(0x1, b"in the same packet"))
                    head, rest = read_head(s)
                    opcode, payload, rest = read_frame(s, rest)
                    s.sendall(client_frame(0x8, struct.pack("!H", 1000) + b"bye"))
                    close_opcode, _, rest = read_frame(s, rest)
                    # The backend closes TCP after the close handshake; the proxy ends the TLS
                    # side with close_notify, so this read sees a clean end (b""), not an
                    # SSLEOFError (which suppress_ragged_eofs=False would raise).
                    tail = rest + s.recv(100)
                    return head, bytes([opcode, close_opcode]), payload, tail

        head, opcodes, payload, tail = yield in_thread(_sync(raw_client))
        self.assertTrue(head.startswith(b"HTTP/1.1 101 "), head)
        accept = [
            line.split(b":", 1)[1].strip()
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"sec-websocket-accept:")
        ]
        self.assertEqual(accept, [expected])
        self.assertEqual(opcodes, bytes([0x1, 0x8]))
        self.assertEqual(payload, b"in the same packet")
        self.assertEqual(tail, b"")
        yield wait_for(lambda: self.relay.open_count() == 0)

    @defer.inlineCallbacks
    def test_slow_client_pauses_the_backend(self):  # type: ignore[no-untyped-def]
        chunk = os.urandom(512 * 1024)
        count = 48  # 24 MB: more than the kernel's socket buffers on both hops
        sent: list[int] = []

        async def firehose(ws: Any) -> None:
            for i in range(count):
                await ws.send(chunk)
                sent.append(i)
            await echo(ws)

        port = WSBackend(firehose, max_size=None, compression=None).start(self)

        async def scenario() -> tuple[bool, int, int]:
            async with self.client(
                self.url(port), max_size=None, max_queue=1, compression=None
            ) as ws:
                loop = asyncio.get_running_loop()
                deadline = loop.time() + 30
                while not on_reactor(self.paused("backend")):
                    assert loop.time() < deadline, "the backend was never paused"
                    await asyncio.sleep(0.02)
                stalled_at = len(sent)
                digest = hashlib.sha256(chunk).digest()
                ok = True
                for _ in range(count):
                    ok = ok and hashlib.sha256(await ws.recv()).digest() == digest
                return ok, stalled_at, len(sent)

        ok, stalled_at, finally_sent = yield in_thread(scenario)
        self.assertTrue(ok)
        self.assertLess(stalled_at, count)  # the backend could not send everything while paused
        self.assertEqual(finally_sent, count)

    @defer.inlineCallbacks
    def test_slow_backend_pauses_the_client(self):  # type: ignore[no-untyped-def]
        chunk = os.urandom(512 * 1024)
        count = 48
        import threading

        gate = threading.Event()

        async def sluggish(ws: Any) -> None:
            await asyncio.get_running_loop().run_in_executor(None, gate.wait, 60)
            digest = hashlib.sha256(chunk).digest()
            good = 0
            for _ in range(count):
                good += hashlib.sha256(await ws.recv()).digest() == digest
            await ws.send(f"got {good}")
            await echo(ws)

        port = WSBackend(sluggish, max_size=None, max_queue=1, compression=None).start(self)

        async def scenario() -> tuple[int, str]:
            async with self.client(self.url(port), max_size=None, compression=None) as ws:
                sent = 0

                async def push() -> None:
                    nonlocal sent
                    for _ in range(count):
                        await ws.send(chunk)
                        sent += 1

                pushing = asyncio.ensure_future(push())
                loop = asyncio.get_running_loop()
                deadline = loop.time() + 30
                while not on_reactor(self.paused("client")):
                    assert loop.time() < deadline, "the client was never paused"
                    await asyncio.sleep(0.02)
                stalled_at = sent
                gate.set()
                await pushing
                return stalled_at, await asyncio.wait_for(ws.recv(), 30)

        stalled_at, answer = yield in_thread(scenario)
        self.assertLess(stalled_at, count)
        self.assertEqual(answer, f"got {count}")

    def paused(self, side: str) -> Any:
        def check() -> bool:
            relays = list(self.relay.open_relays)
            return len(relays) == 1 and getattr(relays[0], f"{side}_paused")

        return check

    @defer.inlineCallbacks
    def test_shutdown_closes_open_relays(self):  # type: ignore[no-untyped-def]
        port = WSBackend(echo).start(self)

        async def scenario() -> tuple[str, Any]:
            async with self.client(self.url(port)) as ws:
                await ws.send("x")
                await ws.recv()
                # Not waiting for stopService here: it waits for this client to close.
                stopped = on_reactor(lambda: [self.proxy.service.stopService()])[0]
                try:
                    await asyncio.wait_for(ws.recv(), 10)
                except ConnectionClosed as e:
                    return f"closed {e.rcvd.code if e.rcvd else None}", stopped
                return "open", stopped

        outcome, stopped = yield in_thread(scenario)
        self.assertEqual(outcome, "closed 1001")  # going away
        yield stopped
        self.assertEqual(self.relay.open_count(), 0)


def _sync(fn: Any) -> Any:
    async def run() -> Any:
        return await asyncio.get_running_loop().run_in_executor(None, fn)

    return run


def client_frame(opcode: int, payload: bytes) -> bytes:
    """A single masked frame, as a client must send (RFC 6455 section 5.3)."""
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    assert len(payload) < 126
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + masked


def read_head(s: Any) -> tuple[bytes, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        more = s.recv(4096)
        if not more:
            raise AssertionError(f"connection closed during the handshake: {data!r}")
        data += more
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


def read_frame(s: Any, buffered: bytes) -> tuple[int, bytes, bytes]:
    """(opcode, payload, leftover) of one small unmasked frame from the server."""
    data = buffered
    while len(data) < 2 or len(data) < 2 + (data[1] & 0x7F):
        more = s.recv(4096)
        if not more:
            raise AssertionError("connection closed mid-frame")
        data += more
    length = data[1] & 0x7F
    assert length < 126 and not data[1] & 0x80
    return data[0] & 0x0F, data[2 : 2 + length], data[2 + length :]


class SubdomainWebSocketTests(unittest.TestCase):
    """``https://<pid>-<port>.<domain>/``: the project's own subdomain is the allowed origin."""

    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def]
        self.proxy = yield start_proxy(self, "--project-domain", "projects.test")
        yield self.proxy.directory.add_user("bob", "bob-password")
        project = yield self.proxy.directory.add_project("bob", host="127.0.0.1")
        self.pid = project.id
        # The generated certificate names localhost only; these tests are about origins.
        self.tls = ssl.create_default_context(cafile=self.proxy.cert_path)
        self.tls.check_hostname = False

    def host(self, port: int) -> str:
        return f"{self.pid}-{port}.projects.test:{self.proxy.port}"

    def connect_to(self, port: int, path: str, **options: Any) -> Any:
        sock = socket.create_connection(("127.0.0.1", self.proxy.port), timeout=20)
        return connect(
            f"wss://{self.host(port)}{path}",
            sock=sock,
            ssl=self.tls,
            server_hostname=f"{self.pid}-{port}.projects.test",
            additional_headers=basic("bob", "bob-password"),
            proxy=None,
            open_timeout=20,
            **options,
        )

    @defer.inlineCallbacks
    def test_own_subdomain_origin_only(self):  # type: ignore[no-untyped-def]
        paths: list[str] = []

        async def handler(ws: Any) -> None:
            paths.append(ws.request.path)
            await echo(ws)

        port = WSBackend(handler).start(self)

        async def scenario() -> list[Any]:
            results: list[Any] = []
            async with self.connect_to(
                port, "/live?x=1", origin=f"https://{self.host(port)}"
            ) as ws:
                await ws.send("on my own subdomain")
                results.append(await ws.recv())
            for origin in (
                f"https://localhost:{self.proxy.port}",  # the main host is another site here
                f"https://{self.host(port + 1)}",  # a neighbouring port's subdomain
            ):
                try:
                    async with self.connect_to(port, "/", origin=origin):
                        results.append(101)
                except InvalidStatus as e:
                    results.append(e.response.status_code)
            return results

        got = yield in_thread(scenario)
        self.assertEqual(got, ["on my own subdomain", 403, 403])
        self.assertEqual(paths, ["/live?x=1"])
