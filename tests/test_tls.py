"""
Tests for L{pop3gw.tls}: certificate loading, generation, reload, the
server TLS policy and the relay client context factories.

Handshakes run in memory: Twisted peers over L{twisted.test.iosim} with
L{TLSMemoryBIOFactory} on both sides, and Python's C{ssl} module client over
C{ssl.MemoryBIO} against a pyOpenSSL server connection.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import re
import shutil
import ssl
import stat
import warnings

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from OpenSSL import SSL
from service_identity import VerificationError
from twisted.application.internet import TimerService
from twisted.internet import defer
from twisted.internet import ssl as tssl
from twisted.internet.interfaces import (
    IOpenSSLContextFactory,
    IOpenSSLServerConnectionCreator,
)
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.internet.task import Clock
from twisted.logger import Logger, LogLevel
from twisted.protocols.basic import LineReceiver
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from pop3gw import tls, tlsclient
from pop3gw.fsutil import Owner
from pop3gw.tls import CertificateManager, TLSConfigError

from .tlshelpers import makeCA, makeIntermediate, makeLeaf
from .util import OTHER_GID, OTHER_UID, requireRoot, withUmask

HOST = "mail.example.test"
GREETING = b"+OK hello\r\n"
FINGERPRINT = re.compile(r"^([0-9A-F]{2}:){31}[0-9A-F]{2}$")
HANDSHAKE_ROUNDS = 10


# --- helpers ---------------------------------------------------------------


class Recorder(Protocol):
    """
    An application protocol that records what happens to it; as a server it
    sends L{GREETING} at once.
    """

    def __init__(self, greeting: bytes = b"") -> None:
        self.greeting = greeting
        self.received: list[bytes] = []
        self.lost = None

    def connectionMade(self) -> None:
        if self.greeting:
            self.transport.write(self.greeting)

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)

    def connectionLost(self, reason) -> None:
        self.lost = reason

    def data(self) -> bytes:
        return b"".join(self.received)


class OneProtocolFactory(Factory):
    """
    Builds the one protocol instance it was given.
    """

    def __init__(self, proto: Protocol) -> None:
        self.proto = proto

    def buildProtocol(self, addr):
        self.proto.factory = self
        return self.proto


class TLSPair:
    """
    A Twisted TLS client and server connected in memory.

    @ivar serverApp: the server L{Recorder} (sends L{GREETING}).
    @ivar clientApp: the client L{Recorder}.
    @ivar serverTLS: the server L{TLSMemoryBIOProtocol}.
    @ivar clientTLS: the client L{TLSMemoryBIOProtocol}.
    """

    def __init__(self, serverCreator, clientCreator) -> None:
        self.clock = Clock()
        self.serverApp = Recorder(GREETING)
        self.clientApp = Recorder()
        serverFactory = TLSMemoryBIOFactory(
            serverCreator, False, OneProtocolFactory(self.serverApp), self.clock
        )
        clientFactory = TLSMemoryBIOFactory(
            clientCreator, True, OneProtocolFactory(self.clientApp), self.clock
        )
        self.serverTLS = serverFactory.buildProtocol(None)
        self.clientTLS = clientFactory.buildProtocol(None)
        _, _, self.pump = iosim.connectedServerAndClient(
            lambda: self.serverTLS, lambda: self.clientTLS, clock=self.clock
        )
        self.flush()

    def flush(self) -> None:
        for _ in range(HANDSHAKE_ROUNDS):
            self.pump.flush()

    def peerCertificate(self) -> x509.Certificate:
        """
        @return: the leaf certificate the client received.
        """
        return self.clientTLS.getHandle().get_peer_certificate(as_cryptography=True)

    def peerChain(self) -> list[x509.Certificate]:
        return self.clientTLS.getHandle().get_peer_cert_chain(as_cryptography=True)


class PythonHandshake:
    """
    Python's C{ssl} client against a pyOpenSSL server connection, over
    memory BIOs.

    @ivar client: the C{ssl.SSLObject}.
    @ivar clientError: the client's C{ssl.SSLError}, or L{None}.
    @ivar serverError: the server's L{SSL.Error}, or L{None}.
    """

    def __init__(self, serverConnection: SSL.Connection, clientContext: ssl.SSLContext,
                 serverHostname: str | None = None) -> None:
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.incoming, self.outgoing = incoming, outgoing
        self.client = clientContext.wrap_bio(incoming, outgoing, server_hostname=serverHostname)
        self.server = serverConnection
        self.clientError = self.serverError = None
        self.clientDone = self.serverDone = False
        serverConnection.set_accept_state()
        for _ in range(HANDSHAKE_ROUNDS):
            if not (self.clientDone or self.clientError):
                try:
                    self.client.do_handshake()
                    self.clientDone = True
                except ssl.SSLWantReadError:
                    pass
                except ssl.SSLError as e:
                    self.clientError = e
            data = outgoing.read()
            if data:
                serverConnection.bio_write(data)
            if not (self.serverDone or self.serverError):
                try:
                    serverConnection.do_handshake()
                    self.serverDone = True
                except SSL.WantReadError:
                    pass
                except SSL.Error as e:
                    self.serverError = e
            try:
                data = serverConnection.bio_read(65536)
            except SSL.WantReadError:
                data = b""
            if data:
                incoming.write(data)

    @property
    def succeeded(self) -> bool:
        return self.clientDone and self.serverDone


def pythonClient(minimum=ssl.TLSVersion.TLSv1_2, maximum=ssl.TLSVersion.MAXIMUM_SUPPORTED,
                 ciphers: str | None = None) -> ssl.SSLContext:
    """
    A Python client context that does not verify, limited to the given
    versions (and cipher list).
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = minimum
        ctx.maximum_version = maximum
    if ciphers is not None:
        ctx.set_ciphers(ciphers)
    return ctx


def writePem(directory: str, name: str, data: bytes) -> str:
    """
    Write C{data} to C{directory/name}, replacing any file there (a new
    inode, as deployment tools do).
    """
    path = os.path.join(directory, name)
    tmp = path + ".new"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
    return path


class LogCaptureMixin:
    """
    Capture what L{CertificateManager} logs into C{self.events}.
    """

    def captureLogs(self) -> None:
        self.events: list[dict] = []
        self.patch(CertificateManager, "log", Logger(observer=self.events.append))

    def eventsAt(self, level) -> list[dict]:
        return [e for e in self.events if e["log_level"] is level]


class CAMixin:
    """
    A CA, two leaves for L{HOST} and the files of the first one.
    """

    def makeMaterial(self) -> None:
        self.caCert, self.caKey = makeCA("pop3gw test CA")
        self.leaf1 = makeLeaf(self.caCert, self.caKey, HOST)
        self.leaf2 = makeLeaf(self.caCert, self.caKey, HOST)
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.certPath = writePem(self.dir, "cert.pem", self.leaf1[0])
        self.keyPath = writePem(self.dir, "key.pem", self.leaf1[1])

    def install(self, leaf) -> None:
        writePem(self.dir, "cert.pem", leaf[0])
        writePem(self.dir, "key.pem", leaf[1])

    def trustRoot(self):
        return tssl.Certificate.loadPEM(self.caCert)

    def manager(self) -> CertificateManager:
        m = CertificateManager(self.mktemp(), self.certPath, self.keyPath)
        m.load()
        return m


def fingerprintOf(pem: bytes) -> str:
    der = x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)
    return hashlib.sha256(der).hexdigest().upper()


def colonless(fingerprint: str) -> str:
    return fingerprint.replace(":", "")


# --- self-signed generation --------------------------------------------------


class SelfSignedTests(LogCaptureMixin, SynchronousTestCase):
    """
    Without certificate files, a self-signed certificate is generated once
    under C{<dataDir>/tls/} and reused.
    """

    def setUp(self) -> None:
        self.captureLogs()
        self.dataDir = self.mktemp()
        os.makedirs(self.dataDir)
        self.tlsDir = os.path.join(self.dataDir, "tls")

    def test_generatedOnFirstLoad(self) -> None:
        """
        The first load writes C{tls/cert.pem} and C{tls/key.pem}, both
        0600, in a 0700 directory, and nothing else, whatever the umask
        (022, 000, 277).
        """
        for mask in (0o022, 0o000, 0o277):
            shutil.rmtree(self.tlsDir, ignore_errors=True)
            withUmask(self, mask)
            CertificateManager(self.dataDir, hostname=HOST).load()
            self.assertEqual(sorted(os.listdir(self.tlsDir)), ["cert.pem", "key.pem"])
            self.assertEqual(stat.S_IMODE(os.stat(self.tlsDir).st_mode), 0o700)
            for name in ("cert.pem", "key.pem"):
                mode = stat.S_IMODE(os.stat(os.path.join(self.tlsDir, name)).st_mode)
                self.assertEqual(mode, 0o600, (oct(mask), name))

    def test_generatedOwner(self) -> None:
        """
        Run as root with the data directory's owner, the generated
        directory, certificate and key belong to that owner, also when
        regenerated.
        """
        requireRoot(self)
        owner = Owner(OTHER_UID, OTHER_GID)
        CertificateManager(self.dataDir, hostname=HOST, owner=owner).load()
        for name in ("", "cert.pem", "key.pem"):
            st = os.stat(os.path.join(self.tlsDir, name))
            self.assertEqual((st.st_uid, st.st_gid), (OTHER_UID, OTHER_GID), name)
        os.unlink(os.path.join(self.tlsDir, "cert.pem"))
        CertificateManager(self.dataDir, hostname=HOST, owner=owner).load()
        for name in ("cert.pem", "key.pem"):
            st = os.stat(os.path.join(self.tlsDir, name))
            self.assertEqual((st.st_uid, st.st_gid), (OTHER_UID, OTHER_GID), name)

    def test_generatedContent(self) -> None:
        """
        The generated certificate names the host name in its CN and
        subjectAltName, with 127.0.0.1 and ::1, is valid about three years
        and uses an EC P-256 key.
        """
        m = CertificateManager(self.dataDir, hostname=HOST)
        cert = m.certificate
        self.assertEqual(
            cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value, HOST
        )
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual(san.get_values_for_type(x509.DNSName), [HOST])
        self.assertEqual(
            san.get_values_for_type(x509.IPAddress),
            [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")],
        )
        lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
        self.assertGreater(lifetime, datetime.timedelta(days=3 * 365 - 1))
        self.assertLess(lifetime, datetime.timedelta(days=3 * 366))
        self.assertIsInstance(cert.public_key(), ec.EllipticCurvePublicKey)
        self.assertEqual(cert.public_key().curve.name, "secp256r1")

    def test_defaultHostnameIsFQDN(self) -> None:
        """
        Without a host name, the generated certificate is for the host's
        FQDN.
        """
        self.patch(tls.socket, "getfqdn", lambda: "fqdn.example.test")
        cert = CertificateManager(self.dataDir).certificate
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual(san.get_values_for_type(x509.DNSName), ["fqdn.example.test"])

    def test_reusedOnSecondStart(self) -> None:
        """
        A second manager on the same data directory serves the same
        certificate and does not rewrite the files.
        """
        first = CertificateManager(self.dataDir, hostname=HOST)
        first.load()
        certFile = os.path.join(self.tlsDir, "cert.pem")
        before = os.stat(certFile)
        second = CertificateManager(self.dataDir, hostname="other.example.test")
        second.load()
        self.assertEqual(second.fingerprint, first.fingerprint)
        after = os.stat(certFile)
        self.assertEqual((after.st_ino, after.st_mtime_ns), (before.st_ino, before.st_mtime_ns))

    def test_fingerprintLogged(self) -> None:
        """
        Loading logs the SHA-256 fingerprint of the served certificate in
        C{AA:BB:...} form, and the certificate's path.
        """
        m = CertificateManager(self.dataDir, hostname=HOST)
        m.load()
        with open(os.path.join(self.tlsDir, "cert.pem"), "rb") as f:
            expected = fingerprintOf(f.read())
        self.assertTrue(FINGERPRINT.match(m.fingerprint), m.fingerprint)
        self.assertEqual(colonless(m.fingerprint), expected)
        loaded = [e for e in self.events if "fingerprint" in e]
        self.assertEqual(len(loaded), 1)
        self.assertEqual(loaded[0]["fingerprint"], m.fingerprint)
        self.assertEqual(loaded[0]["path"], os.path.join(self.tlsDir, "cert.pem"))
        self.assertEqual(self.eventsAt(LogLevel.error), [])

    def test_expiringGeneratedReplaced(self) -> None:
        """
        A generated certificate within 30 days of its end is replaced at
        load by a new one.
        """
        longAgo = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=3 * 365)
        old = CertificateManager(self.dataDir, hostname=HOST, now=lambda: longAgo)
        old.load()
        new = CertificateManager(self.dataDir, hostname=HOST)
        new.load()
        self.assertNotEqual(new.fingerprint, old.fingerprint)
        self.assertGreater(
            new.certificate.not_valid_after_utc,
            datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=365),
        )

    def test_corruptGeneratedRaises(self) -> None:
        """
        A damaged generated certificate is reported, not silently replaced.
        """
        CertificateManager(self.dataDir, hostname=HOST).load()
        certFile = writePem(self.tlsDir, "cert.pem", b"garbage\n")
        e = self.assertRaises(TLSConfigError, CertificateManager(self.dataDir).load)
        self.assertEqual(
            str(e), f"TLS certificate file {certFile}: no valid PEM certificate found"
        )
        with open(certFile, "rb") as f:
            self.assertEqual(f.read(), b"garbage\n")

    def test_servesGenerated(self) -> None:
        """
        A client that does not verify gets the generated certificate.
        """
        m = CertificateManager(self.dataDir, hostname=HOST)
        pair = TLSPair(m.serverContextFactory(), tlsclient.clientContextFactory(HOST, verify=False))
        self.assertEqual(pair.clientApp.data(), GREETING)
        self.assertEqual(tls.formatFingerprint(pair.peerCertificate()), m.fingerprint)


# --- operator certificates --------------------------------------------------------


class OperatorCertificateTests(CAMixin, LogCaptureMixin, SynchronousTestCase):
    """
    Certificates and keys given by the operator.
    """

    def setUp(self) -> None:
        self.captureLogs()
        self.makeMaterial()

    def test_loadChain(self) -> None:
        """
        A full chain (leaf, intermediate) is loaded and all of it is sent:
        a client trusting only the root verifies the leaf.
        """
        interCert, interKey = makeIntermediate(self.caCert, self.caKey, "Intermediate")
        leafCert, leafKey = makeLeaf(interCert, interKey, HOST)
        self.install((leafCert + interCert, leafKey))
        m = self.manager()
        self.assertEqual(len(m.chain), 2)
        self.assertEqual(colonless(m.fingerprint), fingerprintOf(leafCert))
        pair = TLSPair(
            m.serverContextFactory(),
            tlsclient.clientContextFactory(HOST, trustRoot=self.trustRoot()),
        )
        self.assertEqual(pair.clientApp.data(), GREETING)
        self.assertEqual(
            [colonless(tls.formatFingerprint(c)) for c in pair.peerChain()],
            [fingerprintOf(leafCert), fingerprintOf(interCert)],
        )

    def test_leafOnlyChainFailsVerification(self) -> None:
        """
        Control for L{test_loadChain}: without the intermediate in the file
        the same client cannot verify.
        """
        interCert, interKey = makeIntermediate(self.caCert, self.caKey, "Intermediate")
        leafCert, leafKey = makeLeaf(interCert, interKey, HOST)
        self.install((leafCert, leafKey))
        pair = TLSPair(
            self.manager().serverContextFactory(),
            tlsclient.clientContextFactory(HOST, trustRoot=self.trustRoot()),
        )
        self.assertEqual(pair.clientApp.data(), b"")
        self.assertEqual(
            pair.clientApp.lost.value.args[0][0][2], "certificate verify failed"
        )

    def test_mismatchedKey(self) -> None:
        """
        A key that is not the certificate's is refused with one clear line.
        """
        writePem(self.dir, "key.pem", self.leaf2[1])
        m = CertificateManager(self.mktemp(), self.certPath, self.keyPath)
        e = self.assertRaises(TLSConfigError, m.load)
        self.assertEqual(
            str(e), f"TLS key file {self.keyPath} does not match the certificate in {self.certPath}"
        )

    def test_missingCertificate(self) -> None:
        """
        A missing certificate file is named in the error.
        """
        missing = os.path.join(self.dir, "nope.pem")
        m = CertificateManager(self.mktemp(), missing, self.keyPath)
        e = self.assertRaises(TLSConfigError, m.load)
        self.assertEqual(str(e), f"TLS certificate file {missing}: no such file")

    def test_missingKey(self) -> None:
        """
        A missing key file is named in the error.
        """
        missing = os.path.join(self.dir, "nope.pem")
        m = CertificateManager(self.mktemp(), self.certPath, missing)
        e = self.assertRaises(TLSConfigError, m.load)
        self.assertEqual(str(e), f"TLS key file {missing}: no such file")

    def test_unreadable(self) -> None:
        """
        A path that cannot be read as a file is reported.
        """
        m = CertificateManager(self.mktemp(), self.dir, self.keyPath)
        e = self.assertRaises(TLSConfigError, m.load)
        self.assertEqual(str(e), f"TLS certificate file {self.dir}: is a directory")

    def test_notPEM(self) -> None:
        """
        Files without PEM content are reported.
        """
        writePem(self.dir, "key.pem", b"not a key\n")
        m = CertificateManager(self.mktemp(), self.certPath, self.keyPath)
        e = self.assertRaises(TLSConfigError, m.load)
        self.assertEqual(str(e), f"TLS key file {self.keyPath}: no valid PEM private key found")

    def test_encryptedKey(self) -> None:
        """
        An encrypted key is refused with a hint.
        """
        key = serialization.load_pem_private_key(self.leaf1[1], password=None)
        writePem(
            self.dir,
            "key.pem",
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(b"secret"),
            ),
        )
        m = CertificateManager(self.mktemp(), self.certPath, self.keyPath)
        e = self.assertRaises(TLSConfigError, m.load)
        self.assertEqual(
            str(e), f"TLS key file {self.keyPath}: the key is encrypted; give an unencrypted key"
        )

    def test_certificateWithoutKey(self) -> None:
        """
        Giving only one of certificate and key is an error.
        """
        self.assertRaises(TLSConfigError, CertificateManager, self.dir, self.certPath, None)
        self.assertRaises(TLSConfigError, CertificateManager, self.dir, None, self.keyPath)

    def test_hostnameMismatchWarns(self) -> None:
        """
        A certificate that does not cover the configured host name is loaded
        with a warning.
        """
        m = CertificateManager(self.mktemp(), self.certPath, self.keyPath, "other.example.test")
        m.load()
        warnings_ = self.eventsAt(LogLevel.warn)
        self.assertEqual(len(warnings_), 1)
        self.assertEqual(warnings_[0]["hostname"], "other.example.test")

    def test_hostnameMatchNoWarning(self) -> None:
        """
        Control for L{test_hostnameMismatchWarns}: no warning when the
        certificate covers the host name.
        """
        CertificateManager(self.mktemp(), self.certPath, self.keyPath, HOST).load()
        self.assertEqual(self.eventsAt(LogLevel.warn), [])

    def test_expiredWarns(self) -> None:
        """
        An expired certificate is served, with a warning.
        """
        now = datetime.datetime.now(datetime.timezone.utc)
        self.install(
            makeLeaf(
                self.caCert, self.caKey, HOST,
                notBefore=now - datetime.timedelta(days=10),
                notAfter=now - datetime.timedelta(days=1),
            )
        )
        self.manager()
        self.assertEqual(len(self.eventsAt(LogLevel.warn)), 1)
        self.assertIn("expired", self.eventsAt(LogLevel.warn)[0]["log_format"])


# --- reload -------------------------------------------------------------------------


@implementer(IOpenSSLContextFactory)
class LegacyOnly:
    """
    Exposes only C{getContext} of another object: how an old-style caller
    sees the server context factory.
    """

    def __init__(self, wrapped) -> None:
        self.wrapped = wrapped

    def getContext(self):
        return self.wrapped.getContext()


class ReloadTests(CAMixin, LogCaptureMixin, SynchronousTestCase):
    """
    L{CertificateManager.reload} and friends swap the certificate for new
    handshakes only, and keep the old one when the new files are bad.
    """

    def setUp(self) -> None:
        self.captureLogs()
        self.makeMaterial()
        self.m = self.manager()
        self.factory = self.m.serverContextFactory()
        self.fp1 = tls.formatFingerprint(x509.load_pem_x509_certificate(self.leaf1[0]))
        self.fp2 = tls.formatFingerprint(x509.load_pem_x509_certificate(self.leaf2[0]))
        del self.events[:]

    def connect(self, serverCreator=None) -> TLSPair:
        return TLSPair(
            serverCreator or self.factory,
            tlsclient.clientContextFactory(HOST, trustRoot=self.trustRoot()),
        )

    def test_interfaces(self) -> None:
        """
        The server context factory provides both the connection-creator and
        the old context-factory interfaces, and is one object.
        """
        self.assertTrue(verifyObject(IOpenSSLServerConnectionCreator, self.factory))
        self.assertTrue(verifyObject(IOpenSSLContextFactory, self.factory))
        self.assertIs(self.m.serverContextFactory(), self.factory)

    def test_reloadSwapsForNewHandshakes(self) -> None:
        """
        After a reload, new handshakes get the new certificate, while a
        session opened before keeps working in both directions.
        """
        before = self.connect()
        self.assertEqual(tls.formatFingerprint(before.peerCertificate()), self.fp1)
        self.install(self.leaf2)
        self.assertTrue(self.m.reload())
        self.assertEqual(self.m.fingerprint, self.fp2)
        after = self.connect()
        self.assertEqual(after.clientApp.data(), GREETING)
        self.assertEqual(tls.formatFingerprint(after.peerCertificate()), self.fp2)
        before.clientApp.transport.write(b"NOOP\r\n")
        before.serverApp.transport.write(b"+OK\r\n")
        before.flush()
        self.assertEqual(before.serverApp.data(), b"NOOP\r\n")
        self.assertEqual(before.clientApp.data(), GREETING + b"+OK\r\n")
        self.assertIsNone(before.clientApp.lost)
        self.assertIsNone(before.serverApp.lost)

    def test_loadsOnFirstUse(self) -> None:
        """
        The server context factory loads the certificate if C{load} was not
        called.
        """
        m = CertificateManager(self.mktemp(), self.certPath, self.keyPath)
        pair = self.connect(m.serverContextFactory())
        self.assertEqual(pair.clientApp.data(), GREETING)
        self.assertEqual(m.fingerprint, self.fp1)

    def test_unexpectedReloadError(self) -> None:
        """
        An unexpected error during reload is logged as a failure and the
        old certificate stays.
        """

        def broken(certPath, keyPath):
            raise RuntimeError("boom")

        self.patch(tls, "loadMaterial", broken)
        self.assertFalse(self.m.reload())
        self.assertEqual(self.m.fingerprint, self.fp1)
        failures = [e for e in self.events if "log_failure" in e]
        self.assertEqual(len(failures), 1)
        self.assertIsInstance(failures[0]["log_failure"].value, RuntimeError)

    def test_reloadLogsNewFingerprint(self) -> None:
        """
        A successful reload logs the new fingerprint.
        """
        self.install(self.leaf2)
        self.m.reload()
        self.assertEqual([e.get("fingerprint") for e in self.events], [self.fp2])

    def test_legacyGetContextPath(self) -> None:
        """
        A caller using only C{getContext} also gets the new certificate
        after a reload.
        """
        legacy = LegacyOnly(self.factory)
        self.assertEqual(tls.formatFingerprint(self.connect(legacy).peerCertificate()), self.fp1)
        self.install(self.leaf2)
        self.m.reload()
        pair = self.connect(legacy)
        self.assertEqual(pair.clientApp.data(), GREETING)
        self.assertEqual(tls.formatFingerprint(pair.peerCertificate()), self.fp2)

    def test_badReloadKeepsOld(self) -> None:
        """
        A reload of a broken certificate fails, logs one error naming the
        file, and new handshakes still get the old certificate.
        """
        writePem(self.dir, "cert.pem", b"-----BEGIN CERTIFICATE-----\nxx\n")
        self.assertFalse(self.m.reload())
        self.assertEqual(self.m.fingerprint, self.fp1)
        errors = self.eventsAt(LogLevel.error)
        self.assertEqual(len(errors), 1)
        self.assertEqual(
            errors[0]["error"],
            f"TLS certificate file {self.certPath}: no valid PEM certificate found",
        )
        self.assertEqual(errors[0]["fingerprint"], self.fp1)
        pair = self.connect()
        self.assertEqual(pair.clientApp.data(), GREETING)
        self.assertEqual(tls.formatFingerprint(pair.peerCertificate()), self.fp1)

    def test_expiredReloadKeepsOld(self) -> None:
        """
        A new certificate that has expired, or is not valid yet, is refused
        on reload (one error naming the file) while the current one is
        valid; new handshakes still get the current one.
        """
        now = datetime.datetime.now(datetime.timezone.utc)
        for notBefore, notAfter in (
            (now - datetime.timedelta(days=10), now - datetime.timedelta(days=1)),
            (now + datetime.timedelta(days=1), now + datetime.timedelta(days=10)),
        ):
            del self.events[:]
            self.install(makeLeaf(self.caCert, self.caKey, HOST, notBefore=notBefore, notAfter=notAfter))
            self.assertFalse(self.m.reload())
            self.assertEqual(self.m.fingerprint, self.fp1)
            errors = self.eventsAt(LogLevel.error)
            self.assertEqual(len(errors), 1)
            self.assertEqual((errors[0]["path"], errors[0]["fingerprint"]), (self.certPath, self.fp1))
            self.assertEqual(tls.formatFingerprint(self.connect().peerCertificate()), self.fp1)
        self.install(self.leaf2)
        self.assertTrue(self.m.reload())
        self.assertEqual(self.m.fingerprint, self.fp2)

    def test_mismatchedReloadKeepsOld(self) -> None:
        """
        A new certificate with the old key is refused on reload.
        """
        writePem(self.dir, "cert.pem", self.leaf2[0])
        self.assertFalse(self.m.reload())
        self.assertEqual(self.m.fingerprint, self.fp1)
        self.assertEqual(tls.formatFingerprint(self.connect().peerCertificate()), self.fp1)

    def test_reloadIfChangedUnchanged(self) -> None:
        """
        Nothing happens when the files did not change.
        """
        self.assertFalse(self.m.reloadIfChanged())
        self.assertEqual(self.events, [])

    def test_reloadIfChangedReplaced(self) -> None:
        """
        Replaced files are reloaded.
        """
        self.install(self.leaf2)
        self.assertTrue(self.m.reloadIfChanged())
        self.assertEqual(self.m.fingerprint, self.fp2)
        self.assertFalse(self.m.reloadIfChanged())

    def test_reloadIfChangedFailsOnce(self) -> None:
        """
        A bad change is reported once, not at every check, and a later good
        change is picked up.
        """
        writePem(self.dir, "cert.pem", self.leaf2[0])
        self.assertFalse(self.m.reloadIfChanged())
        self.assertFalse(self.m.reloadIfChanged())
        self.assertEqual(len(self.eventsAt(LogLevel.error)), 1)
        writePem(self.dir, "key.pem", self.leaf2[1])
        self.assertTrue(self.m.reloadIfChanged())
        self.assertEqual(self.m.fingerprint, self.fp2)

    def test_periodicCheckSurvivesAFailure(self) -> None:
        """
        Driven by a L{TimerService} (as C{makeService} does), an unexpected
        error while checking the files is logged as a failure and the
        checks go on: a later change is still picked up.
        """
        clock = Clock()
        timer = TimerService(30, self.m.reloadIfChanged)
        timer.clock = clock
        timer.startService()
        self.addCleanup(timer.stopService)
        install = CertificateManager._install

        def broken(manager, material) -> None:
            raise RuntimeError("boom")

        self.patch(CertificateManager, "_install", broken)
        self.install(self.leaf2)
        clock.advance(30)
        failures = [e for e in self.events if "log_failure" in e]
        self.assertEqual(len(failures), 1)
        self.assertIsInstance(failures[0]["log_failure"].value, RuntimeError)
        self.assertEqual(self.m.fingerprint, self.fp1)
        self.patch(CertificateManager, "_install", install)
        self.install(self.leaf2)
        clock.advance(30)
        self.assertEqual(self.m.fingerprint, self.fp2)


# --- server policy -----------------------------------------------------------------


class PolicyTests(CAMixin, SynchronousTestCase):
    """
    The server accepts TLS 1.2 and 1.3 only, with ECDHE + AEAD suites, and
    no compression.
    """

    def setUp(self) -> None:
        self.makeMaterial()
        self.factory = self.manager().serverContextFactory()

    def handshake(self, clientContext: ssl.SSLContext) -> PythonHandshake:
        return PythonHandshake(self.factory.serverConnectionForTLS(None), clientContext, HOST)

    def test_buffersReleasedWhenIdle(self) -> None:
        """
        Server connections release OpenSSL's read and write buffers while
        idle (C{SSL_MODE_RELEASE_BUFFERS}, as Twisted's own contexts do):
        an idle TLS connection then costs a few KB, not some 40.
        """
        from pop3gw import tls

        # set_mode adds nothing with 0 and returns the mode in force.
        self.assertTrue(tls._newServerContext().set_mode(0) & SSL.MODE_RELEASE_BUFFERS)

    def test_handshakeBuffersFreed(self) -> None:
        """
        Once the handshake is done and its flights are read out, a server
        connection's memory BIOs are replaced by fresh ones (a memory BIO's
        buffer grows during the handshake and never shrinks); application
        data then flows both ways byte for byte.  (This reads pyOpenSSL's
        private C{_into_ssl} and C{_from_ssl}: it fails if they change.)
        """
        connection = self.factory.serverConnectionForTLS(None)
        before = (connection._into_ssl, connection._from_ssl)
        handshake = PythonHandshake(connection, pythonClient(), HOST)
        self.assertTrue(handshake.succeeded)
        self.assertNotEqual(connection._into_ssl, before[0])
        self.assertNotEqual(connection._from_ssl, before[1])
        connection.send(b"+OK ready\r\n")
        handshake.incoming.write(connection.bio_read(65536))
        self.assertEqual(handshake.client.read(100), b"+OK ready\r\n")
        handshake.client.write(b"CAPA\r\n")
        connection.bio_write(handshake.outgoing.read())
        self.assertEqual(connection.recv(100), b"CAPA\r\n")

    def test_buffersKeptWhileNotEmpty(self) -> None:
        """
        The BIOs are not replaced while one still holds octets: those would
        be lost.
        """
        connection = self.factory.serverConnectionForTLS(None)
        handshake = PythonHandshake(connection, pythonClient(), HOST)
        self.assertTrue(handshake.succeeded)
        connection._releaseBIOs = True
        connection.send(b"x" * 100)
        into, out = connection._into_ssl, connection._from_ssl
        connection.bio_read(10)
        self.assertEqual((connection._into_ssl, connection._from_ssl), (into, out))
        handshake.incoming.write(connection.bio_read(65536))
        self.assertNotEqual(connection._from_ssl, out)

    def test_tls13Accepted(self) -> None:
        """
        A TLS 1.3 client is accepted.
        """
        h = self.handshake(pythonClient(minimum=ssl.TLSVersion.TLSv1_3))
        self.assertTrue(h.succeeded, (h.clientError, h.serverError))
        self.assertEqual(h.client.version(), "TLSv1.3")

    def test_tls12Accepted(self) -> None:
        """
        A TLS 1.2 client is accepted with an ECDHE AEAD suite.
        """
        h = self.handshake(pythonClient(maximum=ssl.TLSVersion.TLSv1_2))
        self.assertTrue(h.succeeded, (h.clientError, h.serverError))
        self.assertEqual(h.client.version(), "TLSv1.2")
        self.assertEqual(h.client.cipher()[0], "ECDHE-ECDSA-AES128-GCM-SHA256")

    def test_rsaCertificate(self) -> None:
        """
        An RSA certificate is served with an ECDHE-RSA AEAD suite over
        TLS 1.2.
        """
        self.install(makeLeaf(self.caCert, self.caKey, HOST, keyType="rsa"))
        factory = self.manager().serverContextFactory()
        h = PythonHandshake(
            factory.serverConnectionForTLS(None), pythonClient(maximum=ssl.TLSVersion.TLSv1_2)
        )
        self.assertTrue(h.succeeded, (h.clientError, h.serverError))
        self.assertEqual(h.client.cipher()[0], "ECDHE-RSA-AES128-GCM-SHA256")

    def test_tls11Refused(self) -> None:
        """
        A TLS 1.1 client is refused.
        """
        h = self.handshake(
            pythonClient(
                minimum=ssl.TLSVersion.TLSv1_1,
                maximum=ssl.TLSVersion.TLSv1_1,
                ciphers="DEFAULT:@SECLEVEL=0",
            )
        )
        self.assertFalse(h.clientDone)
        self.assertIsInstance(h.clientError, ssl.SSLError)
        self.assertIsInstance(h.serverError, SSL.Error)

    def test_cbcSuiteRefused(self) -> None:
        """
        A TLS 1.2 client offering only a CBC suite is refused, even with
        ECDHE.
        """
        h = self.handshake(
            pythonClient(maximum=ssl.TLSVersion.TLSv1_2, ciphers="ECDHE-ECDSA-AES128-SHA")
        )
        self.assertFalse(h.succeeded)
        self.assertIsInstance(h.serverError, SSL.Error)

    def test_cbcSuiteControl(self) -> None:
        """
        Control for L{test_cbcSuiteRefused}: an OpenSSL server context
        without the policy accepts that client.
        """
        ctx = SSL.Context(SSL.TLS_METHOD)
        ctx.use_certificate(x509.load_pem_x509_certificate(self.leaf1[0]))
        ctx.use_privatekey(serialization.load_pem_private_key(self.leaf1[1], None))
        h = PythonHandshake(
            SSL.Connection(ctx, None),
            pythonClient(maximum=ssl.TLSVersion.TLSv1_2, ciphers="ECDHE-ECDSA-AES128-SHA"),
        )
        self.assertTrue(h.succeeded)

    def test_noCompression(self) -> None:
        """
        The context disables compression and the session is not
        compressed.
        """
        options = self.factory.getContext().set_options(0)
        self.assertTrue(options & SSL.OP_NO_COMPRESSION)
        h = self.handshake(pythonClient())
        self.assertTrue(h.succeeded)
        self.assertIsNone(h.client.compression())

    def test_options(self) -> None:
        """
        Old protocol versions and renegotiation are off, and the server's
        cipher order wins.
        """
        options = self.factory.getContext().set_options(0)
        for flag in (
            # OP_NO_SSLv2 is 0 with OpenSSL 3 (SSLv2 is gone altogether).
            SSL.OP_NO_SSLv3,
            SSL.OP_NO_TLSv1,
            SSL.OP_NO_TLSv1_1,
            SSL.OP_NO_RENEGOTIATION,
            SSL.OP_CIPHER_SERVER_PREFERENCE,
        ):
            self.assertTrue(options & flag, hex(flag))

    def test_pythonClientVerifies(self) -> None:
        """
        A Python client trusting the test CA verifies the server for its
        host name.
        """
        ctx = ssl.create_default_context(cadata=self.caCert.decode("ascii"))
        h = self.handshake(ctx)
        self.assertTrue(h.succeeded, (h.clientError, h.serverError))

    def test_policyDocumented(self) -> None:
        """
        The module docstring has the "TLS policy" section the README quotes.
        """
        self.assertIn("\nTLS policy\n==========\n", tls.__doc__)


# --- relay client ----------------------------------------------------------------


class ClientContextFactoryTests(CAMixin, SynchronousTestCase):
    """
    L{tlsclient.clientContextFactory} verifies the smarthost unless told not to.
    """

    def setUp(self) -> None:
        self.makeMaterial()
        self.factory = self.manager().serverContextFactory()
        dataDir = self.mktemp()
        os.makedirs(dataDir)
        self.selfSigned = CertificateManager(dataDir, hostname=HOST).serverContextFactory()

    def test_goodName(self) -> None:
        """
        A certificate from the trusted CA for the expected name passes.
        """
        pair = TLSPair(self.factory, tlsclient.clientContextFactory(HOST, trustRoot=self.trustRoot()))
        self.assertEqual(pair.clientApp.data(), GREETING)
        self.assertIsNone(pair.clientApp.lost)

    def test_ipAddress(self) -> None:
        """
        An IP address is checked against the IP subjectAltNames.
        """
        pair = TLSPair(
            self.factory, tlsclient.clientContextFactory("127.0.0.1", trustRoot=self.trustRoot())
        )
        self.assertEqual(pair.clientApp.data(), GREETING)

    def test_wrongName(self) -> None:
        """
        A trusted certificate for another name fails the handshake.
        """
        pair = TLSPair(
            self.factory,
            tlsclient.clientContextFactory("other.example.test", trustRoot=self.trustRoot()),
        )
        self.assertEqual(pair.clientApp.data(), b"")
        self.assertIsInstance(pair.clientApp.lost.value, VerificationError)

    def test_untrusted(self) -> None:
        """
        A self-signed certificate fails verification.
        """
        pair = TLSPair(self.selfSigned, tlsclient.clientContextFactory(HOST, trustRoot=self.trustRoot()))
        self.assertEqual(pair.clientApp.data(), b"")
        self.assertIsInstance(pair.clientApp.lost.value, SSL.Error)
        self.assertEqual(
            pair.clientApp.lost.value.args[0][0][2], "certificate verify failed"
        )

    def test_noVerifySelfSigned(self) -> None:
        """
        With C{verify=False} the client connects to a self-signed server,
        and sends the host name as SNI.
        """
        pair = TLSPair(self.selfSigned, tlsclient.clientContextFactory(HOST, verify=False))
        self.assertEqual(pair.clientApp.data(), GREETING)
        self.assertEqual(pair.serverTLS.getHandle().get_servername(), HOST.encode("ascii"))

    def test_refusesTLS11Server(self) -> None:
        """
        The client does not go below TLS 1.2, even without verification.
        """
        ctx = SSL.Context(SSL.TLS_METHOD)
        ctx.set_max_proto_version(SSL.TLS1_1_VERSION)
        ctx.set_cipher_list(b"DEFAULT:@SECLEVEL=0")
        ctx.use_certificate(x509.load_pem_x509_certificate(self.leaf1[0]))
        ctx.use_privatekey(serialization.load_pem_private_key(self.leaf1[1], None))
        for client in (
            tlsclient.clientContextFactory(HOST, verify=False),
            tlsclient.clientContextFactory(HOST, trustRoot=self.trustRoot()),
            tlsclient.opportunisticClientContextFactory(HOST, trustRoot=self.trustRoot()),
        ):
            pair = TLSPair(LegacyServer(ctx), client)
            self.assertEqual(pair.clientApp.data(), b"", client)
            self.assertIsNotNone(pair.clientApp.lost, client)


@implementer(IOpenSSLContextFactory)
class LegacyServer:
    """
    A fixed server context.
    """

    def __init__(self, ctx: SSL.Context) -> None:
        self.ctx = ctx

    def getContext(self) -> SSL.Context:
        return self.ctx


class OpportunisticTests(CAMixin, SynchronousTestCase):
    """
    L{tlsclient.opportunisticClientContextFactory} always encrypts and records
    whether the peer was verified.
    """

    def setUp(self) -> None:
        self.makeMaterial()
        self.factory = self.manager().serverContextFactory()

    def test_beforeHandshake(self) -> None:
        """
        Before any handshake the outcome is unknown.
        """
        client = tlsclient.opportunisticClientContextFactory(HOST)
        self.assertIsNone(client.result.verified)

    def test_verified(self) -> None:
        """
        A trusted certificate for the name is recorded as verified.
        """
        client = tlsclient.opportunisticClientContextFactory(HOST, trustRoot=self.trustRoot())
        pair = TLSPair(self.factory, client)
        self.assertEqual(pair.clientApp.data(), GREETING)
        self.assertEqual((client.result.verified, client.result.reason), (True, None))
        self.assertEqual(pair.serverTLS.getHandle().get_servername(), HOST.encode("ascii"))

    def test_wrongName(self) -> None:
        """
        A trusted certificate for another name: connected, not verified.
        """
        client = tlsclient.opportunisticClientContextFactory(
            "other.example.test", trustRoot=self.trustRoot()
        )
        pair = TLSPair(self.factory, client)
        self.assertEqual(pair.clientApp.data(), GREETING)
        self.assertIsNone(pair.clientApp.lost)
        self.assertEqual(
            (client.result.verified, client.result.reason),
            (False, "certificate does not match other.example.test"),
        )

    def test_selfSigned(self) -> None:
        """
        A self-signed certificate: connected, not verified, with the
        reason.
        """
        dataDir = self.mktemp()
        os.makedirs(dataDir)
        server = CertificateManager(dataDir, hostname=HOST).serverContextFactory()
        client = tlsclient.opportunisticClientContextFactory(HOST, trustRoot=self.trustRoot())
        pair = TLSPair(server, client)
        self.assertEqual(pair.clientApp.data(), GREETING)
        self.assertEqual(
            (client.result.verified, client.result.reason),
            (False, "self-signed certificate (depth 0)"),
        )

    def test_untrustedCA(self) -> None:
        """
        A certificate from an unknown CA: connected, not verified.
        """
        client = tlsclient.opportunisticClientContextFactory(
            HOST, trustRoot=tssl.Certificate.loadPEM(makeCA("Other CA")[0])
        )
        pair = TLSPair(self.factory, client)
        self.assertEqual(pair.clientApp.data(), GREETING)
        self.assertFalse(client.result.verified)
        self.assertEqual(client.result.reason, "unable to get local issuer certificate (depth 0)")

    def test_freshResultPerConnection(self) -> None:
        """
        Each connection made with the factory starts a new result.
        """
        client = tlsclient.opportunisticClientContextFactory(HOST, trustRoot=self.trustRoot())
        TLSPair(self.factory, client)
        first = client.result
        dataDir = self.mktemp()
        os.makedirs(dataDir)
        TLSPair(CertificateManager(dataDir, hostname=HOST).serverContextFactory(), client)
        self.assertTrue(first.verified)
        self.assertFalse(client.result.verified)


# --- real sockets ------------------------------------------------------------


class STLSServer(LineReceiver):
    """
    A tiny line server: greets, answers C{STLS} by starting TLS with the
    factory's context factory, echoes anything else.
    """

    def connectionMade(self) -> None:
        self.sendLine(b"+OK")

    def lineReceived(self, line: bytes) -> None:
        if line == b"STLS":
            self.sendLine(b"+OK go")
            self.transport.startTLS(self.factory.contextFactory)
        else:
            self.sendLine(b"+OK " + line)

    def connectionLost(self, reason) -> None:
        self.factory.lost.callback(None)


class STLSClient(LineReceiver):
    """
    Sends C{STLS} (unless already on TLS), then C{hi}; fires the factory's
    C{done} with the server's certificate and hangs up.
    """

    def lineReceived(self, line: bytes) -> None:
        if line == b"+OK" and not self.factory.implicit:
            self.sendLine(b"STLS")
        elif line == b"+OK go" or (line == b"+OK" and self.factory.implicit):
            if not self.factory.implicit:
                self.transport.startTLS(self.factory.contextFactory)
            self.sendLine(b"hi")
        elif line == b"+OK hi":
            cert = self.transport.getHandle().get_peer_certificate(as_cryptography=True)
            self.factory.done.callback(cert)
            self.transport.loseConnection()

    def connectionLost(self, reason) -> None:
        self.factory.lost.callback(None)


class RealSocketTests(CAMixin, TestCase):
    """
    The server context factory on real loopback sockets: with C{startTLS}
    (STLS/STARTTLS) and behind L{TLSMemoryBIOFactory} (implicit TLS).
    """

    def setUp(self) -> None:
        from twisted.internet import reactor

        self.reactor = reactor
        self.makeMaterial()
        self.m = self.manager()

    def serve(self, wrap: bool):
        server = Factory.forProtocol(STLSServer)
        server.contextFactory = self.m.serverContextFactory()
        server.lost = defer.Deferred()
        factory = server
        if wrap:
            factory = TLSMemoryBIOFactory(server.contextFactory, False, server)
        port = self.reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return port, server

    def talk(self, port, server, implicit: bool):
        client = ClientFactory.forProtocol(STLSClient)
        client.implicit = implicit
        client.contextFactory = tlsclient.clientContextFactory(HOST, trustRoot=self.trustRoot())
        client.done = defer.Deferred()
        client.lost = defer.Deferred()
        factory = client
        if implicit:
            factory = TLSMemoryBIOFactory(client.contextFactory, True, client)
        self.reactor.connectTCP("127.0.0.1", port.getHost().port, factory)
        finished = defer.gatherResults([client.done, client.lost, server.lost])
        return finished.addCallback(lambda results: results[0])

    @defer.inlineCallbacks
    def test_startTLS(self):
        """
        STLS: a plain connection upgraded with C{startTLS} serves the
        certificate, verified by the relay client factory.
        """
        port, server = self.serve(wrap=False)
        cert = yield self.talk(port, server, implicit=False)
        self.assertEqual(tls.formatFingerprint(cert), self.m.fingerprint)

    @defer.inlineCallbacks
    def test_implicitTLS(self):
        """
        Implicit TLS: a listener wrapped in L{TLSMemoryBIOFactory} serves
        the certificate, and a reload changes it for the next connection.
        """
        port, server = self.serve(wrap=True)
        cert = yield self.talk(port, server, implicit=True)
        self.assertEqual(tls.formatFingerprint(cert), self.m.fingerprint)
        self.install(self.leaf2)
        self.assertTrue(self.m.reload())
        server.lost = defer.Deferred()
        cert = yield self.talk(port, server, implicit=True)
        self.assertEqual(colonless(tls.formatFingerprint(cert)), fingerprintOf(self.leaf2[0]))
