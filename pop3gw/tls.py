# -*- test-case-name: tests.test_tls -*-
"""
TLS certificates and OpenSSL context factories.

L{CertificateManager} owns the server certificate: either one the operator
gives (a PEM full chain and its key) or a self-signed one it generates once
under C{<dataDir>/tls/}.  Its L{CertificateManager.serverContextFactory} is
one object, passed once to every implicit-TLS listener
(C{twisted.protocols.tls.TLSMemoryBIOFactory}) and to C{startTLS} for
STLS/STARTTLS; after L{CertificateManager.reload} new handshakes use the new
certificate while open sessions keep the old one.

The relay client's context factories are in L{pop3gw.tlsclient}.

TLS policy
==========

Servers (every listener, implicit TLS and STLS/STARTTLS alike):

  - TLS 1.2 and TLS 1.3 only (C{set_min_proto_version(TLS1_2_VERSION)}, plus
    C{OP_NO_SSLv2}, C{OP_NO_SSLv3}, C{OP_NO_TLSv1}, C{OP_NO_TLSv1_1}).
  - TLS 1.2 cipher suites: ephemeral ECDH key exchange with AES-GCM or
    ChaCha20-Poly1305 only (Mozilla "intermediate" without the DHE suites);
    the server's order is preferred (C{OP_CIPHER_SERVER_PREFERENCE}).
    TLS 1.3 uses OpenSSL's default TLS 1.3 suites (all AEAD).
  - ECDH curve chosen automatically by OpenSSL (X25519, P-256, P-384...).
  - No TLS compression (C{OP_NO_COMPRESSION}, against CRIME) and no
    renegotiation (C{OP_NO_RENEGOTIATION}).
  - The whole chain in the certificate file (leaf first, then intermediates)
    is sent to clients.  No client certificates are requested.

Relay client: see L{pop3gw.tlsclient}.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
from typing import TYPE_CHECKING, Callable, Sequence

import attrs
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.bindings.openssl.binding import Binding
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL
from service_identity import CertificateError, VerificationError
from service_identity.cryptography import (
    verify_certificate_hostname,
    verify_certificate_ip_address,
)

if TYPE_CHECKING:
    # Not exported by twisted.internet.ssl, which returns its providers.
    pass
from twisted.internet.interfaces import (
    IOpenSSLContextFactory,
    IOpenSSLServerConnectionCreator,
)
from twisted.logger import Logger
from zope.interface import implementer

from pop3gw import fsutil

# --- Policy constants ------------------------------------------------------

#: TLS 1.2 cipher suites offered by servers: ECDHE + AEAD only.
SERVER_CIPHERS_TLS12 = ":".join(
    [
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
    ]
)

#: Options set on every context we build (server and relay client).
COMMON_OPTIONS = (
    SSL.OP_NO_SSLv2
    | SSL.OP_NO_SSLv3
    | SSL.OP_NO_TLSv1
    | SSL.OP_NO_TLSv1_1
    | SSL.OP_NO_COMPRESSION
    | getattr(SSL, "OP_NO_RENEGOTIATION", 0)
)

#: Options set on server contexts only.
_SERVER_OPTIONS = (
    COMMON_OPTIONS
    | SSL.OP_CIPHER_SERVER_PREFERENCE
    | SSL.OP_SINGLE_ECDH_USE
)

#: Validity of the generated self-signed certificate.
SELF_SIGNED_VALIDITY = datetime.timedelta(days=3 * 365)

#: A generated certificate this close to its end is replaced at load.
SELF_SIGNED_RENEW_BEFORE = datetime.timedelta(days=30)

#: Longest common name X.509 allows (RFC 5280 ub-common-name).
MAX_COMMON_NAME = 64

#: File names of the generated material under C{<dataDir>/tls/}.
GENERATED_DIR = "tls"
GENERATED_CERT = "cert.pem"
GENERATED_KEY = "key.pem"


class TLSConfigError(Exception):
    """
    The TLS certificate or key cannot be used.  The text is one line for the
    operator: which file, and what is wrong with it.
    """


# --- Small helpers ----------------------------------------------------------


def formatFingerprint(cert: x509.Certificate) -> str:
    """
    @return: the SHA-256 fingerprint of C{cert} as upper-case hex pairs
        separated by colons (C{"AA:BB:..."}).
    """
    return cert.fingerprint(hashes.SHA256()).hex(":").upper()


def isIPAddress(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _publicKeyBytes(key) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER,
        serialization.PublicFormat.SubjectPublicKeyInfo,
    )


def _notAfter(cert: x509.Certificate) -> datetime.datetime:
    """
    End of validity, timezone-aware (also with cryptography < 42).
    """
    value = getattr(cert, "not_valid_after_utc", None)
    if value is None:
        value = cert.not_valid_after.replace(tzinfo=datetime.timezone.utc)
    return value


def _notBefore(cert: x509.Certificate) -> datetime.datetime:
    """
    Start of validity, timezone-aware (also with cryptography < 42).
    """
    value = getattr(cert, "not_valid_before_utc", None)
    if value is None:
        value = cert.not_valid_before.replace(tzinfo=datetime.timezone.utc)
    return value


def _validAt(cert: x509.Certificate, when: datetime.datetime) -> bool:
    """
    Whether C{when} is within the validity period of C{cert}.
    """
    return _notBefore(cert) <= when < _notAfter(cert)


def _useMaterial(ctx: SSL.Context, chain: Sequence[x509.Certificate], key) -> None:
    """
    Put C{chain} and C{key} in C{ctx}, converting them to pyOpenSSL objects
    when pyOpenSSL is too old (< 24.3) to take C{cryptography} ones.
    """
    try:
        ctx.use_certificate(chain[0])
    except TypeError:
        from OpenSSL import crypto

        ctx.use_certificate(crypto.X509.from_cryptography(chain[0]))
        for extra in chain[1:]:
            ctx.add_extra_chain_cert(crypto.X509.from_cryptography(extra))
        ctx.use_privatekey(crypto.PKey.from_cryptography_key(key))
        return
    for extra in chain[1:]:
        ctx.add_extra_chain_cert(extra)
    ctx.use_privatekey(key)


def generateSelfSigned(
    hostname: str, now: datetime.datetime | None = None
) -> tuple[bytes, bytes]:
    """
    Make a self-signed server certificate for C{hostname}.

    @param hostname: the DNS name; also the common name (cut to 64
        characters).  The subjectAltName holds it plus 127.0.0.1 and ::1.
    @param now: the start of validity (defaults to the current time).
    @return: C{(certPem, keyPem)}; the key is EC P-256 in PKCS#8.
    """
    if now is None:
        now = datetime.datetime.now(datetime.timezone.utc)
    key = ec.generate_private_key(ec.SECP256R1())
    asciiName = hostname.encode("idna").decode("ascii") if not hostname.isascii() else hostname
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, asciiName[:MAX_COMMON_NAME])])
    altNames: list[x509.GeneralName] = []
    if isIPAddress(asciiName):
        altNames.append(x509.IPAddress(ipaddress.ip_address(asciiName)))
    else:
        altNames.append(x509.DNSName(asciiName))
    for ip in ("127.0.0.1", "::1"):
        entry = x509.IPAddress(ipaddress.ip_address(ip))
        if entry not in altNames:
            altNames.append(entry)
    publicKey = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(publicKey)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + SELF_SIGNED_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(altNames), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(publicKey), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(publicKey), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    certPem = cert.public_bytes(serialization.Encoding.PEM)
    keyPem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return certPem, keyPem


def _newServerContext() -> SSL.Context:
    """
    An empty server context with the L{TLS policy <pop3gw.tls>} applied.
    """
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    ctx.set_options(_SERVER_OPTIONS)
    ctx.set_cipher_list(SERVER_CIPHERS_TLS12.encode("ascii"))
    ctx.set_session_id(b"pop3gw")
    # An idle connection gives its read and write buffers back: 1,000 idle
    # TLS connections took 48 KB each without, 26 KB with.
    ctx.set_mode(SSL.MODE_RELEASE_BUFFERS)
    return ctx


# --- Loaded material --------------------------------------------------------


@attrs.frozen
class _Material:
    """
    A loaded certificate chain and key, and the server context built from
    them.

    @ivar chain: the certificates, leaf first.
    @ivar context: the server C{SSL.Context} serving them.
    @ivar signature: C{(mtime_ns, size, inode)} of the certificate and key
        files as they were when read.
    """

    chain: tuple[x509.Certificate, ...]
    context: SSL.Context
    signature: tuple

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]


def _fileSignature(path: str) -> tuple | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def _readFile(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise TLSConfigError(f"TLS {what} file {path}: no such file") from None
    except PermissionError:
        raise TLSConfigError(f"TLS {what} file {path}: permission denied") from None
    except IsADirectoryError:
        raise TLSConfigError(f"TLS {what} file {path}: is a directory") from None
    except OSError as e:
        raise TLSConfigError(f"TLS {what} file {path}: {e.strerror or e}") from None


def loadMaterial(certPath: str, keyPath: str) -> _Material:
    """
    Read a PEM chain and key and build a server context from them.

    @raise TLSConfigError: a file is missing, unreadable, not PEM, the key is
        encrypted or does not match the leaf certificate.
    """
    signature = (_fileSignature(certPath), _fileSignature(keyPath))
    certData = _readFile(certPath, "certificate")
    keyData = _readFile(keyPath, "key")
    try:
        chain = tuple(x509.load_pem_x509_certificates(certData))
    except ValueError:
        raise TLSConfigError(
            f"TLS certificate file {certPath}: no valid PEM certificate found"
        ) from None
    try:
        key = serialization.load_pem_private_key(keyData, password=None)
    except TypeError:
        raise TLSConfigError(
            f"TLS key file {keyPath}: the key is encrypted; give an unencrypted key"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise TLSConfigError(f"TLS key file {keyPath}: no valid PEM private key found") from None
    if _publicKeyBytes(chain[0].public_key()) != _publicKeyBytes(key.public_key()):
        raise TLSConfigError(
            f"TLS key file {keyPath} does not match the certificate in {certPath}"
        )
    ctx = _newServerContext()
    try:
        _useMaterial(ctx, chain, key)
        ctx.check_privatekey()
    except (SSL.Error, TypeError, ValueError) as e:
        reason = "unusable certificate or key"
        if isinstance(e, SSL.Error) and e.args and e.args[0]:
            try:
                reason = e.args[0][0][2]
            except (IndexError, TypeError):
                pass
        raise TLSConfigError(f"TLS certificate {certPath} / key {keyPath}: {reason}") from None
    return _Material(chain=chain, context=ctx, signature=signature)


# --- Server side -----------------------------------------------------------


class _ServerConnection(SSL.Connection):
    """
    A server C{SSL.Connection} over memory BIOs that, once its handshake is
    done, gives back the memory its BIOs grew during the handshake: at the
    first C{bio_read} after the handshake that finds both BIOs empty, they
    are replaced by fresh ones (C{SSL_set_bio} frees the old ones).  The
    buffer of a memory BIO never shrinks, and the handshake's flights (the
    certificate chain above all) leave about 4.5 KB in them for the life of
    the connection.

    pyOpenSSL has no interface for this: it uses its private C{_ssl},
    C{_into_ssl} and C{_from_ssl} attributes and the C{cryptography}
    bindings that pyOpenSSL itself uses; if an attribute is missing,
    nothing is swapped.
    """

    # None: handshake not done yet; True: swap at the next bio_read that
    # finds both BIOs empty; False: swapped (or not possible).
    _releaseBIOs: "bool | None" = None

    def do_handshake(self) -> None:
        super().do_handshake()
        if self._releaseBIOs is None:
            self._releaseBIOs = True

    def bio_read(self, bufsiz: int) -> bytes:
        try:
            return super().bio_read(bufsiz)
        finally:
            if self._releaseBIOs:
                self._swapBIOs()

    def _swapBIOs(self) -> None:
        """
        Replace both memory BIOs by new ones if both are empty; else leave
        it to the next C{bio_read}.
        """
        into = getattr(self, "_into_ssl", None)
        out = getattr(self, "_from_ssl", None)
        ssl = getattr(self, "_ssl", None)
        if into is None or out is None or ssl is None:
            self._releaseBIOs = False
            return
        lib, ffi = Binding.lib, Binding.ffi
        pointer = ffi.new("char **")
        if lib.BIO_get_mem_data(into, pointer) or lib.BIO_get_mem_data(out, pointer):
            return
        self._releaseBIOs = False
        newInto = lib.BIO_new(lib.BIO_s_mem())
        newOut = lib.BIO_new(lib.BIO_s_mem())
        if newInto == ffi.NULL or newOut == ffi.NULL:
            for bio in (newInto, newOut):
                if bio != ffi.NULL:
                    lib.BIO_free(bio)
            return
        lib.SSL_set_bio(ssl, newInto, newOut)
        self._into_ssl = newInto
        self._from_ssl = newOut


@implementer(IOpenSSLServerConnectionCreator, IOpenSSLContextFactory)
@attrs.define(eq=False)
class ServerContextFactory:
    """
    The server connection creator of a L{CertificateManager}: one object for
    the life of the process, always using the manager's current context.

    Twisted (C{startTLS}, C{twisted.protocols.tls.TLSMemoryBIOFactory})
    calls L{serverConnectionForTLS}; old-style users call L{getContext}.
    Both look up the current context at each new connection, so a reload
    affects only new handshakes.
    """

    _manager: CertificateManager

    def getContext(self) -> SSL.Context:
        """
        @return: the current server context.
        """
        return self._manager._currentContext()

    def serverConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        """
        @return: a new server connection using the current context (one
            that frees its handshake buffers, L{_ServerConnection}).
        """
        return _ServerConnection(self.getContext(), None)


@attrs.define(eq=False)
class CertificateManager:
    """
    The server certificate: loading, self-signed generation, reload.

    @ivar dataDir: the data directory; generated material goes to its
        C{tls/} subdirectory.
    @ivar certPath: the PEM full chain (leaf first), or C{None} to use a
        generated self-signed certificate.
    @ivar keyPath: the PEM key of the leaf, or C{None} (with C{certPath}).
    @ivar hostname: the name for a generated certificate (default: the FQDN
        of this host); with operator certificates, a warning is logged when
        the certificate does not cover it.
    @ivar owner: the data directory's owner, given the generated directory,
        certificate and key (see L{pop3gw.fsutil}), or C{None}.
    @ivar preferred: C{(certificate, key)} files served instead of the
        generated ones as soon as both exist (what ACME obtains: see
        L{pop3gw.acmeclient}), or C{None}.
    """

    dataDir: str
    certPath: str | None = None
    keyPath: str | None = None
    hostname: str | None = None
    owner: fsutil.Owner | None = attrs.field(default=None, kw_only=True)
    preferred: tuple[str, str] | None = attrs.field(default=None, kw_only=True)
    _now: Callable[[], datetime.datetime] = attrs.field(
        default=lambda: datetime.datetime.now(datetime.timezone.utc), kw_only=True
    )
    _material: _Material | None = attrs.field(default=None, init=False)
    _lastSeen: tuple | None = attrs.field(default=None, init=False)
    _factory: ServerContextFactory | None = attrs.field(default=None, init=False)

    log = Logger()

    def __attrs_post_init__(self) -> None:
        if (self.certPath is None) != (self.keyPath is None):
            raise TLSConfigError("TLS needs both a certificate file and a key file, or neither")

    # -- paths

    def expiry(self) -> float | None:
        """
        When the certificate being served expires (POSIX seconds), or
        C{None} before any is loaded.
        """
        material = self._material
        return None if material is None else _notAfter(material.leaf).timestamp()

    @property
    def generated(self) -> bool:
        """
        C{True} when serving a generated self-signed certificate.
        """
        return self.certPath is None and not self._preferredReady()

    def _preferredReady(self) -> bool:
        return self.preferred is not None and all(os.path.exists(p) for p in self.preferred)

    def _paths(self) -> tuple[str, str]:
        if self.certPath is not None and self.keyPath is not None:
            return self.certPath, self.keyPath
        if self.preferred is not None and self._preferredReady():
            return self.preferred
        directory = os.path.join(self.dataDir, GENERATED_DIR)
        return (
            os.path.join(directory, GENERATED_CERT),
            os.path.join(directory, GENERATED_KEY),
        )

    def _hostname(self) -> str:
        return self.hostname or socket.getfqdn()

    # -- loading

    def _generate(self, certFile: str, keyFile: str) -> None:
        directory = os.path.dirname(certFile)
        try:
            fsutil.makeDirectories(directory, self.owner)
            os.chmod(directory, fsutil.DIRECTORY_MODE)
            certPem, keyPem = generateSelfSigned(self._hostname(), self._now())
            # Key first: a certificate on disk implies its key is there too.
            fsutil.replaceFile(keyFile, keyPem, self.owner)
            fsutil.replaceFile(certFile, certPem, self.owner)
        except OSError as e:
            raise TLSConfigError(
                f"cannot write a self-signed TLS certificate to {directory}: "
                f"{e.strerror or e}"
            ) from None
        self.log.info(
            "generated a self-signed TLS certificate for {hostname} in {path}",
            hostname=self._hostname(),
            path=certFile,
        )

    def _read(self) -> _Material:
        certFile, keyFile = self._paths()
        if self.generated:
            if not (os.path.exists(certFile) and os.path.exists(keyFile)):
                self._generate(certFile, keyFile)
            material = loadMaterial(certFile, keyFile)
            if _notAfter(material.leaf) - SELF_SIGNED_RENEW_BEFORE <= self._now():
                self.log.info(
                    "the self-signed TLS certificate in {path} is expiring; replacing it",
                    path=certFile,
                )
                self._generate(certFile, keyFile)
                material = loadMaterial(certFile, keyFile)
            return material
        material = loadMaterial(certFile, keyFile)
        self._checkMaterial(material, certFile)
        return material

    def _checkMaterial(self, material: _Material, certFile: str) -> None:
        """
        Warnings (not errors) about an operator certificate.
        """
        leaf = material.leaf
        now = self._now()
        if _notAfter(leaf) <= now:
            self.log.warn(
                "the TLS certificate in {path} expired on {date}",
                path=certFile,
                date=_notAfter(leaf).isoformat(),
            )
        elif _notBefore(leaf) > now:
            self.log.warn(
                "the TLS certificate in {path} is not valid before {date}",
                path=certFile,
                date=_notBefore(leaf).isoformat(),
            )
        if self.hostname:
            try:
                if isIPAddress(self.hostname):
                    verify_certificate_ip_address(leaf, self.hostname)
                else:
                    verify_certificate_hostname(leaf, self.hostname)
            except (VerificationError, CertificateError, ValueError):
                self.log.warn(
                    "the TLS certificate in {path} is not valid for {hostname}",
                    path=certFile,
                    hostname=self.hostname,
                )

    def _install(self, material: _Material) -> None:
        self._material = material
        self._lastSeen = material.signature
        self.log.info(
            "TLS certificate {path} loaded, SHA-256 fingerprint {fingerprint}",
            path=self._paths()[0],
            fingerprint=formatFingerprint(material.leaf),
        )

    def load(self) -> None:
        """
        Load (generating first if needed) the certificate and key.

        @raise TLSConfigError: they cannot be used.
        """
        self._install(self._read())

    def reload(self) -> bool:
        """
        Read the files again.  On success new handshakes use the new
        certificate and open sessions are not disturbed; on failure one
        error is logged and the current certificate stays.  A new
        certificate that has expired or is not yet valid is a failure
        while the current one is valid.

        @return: C{True} if the new certificate is now served.
        """
        if self._material is None:
            try:
                self.load()
            except TLSConfigError as e:
                self.log.error("TLS reload failed: {error}", error=str(e))
                return False
            return True
        certFile, keyFile = self._paths()
        self._lastSeen = (_fileSignature(certFile), _fileSignature(keyFile))
        try:
            material = self._read()
        except TLSConfigError as e:
            self.log.error(
                "TLS reload failed, still serving the certificate {fingerprint}: {error}",
                fingerprint=self.fingerprint,
                error=str(e),
            )
            return False
        except Exception:
            self.log.failure(
                "TLS reload failed, still serving the certificate {fingerprint}",
                fingerprint=self.fingerprint,
            )
            return False
        now = self._now()
        if _validAt(self._material.leaf, now) and not _validAt(material.leaf, now):
            # An expired or not yet valid replacement is a bad certificate:
            # every client would refuse it while the current one works.
            self.log.error(
                "TLS reload failed, still serving the certificate {fingerprint}: "
                "the new certificate in {path} is valid only from {start} to {end}",
                fingerprint=self.fingerprint,
                path=certFile,
                start=_notBefore(material.leaf).isoformat(),
                end=_notAfter(material.leaf).isoformat(),
            )
            return False
        self._install(material)
        return True

    def reloadIfChanged(self) -> bool:
        """
        Reload if the certificate or key file changed (modification time,
        size or inode) since it was last read or tried.  A failed attempt is
        not retried until the files change again.  Meant to be called
        periodically (C{makeService} uses a C{TimerService}), so it never
        raises: an unexpected error is logged as a failure and the next
        call checks again.

        @return: C{True} if a new certificate is now served.
        """
        try:
            certFile, keyFile = self._paths()
            current = (_fileSignature(certFile), _fileSignature(keyFile))
            if current == self._lastSeen:
                return False
            return self.reload()
        except Exception:
            self.log.failure("TLS certificate check failed")
            return False

    # -- serving

    def _currentContext(self) -> SSL.Context:
        if self._material is None:
            self.load()
        assert self._material is not None
        return self._material.context

    def serverContextFactory(self) -> ServerContextFactory:
        """
        @return: the server connection creator (always the same object),
            valid across reloads.  It provides both
            C{IOpenSSLServerConnectionCreator} and C{IOpenSSLContextFactory}.
        """
        if self._factory is None:
            self._factory = ServerContextFactory(self)
        return self._factory

    @property
    def certificate(self) -> x509.Certificate:
        """
        The leaf certificate being served (loading it if needed).
        """
        self._currentContext()
        assert self._material is not None
        return self._material.leaf

    @property
    def chain(self) -> Sequence[x509.Certificate]:
        """
        The certificates sent to clients, leaf first.
        """
        self._currentContext()
        assert self._material is not None
        return self._material.chain

    @property
    def fingerprint(self) -> str:
        """
        The SHA-256 fingerprint of the served leaf certificate, C{"AA:BB:..."}.
        """
        return formatFingerprint(self.certificate)
