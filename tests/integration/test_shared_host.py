"""Shared hosts over real sockets: a project reaches only its own ports, never the proxy's own
listeners nor denied infrastructure (issue 16). The whole proxy on loopback TLS, real backends,
treq and ``websockets`` as clients."""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import ssl
import tempfile
from typing import Any

import treq
from twisted.internet import defer, reactor, task
from twisted.internet.endpoints import TCP4ServerEndpoint, UNIXServerEndpoint
from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent as format_event
from twisted.logger import globalLogPublisher
from twisted.trial import unittest
from twisted.web import resource, server
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from cocalcproxy.directory.addresses import always_local, ip_of
from cocalcproxy.handlers.backendio import is_local_address
from tests.directory_support import new_postgres_url
from tests.relay_support import WSBackend, in_thread, on_reactor, wait_for
from tests.support import https_client, start_proxy


class Hello(resource.Resource):
    isLeaf = True

    def __init__(self, label: str) -> None:
        super().__init__()
        self.label = label

    def render(self, request: server.Request) -> bytes:
        request.setHeader(b"Content-Type", b"text/plain")
        return f"{self.label} {request.uri.decode()}".encode()


@defer.inlineCallbacks
def http_backend(case: unittest.TestCase, label: str):  # type: ignore[no-untyped-def]
    """A Twisted web server on a free loopback port answering ``<label> <path>``."""
    port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        server.Site(Hello(label))
    )
    case.addCleanup(port.stopListening)
    return port.getHost().port


async def echo(ws: Any) -> None:
    try:
        async for message in ws:
            await ws.send(message)
    except ConnectionClosed:
        pass


def basic(name: str) -> str:
    return "Basic " + base64.b64encode(f"{name}:{name}-password".encode()).decode()


class LogLines:
    """Collects the proxy's log lines (formatted) while a test runs."""

    def __init__(self, case: unittest.TestCase) -> None:
        self.lines: list[str] = []
        globalLogPublisher.addObserver(self)
        case.addCleanup(globalLogPublisher.removeObserver, self)

    def __call__(self, event: dict[str, Any]) -> None:
        text = format_event(event)
        if text:
            self.lines.append(text)

    def matching(self, *words: str) -> list[str]:
        return [line for line in self.lines if all(w in line for w in words)]


class ProxyCase(unittest.TestCase):
    timeout = 60
    extra: tuple[str, ...] = ()

    @defer.inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def]
        self.log = LogLines(self)
        self.proxy = yield start_proxy(self, *self.extra)
        self.directory = self.proxy.directory
        for name in ("alice", "bob"):
            yield self.directory.add_user(name, f"{name}-password")
        self.http = https_client(self, self.proxy.cert_path)
        self.tls = ssl.create_default_context(cafile=self.proxy.cert_path)

    @defer.inlineCallbacks
    def get(self, path: str, user: str, host: str | None = None):  # type: ignore[no-untyped-def]
        headers = {"Authorization": basic(user)}
        if host is not None:
            headers["Host"] = host
        response = yield self.http.get(self.proxy.url + path, headers=headers)
        body = yield response.content()
        return response.code, body

    @defer.inlineCallbacks
    def websocket(self, path: str, user: str, host: str | None = None):  # type: ignore[no-untyped-def]
        """101 and the echo of a message, or the refusal's status."""
        target = f"wss://localhost:{self.proxy.port}{path}"

        async def scenario() -> tuple[int, str | None]:
            options: dict[str, Any] = {
                "additional_headers": {"Authorization": basic(user)},
                "proxy": None,
                "open_timeout": 20,
            }
            if host is not None:
                # Connect to the proxy, but name the project subdomain in Host (and SNI).
                context = ssl.create_default_context(cafile=self.proxy.cert_path)
                context.check_hostname = False
                sock = socket.create_connection(("127.0.0.1", self.proxy.port), timeout=20)
                target_host = f"wss://{host}{path}"
                try:
                    async with connect(
                        target_host, ssl=context, sock=sock, server_hostname="localhost", **options
                    ) as ws:
                        await ws.send("ping")
                        return 101, str(await ws.recv())
                except InvalidStatus as e:
                    return int(e.response.status_code), None
            try:
                async with connect(target, ssl=self.tls, **options) as ws:
                    await ws.send("ping")
                    return 101, str(await ws.recv())
            except InvalidStatus as e:
                return int(e.response.status_code), None

        return (yield in_thread(scenario))


class SharedLoopbackTests(ProxyCase):
    """The default set-up: two projects on 127.0.0.1 (the issue's attack)."""

    @defer.inlineCallbacks
    def test_member_of_b_cannot_reach_a_by_port_on_shared_host(self):  # type: ignore[no-untyped-def]
        a = yield self.directory.add_project("alice", host="127.0.0.1")
        b = yield self.directory.add_project("bob", host="127.0.0.1")
        jupyter_a = yield http_backend(self, "A's jupyter")
        # Alone on 127.0.0.1, the default would allow it; shared, it allows no port at all.
        code, body = yield self.get(f"/{b.id}/server/{jupyter_a}/api", "bob")
        self.assertEqual(code, 404)
        self.assertNotIn(b"jupyter", body)
        unknown, unknown_body = yield self.get(
            f"/00000000-0000-4000-8000-000000000000/server/{jupyter_a}/api", "bob"
        )
        self.assertEqual((unknown, unknown_body), (404, body), "same 404 as an unknown project")
        code, _ = yield self.get(f"/{a.id}/server/{jupyter_a}/api", "alice")
        self.assertEqual(code, 404, "A shares its host too: no default ports")
        hint = self.log.matching(b.id, "--ports", "--socket-dir")
        self.assertTrue(hint, "the log line says the project needs --ports or --socket-dir")
        # The access log records why (the client's 404 does not).
        log_path = os.path.join(self.proxy.state_dir, "access.log")

        def refused_lines() -> list[dict[str, Any]]:
            with open(log_path, encoding="utf-8") as f:
                lines = [json.loads(line) for line in f if line.strip()]
            return [line for line in lines if line.get("backend") == "port-not-allowed"]

        yield wait_for(lambda: len(refused_lines()) >= 2)
        self.assertEqual({line["status"] for line in refused_lines()}, {404})
        # With their own disjoint port sets each reaches its own servers only.
        yield self.directory.set_project(a.id, ports=f"{jupyter_a}")
        yield self.directory.set_project(b.id, ports=f"{jupyter_a + 1}-{jupyter_a + 5}")
        yield wait_for_change(self)
        code, body = yield self.get(f"/{a.id}/server/{jupyter_a}/api", "alice")
        self.assertEqual((code, body), (200, b"A's jupyter /api"))
        code, _ = yield self.get(f"/{b.id}/server/{jupyter_a}/api", "bob")
        self.assertEqual(code, 404)

    @defer.inlineCallbacks
    def test_project_alone_on_its_host_keeps_the_unprivileged_range(self):  # type: ignore[no-untyped-def]
        """The README's walkthrough: the directory's only project, on 127.0.0.1. Once another
        project exists, even on a remote host, the local one needs its own port set: the other
        project's host could name this machine in a spelling the proxy cannot match."""
        a = yield self.directory.add_project("alice", host="127.0.0.1")
        port = yield http_backend(self, "alone")
        code, body = yield self.get(f"/{a.id}/server/{port}/x", "alice")
        self.assertEqual((code, body), (200, b"alone /x"))
        remote = yield self.directory.add_project("bob", host="192.0.2.77")
        yield wait_for_change(self)
        code, _ = yield self.get(f"/{a.id}/server/{port}/x", "alice")
        self.assertEqual(code, 404)
        yield self.directory.set_project(a.id, ports=f"{port}")
        yield wait_for_change(self)
        code, body = yield self.get(f"/{a.id}/server/{port}/x", "alice")
        self.assertEqual((code, body), (200, b"alone /x"))
        self.assertTrue(remote.id)

    @defer.inlineCallbacks
    def test_this_machine_under_another_name_is_still_shared(self):  # type: ignore[no-untyped-def]
        """A's host is this machine's own host name, B's 127.0.0.1 (found by review: they were
        not seen as one machine, so B's members reached A's servers by port). Neither gets
        default ports; the name is judged by the address it resolves to, before connecting."""
        name = socket.gethostname()
        self.assertFalse(always_local(name) or ip_of(name) is not None, name)
        a = yield self.directory.add_project("alice", host=name)
        b = yield self.directory.add_project("bob", host="127.0.0.1")
        a_server = yield TCP4ServerEndpoint(reactor, 0, interface="0.0.0.0").listen(  # noqa: S104
            server.Site(Hello("A's jupyter"))
        )
        self.addCleanup(a_server.stopListening)
        port = a_server.getHost().port
        code, body = yield self.get(f"/{b.id}/server/{port}/api", "bob")
        self.assertEqual(code, 404)
        self.assertNotIn(b"jupyter", body)
        got = yield self.websocket(f"/{b.id}/port/{port}/", "bob")
        self.assertEqual(got[0], 404)
        code, body = yield self.get(f"/{a.id}/server/{port}/api", "alice")
        self.assertEqual(code, 404, "A's name resolves to this machine, which B shares")
        self.assertNotIn(b"jupyter", body)
        self.assertTrue(self.log.matching(name, "resolves to this machine", "--ports"))
        yield self.directory.set_project(a.id, ports=f"{port}")
        yield wait_for_change(self)
        code, body = yield self.get(f"/{a.id}/server/{port}/api", "alice")
        self.assertEqual((code, body), (200, b"A's jupyter /api"))
        code, _ = yield self.get(f"/{b.id}/server/{port}/api", "bob")
        self.assertEqual(code, 404)


class PortSetFormsTests(ProxyCase):
    """A port outside the set is a 404 on every form and on WebSocket upgrades; inside works."""

    extra = ("--project-domain", "projects.test")

    @defer.inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def]
        yield super().setUp()
        self.inside = yield http_backend(self, "inside")
        self.outside = yield http_backend(self, "outside")
        self.ws = WSBackend(echo)
        self.ws_port = self.ws.start(self)
        self.ws_outside = WSBackend(echo)
        self.ws_outside_port = self.ws_outside.start(self)
        project = yield self.directory.add_project(
            "alice", host="127.0.0.1", ports=f"{self.inside},{self.ws_port}"
        )
        self.pid = project.id

    def sub(self, port: int) -> str:
        return f"{self.pid}-{port}.projects.test:{self.proxy.port}"

    @defer.inlineCallbacks
    def test_http_forms(self):  # type: ignore[no-untyped-def]
        for port, expected in ((self.inside, 200), (self.outside, 404)):
            code, body = yield self.get(f"/{self.pid}/server/{port}/a", "alice")
            self.assertEqual(code, expected, f"server form, port {port}")
            code, body = yield self.get(f"/{self.pid}/port/{port}/b", "alice")
            self.assertEqual(code, expected, f"port form, port {port}")
            code, body = yield self.get("/c", "alice", host=self.sub(port))
            self.assertEqual(code, expected, f"subdomain form, port {port}")
            if expected == 200:
                self.assertEqual(body, b"inside /c")
            else:
                self.assertNotIn(b"outside", body)

    @defer.inlineCallbacks
    def test_websocket_forms(self):  # type: ignore[no-untyped-def]
        for port, expected in ((self.ws_port, 101), (self.ws_outside_port, 404)):
            got = yield self.websocket(f"/{self.pid}/server/{port}/", "alice")
            self.assertEqual(got[0], expected, f"server form, port {port}")
            got = yield self.websocket(f"/{self.pid}/port/{port}/", "alice")
            self.assertEqual(got[0], expected, f"port form, port {port}")
            got = yield self.websocket("/", "alice", host=self.sub(port))
            self.assertEqual(got[0], expected, f"subdomain form, port {port}")
            if expected == 101:
                self.assertEqual(got[1], "ping")
        self.assertEqual(self.ws_outside.connections, 0, "the refused backend never saw a thing")

    @defer.inlineCallbacks
    def test_port_removed_from_the_set_cuts_open_websockets(self):  # type: ignore[no-untyped-def]
        directory = self.directory
        url = f"wss://localhost:{self.proxy.port}/{self.pid}/server/{self.ws_port}/"

        async def scenario() -> tuple[float, int | None, str]:
            import asyncio

            async with connect(
                url,
                ssl=self.tls,
                proxy=None,
                additional_headers={"Authorization": basic("alice")},
            ) as ws:
                await ws.send("before")
                before = str(await ws.recv())
                loop = asyncio.get_running_loop()
                started = loop.time()
                on_reactor(lambda: directory.set_project(self.pid, ports=str(self.inside)))
                try:
                    await asyncio.wait_for(ws.recv(), 10)
                    return -1.0, None, before
                except ConnectionClosed as e:
                    return loop.time() - started, e.rcvd.code if e.rcvd else None, before

        elapsed, code, before = yield in_thread(scenario)
        self.assertEqual(before, "before")
        self.assertEqual(code, 1008)
        self.assertGreaterEqual(elapsed, 0)
        self.assertLess(elapsed, 2.0)
        got = yield self.websocket(f"/{self.pid}/server/{self.ws_port}/", "alice")
        self.assertEqual(got[0], 404, "and new handshakes are refused")

    @defer.inlineCallbacks
    def test_refused_before_the_body_is_read(self):  # type: ignore[no-untyped-def]
        """A POST announcing 100 MB to a port outside the set is answered 404 from its headers
        alone: the proxy neither waits for nor stores the body."""
        head = (
            f"POST /{self.pid}/server/{self.outside}/upload HTTP/1.1\r\n"
            f"Host: localhost:{self.proxy.port}\r\nAuthorization: {basic('alice')}\r\n"
            "Content-Length: 100000000\r\n\r\n"
        ).encode()

        def exchange() -> bytes:
            with socket.create_connection(("127.0.0.1", self.proxy.port), timeout=20) as raw:
                with self.tls.wrap_socket(raw, server_hostname="localhost") as tls:
                    tls.sendall(head)
                    return tls.recv(65536)

        answer = yield deferToThread(exchange)
        self.assertTrue(answer.startswith(b"HTTP/1.1 404 "), answer[:80])


class OwnListenersTests(ProxyCase):
    """Even with every port allowed and nothing denied, a route never reaches the proxy's own
    listeners: metrics, the HTTPS listener, the redirect listener; by address or by name."""

    extra = (
        "--metrics",
        "tcp:0:interface=127.0.0.1",
        "--redirect-http",
        "tcp:0:interface=127.0.0.1",
        "--deny-ports",
        "none",
    )

    @defer.inlineCallbacks
    def test_own_listeners_refused_through_routes(self):  # type: ignore[no-untyped-def]
        service = self.proxy.service
        metrics = service.metrics_listener.port.getHost().port
        redirect = service.redirect_listener.port.getHost().port
        main = self.proxy.port
        by_ip = yield self.directory.add_project("alice", host="127.0.0.1", ports="all")
        by_name = yield self.directory.add_project("bob", host="localhost", ports="all")
        for project, user in ((by_ip, "alice"), (by_name, "bob")):
            for port in (metrics, redirect, main):
                code, body = yield self.get(f"/{project.id}/server/{port}/metrics", user)
                self.assertEqual(code, 404, f"{project.host}:{port}")
                self.assertNotIn(b"cocalcproxy_", body)
                got = yield self.websocket(f"/{project.id}/port/{port}/", user)
                self.assertEqual(got[0], 404, f"WebSocket to {project.host}:{port}")
        self.assertTrue(self.log.matching("Prometheus metrics listener"))
        # The same project reaches an ordinary server on its host.
        port = yield http_backend(self, "app")
        code, body = yield self.get(f"/{by_name.id}/server/{port}/", "bob")
        self.assertEqual((code, body), (200, b"app /"))

    @defer.inlineCallbacks
    def test_a_name_resolving_to_this_machine_is_judged_by_its_addresses(self):  # type: ignore[no-untyped-def]
        """The machine's own host name (not an IP literal, not a localhost name) resolves to an
        address of this machine: the check happens on the resolved address (SSRF by name)."""
        name = socket.gethostname()
        self.assertFalse(always_local(name) or ip_of(name) is not None, name)
        addresses = {info[4][0] for info in socket.getaddrinfo(name, 80, type=socket.SOCK_STREAM)}
        self.assertTrue(addresses and all(is_local_address(a) for a in addresses), addresses)
        metrics = self.proxy.service.metrics_listener.port.getHost().port
        project = yield self.directory.add_project("alice", host=name, ports="all")
        code, body = yield self.get(f"/{project.id}/server/{metrics}/metrics", "alice")
        self.assertEqual(code, 404)
        self.assertNotIn(b"cocalcproxy_", body)
        screened = [line for a in addresses for line in self.log.matching(f"{a}:{metrics} is")]
        self.assertTrue(screened, "refused after resolution, naming the resolved address")
        got = yield self.websocket(f"/{project.id}/port/{metrics}/", "alice")
        self.assertEqual(got[0], 404)


class DenyListTests(ProxyCase):
    """The deny list applies whatever the project's port set."""

    @defer.inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def]
        self.denied = yield http_backend(self, "denied")
        self.extra = ("--deny-ports", f"1-1023,{self.denied}")
        yield super().setUp()

    @defer.inlineCallbacks
    def test_denied_port_refused_allowed_port_served(self):  # type: ignore[no-untyped-def]
        project = yield self.directory.add_project("alice", ports="all")
        code, body = yield self.get(f"/{project.id}/server/{self.denied}/", "alice")
        self.assertEqual(code, 404)
        self.assertNotIn(b"denied", body)
        got = yield self.websocket(f"/{project.id}/server/{self.denied}/", "alice")
        self.assertEqual(got[0], 404)
        other = yield http_backend(self, "fine")
        code, body = yield self.get(f"/{project.id}/server/{other}/", "alice")
        self.assertEqual((code, body), (200, b"fine /"))


class DatabasePortTests(ProxyCase):
    """With the directory on PostgreSQL, its port is one of the proxy's own: never reachable
    through a route, even with every port allowed and nothing denied."""

    @defer.inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def]
        self.extra = ("--database", new_postgres_url(self), "--deny-ports", "none")
        yield super().setUp()

    @defer.inlineCallbacks
    def test_database_port_refused(self):  # type: ignore[no-untyped-def]
        project = yield self.directory.add_project("alice", ports="all")
        code, _ = yield self.get(f"/{project.id}/server/5432/", "alice")
        self.assertEqual(code, 404)
        self.assertTrue(self.log.matching("5432", "directory database"))
        got = yield self.websocket(f"/{project.id}/port/5432/", "alice")
        self.assertEqual(got[0], 404)


class DefaultDenyListTests(ProxyCase):
    """The default deny list keeps PostgreSQL (running on 127.0.0.1:5432 here) out of reach."""

    @defer.inlineCallbacks
    def test_postgresql_port_refused_by_default(self):  # type: ignore[no-untyped-def]
        project = yield self.directory.add_project("alice", ports="all")
        code, _ = yield self.get(f"/{project.id}/server/5432/", "alice")
        self.assertEqual(code, 404)
        self.assertTrue(self.log.matching("5432", "deny list"))


class Streaming(resource.Resource):
    """``/stream`` sends one line, then the rest only when the test says so; other paths
    answer ``socket <path>``."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.waiting: list[server.Request] = []

    def render(self, request: server.Request) -> Any:
        request.setHeader(b"Content-Type", b"text/plain")
        if request.path.endswith(b"/stream"):
            request.write(b"first\n")
            self.waiting.append(request)
            return server.NOT_DONE_YET
        return b"socket " + request.uri

    def finish_streams(self) -> None:
        for request in self.waiting:
            request.write(b"second\n")
            request.finish()
        self.waiting = []


class CountingSite(server.Site):
    connections = 0

    def buildProtocol(self, addr: Any) -> Any:  # noqa: N802
        self.connections += 1
        return super().buildProtocol(addr)


class SocketFolderTests(ProxyCase):
    """Projects whose servers listen on Unix sockets ``<socket folder>/<port>``."""

    @defer.inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def]
        yield super().setUp()
        # Short paths under /tmp (root-owned and sticky): AF_UNIX names are at most 107 bytes.
        self.folder = tempfile.mkdtemp(prefix="cp-sock-", dir="/tmp")
        self.addCleanup(shutil.rmtree, self.folder, True)
        os.chmod(self.folder, 0o700)
        # TEST-NET-1: nothing answers there, so anything served came over the socket.
        project = yield self.directory.add_project(
            "alice", host="192.0.2.1", socket_dir=self.folder
        )
        self.pid = project.id

    @defer.inlineCallbacks
    def serve_http(self, port: int, folder: str | None = None):  # type: ignore[no-untyped-def]
        site = Streaming()
        path = os.path.join(folder or self.folder, str(port))
        self.site = CountingSite(site)
        listening = yield UNIXServerEndpoint(reactor, path).listen(self.site)
        self.addCleanup(listening.stopListening)
        return site, path

    @defer.inlineCallbacks
    def test_http_streaming_and_websocket_over_the_socket(self):  # type: ignore[no-untyped-def]
        site, _ = yield self.serve_http(8000)
        code, body = yield self.get(f"/{self.pid}/server/8000/hello?x=1", "alice")
        self.assertEqual((code, body), (200, b"socket /hello?x=1"))
        code, body = yield self.get(f"/{self.pid}/port/8000/hello", "alice")
        self.assertEqual((code, body), (200, f"socket /{self.pid}/port/8000/hello".encode()))
        self.assertEqual(self.site.connections, 1, "the second request reused the pooled one")
        # Streaming: the first line arrives before the backend has written the second.
        response = yield self.http.get(
            f"{self.proxy.url}/{self.pid}/server/8000/stream",
            headers={"Authorization": basic("alice")},
        )
        self.assertEqual(response.code, 200)
        chunks: list[bytes] = []
        first = defer.Deferred()

        def got(data: bytes) -> None:
            chunks.append(data)
            if not first.called:
                first.callback(None)

        done = treq.collect(response, got)
        yield first
        self.assertEqual(b"".join(chunks), b"first\n")
        site.finish_streams()
        yield done
        self.assertEqual(b"".join(chunks), b"first\nsecond\n")
        # WebSocket: the relay connects to the socket too.
        ws_path = os.path.join(self.folder, "8765")
        backend = UnixWSBackend(echo, ws_path)
        backend.start(self)
        got_ws = yield self.websocket(f"/{self.pid}/server/8765/", "alice")
        self.assertEqual(got_ws, (101, "ping"))

    @defer.inlineCallbacks
    def test_nothing_listening_names_the_socket_and_how(self):  # type: ignore[no-untyped-def]
        response = yield self.http.get(
            f"{self.proxy.url}/{self.pid}/server/8888/",
            headers={"Authorization": basic("alice"), "Accept": "text/html"},
        )
        page = (yield response.content()).decode()
        self.assertEqual(response.code, 502)
        path = os.path.join(self.folder, "8888")
        self.assertIn(path, page)
        for how in ("--ServerApp.sock=", "--uds", "--bind unix:"):
            self.assertIn(how, page)
        got = yield self.websocket(f"/{self.pid}/server/8888/", "alice")
        self.assertEqual(got[0], 502, "a WebSocket to a missing socket too")

    @defer.inlineCallbacks
    def refused(self, port: int, *why: str):  # type: ignore[no-untyped-def]
        """The request is refused with a 502 page naming the socket and the reason, and one
        log line; for HTTP and for a WebSocket handshake."""
        path = os.path.join(self.folder, str(port))
        response = yield self.http.get(
            f"{self.proxy.url}/{self.pid}/server/{port}/",
            headers={"Authorization": basic("alice"), "Accept": "text/html"},
        )
        page = (yield response.content()).decode()
        self.assertEqual(response.code, 502, page)
        self.assertIn(path, page)
        self.assertIn("refused", page)
        for word in why:
            self.assertIn(word, page)
        lines = self.log.matching("socket backend refused", path)
        self.assertEqual(len(lines), 1, lines)
        got = yield self.websocket(f"/{self.pid}/server/{port}/", "alice")
        self.assertEqual(got[0], 502)

    @defer.inlineCallbacks
    def test_group_or_world_writable_folder_refused(self):  # type: ignore[no-untyped-def]
        site, _ = yield self.serve_http(8001)
        for mode in (0o770, 0o707, 0o1777):
            os.chmod(self.folder, mode)
            self.log.lines.clear()
            yield self.refused(8001, "writable by group or others")
        os.chmod(self.folder, 0o700)
        code, body = yield self.get(f"/{self.pid}/server/8001/", "alice")
        self.assertEqual((code, body), (200, b"socket /"))

    @defer.inlineCallbacks
    def test_regular_file_or_symlink_in_place_of_the_socket_refused(self):  # type: ignore[no-untyped-def]
        with open(os.path.join(self.folder, "8002"), "w") as f:
            f.write("not a socket")
        yield self.refused(8002, "a regular file, not a socket")
        # A symbolic link to a real, good socket elsewhere is refused too (never followed).
        elsewhere = tempfile.mkdtemp(prefix="cp-else-", dir="/tmp")
        self.addCleanup(shutil.rmtree, elsewhere, True)
        yield self.serve_http(8003, folder=elsewhere)
        os.symlink(os.path.join(elsewhere, "8003"), os.path.join(self.folder, "8003"))
        self.log.lines.clear()
        yield self.refused(8003, "a symbolic link, not a socket")

    @defer.inlineCallbacks
    def test_socket_owned_by_another_user_refused(self):  # type: ignore[no-untyped-def]
        _, path = yield self.serve_http(8004)
        other = unused_uid()
        os.chown(path, other, -1)
        yield self.refused(8004, f"belongs to uid {other}", "not to the owner (uid 0)")
        # With --socket-owner naming that account (and the folder its own), it is served.
        os.chown(self.folder, other, -1)
        yield self.directory.set_project(self.pid, socket_owner=str(other))
        yield wait_for_change(self)
        code, body = yield self.get(f"/{self.pid}/server/8004/", "alice")
        self.assertEqual((code, body), (200, b"socket /"))
        # ...and a socket of root's there is now the other account's problem: refused.
        _, root_path = yield self.serve_http(8005)
        self.log.lines.clear()
        yield self.refused(8005, "belongs to uid 0", f"not to the owner (uid {other})")

    @defer.inlineCallbacks
    def test_symlinked_folder_refused(self):  # type: ignore[no-untyped-def]
        """A folder swapped for a symbolic link to someone else's folder is refused."""
        yield self.serve_http(8006)
        link = self.folder + "-link"
        os.symlink(self.folder, link)
        self.addCleanup(os.unlink, link)
        yield self.directory.set_project(self.pid, socket_dir=link)
        yield wait_for_change(self)
        response = yield self.http.get(
            f"{self.proxy.url}/{self.pid}/server/8006/",
            headers={"Authorization": basic("alice"), "Accept": "text/html"},
        )
        page = (yield response.content()).decode()
        self.assertEqual(response.code, 502)
        self.assertIn("symbolic link", page)

    @defer.inlineCallbacks
    def test_socket_swapped_after_the_check_is_refused(self):  # type: ignore[no-untyped-def]
        """The folder's owner swaps the checked socket for a symbolic link to another user's
        socket between the proxy's check and its connect (a race the owner can win by
        repeating it): the server that answers runs as that other user, and is refused."""
        from cocalcproxy.handlers import socketdir

        yield self.serve_http(8010)
        victim = unused_uid()
        theirs = tempfile.mkdtemp(prefix="cp-bob-", dir="/tmp")
        self.addCleanup(shutil.rmtree, theirs, True)
        os.chown(theirs, victim, victim)
        their_socket = os.path.join(theirs, "8000")
        ready, tell = os.pipe()
        child = os.fork()
        if child == 0:  # pragma: no cover - bob's server, in a child under bob's uid
            try:
                os.setgroups([])
                os.setgid(victim)
                os.setuid(victim)
                listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                listener.bind(their_socket)
                listener.listen(4)
                os.write(tell, b"ready\n")
                while True:
                    conn, _ = listener.accept()
                    conn.recv(65536)
                    conn.sendall(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\nConnection: close\r\n"
                        b"\r\nbob secret"
                    )
                    conn.close()
            finally:
                os._exit(0)
        os.close(tell)
        self.addCleanup(os.waitpid, child, 0)
        self.addCleanup(os.kill, child, 9)
        with os.fdopen(ready, "rb") as pipe:
            self.assertEqual(pipe.readline(), b"ready\n")
        os.chmod(their_socket, 0o777)  # the proxy (root here) may connect anyway

        checked = socketdir.open_checked
        mine = os.path.join(self.folder, "8010")

        def racing(target: Any, own_paths: Any = frozenset()) -> Any:
            found = checked(target, own_paths)
            if target.port == 8010 and not os.path.islink(mine):
                os.unlink(mine)
                os.symlink(their_socket, mine)
            return found

        self.patch(socketdir, "open_checked", racing)
        response = yield self.http.get(
            f"{self.proxy.url}/{self.pid}/server/8010/",
            headers={"Authorization": basic("alice"), "Accept": "text/html"},
        )
        page = (yield response.content()).decode()
        self.assertNotIn("bob secret", page)
        self.assertEqual(response.code, 502, page)
        self.assertIn(f"runs as uid {victim}, not as the owner (uid 0)", page)
        got = yield self.websocket(f"/{self.pid}/server/8010/", "alice")
        self.assertEqual(got[0], 502)


def unused_uid() -> int:
    import pwd

    uid = 54321
    while True:
        try:
            pwd.getpwuid(uid)
        except KeyError:
            return uid
        uid += 1


@defer.inlineCallbacks
def wait_for_change(case: ProxyCase):  # type: ignore[no-untyped-def]
    """Let the guard see the directory's change counter move (it polls once a second)."""
    guard = case.proxy.service.site.resource.guard
    counter = yield case.directory.change_counter()
    deadline = reactor.seconds() + 10
    while guard.last_counter != counter:
        case.assertLess(reactor.seconds(), deadline, "the guard never polled")
        yield task.deferLater(reactor, 0.05, lambda: None)


class UnixWSBackend(WSBackend):
    """The ``websockets`` echo server on a Unix socket instead of TCP."""

    def __init__(self, handler: Any, path: str) -> None:
        super().__init__(handler)
        self.path = path

    async def _main(self) -> None:
        import asyncio

        from websockets.asyncio.server import unix_serve

        self._stop = asyncio.Event()

        async def handler(connection: Any) -> None:
            self.connections += 1
            await self.handler(connection)

        async with unix_serve(handler, self.path) as ws_server:
            self.ready.set()
            await self._stop.wait()
            ws_server.close()
            await ws_server.wait_closed()
