"""
Tests for L{pop3gw.selftest}: each probe is shown to fail against a server
with the flaw it looks for (small scripted servers on loopback), and the
command line's parsing.
"""

import datetime
import io
import os
import shutil
import socket
import ssl
import tempfile
import threading
from typing import Callable, List
from unittest import TestCase

from pop3gw import cli, selftest
from tests.tlshelpers import makeCA, makeLeaf


class ScriptedServer:
    """
    A TCP server on 127.0.0.1 that runs C{handler(connection)} in a thread
    for each connection.
    """

    def __init__(self, testcase: TestCase, handler: Callable[["Peer"], None],
                 context: "ssl.SSLContext | None" = None) -> None:
        self.handler = handler
        self.context = context
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.threads: List[threading.Thread] = []
        thread = threading.Thread(target=self.serve, daemon=True)
        thread.start()
        testcase.addCleanup(self.stop, thread)

    def serve(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            thread = threading.Thread(target=self.run, args=(sock,), daemon=True)
            self.threads.append(thread)
            thread.start()

    def run(self, sock: socket.socket) -> None:
        sock.settimeout(5)
        try:
            if self.context is not None:
                sock = self.context.wrap_socket(sock, server_side=True)
            self.handler(Peer(sock))
        except (OSError, ssl.SSLError, EOFError):
            pass
        finally:
            sock.close()

    def stop(self, thread: threading.Thread) -> None:
        try:
            # Wakes the accept() in the serving thread; close() alone does not.
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()
        thread.join(5)
        for t in self.threads:
            t.join(5)

    def target(self, kind: str) -> selftest.Target:
        return selftest.Target(kind, "127.0.0.1", self.port)


class Peer:
    """
    The server side of one scripted connection.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def readLine(self) -> bytes:
        while b"\r\n" not in self.buffer:
            data = self.sock.recv(4096)
            if not data:
                raise EOFError()
            self.buffer += data
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return line

    def readUntil(self, markers) -> bytes:
        while not any(m in self.buffer for m in markers):
            data = self.sock.recv(4096)
            if not data:
                raise EOFError()
            self.buffer += data
        return self.buffer


def options(**kwargs) -> selftest.Options:
    return selftest.Options(timeout=5, quiet=0.3, **kwargs)


def results(target: selftest.Target, opts: selftest.Options) -> dict:
    return {r.name: r for r in selftest.Prober(target, opts).run()}


def naiveSMTP(peer: Peer, relay: bool = False, smuggling: bool = False) -> None:
    """
    An SMTP server with the flaws asked for: every recipient accepted, or
    a bare LF.LF taken as the end of data.
    """
    peer.send(b"220 naive ESMTP\r\n")
    while True:
        line = peer.readLine().upper()
        if line.startswith(b"EHLO"):
            peer.send(b"250-naive\r\n250 PIPELINING\r\n")
        elif line.startswith(b"RCPT") and not relay and line.endswith(b"@EXAMPLE.NET>"):
            peer.send(b"550 5.7.1 relay denied\r\n")
        elif line.startswith(b"DATA"):
            peer.send(b"354 go\r\n")
            ends = [b"\n.\n", b"\r\n.\r\n"] if smuggling else [b"\r\n.\r\n"]
            peer.readUntil(ends)
            peer.buffer = b""
            peer.send(b"250 2.0.0 queued\r\n")
        elif line.startswith(b"QUIT"):
            peer.send(b"221 bye\r\n")
            return
        else:
            peer.send(b"250 ok\r\n")


class SMTPProbeTests(TestCase):
    def test_openRelayFails(self) -> None:
        """
        An MX that accepts a foreign recipient fails C{mx-open-relay},
        naming every form it accepted.
        """
        server = ScriptedServer(self, lambda p: naiveSMTP(p, relay=True))
        found = results(server.target("mx"), options(domain="example.org"))
        self.assertFalse(found["mx-open-relay"].passed)
        self.assertIn("selftest%example.net@example.org", found["mx-open-relay"].detail)

    def test_relayRefusedPasses(self) -> None:
        """
        An MX that refuses the plain foreign recipient but accepts the
        disguised ones still fails; only refusing all of them passes.
        """
        server = ScriptedServer(self, naiveSMTP)
        found = results(server.target("mx"), options(domain="example.org"))
        self.assertFalse(found["mx-open-relay"].passed)
        self.assertNotIn("<selftest@example.net>", found["mx-open-relay"].detail)
        self.assertIn("selftest%example.net@example.org", found["mx-open-relay"].detail)

    def test_smugglingFails(self) -> None:
        """
        An SMTP server that ends a message at LF.LF fails C{mx-smuggling},
        naming the two vectors that contain it.
        """
        server = ScriptedServer(self, lambda p: naiveSMTP(p, smuggling=True))
        result = results(server.target("mx"), options(domain="example.org"))["mx-smuggling"]
        self.assertEqual(result.line(), "FAIL mx-smuggling: ended the message at LF.LF, CRLF.LF: smuggled commands would run")

    def test_noStartTLSFails(self) -> None:
        """
        An MX without STARTTLS fails C{mx-tls-offered}.
        """
        server = ScriptedServer(self, naiveSMTP)
        result = results(server.target("mx"), options(domain="example.org"))["mx-tls-offered"]
        self.assertEqual(result.line(), "FAIL mx-tls-offered: STARTTLS not offered: everything crosses the network in clear")

    def test_smugglingNeedsADomain(self) -> None:
        """
        Without a domain to send to, the smuggling probe fails and says
        what to give.
        """
        server = ScriptedServer(self, naiveSMTP)
        result = results(server.target("mx"), options())["mx-smuggling"]
        self.assertEqual(result.line(), "FAIL mx-smuggling: no local domain to send to: give --domain or --user")

    def test_refusedConnection(self) -> None:
        """
        A listener that cannot be reached gives one failed C{connect}
        probe and nothing else.
        """
        sock = socket.create_server(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.close()
        found = list(selftest.Prober(selftest.Target("mx", "127.0.0.1", port), options()).run())
        self.assertEqual(len(found), 1)
        self.assertEqual(found[0].line(), f"FAIL mx-connect: cannot talk to 127.0.0.1:{port}: Connection refused")


def naivePOP3(peer: Peer, context: "ssl.SSLContext | None" = None, listSize: int = 0) -> None:
    """
    A POP3 server that runs what was pipelined after STLS in clear, and
    lists one message with a wrong size when C{listSize} is given.
    """
    peer.send(b"+OK naive\r\n")
    while True:
        line = peer.readLine().upper()
        if line == b"CAPA":
            peer.send(b"+OK\r\nUSER\r\nSTLS\r\n.\r\n")
        elif line == b"STLS":
            peer.send(b"+OK go\r\n")
            if not peer.buffer and context is not None:
                peer.sock = context.wrap_socket(peer.sock, server_side=True)
        elif line == b"LIST":
            peer.send(b"+OK\r\n1 %d\r\n.\r\n" % listSize)
        elif line.startswith(b"RETR"):
            peer.send(b"+OK\r\nSubject: x\r\n\r\n..dotted\r\n.\r\n")
        elif line == b"QUIT":
            peer.send(b"+OK bye\r\n")
            return
        else:
            peer.send(b"+OK\r\n")


class POP3ProbeTests(TestCase):
    def test_injectionAnsweredInClear(self) -> None:
        """
        A server that answers a command pipelined after STLS before the
        handshake fails C{pop3-tls-injection}.
        """
        server = ScriptedServer(self, naivePOP3)
        result = selftest.Prober(server.target("pop3"), options()).probeInjection()
        self.assertEqual(result.line(), "FAIL pop3-tls-injection: answered the CAPA sent with STLS in clear")

    def test_plaintextAuthElsewhere(self) -> None:
        """
        USER offered before TLS fails C{plaintext-auth} on an address that
        is not loopback, and passes with a caveat on loopback.
        """
        for host, passed in (("192.0.2.1", False), ("127.0.0.1", True), ("::1", True)):
            prober = selftest.Prober(selftest.Target("pop3", host, 110), options())
            found = {r.name: r for r in prober.probePlaintext(["USER", "SASL PLAIN"], tls=False)}
            self.assertEqual(found["pop3-plaintext-auth"].passed, passed, host)
            self.assertIn("USER/PASS, PLAIN offered before TLS", found["pop3-plaintext-auth"].detail)

    def test_listSizeMismatch(self) -> None:
        """
        A LIST size that is not what RETR sends fails C{list-size}; the
        right one (CRLF octets, dots unstuffed) passes.
        """
        for size, passed in ((99, False), (len(b"Subject: x\r\n\r\n.dotted\r\n"), True)):
            server = ScriptedServer(self, lambda p, size=size: naivePOP3(p, listSize=size))
            prober = selftest.Prober(server.target("pop3"), options())
            conversation = prober.connect()
            try:
                result = prober.probeSizes(conversation)
            finally:
                conversation.close()
            self.assertEqual(result.passed, passed, result.line())
        self.assertEqual(result.detail, "1 of 1 message(s) checked")


class CertificateProbeTests(TestCase):
    def setUp(self) -> None:
        self.work = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.work, True)

    def serverContext(self, days: int):
        caCert, caKey = makeCA()
        now = datetime.datetime.now(datetime.timezone.utc)
        cert, key = makeLeaf(caCert, caKey, "mail.example.org", notBefore=now - datetime.timedelta(days=1),
                             notAfter=now + datetime.timedelta(days=days))
        paths = {}
        for name, data in (("ca", caCert), ("cert", cert), ("key", key)):
            paths[name] = os.path.join(self.work, name + ".pem")
            with open(paths[name], "wb") as f:
                f.write(data)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(paths["cert"], paths["key"])
        return context, paths["ca"]

    def test_expiringSoon(self) -> None:
        """
        A trusted certificate that expires within 14 days fails
        C{certificate}; one with 60 days left passes.
        """
        for days, passed in ((5, False), (60, True)):
            context, ca = self.serverContext(days)
            server = ScriptedServer(self, naivePOP3, context=context)
            result = results(server.target("pop3s"), options(caFile=ca))["pop3s-certificate"]
            self.assertEqual(result.passed, passed, result.line())
        self.assertRegex(result.detail, r"^mail\.example\.org issued by pop3gw test CA, expires \d{4}-\d\d-\d\d \(59 days\)")

    def test_untrusted(self) -> None:
        """
        A certificate from a CA that is not trusted fails.
        """
        context, ca = self.serverContext(60)
        server = ScriptedServer(self, naivePOP3, context=context)
        result = results(server.target("pop3s"), options())["pop3s-certificate"]
        self.assertFalse(result.passed)
        self.assertTrue(result.detail.startswith("not trusted for 127.0.0.1: "), result.detail)


class ParsingTests(TestCase):
    def test_hostPort(self) -> None:
        """
        HOST:PORT and [V6]:PORT parse; anything else is refused.
        """
        self.assertEqual(selftest.parseHostPort("mail.example.org:995"), ("mail.example.org", 995))
        self.assertEqual(selftest.parseHostPort("[::1]:110"), ("::1", 110))
        for bad in ("mail.example.org", "::1:110", "host:0", "host:99999", "host:port"):
            self.assertRaises(ValueError, selftest.parseHostPort, bad)

    def test_endpoints(self) -> None:
        """
        Configured TCP endpoints become targets (a listener on every
        interface is probed on loopback); Unix sockets and port 0 are
        skipped.
        """
        t = selftest.targetFromEndpoint
        self.assertEqual(t("pop3", "tcp:1110:interface=127.0.0.1"), selftest.Target("pop3", "127.0.0.1", 1110))
        self.assertEqual(t("mx", "tcp:25"), selftest.Target("mx", "127.0.0.1", 25))
        self.assertEqual(t("pop3s", "tcp6:995:interface=\\:\\:"), selftest.Target("pop3s", "::1", 995))
        self.assertEqual(t("pop3", "tcp:port=110:interface=192.0.2.1"), selftest.Target("pop3", "192.0.2.1", 110))
        self.assertIsNone(t("pop3", "unix:/run/pop3gw/pop3"))
        self.assertIsNone(t("pop3", "tcp:0"))

    def runCLI(self, *argv: str):
        out, err = io.StringIO(), io.StringIO()
        status = cli.main(list(argv), stdin=io.StringIO(), stdout=out, stderr=err)
        return status, out.getvalue(), err.getvalue()

    def test_userNeedsPasswordFile(self) -> None:
        """
        --user without --password-file is a usage error, one line.
        """
        status, out, err = self.runCLI("selftest", "--pop3", "127.0.0.1:1", "--user", "a@example.org")
        self.assertEqual((status, out, err), (64, "", "pop3gw: --user and --password-file go together\n"))

    def test_badHostPort(self) -> None:
        """
        A malformed HOST:PORT is a usage error naming the option.
        """
        status, out, err = self.runCLI("selftest", "--mx", "nowhere")
        self.assertEqual((status, err), (64, "pop3gw: --mx: expected HOST:PORT, got 'nowhere'\n"))

    def test_failureExitStatus(self) -> None:
        """
        A failed probe makes the exit status 1.
        """
        sock = socket.create_server(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.close()
        status, out, err = self.runCLI("selftest", "--pop3", f"127.0.0.1:{port}")
        self.assertEqual(status, 1)
        self.assertEqual(out, f"FAIL pop3-connect: cannot talk to 127.0.0.1:{port}: Connection refused\n")


def strictSMTP(peer: Peer) -> None:
    """
    An SMTP server that refuses a bare LF in the data with one error and
    hangs up, as Postfix's smtpd_forbid_bare_newline does.
    """
    peer.send(b"220 strict ESMTP\r\n")
    while True:
        line = peer.readLine().upper()
        if line.startswith(b"DATA"):
            peer.send(b"354 go\r\n")
            while b"\n" not in peer.buffer.replace(b"\r\n", b"") and b"\r\n.\r\n" not in peer.buffer:
                data = peer.sock.recv(4096)
                if not data:
                    return
                peer.buffer += data
            if b"\r\n.\r\n" in peer.buffer:
                peer.buffer = b""
                peer.send(b"250 ok\r\n")
            else:
                peer.send(b"521 5.5.2 Error: bare <LF> received\r\n")
                return
        elif line.startswith(b"QUIT"):
            peer.send(b"221 bye\r\n")
            return
        else:
            peer.send(b"250 ok\r\n")


class StrictSMTPTests(TestCase):
    def test_refusalPasses(self) -> None:
        """
        A server that answers a look-alike with one error reply and no
        more has not run the smuggled commands: the probe passes, naming
        the refusals.
        """
        server = ScriptedServer(self, strictSMTP)
        prober = selftest.Prober(server.target("mx"), options(domain="example.org"))
        [result] = list(prober.probeSmuggling("postmaster@example.org"))
        self.assertTrue(result.passed, result.line())
        self.assertIn("LF.LF (521 5.5.2 Error: bare <LF> received)", result.detail)
