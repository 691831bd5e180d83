"""The plain-HTTP redirect listener and /_/health, over real loopback sockets."""

from __future__ import annotations

import json
import socket

from twisted.internet import defer, reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.threads import deferToThread
from twisted.trial import unittest
from twisted.web import server

from cocalcproxy.http import routing
from cocalcproxy.http.ownpages import OwnPages
from cocalcproxy.http.redirect import RedirectResource
from cocalcproxy.http.site import ProxySite, Root
from cocalcproxy.ops.options import Options
from cocalcproxy.ops.service import _https_port
from tests.support import plain_client


def raw_exchange(port: int, data: bytes) -> bytes:
    """Blocking: send raw bytes, read until the server closes or the head is complete."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        chunks = []
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
            if b"\r\n\r\n" in b"".join(chunks):
                break
        return b"".join(chunks)


class RedirectTests(unittest.TestCase):
    @inlineCallbacks
    def listen(self, resource):  # type: ignore[no-untyped-def]
        site = server.Site(resource)
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(site)
        self.addCleanup(port.stopListening)
        return port.getHost().port

    @inlineCallbacks
    def test_every_method_gets_308_to_same_path(self):  # type: ignore[no-untyped-def]
        port = yield self.listen(RedirectResource("proxy.example.org", 8443))
        client = plain_client(self)
        for method in ("GET", "POST", "PUT", "DELETE"):
            response = yield client.request(
                method, f"http://127.0.0.1:{port}/abc/server/8000/x?y=1", allow_redirects=False
            )
            yield response.content()
            self.assertEqual(response.code, 308, method)
            self.assertEqual(
                response.headers.getRawHeaders("location"),
                ["https://proxy.example.org:8443/abc/server/8000/x?y=1"],
            )

    @inlineCallbacks
    def test_default_port_omitted_and_foreign_authority_never_echoed(self):  # type: ignore[no-untyped-def]
        port = yield self.listen(RedirectResource("proxy.example.org", None))
        head = yield deferToThread(
            raw_exchange,
            port,
            b"GET http://evil.example/steal HTTP/1.1\r\nHost: evil.example\r\n\r\n",
        )
        self.assertIn(b"308", head.split(b"\r\n")[0])
        self.assertIn(b"\r\nLocation: https://proxy.example.org/\r\n", head)
        self.assertNotIn(b"evil", head)
        self.assertNotIn(b"Twisted", head)
        head = yield deferToThread(
            raw_exchange, port, b"GET //evil.example/x HTTP/1.1\r\nHost: a\r\n\r\n"
        )
        self.assertIn(b"\r\nLocation: https://proxy.example.org/\r\n", head)

    def test_https_port_from_listen_options(self) -> None:
        def port_for(*listen: str) -> int | None:
            options = Options()
            args = [a for endpoint in listen for a in ("--listen", endpoint)]
            options.parseOptions(args)
            return _https_port(options)

        self.assertEqual(port_for(), 8443)
        self.assertEqual(port_for("tcp:443"), None)
        self.assertEqual(port_for("tcp:port=9443:interface=127.0.0.1"), 9443)
        self.assertEqual(port_for("systemd:domain=INET:index=0"), None)
        # Behind a load balancer speaking the PROXY protocol: the port it wraps.
        self.assertEqual(port_for("haproxy:tcp:9443:interface=10.0.0.11"), 9443)
        self.assertEqual(port_for("haproxy:tcp:443"), None)


class FakeDirectory:
    def __init__(self, healthy: bool) -> None:
        self.healthy = healthy

    def ping(self) -> defer.Deferred[None]:
        if self.healthy:
            return defer.succeed(None)
        return defer.fail(ConnectionError("database is gone"))


class HealthTests(unittest.TestCase):
    @inlineCallbacks
    def get_health(self, healthy: bool, method: str = "GET"):  # type: ignore[no-untyped-def]
        root = Root(
            guard=None,  # type: ignore[arg-type]
            forwarder=None,  # type: ignore[arg-type]
            relay=None,  # type: ignore[arg-type]
            raw=None,  # type: ignore[arg-type]
            own_pages=OwnPages(FakeDirectory(healthy)),  # type: ignore[arg-type]
        )
        site = ProxySite(root)
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(site)
        self.addCleanup(port.stopListening)
        response = yield plain_client(self).request(
            method, f"http://127.0.0.1:{port.getHost().port}/_/health"
        )
        body = yield response.content()
        return response, body

    @inlineCallbacks
    def test_healthy(self):  # type: ignore[no-untyped-def]
        response, body = yield self.get_health(True)
        self.assertEqual(response.code, 200)
        self.assertEqual(json.loads(body), {"status": "ok", "directory": True})
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["application/json"])
        self.assertIsNone(response.headers.getRawHeaders("server"), "no version banner")

    @inlineCallbacks
    def test_directory_unreachable_is_503(self):  # type: ignore[no-untyped-def]
        response, body = yield self.get_health(False)
        self.assertEqual(response.code, 503)
        self.assertEqual(json.loads(body)["directory"], False)
        self.assertNotIn(b"database is gone", body)

    @inlineCallbacks
    def test_post_not_allowed(self):  # type: ignore[no-untyped-def]
        response, _ = yield self.get_health(True, "POST")
        self.assertEqual(response.code, 405)

    def test_health_route(self) -> None:
        self.assertEqual(routing.parse(b"localhost", b"/_/health"), routing.OwnPage("health"))


class IdleConnectionTests(unittest.TestCase):
    def test_default_idle_timeout_is_bounded(self) -> None:
        from cocalcproxy.http.site import KEEPALIVE_IDLE_TIMEOUT

        site = ProxySite(Root(guard=None, forwarder=None, relay=None, raw=None, own_pages=None))  # type: ignore[arg-type]
        self.assertEqual(site.timeOut, KEEPALIVE_IDLE_TIMEOUT)
        self.assertLessEqual(KEEPALIVE_IDLE_TIMEOUT, 120)

    @inlineCallbacks
    def test_idle_keepalive_connection_is_closed(self):  # type: ignore[no-untyped-def]
        root = Root(
            guard=None,  # type: ignore[arg-type]
            forwarder=None,  # type: ignore[arg-type]
            relay=None,  # type: ignore[arg-type]
            raw=None,  # type: ignore[arg-type]
            own_pages=OwnPages(FakeDirectory(True)),  # type: ignore[arg-type]
        )
        site = ProxySite(root, timeout=0.5)
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(site)
        self.addCleanup(port.stopListening)

        def exchange_then_wait_for_close() -> tuple[bytes, float]:
            import time

            with socket.create_connection(("127.0.0.1", port.getHost().port), timeout=10) as s:
                s.sendall(b"GET /_/health HTTP/1.1\r\nHost: x\r\n\r\n")
                received = b""
                started = time.monotonic()
                while True:
                    chunk = s.recv(65536)
                    if not chunk:
                        return received, time.monotonic() - started
                    received += chunk

        received, waited = yield deferToThread(exchange_then_wait_for_close)
        self.assertIn(b"HTTP/1.1 200", received)
        self.assertLess(waited, 9, "the server closed the idle connection itself")
