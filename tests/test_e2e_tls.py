"""
End-to-end TLS: STLS, STARTTLS and implicit TLS on the real server with a
CA and certificates made in the test; the plaintext-auth policy; command
injection across STLS/STARTTLS; certificate reload on SIGHUP; installed
clients (openssl s_client, curl, swaks).
"""

from __future__ import annotations

import base64
import hashlib
import os
import poplib
import signal
import smtplib
import socket
import ssl
import subprocess
import tempfile
import time

from twisted.trial.unittest import SynchronousTestCase

from tests.e2e import Pop3gwProcess, requireProgram, requireSwaksTLS
from tests.tlshelpers import makeCA, makeLeaf

ALICE, PASSWORD = "alice@example.org", "alice secret"
HOST = "mail.example.org"


def fingerprint(derCert: bytes) -> str:
    return hashlib.sha256(derCert).hexdigest()


class TLSServerMixin:
    def makeCertificates(self, name="Test CA"):
        work = tempfile.mkdtemp(prefix="pop3gw-tls-")
        self.addCleanup(__import__("shutil").rmtree, work, True)
        caCert, caKey = makeCA(name)
        cert, key = makeLeaf(caCert, caKey, HOST, ips=("127.0.0.1",))
        paths = {}
        for label, data in (("ca.pem", caCert), ("cert.pem", cert), ("key.pem", key)):
            paths[label] = os.path.join(work, label)
            with open(paths[label], "wb") as f:
                f.write(data)
        paths["caKey"] = caKey
        paths["caCert"] = caCert
        return paths

    def startServer(self, *args, listeners=("pop3", "submission"), certs=None) -> Pop3gwProcess:
        certs = certs or self.makeCertificates()
        self.certs = certs
        server = Pop3gwProcess(
            self,
            args=["--domain", "example.org", "--tls-cert", certs["cert.pem"], "--tls-key", certs["key.pem"], *args],
            listeners=listeners,
        ).start()
        server.addUser(ALICE, PASSWORD)
        return server

    def clientContext(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=self.certs["ca.pem"])
        return ctx


class PolicyTests(TLSServerMixin, SynchronousTestCase):
    def test_pop3NeverPlaintext(self) -> None:
        """
        Under C{--plaintext-auth never}, CAPA offers STLS but neither USER nor
        SASL PLAIN, USER is refused with C{[AUTH]}; after STLS (verified
        against the test CA) login works and STLS is no longer offered.
        """
        server = self.startServer("--plaintext-auth", "never")
        client = poplib.POP3("127.0.0.1", server.ports["pop3"], timeout=30)
        self.addCleanup(client.close)
        caps = client.capa()
        self.assertIn("STLS", caps)
        self.assertNotIn("USER", caps)
        self.assertNotIn("PLAIN", caps.get("SASL", []))
        with self.assertRaises(poplib.error_proto) as e:
            client.user(ALICE)
        self.assertIn(b"[AUTH]", e.exception.args[0])
        client.stls(self.clientContext())
        caps = client.capa()
        self.assertIn("USER", caps)
        self.assertNotIn("STLS", caps)
        client.user(ALICE)
        client.pass_(PASSWORD)
        client.quit()
        self.assertNotIn("authentication failed", server.log())

    def test_submissionNeverPlaintext(self) -> None:
        """
        Under C{--plaintext-auth never}, EHLO offers STARTTLS but not AUTH and
        AUTH gets 538 5.7.11; after STARTTLS AUTH is offered and works.
        """
        server = self.startServer("--plaintext-auth", "never")
        client = smtplib.SMTP("127.0.0.1", server.ports["submission"], timeout=30)
        self.addCleanup(client.close)
        client.ehlo("client.example")
        self.assertTrue(client.has_extn("starttls"))
        self.assertFalse(client.has_extn("auth"))
        code, text = client.docmd("AUTH", "PLAIN " + base64.b64encode(f"\0{ALICE}\0{PASSWORD}".encode()).decode())
        self.assertEqual(code, 538)
        client.starttls(context=self.clientContext())
        client.ehlo("client.example")
        self.assertFalse(client.has_extn("starttls"))
        self.assertTrue(client.has_extn("auth"))
        client.login(ALICE, PASSWORD)
        client.quit()

    def test_implicitTLS(self) -> None:
        """
        C{--pop3s} and C{--submissions} listeners speak TLS from the first
        byte, verified against the test CA, and do not offer STLS/STARTTLS.
        """
        server = self.startServer(listeners=("pop3", "submission", "pop3s", "submissions"))
        pop = poplib.POP3_SSL("127.0.0.1", server.ports["pop3s"], context=self.clientContext(), timeout=30)
        self.addCleanup(pop.close)
        self.assertNotIn("STLS", pop.capa())
        pop.user(ALICE)
        pop.pass_(PASSWORD)
        self.assertIn(pop.sock.version(), ("TLSv1.2", "TLSv1.3"))
        pop.quit()
        smtp = smtplib.SMTP_SSL("127.0.0.1", server.ports["submissions"], context=self.clientContext(), timeout=30)
        self.addCleanup(smtp.close)
        smtp.ehlo("client.example")
        self.assertFalse(smtp.has_extn("starttls"))
        smtp.login(ALICE, PASSWORD)
        smtp.quit()

    def test_oldTLSRefused(self) -> None:
        """
        A client limited to TLS 1.1 cannot connect.
        """
        server = self.startServer(listeners=("pop3", "submission", "pop3s"))
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        try:
            ctx.minimum_version = ssl.TLSVersion.TLSv1
            ctx.maximum_version = ssl.TLSVersion.TLSv1_1
            ctx.set_ciphers("ALL:@SECLEVEL=0")
        except (ValueError, ssl.SSLError):
            self.skipTest("this OpenSSL cannot even offer TLS 1.1")
        with socket.create_connection(("127.0.0.1", server.ports["pop3s"]), timeout=30) as raw:
            with self.assertRaises((ssl.SSLError, ConnectionResetError)):
                ctx.wrap_socket(raw).recv(100)


class InjectionTests(TLSServerMixin, SynchronousTestCase):
    def test_pop3PipelinedAfterSTLSIgnored(self) -> None:
        """
        A USER command sent in the same segment as STLS is discarded: after
        the handshake, PASS is refused because no USER was given.
        """
        server = self.startServer()
        with socket.create_connection(("127.0.0.1", server.ports["pop3"]), timeout=30) as raw:
            f = raw.makefile("rb")
            f.readline()
            raw.sendall(f"STLS\r\nUSER {ALICE}\r\n".encode())
            self.assertTrue(f.readline().startswith(b"+OK"))
            tls = self.clientContext().wrap_socket(raw, server_hostname=HOST)
            tf = tls.makefile("rb")
            tls.sendall(f"PASS {PASSWORD}\r\n".encode())
            self.assertTrue(tf.readline().startswith(b"-ERR"))
            tls.sendall(b"QUIT\r\n")
            tf.readline()

    def test_smtpPipelinedAfterSTARTTLSIgnored(self) -> None:
        """
        An AUTH command sent in the same segment as STARTTLS is discarded:
        after the handshake the first reply is the one to the new EHLO.
        """
        server = self.startServer()
        token = base64.b64encode(f"\0{ALICE}\0{PASSWORD}".encode())
        with socket.create_connection(("127.0.0.1", server.ports["submission"]), timeout=30) as raw:
            f = raw.makefile("rb")
            f.readline()
            raw.sendall(b"EHLO x\r\n")
            while not f.readline().startswith(b"250 "):
                pass
            raw.sendall(b"STARTTLS\r\nAUTH PLAIN " + token + b"\r\n")
            self.assertTrue(f.readline().startswith(b"220"))
            tls = self.clientContext().wrap_socket(raw, server_hostname=HOST)
            tf = tls.makefile("rb")
            tls.sendall(b"MAIL FROM:<" + ALICE.encode() + b">\r\n")
            self.assertTrue(tf.readline().startswith(b"503"))  # no EHLO yet, and certainly not authenticated


class ReloadTests(TLSServerMixin, SynchronousTestCase):
    def test_sighupReloadsCertificate(self) -> None:
        """
        After the certificate files are replaced and SIGHUP is sent, new
        connections get the new certificate while a session opened before
        keeps working; a broken replacement is logged and the current one
        kept.
        """
        server = self.startServer(listeners=("pop3", "submission", "pop3s"))
        before = poplib.POP3_SSL("127.0.0.1", server.ports["pop3s"], context=self.clientContext(), timeout=30)
        self.addCleanup(before.close)
        oldPrint = fingerprint(before.sock.getpeercert(binary_form=True))

        cert, key = makeLeaf(self.certs["caCert"], self.certs["caKey"], HOST, ips=("127.0.0.1",))
        for name, data in (("cert.pem", cert), ("key.pem", key)):
            tmp = self.certs[name] + ".new"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, self.certs[name])
        server.signal(signal.SIGHUP)

        deadline = time.monotonic() + 15
        while True:
            after = poplib.POP3_SSL("127.0.0.1", server.ports["pop3s"], context=self.clientContext(), timeout=30)
            newPrint = fingerprint(after.sock.getpeercert(binary_form=True))
            after.quit()
            after.close()
            if newPrint != oldPrint or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        self.assertEqual(newPrint, hashlib.sha256(ssl.PEM_cert_to_DER_cert(cert.decode())).hexdigest())
        before.user(ALICE)
        before.pass_(PASSWORD)
        before.quit()

        with open(self.certs["cert.pem"], "wb") as f:
            f.write(b"not a certificate\n")
        server.signal(signal.SIGHUP)
        time.sleep(1.0)
        again = poplib.POP3_SSL("127.0.0.1", server.ports["pop3s"], context=self.clientContext(), timeout=30)
        self.assertEqual(fingerprint(again.sock.getpeercert(binary_form=True)), newPrint)
        again.quit()
        again.close()
        self.assertEqual(server.proc.poll(), None)


class GeneratedCertificateTests(SynchronousTestCase):
    def test_selfSignedOnFirstStart(self) -> None:
        """
        Without --tls-cert, a self-signed certificate is generated under
        DATA/tls/ and its SHA-256 fingerprint logged; STLS serves it.
        """
        server = Pop3gwProcess(self).start()
        certPath = os.path.join(server.dataDir, "tls", "cert.pem")
        self.assertTrue(os.path.exists(certPath))
        with open(certPath) as f:
            der = ssl.PEM_cert_to_DER_cert(f.read())
        digest = hashlib.sha256(der).hexdigest().upper()
        logged = ":".join(digest[i:i + 2] for i in range(0, len(digest), 2))
        self.assertIn(logged, server.log())
        client = poplib.POP3("127.0.0.1", server.ports["pop3"], timeout=30)
        self.addCleanup(client.close)
        ctx = ssl.create_default_context(cafile=certPath)
        ctx.check_hostname = False
        client.stls(ctx)
        self.assertEqual(client.sock.getpeercert(binary_form=True), der)
        client.quit()


class InstalledClientTests(TLSServerMixin, SynchronousTestCase):
    def sClient(self, port: int, proto: str) -> str:
        openssl = requireProgram(self, "openssl")
        result = subprocess.run(
            [openssl, "s_client", "-connect", f"127.0.0.1:{port}", "-starttls", proto, "-CAfile", self.certs["ca.pem"],
             "-verify_hostname", HOST, "-verify_return_error", "-brief"],
            input=b"QUIT\r\n", capture_output=True, timeout=60)
        return (result.stdout + result.stderr).decode("utf-8", "replace")

    def test_opensslStarttls(self) -> None:
        """
        C{openssl s_client -starttls pop3|smtp} completes a verified TLS 1.2+
        handshake on both plain listeners.
        """
        server = self.startServer()
        for port, proto in ((server.ports["pop3"], "pop3"), (server.ports["submission"], "smtp")):
            out = self.sClient(port, proto)
            self.assertIn("Verification: OK", out, out)
            self.assertRegex(out, r"Protocol version: TLSv1\.[23]")

    def test_curlSslReqd(self) -> None:
        """
        C{curl --ssl-reqd pop3://} upgrades with STLS, verifies the server
        against the test CA and retrieves a message.
        """
        curl = requireProgram(self, "curl")
        server = self.startServer("--plaintext-auth", "never")
        server.deliver(ALICE, b"Subject: tls\n\nover tls\n")
        result = subprocess.run(
            [curl, "-sS", "--max-time", "30", "--ssl-reqd", "--cacert", self.certs["ca.pem"], "--resolve",
             f"{HOST}:{server.ports['pop3']}:127.0.0.1", "-u", f"{ALICE}:{PASSWORD}",
             f"pop3://{HOST}:{server.ports['pop3']}/1"], capture_output=True, timeout=60)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout, b"Subject: tls\r\n\r\nover tls\r\n")

    def test_swaksTls(self) -> None:
        """
        C{swaks --tls} submits over STARTTLS where plaintext AUTH is refused.
        """
        swaks = requireSwaksTLS(self)
        server = self.startServer("--plaintext-auth", "never")
        result = subprocess.run(
            [swaks, "--server", "127.0.0.1", "--port", str(server.ports["submission"]), "--tls", "--from", ALICE,
             "--to", ALICE, "--auth", "PLAIN", "--auth-user", ALICE, "--auth-password", PASSWORD,
             "--h-From", ALICE, "--body", "over starttls"],
            capture_output=True, timeout=60, stdin=subprocess.DEVNULL)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertIn(b"STARTTLS", result.stdout)
