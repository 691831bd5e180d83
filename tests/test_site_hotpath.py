"""The site's shortcuts on the hot path keep Twisted's behaviour: over real sockets on loopback,
with and without TLS, on a kept-alive connection serving several requests."""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, wrapClientTLS
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.trial import unittest
from twisted.web import resource, server

from cocalcproxy.http.site import ProxySite
from cocalcproxy.ops import tls


class Facts(resource.Resource):
    """Answers with what the request knows about its connection."""

    isLeaf = True

    def render_GET(self, request: server.Request) -> bytes:  # noqa: N802
        host: Any = request.getHost()
        peer: Any = request.getClientAddress()
        facts = {
            "host": [host.type, host.host, host.port],
            "peer": [peer.type, peer.host, peer.port],
            "secure": request.isSecure(),
        }
        return json.dumps(facts).encode()


class Collect(Protocol):
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.received: list[bytes] = []
        self.done: Deferred[bytes] = Deferred()

    def connectionMade(self) -> None:  # noqa: N802
        assert self.transport is not None
        self.transport.write(self.data)

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.received.append(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]  # noqa: N802
        self.done.callback(b"".join(self.received))


THREE_REQUESTS = (
    b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\n"
    b"GET /2 HTTP/1.1\r\nHost: x\r\n\r\n"
    b"GET /3 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
)


def bodies(answer: bytes) -> list[dict[str, Any]]:
    found = []
    for part in answer.split(b"HTTP/1.1 200 OK\r\n")[1:]:
        body = part.split(b"\r\n\r\n", 1)[1]
        found.append(json.loads(body[: body.index(b"}") + 1]))
    return found


class ConnectionFactsTests(unittest.TestCase):
    @inlineCallbacks
    def _exchange(self, secure: bool):  # type: ignore[no-untyped-def]
        site = ProxySite(Facts(), reactor=reactor)
        factory: Any = site
        client_endpoint: Any
        if secure:
            cert, key = tls.ensure_self_signed(self.mktemp(), "localhost")
            factory = TLSMemoryBIOFactory(tls.ReloadableServerCreator(cert, key), False, site)
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
        self.addCleanup(port.stopListening)
        client_endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
        if secure:
            with open(cert, "rb") as f:
                authority = Certificate.loadPEM(f.read())
            client_endpoint = wrapClientTLS(
                optionsForClientTLS("localhost", trustRoot=authority), client_endpoint
            )
        client = Collect(THREE_REQUESTS)
        connected = yield client_endpoint.connect(Factory.forProtocol(lambda: client))
        local = connected.transport.getHost()
        answer = yield client.done
        return port.getHost(), local, bodies(answer)

    @inlineCallbacks
    def test_addresses_and_security_over_tls(self):  # type: ignore[no-untyped-def]
        listening, client, facts = yield self._exchange(secure=True)
        self.assertEqual(len(facts), 3)
        for fact in facts:
            self.assertEqual(fact["host"], ["TCP", "127.0.0.1", listening.port])
            self.assertEqual(fact["peer"], ["TCP", "127.0.0.1", client.port])
            self.assertIs(fact["secure"], True)

    @inlineCallbacks
    def test_addresses_and_security_over_tcp(self):  # type: ignore[no-untyped-def]
        listening, client, facts = yield self._exchange(secure=False)
        self.assertEqual(len(facts), 3)
        for fact in facts:
            self.assertEqual(fact["host"], ["TCP", "127.0.0.1", listening.port])
            self.assertEqual(fact["peer"], ["TCP", "127.0.0.1", client.port])
            self.assertIs(fact["secure"], False)

    def test_a_new_transport_is_asked_again(self) -> None:
        from twisted.internet.address import IPv4Address
        from twisted.internet.testing import StringTransport

        from cocalcproxy.http.site import ProxyChannel

        channel = ProxyChannel()
        first = StringTransport(
            hostAddress=IPv4Address("TCP", "10.0.0.1", 443),
            peerAddress=IPv4Address("TCP", "10.0.0.2", 5000),
        )
        asked = []
        ask_host = first.getHost
        first.getHost = lambda: asked.append(1) or ask_host()  # type: ignore[method-assign]
        channel.transport = first
        for _ in range(3):
            self.assertEqual(channel.getHost().host, "10.0.0.1")
        self.assertEqual(len(asked), 1)  # once per transport, not once per request
        self.assertEqual(channel.getPeer().port, 5000)
        self.assertFalse(channel.isSecure())
        channel.transport = StringTransport(
            hostAddress=IPv4Address("TCP", "10.0.0.3", 8443),
            peerAddress=IPv4Address("TCP", "10.0.0.4", 6000),
        )
        self.assertEqual(channel.getHost().port, 8443)
        self.assertEqual(channel.getPeer().host, "10.0.0.4")
        channel.transport = None
        self.assertFalse(channel.isSecure())
