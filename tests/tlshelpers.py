# -*- test-case-name: tests.test_tls -*-
"""
Test certificates made on the fly with C{cryptography}: a CA, intermediates
and leaves, all as PEM bytes.  Keys are EC P-256 (fast to make).

    caCert, caKey = makeCA("Test CA")
    cert, key = makeLeaf(caCert, caKey, "mail.example.test")
"""

from __future__ import annotations

import datetime
import ipaddress
from typing import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_ONE_DAY = datetime.timedelta(days=1)


def _keyPem(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _name(commonName: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, commonName)])


def _caUsage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )


def _load(certPem: bytes, keyPem: bytes):
    return (
        x509.load_pem_x509_certificate(certPem),
        serialization.load_pem_private_key(keyPem, password=None),
    )


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def makeCA(name: str = "pop3gw test CA") -> tuple[bytes, bytes]:
    """
    A self-signed root CA.

    @return: C{(caCertPem, caKeyPem)}.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(_name(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _ONE_DAY)
        .not_valid_after(now + 30 * _ONE_DAY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_caUsage(), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _keyPem(key)


def makeIntermediate(caCertPem: bytes, caKeyPem: bytes, name: str) -> tuple[bytes, bytes]:
    """
    An intermediate CA signed by the given CA.

    @return: C{(certPem, keyPem)}.
    """
    caCert, caKey = _load(caCertPem, caKeyPem)
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(caCert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _ONE_DAY)
        .not_valid_after(now + 30 * _ONE_DAY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_caUsage(), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(caKey.public_key()),
            critical=False,
        )
        .sign(caKey, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _keyPem(key)


def makeLeaf(
    caCertPem: bytes,
    caKeyPem: bytes,
    hostname: str,
    ips: Sequence[str] = ("127.0.0.1",),
    notBefore: datetime.datetime | None = None,
    notAfter: datetime.datetime | None = None,
    keyType: str = "ec",
) -> tuple[bytes, bytes]:
    """
    A server certificate for C{hostname} (DNS subjectAltName) and C{ips}
    (IP subjectAltNames), signed by the given CA.

    @param keyType: C{"ec"} (P-256) or C{"rsa"} (2048 bits).
    @return: C{(certPem, keyPem)}; C{certPem} holds the leaf only (append
        intermediates yourself to make a full chain).
    """
    caCert, caKey = _load(caCertPem, caKeyPem)
    if keyType == "rsa":
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    else:
        key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    altNames: list[x509.GeneralName] = [x509.DNSName(hostname)]
    altNames += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hostname))
        .issuer_name(caCert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(notBefore or now - _ONE_DAY)
        .not_valid_after(notAfter or now + 30 * _ONE_DAY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(altNames), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(caKey.public_key()),
            critical=False,
        )
        .sign(caKey, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _keyPem(key)
