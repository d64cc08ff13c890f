"""A throwaway certificate authority, for tests that need real TLS.

This module owns ``CertificateAuthority`` (an EC P-256 key and a self-signed
CA certificate, valid from an hour ago for two days), the server
certificates it issues (for 127.0.0.1, localhost and ::1 unless told
otherwise), and ``TlsFiles``: the PEM files written for one CA and one
server certificate, with the ``ssl.SSLContext`` a server or a client builds
from them. Nothing here touches the system trust store.

Key generation is quick with EC keys, but the root conftest still makes one
set per session (``tls_files``); tests that need a CA the mirror must *not*
trust make their own.
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
VALIDITY = datetime.timedelta(days=2)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _subject_alternative_names(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


@dataclass(frozen=True)
class ServerCertificate:
    """A leaf certificate for TLS servers, with its key and issuer."""

    certificate_pem: bytes
    key_pem: bytes
    ca_pem: bytes
    hosts: tuple[str, ...]


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    """Signatures for both; a CA also signs certificates and CRLs."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


class CertificateAuthority:
    """A CA that exists only in memory (and the files it is written to)."""

    def __init__(
        self,
        name: str = "mirror test CA",
        *,
        issuer: CertificateAuthority | None = None,
    ) -> None:
        """A root CA, or with ``issuer`` an intermediate CA it signs."""
        self.name = name
        self._key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        public = self._key.public_key()
        issuer_name = issuer.certificate.subject if issuer else subject
        self.certificate: x509.Certificate = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer_name)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + VALIDITY)
            .add_extension(
                x509.BasicConstraints(ca=True, path_length=0 if issuer else 1), True
            )
            .add_extension(_key_usage(ca=True), True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), False)
            .sign(issuer._key if issuer else self._key, hashes.SHA256())
        )

    @property
    def pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def write(self, path: Path) -> Path:
        """Write the CA certificate (a trust bundle of one) to ``path``."""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.pem)
        return path

    def issue(
        self, hosts: Sequence[str] = LOOPBACK_NAMES, *, client: bool = False
    ) -> ServerCertificate:
        """A server certificate for ``hosts`` (IP addresses or DNS names), or
        with ``client`` one a TLS client presents (mTLS), named ``hosts[0]``."""
        usage = (
            ExtendedKeyUsageOID.CLIENT_AUTH
            if client
            else ExtendedKeyUsageOID.SERVER_AUTH
        )
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        public = key.public_key()
        issuer_ski = self.certificate.extensions.get_extension_for_class(
            x509.SubjectKeyIdentifier
        ).value
        certificate = (
            x509.CertificateBuilder()
            .subject_name(
                x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])])
            )
            .issuer_name(self.certificate.subject)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + VALIDITY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
            .add_extension(_subject_alternative_names(hosts), False)
            .add_extension(x509.ExtendedKeyUsage([usage]), False)
            .add_extension(_key_usage(ca=False), True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
                    issuer_ski
                ),
                False,
            )
            .sign(self._key, hashes.SHA256())
        )
        return ServerCertificate(
            certificate_pem=certificate.public_bytes(serialization.Encoding.PEM),
            key_pem=_pem_key(key),
            ca_pem=self.pem,
            hosts=tuple(hosts),
        )


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of one CA and one server certificate it issued."""

    ca_file: Path
    """The CA certificate: what a client (``upstream.ca_file``) trusts."""
    cert_file: Path
    key_file: Path

    @classmethod
    def write(cls, server: ServerCertificate, directory: Path) -> TlsFiles:
        """Write ``ca.pem``, ``server.pem`` and ``server-key.pem``."""
        directory.mkdir(parents=True, exist_ok=True)
        files = cls(
            directory / "ca.pem", directory / "server.pem", directory / "server-key.pem"
        )
        files.ca_file.write_bytes(server.ca_pem)
        files.cert_file.write_bytes(server.certificate_pem)
        files.key_file.touch(mode=0o600)
        files.key_file.write_bytes(server.key_pem)
        return files

    @classmethod
    def create(cls, directory: Path, hosts: Sequence[str] = LOOPBACK_NAMES) -> TlsFiles:
        """A new CA and a server certificate for ``hosts``, written out."""
        return cls.write(CertificateAuthority().issue(hosts), directory)

    def server_context(self) -> ssl.SSLContext:
        """What a TLS server (aiohttp's ``ssl_context``) presents."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.cert_file, self.key_file)
        return context

    def client_context(self) -> ssl.SSLContext:
        """A client context trusting the system store and this CA."""
        context = ssl.create_default_context()
        context.load_verify_locations(cafile=self.ca_file)
        return context
