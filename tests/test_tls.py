"""TLS material: generation, loading, refusal of broken files, and live reload on real sockets."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

from cryptography import x509
from OpenSSL import SSL
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.interfaces import ITCPTransport
from twisted.internet.threads import deferToThread
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.trial import unittest
from twisted.web import resource, server

from cocalcproxy.ops import tls
from tests import tlsutil
from tests.relay_support import wait_for
from tests.support import https_client


class Hello(resource.Resource):
    isLeaf = True

    def render_GET(self, request: server.Request) -> bytes:  # noqa: N802
        return b"hello over tls"


class GeneratedCertificateTests(unittest.TestCase):
    def test_generated_once_with_names_and_private_key(self) -> None:
        state = self.mktemp()
        cert_path, key_path = tls.ensure_self_signed(state, "proxy.example.org")
        cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = set(san.get_values_for_type(x509.DNSName))
        addresses = {str(a) for a in san.get_values_for_type(x509.IPAddress)}
        self.assertEqual(names, {"proxy.example.org", "localhost"})
        self.assertEqual(addresses, {"127.0.0.1", "::1"})
        self.assertEqual(stat.S_IMODE(os.stat(key_path).st_mode), 0o600)
        first = Path(cert_path).read_bytes()
        tls.ensure_self_signed(state, "proxy.example.org")
        self.assertEqual(Path(cert_path).read_bytes(), first, "reused on later starts")

    def test_with_subdomains_the_domain_and_its_wildcard_are_covered(self) -> None:
        state = self.mktemp()
        cert_path, _ = tls.ensure_self_signed(state, "localhost")
        first = Path(cert_path).read_bytes()
        # --project-domain added later: the certificate is made again to cover it.
        tls.ensure_self_signed(state, "localhost", "proj.example")
        second = Path(cert_path).read_bytes()
        self.assertNotEqual(second, first)
        cert = x509.load_pem_x509_certificate(second)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual(
            set(san.get_values_for_type(x509.DNSName)),
            {"localhost", "*.proj.example", "proj.example"},
        )
        tls.ensure_self_signed(state, "localhost", "proj.example")
        self.assertEqual(Path(cert_path).read_bytes(), second, "reused while it fits")
        tls.ensure_self_signed(state, "localhost")  # a subset of what it covers: kept
        self.assertEqual(Path(cert_path).read_bytes(), second)

    def test_generated_material_loads(self) -> None:
        cert_path, key_path = tls.ensure_self_signed(self.mktemp(), "localhost")
        material = tls.load_material(cert_path, key_path)
        cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
        self.assertEqual(material.fingerprint, tlsutil.fingerprint(cert))


class LoadMaterialTests(unittest.TestCase):
    def setUp(self) -> None:
        self.dir = Path(self.mktemp())
        self.cert, self.key, self.leaf, _ = tlsutil.write_pair(self.dir, "a")

    def test_key_inside_certificate_file(self) -> None:
        combined = self.dir / "combined.pem"
        combined.write_bytes(self.cert.read_bytes() + self.key.read_bytes())
        material = tls.load_material(str(combined))
        self.assertEqual(material.fingerprint, tlsutil.fingerprint(self.leaf))

    def test_mismatched_key_refused(self) -> None:
        _, other_key, _, _ = tlsutil.write_pair(self.dir, "b")
        with self.assertRaises(tls.TLSConfigError) as caught:
            tls.load_material(str(self.cert), str(other_key))
        self.assertIn("does not match", str(caught.exception))

    def test_garbage_and_missing_files_refused(self) -> None:
        garbage = self.dir / "garbage.pem"
        garbage.write_bytes(b"not a certificate\n")
        with self.assertRaises(tls.TLSConfigError):
            tls.load_material(str(garbage), str(self.key))
        with self.assertRaises(tls.TLSConfigError):
            tls.load_material(str(self.cert), str(garbage))
        with self.assertRaises(tls.TLSConfigError) as caught:
            tls.load_material(str(self.dir / "missing.pem"))
        self.assertIn("cannot read", str(caught.exception))

    def test_key_never_in_error_message(self) -> None:
        truncated = self.dir / "truncated.key"
        truncated.write_bytes(self.key.read_bytes()[:-40])
        with self.assertRaises(tls.TLSConfigError) as caught:
            tls.load_material(str(self.cert), str(truncated))
        self.assertNotIn("PRIVATE KEY-----\n", str(caught.exception))
        self.assertNotIn(self.key.read_bytes()[40:80].decode(), str(caught.exception))


class LiveTLSTests(unittest.TestCase):
    """A real TLS listener on loopback with the reloadable creator."""

    @inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def]
        self.dir = Path(self.mktemp())
        self.cert, self.key, self.leaf, self.ca = tlsutil.write_pair(self.dir, "live")
        self.creator = tls.ReloadableServerCreator(str(self.cert), str(self.key))
        factory = TLSMemoryBIOFactory(self.creator, False, server.Site(Hello()))
        self.port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
        self.addCleanup(self.port.stopListening)
        self.portnum = self.port.getHost().port
        # The client trusts the CA: so a request succeeding proves the chain was sent and valid.
        self.ca_file = self.dir / "ca.pem"
        self.ca_file.write_bytes(tlsutil.pem(self.ca))

    @inlineCallbacks
    def test_handshake_and_request_with_chain(self):  # type: ignore[no-untyped-def]
        client = https_client(self, str(self.ca_file))
        response = yield client.get(f"https://localhost:{self.portnum}/")
        body = yield response.content()
        self.assertEqual((response.code, body), (200, b"hello over tls"))
        chain, chosen = yield deferToThread(tlsutil.peer_chain, self.portnum)
        self.assertEqual(len(chain), 2, "leaf and its chain are sent")
        self.assertEqual(chosen, None)

    @inlineCallbacks
    def test_old_tls_versions_refused(self):  # type: ignore[no-untyped-def]
        with self.assertRaises(SSL.Error):
            yield deferToThread(tlsutil.peer_chain, self.portnum, max_version=SSL.TLS1_1_VERSION)
        chain, _ = yield deferToThread(
            tlsutil.peer_chain, self.portnum, max_version=SSL.TLS1_2_VERSION
        )
        self.assertTrue(chain)

    @inlineCallbacks
    def test_alpn_only_http11(self):  # type: ignore[no-untyped-def]
        _, chosen = yield deferToThread(tlsutil.peer_chain, self.portnum, alpn=[b"h2", b"http/1.1"])
        self.assertEqual(chosen, b"http/1.1")

    @inlineCallbacks
    def test_reload_new_connections_get_new_certificate(self):  # type: ignore[no-untyped-def]
        before = yield deferToThread(tlsutil.peer_fingerprint, self.portnum)
        self.assertEqual(before, tlsutil.fingerprint(self.leaf))

        # An open keep-alive connection made before the reload keeps working after it.
        client = https_client(self, str(self.ca_file))
        first = yield client.get(f"https://localhost:{self.portnum}/")
        yield first.content()

        new_cert, new_key, new_leaf, _ = tlsutil.write_pair(self.dir, "next")
        os.replace(new_cert, self.cert)
        os.replace(new_key, self.key)
        self.assertTrue(self.creator.reload())
        after = yield deferToThread(tlsutil.peer_fingerprint, self.portnum)
        self.assertEqual(after, tlsutil.fingerprint(new_leaf))

        again = yield client.get(f"https://localhost:{self.portnum}/")
        body = yield again.content()
        self.assertEqual(
            body, b"hello over tls", "the old connection (old CA trusted) still serves"
        )

    @inlineCallbacks
    def test_broken_reload_keeps_old_certificate(self):  # type: ignore[no-untyped-def]
        self.cert.write_bytes(b"-----BEGIN CERTIFICATE-----\nbroken\n-----END CERTIFICATE-----\n")
        self.assertFalse(self.creator.reload())
        after = yield deferToThread(tlsutil.peer_fingerprint, self.portnum)
        self.assertEqual(after, tlsutil.fingerprint(self.leaf))
        self.flushLoggedErrors()


class LeanWrapperTests(unittest.TestCase):
    """tls.LeanTLSProtocol: Twisted's TLS wrapper minus its per-interface loop, same result."""

    @inlineCallbacks
    def test_same_interfaces_and_a_working_exchange(self):  # type: ignore[no-untyped-def]
        from zope.interface import providedBy

        folder = Path(self.mktemp())
        cert, key, _, ca = tlsutil.write_pair(folder, "lean")
        (folder / "ca.pem").write_bytes(tlsutil.pem(ca))
        creator = tls.ReloadableServerCreator(str(cert), str(key))
        seen: dict[str, set[Any]] = {}

        class Recording(server.Site):
            def __init__(self, name: str) -> None:
                super().__init__(Hello())
                self.name = name

            def buildProtocol(self, addr: Any) -> Any:  # noqa: N802
                channel = super().buildProtocol(addr)
                original = channel.makeConnection

                def make(transport: Any) -> None:
                    seen[self.name] = set(providedBy(transport))
                    original(transport)

                channel.makeConnection = make
                return channel

        urls = {}
        for name, protocol in (("stock", TLSMemoryBIOFactory.protocol), ("lean", None)):
            factory = TLSMemoryBIOFactory(creator, False, Recording(name))
            factory.protocol = protocol or tls.LeanTLSProtocol  # type: ignore[assignment]
            port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
            self.addCleanup(port.stopListening)
            urls[name] = f"https://localhost:{port.getHost().port}/"
        client = https_client(self, str(folder / "ca.pem"))
        for name, url in urls.items():
            response = yield client.get(url)
            body = yield response.content()
            self.assertEqual((response.code, body), (200, b"hello over tls"), name)
        self.assertEqual(seen["lean"], seen["stock"])
        self.assertIn(ITCPTransport, seen["lean"])


class CorkTests(unittest.TestCase):
    """LeanTLSProtocol.cork/uncork: held writes leave as one record; closing sends them first."""

    @inlineCallbacks
    def test_held_writes_leave_together_and_before_a_close(self):  # type: ignore[no-untyped-def]
        folder = Path(self.mktemp())
        cert, key, _, ca = tlsutil.write_pair(folder, "cork")
        (folder / "ca.pem").write_bytes(tlsutil.pem(ca))
        flushes: list[int] = []
        records: list[tuple[int, int]] = []

        class Counting(tls.LeanTLSProtocol):
            def _flushSendBIO(self) -> None:  # noqa: N802
                flushes.append(1)
                super()._flushSendBIO()

        class Corked(resource.Resource):
            isLeaf = True

            def render_GET(self, request: Any) -> int:  # noqa: N802
                transport = request.channel.transport
                transport.cork()
                request.setHeader(b"content-type", b"text/plain")
                request.write(b"one ")
                request.write(b"two")
                del flushes[:]
                request.finish()  # with Connection: close, this loses the connection
                held = len(flushes)
                transport.uncork()
                records.append((held, len(flushes) - held))
                return server.NOT_DONE_YET  # type: ignore[no-any-return]

        factory = TLSMemoryBIOFactory(
            tls.ReloadableServerCreator(str(cert), str(key)), False, server.Site(Corked())
        )
        factory.protocol = Counting  # type: ignore[assignment]
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
        self.addCleanup(port.stopListening)
        url = f"https://localhost:{port.getHost().port}/"
        client = https_client(self, str(folder / "ca.pem"))
        for close in (False, True):
            headers = {b"Connection": [b"close"]} if close else {}
            response = yield client.get(url, headers=headers)
            body = yield response.content()
            self.assertEqual((response.code, body), (200, b"one two"), close)
        # Kept alive: nothing left while corked, then one record for head, body and end.
        self.assertEqual(records[0], (0, 1))


class MemoryBIORenewalTests(unittest.TestCase):
    """tls.renew_memory_bios: a connection gives back the buffers its memory BIOs grew to."""

    def setUp(self) -> None:
        folder = Path(self.mktemp())
        cert, key, _, _ = tlsutil.write_pair(folder, "bio")
        self.server_context = tls.load_material(str(cert), str(key)).options.getContext()
        self.client_context = SSL.Context(SSL.TLS_METHOD)

    def pair(self) -> tuple[SSL.Connection, SSL.Connection]:
        """A server and a client connection on memory BIOs, their handshake done."""
        server, client = SSL.Connection(self.server_context), SSL.Connection(self.client_context)
        server.set_accept_state()
        client.set_connect_state()
        for _ in range(4):
            for side in (client, server):
                try:
                    side.do_handshake()
                except SSL.WantReadError:
                    pass
                move(client, server)
                move(server, client)
        return server, client

    def test_a_renewed_connection_carries_on_both_ways(self) -> None:
        server, client = self.pair()
        before: Any = server
        old = (before._into_ssl, before._from_ssl)
        self.assertIs(tls.renew_memory_bios(server), True)
        self.assertNotIn(before._into_ssl, old)
        self.assertNotIn(before._from_ssl, old)
        client.sendall(b"up")
        move(client, server)
        self.assertEqual(server.recv(100), b"up")
        server.sendall(b"down")
        move(server, client)
        self.assertEqual(client.recv(100), b"down")
        server.shutdown()
        move(server, client)
        with self.assertRaises(SSL.ZeroReturnError):
            client.recv(100)

    def test_not_while_bytes_wait_in_either_bio(self) -> None:
        server, client = self.pair()
        client.sendall(b"unread")
        server.bio_write(client.bio_read(2**16))  # in the server's receive BIO, not yet read
        self.assertIs(tls.renew_memory_bios(server), False)
        self.assertEqual(server.recv(100), b"unread")
        server.sendall(b"unsent")  # in the server's send BIO, not yet taken out
        self.assertIs(tls.renew_memory_bios(server), False)
        move(server, client)
        self.assertEqual(client.recv(100), b"unsent")
        self.assertIs(tls.renew_memory_bios(server), True)

    def test_renewing_frees_what_the_bios_grew_to(self) -> None:
        import ctypes

        try:
            libc = ctypes.CDLL("libc.so.6")
            mallinfo2 = libc.mallinfo2
        except (OSError, AttributeError):
            raise unittest.SkipTest("needs glibc's mallinfo2") from None

        class MallInfo(ctypes.Structure):
            _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks",
                        "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                        "keepcost")]  # fmt: skip

        mallinfo2.restype = MallInfo

        def in_use() -> int:
            info = mallinfo2()
            return int(info.uordblks + info.hblkhd)

        count, size = 40, 64 * 1024
        servers = []
        for _ in range(count):
            server, client = self.pair()
            client.sendall(b"x" * size)
            server.bio_write(client.bio_read(2 * size))  # one socket read's worth at once
            received = 0
            while received < size:
                received += len(server.recv(size))
            servers.append(server)
        grown = in_use()
        for server in servers:
            self.assertIs(tls.renew_memory_bios(server), True)
        # Each receive BIO had grown past the 64 KiB it held at once.
        self.assertGreater(grown - in_use(), count * size)

    @inlineCallbacks
    def test_a_live_connection_renews_its_bios_after_the_handshake(self):  # type: ignore[no-untyped-def]
        folder = Path(self.mktemp())
        cert, key, _, ca = tlsutil.write_pair(folder, "renew")
        (folder / "ca.pem").write_bytes(tlsutil.pem(ca))
        first: dict[Any, Any] = {}

        class Noting(tls.LeanTLSProtocol):
            def makeConnection(self, transport: Any) -> None:  # noqa: N802
                super().makeConnection(transport)
                first[self] = self._tlsConnection._into_ssl  # type: ignore[attr-defined]

        factory = TLSMemoryBIOFactory(
            tls.ReloadableServerCreator(str(cert), str(key)), False, server.Site(Hello())
        )
        factory.protocol = Noting  # type: ignore[assignment]
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
        self.addCleanup(port.stopListening)
        client = https_client(self, str(folder / "ca.pem"))
        for _ in range(2):  # one kept-alive connection, its BIOs renewed after the first
            response = yield client.get(f"https://localhost:{port.getHost().port}/")
            self.assertEqual((yield response.content()), b"hello over tls")
        [(protocol, original)] = first.items()
        self.assertTrue(protocol._bios_renewed)
        self.assertNotEqual(protocol._tlsConnection._into_ssl, original)
        # Later, quiet (the relay asks a connection that was quiet a while): renewed again.
        renewed = protocol._tlsConnection._into_ssl
        self.assertIs(protocol.release_buffers(), True)
        self.assertNotEqual(protocol._tlsConnection._into_ssl, renewed)
        protocol.transport.loseConnection()
        yield wait_for(lambda: protocol._lostTLSConnection)
        self.assertIs(protocol.release_buffers(), False)  # never on a connection that is gone


def move(source: SSL.Connection, destination: SSL.Connection) -> None:
    """Whatever ``source`` has written goes to ``destination``'s receive BIO."""
    try:
        data = source.bio_read(2**20)
    except SSL.WantReadError:
        return
    destination.bio_write(data)
