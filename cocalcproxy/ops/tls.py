"""TLS material: loading PEM files, generating a self-signed certificate, and a server
connection creator whose certificate can be swapped (SIGHUP) without touching open connections."""

from __future__ import annotations

import datetime
import hashlib
import importlib
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import TLSMemoryBIOProtocol
from zope.interface import implementer

from cocalcproxy.http.eagerwrite import eager_write

# The namespace operators see in log lines (kept from before the package layout).
log = Logger(namespace="cocalcproxy.tls")

# Mozilla "intermediate" TLS 1.2 suites; TLS 1.3 suites are fixed and all strong.
CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
)


class TLSConfigError(Exception):
    """The certificate or key cannot be used; the message says why (never the key itself)."""


@dataclass(frozen=True)
class Material:
    options: ssl.CertificateOptions
    fingerprint: str
    not_after: datetime.datetime
    subject: str


def fingerprint_of(cert: x509.Certificate) -> str:
    digest = cert.fingerprint(hashes.SHA256()).hex().upper()
    return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


def load_material(cert_path: str, key_path: str | None = None) -> Material:
    """Read a PEM certificate (leaf, then chain) and its key; refuse anything unusable."""
    try:
        cert_data = Path(cert_path).read_bytes()
        key_data = Path(key_path).read_bytes() if key_path else cert_data
    except OSError as e:
        raise TLSConfigError(f"cannot read TLS file: {e.strerror} ({e.filename})") from None
    try:
        certs = x509.load_pem_x509_certificates(cert_data)
    except ValueError:
        raise TLSConfigError(f"{cert_path}: no PEM certificate found") from None
    try:
        key = serialization.load_pem_private_key(key_data, password=None)
    except (ValueError, TypeError):
        where = key_path or cert_path
        raise TLSConfigError(f"{where}: no usable unencrypted PEM private key found") from None
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise TLSConfigError("only RSA and EC private keys are supported")
    leaf = certs[0]
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    if leaf.public_key().public_bytes(
        serialization.Encoding.DER, public
    ) != key.public_key().public_bytes(serialization.Encoding.DER, public):
        raise TLSConfigError(f"{cert_path}: the private key does not match the certificate")
    # pyOpenSSL takes cryptography's objects directly (its own X509/PKey are deprecated);
    # Twisted only hands these to the SSL.Context.
    options = ssl.CertificateOptions(
        privateKey=key,  # type: ignore[arg-type]
        certificate=leaf,  # type: ignore[arg-type]
        extraCertChain=list(certs[1:]),  # type: ignore[arg-type]
        raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
        acceptableCiphers=ssl.AcceptableCiphers.fromOpenSSLCipherString(CIPHERS),
        acceptableProtocols=[b"http/1.1"],
    )
    try:
        options.getContext()
    except SSL.Error as e:
        raise TLSConfigError(f"OpenSSL refused the certificate or key: {e}") from None
    return Material(
        options=options,
        fingerprint=fingerprint_of(leaf),
        not_after=leaf.not_valid_after_utc,
        subject=leaf.subject.rfc4514_string(),
    )


def self_signed_names(hostname: str, project_domain: str | None = None) -> list[str]:
    """The names a generated certificate covers: the host name, localhost, 127.0.0.1, ::1 and,
    with subdomains, ``*.DOMAIN`` and ``DOMAIN`` (one wildcard covers every project host)."""
    names = [hostname, "localhost", "127.0.0.1", "::1"]
    if project_domain:
        domain = project_domain.strip(".").lower()
        names += [f"*.{domain}", domain]
    unique: list[str] = []
    for name in names:
        if name not in unique:
            unique.append(name)
    return unique


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _covered_names(cert: x509.Certificate) -> set[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    return set(san.get_values_for_type(x509.DNSName)) | {
        str(a) for a in san.get_values_for_type(x509.IPAddress)
    }


def generate_self_signed(
    hostname: str, cert_path: Path, key_path: Path, project_domain: str | None = None
) -> None:
    """Write a new EC P-256 self-signed certificate for :func:`self_signed_names`."""
    key = ec.generate_private_key(ec.SECP256R1())
    names = [_general_name(n) for n in self_signed_names(hostname, project_domain)]
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=825))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key_bytes = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    tmp_key = key_path.with_suffix(".tmp")
    fd = os.open(tmp_key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key_bytes)
    os.replace(tmp_key, key_path)
    tmp_cert = cert_path.with_suffix(".tmp")
    tmp_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    os.replace(tmp_cert, cert_path)


def ensure_self_signed(
    state_dir: str, hostname: str, project_domain: str | None = None
) -> tuple[str, str]:
    """Paths of the generated certificate and key, creating them on first start, and again when
    the one there does not cover the names now needed (``--hostname`` or ``--project-domain``
    changed): a certificate that does not fit would fail every browser and ``curl --cacert``."""
    tls_dir = Path(state_dir) / "tls"
    cert_path, key_path = tls_dir / "cert.pem", tls_dir / "key.pem"
    needed = set(self_signed_names(hostname, project_domain))
    if cert_path.exists() and key_path.exists():
        try:
            covered = _covered_names(x509.load_pem_x509_certificate(cert_path.read_bytes()))
        except ValueError:
            covered = set()
        if needed <= covered:
            return str(cert_path), str(key_path)
        log.warn(
            "the generated certificate in {dir} does not cover {missing}: generating a new one "
            "(its fingerprint changes)",
            dir=str(tls_dir),
            missing=", ".join(sorted(needed - covered)),
        )
    generate_self_signed(hostname, cert_path, key_path, project_domain)
    log.info(
        "generated a self-signed certificate for {names} in {dir}",
        names=", ".join(self_signed_names(hostname, project_domain)),
        dir=str(tls_dir),
    )
    return str(cert_path), str(key_path)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@implementer(IOpenSSLServerConnectionCreator)
class ReloadableServerCreator:
    """Creates each new server TLS connection from the current material.

    ``reload()`` builds and checks new material completely before swapping it in, so a broken file
    leaves the old certificate serving; connections already open keep the context they started with.
    """

    def __init__(self, cert_path: str, key_path: str | None) -> None:
        self.cert_path = cert_path
        self.key_path = key_path
        self.material = load_material(cert_path, key_path)

    def reload(self) -> bool:
        try:
            material = load_material(self.cert_path, self.key_path)
        except TLSConfigError as e:
            log.error("TLS reload refused, keeping the current certificate: {why}", why=str(e))
            return False
        self.material = material
        log.info(
            "TLS certificate reloaded: {subject}, SHA-256 {fingerprint}, valid until {not_after}",
            subject=material.subject,
            fingerprint=material.fingerprint,
            not_after=material.not_after.isoformat(),
        )
        return True

    def serverConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:  # noqa: N802
        connection: SSL.Connection = self.material.options.serverConnectionForTLS(tlsProtocol)
        return connection


# pyOpenSSL's cffi binding of OpenSSL (private, untyped): memory BIOs have no public API there.
_openssl: Any = importlib.import_module("OpenSSL._util")


def renew_memory_bios(connection: SSL.Connection) -> bool | None:
    """Give a memory-BIO connection two new, empty BIOs in place of its current ones.

    An OpenSSL memory BIO keeps the largest buffer it ever needed until it is freed (the
    handshake's flights leave about 4.5 KiB in the pair; a 64 KiB socket read, 88 KiB), so a
    connection that then idles for hours would hold that the whole time. This frees them.
    True when renewed; False when either BIO still holds bytes (try again later); None when
    this pyOpenSSL does not keep its BIOs where this expects (nothing was changed).
    """
    private: Any = connection
    ssl_object = getattr(private, "_ssl", None)
    into = getattr(private, "_into_ssl", None)
    out = getattr(private, "_from_ssl", None)
    lib, ffi = getattr(_openssl, "lib", None), getattr(_openssl, "ffi", None)
    if ssl_object is None or into is None or out is None or lib is None or ffi is None:
        return None
    if lib.BIO_get_mem_data(into, ffi.NULL) or lib.BIO_get_mem_data(out, ffi.NULL):
        return False
    new_into = lib.BIO_new(lib.BIO_s_mem())
    new_out = lib.BIO_new(lib.BIO_s_mem())
    if new_into == ffi.NULL or new_out == ffi.NULL:
        for bio in (new_into, new_out):
            if bio != ffi.NULL:
                lib.BIO_free(bio)
        return False
    # Both differ from the current pair: the SSL object takes them and frees the old ones.
    lib.SSL_set_bio(ssl_object, new_into, new_out)
    private._into_ssl, private._from_ssl = new_into, new_out
    return True


class LeanTLSProtocol(TLSMemoryBIOProtocol):
    """Twisted's server-side TLS wrapper without its per-connection interface loop.

    ``TLSMemoryBIOProtocol.makeConnection`` calls ``directlyProvides`` once per interface of the
    TCP transport (about nine calls, each rebuilding the declaration, and each replacing the
    previous one), and then ``ProtocolWrapper.makeConnection`` declares all of them again in one
    call, which is what stays. On a server (``_connectWrapped``) the loop is pure cost: about a
    tenth of the proxy's CPU per connection when each request opens one. This is the same method
    without it; the declarations the wrapper ends up with are the same (tested).
    """

    #: Whether the handshake's memory BIOs have been replaced by empty ones (renew_memory_bios).
    _bios_renewed = False

    #: True until the server has answered a ClientHello (sent its first flight): the expensive
    #: step of a handshake (key exchange and signature). cocalcproxy.ops.eventloop serves such
    #: connections after the established ones; the client's Finished, which usually arrives
    #: with the first request, is then served as promptly as any request.
    awaiting_hello = True

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        super().dataReceived(data)
        # Once the handshake is over and everything it and this read produced has been passed
        # on, its buffers are freed: an idle connection (an open WebSocket) keeps none of them.
        if not self._bios_renewed:
            self._bios_renewed = self._renew_bios() is not False

    def release_buffers(self) -> bool:
        """Give back what this connection's memory BIOs grew to, when both are empty now.

        A memory BIO keeps the largest buffer it ever needed: a WebSocket that once carried a
        large message (a plot, a notebook) would keep up to ~88 KiB for the rest of its life.
        The relay calls this for connections that have been quiet a while. True when renewed."""
        return self._renew_bios() is True

    def _renew_bios(self) -> bool | None:
        """renew_memory_bios, only on a connection past its handshake and not lost; False
        otherwise (try again later)."""
        if not self._handshakeDone or self._lostTLSConnection:
            return False
        return renew_memory_bios(self._tlsConnection)

    def makeConnection(self, transport: Any) -> None:  # noqa: N802
        if not self._connectWrapped:
            super().makeConnection(transport)
            return
        self._tlsConnection = self.factory._creatorCallable(self)
        self._appSendBuffer = []
        Protocol.makeConnection(self, transport)
        self.factory.registerProtocol(self)
        # Declares every interface of the transport, starts the application protocol.
        ProtocolWrapper.makeConnection(self, transport)
        self._checkHandshakeStatus()

    # --- corking: one TLS record and one send for what one event writes ---------------------

    #: While not None, application writes wait here (see cork()).
    _corked: list[bytes] | None = None

    def cork(self) -> None:
        """Hold writes until :meth:`uncork`: what the proxy writes while handling one backend
        read (the response head, the body, the chunked terminator) leaves as one TLS record and
        one ``send``, not three. Anything that could end or reorder the stream (lose the
        connection, (un)register a producer) sends what is held first."""
        if self._corked is None:
            self._corked = []

    @property
    def corked(self) -> bool:
        return self._corked is not None

    def uncork(self) -> None:
        held, self._corked = self._corked, None
        if held:
            super().write(b"".join(held))

    def write(self, data: bytes) -> None:
        if self._corked is not None:
            if data and not (self.disconnecting and self._producer is None):
                self._corked.append(data)
            return
        super().write(data)

    def writeSequence(self, iovec: Any) -> None:  # noqa: N802
        self.write(b"".join(iovec))

    def loseConnection(self) -> None:  # noqa: N802
        self.uncork()
        super().loseConnection()

    def abortConnection(self) -> None:  # noqa: N802
        self._corked = None  # an abort throws away what is unsent anyway
        super().abortConnection()

    def registerProducer(self, producer: Any, streaming: bool) -> None:  # noqa: N802
        self.uncork()
        super().registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:  # noqa: N802
        self.uncork()
        super().unregisterProducer()

    def _flushSendBIO(self) -> None:  # noqa: N802
        """Twisted's, with the encrypted bytes sent at once (cocalcproxy.http.eagerwrite)."""
        try:
            data = self._tlsConnection.bio_read(2**15)
        except SSL.WantReadError:
            return  # nothing in the send BIO right now
        self.awaiting_hello = False
        eager_write(self.transport, data)
