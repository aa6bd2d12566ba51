"""Throwaway key material for the simulator: a private CA, TLS certificates, APNs signing keys.

Everything here is generated fresh (with `cryptography`) and written to files
only readable by the current user, so a test or an embedded relay can trust
exactly one simulator and sign tokens that only it accepts.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import secrets
import string
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

CERT_VALIDITY = datetime.timedelta(days=30)
# Apple's push certificate extensions: which APNs environments the certificate may use.
APNS_SANDBOX_OID = x509.ObjectIdentifier("1.2.840.113635.100.6.3.1")
APNS_PRODUCTION_OID = x509.ObjectIdentifier("1.2.840.113635.100.6.3.2")
ENVIRONMENT_OIDS = {"sandbox": APNS_SANDBOX_OID, "production": APNS_PRODUCTION_OID}
_ID_ALPHABET = string.ascii_uppercase + string.digits


def random_apple_id() -> str:
    """A 10-character id in the shape of Apple's key and team ids."""
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(10))


def _write_private(path: Path, data: bytes) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    return path


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def write_signing_key(directory: Path, key_id: str) -> tuple[Path, ec.EllipticCurvePublicKey]:
    """A fresh P-256 key as Apple's `AuthKey_<kid>.p8`; returns its path and public key."""
    key = ec.generate_private_key(ec.SECP256R1())
    path = _write_private(Path(directory) / f"AuthKey_{key_id}.p8", _pem_key(key))
    return path, key.public_key()


def load_public_key(path: Path) -> ec.EllipticCurvePublicKey:
    """A P-256 public key from a PEM public key or from a `.p8` private key."""
    data = Path(path).read_bytes()
    key: object
    if b"PRIVATE KEY" in data:
        key = serialization.load_pem_private_key(data, password=None).public_key()
    else:
        key = serialization.load_pem_public_key(data)
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ValueError(f"{str(path)!r} does not hold a P-256 (ES256) key")
    return key


@dataclass(frozen=True)
class Certificate:
    cert_file: Path
    key_file: Path


class CertificateAuthority:
    """A private CA whose certificate (`ca_file`) is the one trust anchor clients need."""

    def __init__(self, directory: Path, name: str = "apns-relay simulator CA") -> None:
        self.directory = Path(directory)
        self._key = ec.generate_private_key(ec.SECP256R1())
        self._name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.timezone.utc)
        self._cert = (
            x509.CertificateBuilder()
            .subject_name(self._name).issuer_name(self._name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + CERT_VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            # Key identifiers: Python 3.13's default TLS context verifies strictly
            # (VERIFY_X509_STRICT) and refuses chains without them.
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self._key.public_key()),
                           critical=False)
            .sign(self._key, hashes.SHA256())
        )
        self.ca_file = self.directory / "ca.pem"
        self.ca_file.write_bytes(self._cert.public_bytes(serialization.Encoding.PEM))

    def issue_push_certificate(self, stem: str, bundle_id: str,
                               environments: tuple[str, ...] = ("production",)) -> Certificate:
        """A client certificate shaped like Apple's APNs certificates: the app's bundle id
        as the subject's UID, and the extensions naming the environments it may push to."""
        subject = [x509.NameAttribute(NameOID.USER_ID, bundle_id),
                   x509.NameAttribute(NameOID.COMMON_NAME, f"Apple Push Services: {bundle_id}")]
        extensions = [ENVIRONMENT_OIDS[name] for name in environments]
        return self.issue(stem, subject, client=True, extensions=extensions)

    def issue(self, stem: str, subject: str | list[x509.NameAttribute[str]], *,
              hosts: tuple[str, ...] = (), client: bool = False,
              extensions: list[x509.ObjectIdentifier] | None = None) -> Certificate:
        """A leaf certificate (server for `hosts`, or a client certificate) and its key;
        `subject` is a common name or the subject's attributes; `extensions` are added as
        non-critical marker extensions (ASN.1 NULL), as Apple's push certificates carry."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        if isinstance(subject, str):
            subject = [x509.NameAttribute(NameOID.COMMON_NAME, subject)]
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name(subject))
            .issuer_name(self._name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + CERT_VALIDITY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([
                x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH if client
                else x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                self._key.public_key()), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
        )
        if hosts:
            names: list[x509.GeneralName] = []
            for host in hosts:
                try:
                    names.append(x509.IPAddress(ipaddress.ip_address(host)))
                except ValueError:
                    names.append(x509.DNSName(host))
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        for oid in extensions or ():
            builder = builder.add_extension(x509.UnrecognizedExtension(oid, b"\x05\x00"),
                                            critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        cert_file = self.directory / f"{stem}.pem"
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_file = _write_private(self.directory / f"{stem}.key", _pem_key(key))
        return Certificate(cert_file, key_file)
