"""Test helpers for TLS: throwaway certificates and a blocking peer-certificate probe."""

from __future__ import annotations

import datetime
import socket
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_ca(common_name: str = "Test CA") -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def make_leaf(
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey], hostname: str = "localhost"
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    ca_cert, ca_key = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hostname))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName(hostname), x509.DNSName("localhost")]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def write_pair(
    directory: Path, name: str, hostname: str = "localhost", chain: bool = True
) -> tuple[Path, Path, x509.Certificate, x509.Certificate]:
    """Write <name>.pem (leaf + CA chain) and <name>.key; return paths, leaf and CA."""
    ca = make_ca(f"CA for {name}")
    leaf, key = make_leaf(ca, hostname)
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    cert_path.write_bytes(pem(leaf) + (pem(ca[0]) if chain else b""))
    key_path.write_bytes(key_pem(key))
    return cert_path, key_path, leaf, ca[0]


def fingerprint(cert: x509.Certificate) -> str:
    digest = cert.fingerprint(hashes.SHA256()).hex().upper()
    return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


def peer_chain(
    port: int,
    host: str = "127.0.0.1",
    max_version: int | None = None,
    alpn: list[bytes] | None = None,
) -> tuple[list[bytes], bytes | None]:
    """Blocking: handshake without verification; the DER chain the server sent and the ALPN pick."""
    context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    if max_version is not None:
        context.set_max_proto_version(max_version)
    if alpn:
        context.set_alpn_protos(alpn)
    with socket.create_connection((host, port), timeout=10) as raw:
        raw.setblocking(True)
        connection = SSL.Connection(context, raw)
        connection.set_tlsext_host_name(b"localhost")
        connection.set_connect_state()
        connection.do_handshake()
        chain = connection.get_peer_cert_chain(as_cryptography=True) or []
        chosen = connection.get_alpn_proto_negotiated() or None
        try:
            connection.shutdown()
        except SSL.Error:
            pass
        return [c.public_bytes(serialization.Encoding.DER) for c in chain], chosen


def peer_fingerprint(port: int, host: str = "127.0.0.1") -> str:
    der = peer_chain(port, host)[0][0]
    return fingerprint(x509.load_der_x509_certificate(der))
