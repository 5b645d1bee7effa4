"""
End-to-end: submission through the real C{twistd pop3gw} with smtplib,
swaks, msmtp and curl; local mail fetched back over POP3; remote mail relayed
to a local sink SMTP server given as C{--relay-host}.
"""

from __future__ import annotations

import email
import os
import poplib
import re
import smtplib
import socket
import subprocess
import tempfile
import time

from twisted.trial.unittest import SynchronousTestCase

from tests.e2e import Pop3gwProcess, requireProgram

ALICE, ALICE_PW = "alice@example.org", "alice secret"
BOB, BOB_PW = "bob@example.org", "bob secret"


def message(sender=ALICE, to=BOB, subject="hi", body=b"hello\r\n.dot line\r\nbye\r\n") -> bytes:
    return (
        f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\n"
        f"Message-ID: <{subject.replace(' ', '.')}.{time.time_ns()}@example.org>\r\n"
        "Date: Thu, 26 Nov 2026 12:00:00 +0000\r\n\r\n"
    ).encode() + body


def stripTrace(data: bytes) -> bytes:
    """
    C{data} without its leading C{Received:} header fields (folded lines
    included): what submission may prepend.
    """
    lines = data.split(b"\r\n")
    i = 0
    while i < len(lines) and lines[i].lower().startswith(b"received:"):
        i += 1
        while i < len(lines) and lines[i][:1] in (b" ", b"\t"):
            i += 1
    return b"\r\n".join(lines[i:])


class Sink:
    """
    A sink SMTP server (aiosmtpd) on 127.0.0.1 whose replies to DATA come
    from C{replies} in turn (the last one repeats).
    """

    def __init__(self, testcase, replies=("250 OK",), smtputf8: bool = False) -> None:
        from aiosmtpd.controller import Controller

        self.replies = list(replies)
        self.received: list = []
        #: Per message received, the MAIL parameters.
        self.mailOptions: list = []
        self.attempts = 0
        sink = self

        class Handler:
            async def handle_DATA(self, server, session, envelope):
                sink.attempts += 1
                reply = sink.replies.pop(0) if len(sink.replies) > 1 else sink.replies[0]
                if reply.startswith("250"):
                    sink.received.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content))
                    sink.mailOptions.append(list(envelope.mail_options))
                return reply

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        # enable_SMTPUTF8: whether the sink offers SMTPUTF8 (RFC 6531).
        self.controller = Controller(Handler(), hostname="127.0.0.1", port=self.port, enable_SMTPUTF8=smtputf8)
        self.controller.start()
        testcase.addCleanup(self.controller.stop)

    def waitFor(self, predicate, timeout=30.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError("timed out waiting for the sink")
            time.sleep(0.1)


class SubmissionTestMixin:
    def startServer(self, *args, extraConfig: str = "") -> Pop3gwProcess:
        server = Pop3gwProcess(self, args=["--domain", "example.org", *args], extraConfig=extraConfig).start()
        server.addUser(ALICE, ALICE_PW)
        server.addUser(BOB, BOB_PW)
        return server

    def smtp(self, server) -> smtplib.SMTP:
        client = smtplib.SMTP("127.0.0.1", server.ports["submission"], timeout=30)
        self.addCleanup(_quietClose, client)
        return client

    def fetchAll(self, server, user, password) -> list:
        pop = poplib.POP3("127.0.0.1", server.ports["pop3"], timeout=30)
        try:
            pop.user(user)
            pop.pass_(password)
            count = pop.stat()[0]
            out = [b"\r\n".join(pop.retr(i)[1]) + b"\r\n" for i in range(1, count + 1)]
            pop.quit()
        finally:
            pop.close()
        return out


def _quietClose(client) -> None:
    try:
        client.close()
    except OSError:
        pass


class SmtplibTests(SubmissionTestMixin, SynchronousTestCase):
    def test_localDeliveryByteForByte(self) -> None:
        """
        A message submitted with smtplib to a local colleague is fetched over
        POP3 byte for byte, with only a C{Received:} header prepended.
        """
        server = self.startServer()
        client = self.smtp(server)
        client.login(ALICE, ALICE_PW)
        msg = message()
        client.sendmail(ALICE, [BOB], msg)
        client.quit()
        fetched = self.fetchAll(server, BOB, BOB_PW)
        self.assertEqual(len(fetched), 1)
        self.assertTrue(fetched[0].lower().startswith(b"received:"), fetched[0][:200])
        self.assertEqual(stripTrace(fetched[0]), msg)

    def test_authRequiredAndNoOpenRelay(self) -> None:
        """
        Without AUTH, MAIL gets 530 and nothing is relayed; an authenticated
        user cannot send as someone else (553).
        """
        server = self.startServer()
        client = self.smtp(server)
        client.ehlo("client.example")
        code, _ = client.mail(ALICE)
        self.assertEqual(code, 530)
        client.login(ALICE, ALICE_PW)
        code, _ = client.mail(BOB)
        self.assertEqual(code, 553)
        code, _ = client.mail(ALICE)
        self.assertEqual(code, 250)
        code, _ = client.rcpt("nobody@example.org")
        self.assertEqual(code, 550)

    def test_smugglingCreatesNoSecondMessage(self) -> None:
        """
        The SMTP smuggling vectors (a fake end-of-data followed by a second
        envelope inside the data) never create a second message.
        """
        server = self.startServer()
        import base64

        for vector in (b"\n.\n", b"\r.\r", b"\r\n.\n", b"\n.\r\n"):
            with socket.create_connection(("127.0.0.1", server.ports["submission"]), timeout=30) as s:
                token = base64.b64encode(f"\0{ALICE}\0{ALICE_PW}".encode())
                smuggled = (
                    b"Subject: outer\r\n\r\nbody" + vector
                    + f"MAIL FROM:<{ALICE}>\r\nRCPT TO:<{BOB}>\r\nDATA\r\nSubject: smuggled\r\n\r\nevil\r\n".encode()
                )
                s.sendall(
                    b"EHLO x\r\nAUTH PLAIN " + token + b"\r\n"
                    + f"MAIL FROM:<{ALICE}>\r\nRCPT TO:<{BOB}>\r\nDATA\r\n".encode()
                    + smuggled + b"\r\n.\r\nQUIT\r\n"
                )
                data = b""
                while not data.endswith(b"\r\n") or b"221" not in data:
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    data += chunk
        fetched = self.fetchAll(server, BOB, BOB_PW)
        # The bare-CR vector is refused outright; the others are stored once each.
        self.assertEqual(len(fetched), 3, fetched)
        for m in fetched:
            self.assertIn(b"Subject: outer", m)
            self.assertEqual(m.count(b"Subject: smuggled"), 1)


# The sink offers no STARTTLS; certificate verification of the smarthost
# (on by default, and then TLS is required, except on loopback) is turned
# off explicitly.
PLAINTEXT_SMARTHOST = "[relay]\nverify-tls = no\n"


def credentialsConfig(testcase) -> str:
    """
    An INI fragment giving relay credentials, their password in a 0600
    file removed after the test.
    """
    fd, path = tempfile.mkstemp(prefix="pop3gw-e2e-relay-")
    testcase.addCleanup(os.unlink, path)
    with os.fdopen(fd, "w") as f:
        f.write("relay secret\n")
    return f"[relay]\nusername = gw@example.org\npassword-file = {path}\n"


class RelayTests(SubmissionTestMixin, SynchronousTestCase):
    def test_loopbackSmarthostWithoutTLSGetsMail(self) -> None:
        """
        A smarthost on 127.0.0.1 (a local Postfix, a content filter) that
        offers no STARTTLS gets the mail in plaintext with the default
        settings (certificate verification on): loopback has no network to
        protect.
        """
        sink = Sink(self)
        server = self.startServer("--relay-host", f"127.0.0.1:{sink.port}")
        client = self.smtp(server)
        client.login(ALICE, ALICE_PW)
        msg = message(to="carol@remote.example")
        client.sendmail(ALICE, ["carol@remote.example"], msg)
        client.quit()
        sink.waitFor(lambda: sink.received)
        sender, rcpts, content = sink.received[0]
        self.assertEqual((sender, rcpts), (ALICE, ["carol@remote.example"]))
        self.assertEqual(stripTrace(content), msg)
        line = server.waitForLog(re.escape(f"host=127.0.0.1:{sink.port} delivered=1 "))
        self.assertIn(" tls=no verified=no error=-", line)

    def test_credentialsWithoutTLSKeepMail(self) -> None:
        """
        With relay credentials, even a smarthost on loopback that offers no
        STARTTLS gets nothing: the message stays queued with a TLS error.
        """
        sink = Sink(self)
        server = self.startServer("--relay-host", f"127.0.0.1:{sink.port}", extraConfig=credentialsConfig(self))
        client = self.smtp(server)
        client.login(ALICE, ALICE_PW)
        client.sendmail(ALICE, ["carol@remote.example"], message(to="carol@remote.example"))
        client.quit()
        deadline = time.monotonic() + 15
        while b"TLS" not in server.cli("queue", "list").stdout:
            self.assertLess(time.monotonic(), deadline, server.cli("queue", "list").stdout)
            time.sleep(0.2)
        self.assertEqual(sink.received, [])

    def test_oneIdAndPlainWordsInLog(self) -> None:
        """
        The id a client is given in C{250 ... queued as} is the id C{pop3gw
        queue list} and the relay's log lines use; the submission's log line
        names it with the message's routing; a smarthost that offers no
        STARTTLS while relay credentials are set is logged at warn level in plain
        words (no made-up 502), counted deferred, and C{queue list} gives the
        same words; no relay attempt adds "Starting factory" lines.
        """
        sink = Sink(self)
        server = self.startServer("--relay-host", f"127.0.0.1:{sink.port}", extraConfig=credentialsConfig(self))
        client = self.smtp(server)
        client.login(ALICE, ALICE_PW)
        msg = message(to="carol@remote.example")
        client.mail(ALICE)
        client.rcpt("carol@remote.example")
        client.rcpt(BOB)
        code, reply = client.data(msg)
        client.quit()
        self.assertEqual(code, 250)
        messageId = re.fullmatch(rb"2\.0\.0 OK queued as (\S+)", reply).group(1).decode()
        why = "smarthost offers no STARTTLS and relay credentials are sent only over TLS"
        line = server.waitForLog(re.escape(f"relay: {messageId} domain=remote.example host=127.0.0.1:{sink.port} "))
        self.assertIn("[pop3gw.queue.RelayService#warn] ", line)
        self.assertIn(" delivered=0 deferred=1 failed=0 ", line)
        self.assertTrue(line.rstrip().endswith(f'error="{why}"'), line)
        accepted = server.waitForLog(re.escape(f"submission: accepted id={messageId} "))
        self.assertIn(f' from="{ALICE}" local=1 remote=1 ', accepted)
        self.assertTrue(accepted.rstrip().endswith(f" queue={messageId}"), accepted)
        listing = server.cli("queue", "list").stdout.decode()
        self.assertTrue(listing.startswith(messageId + " "), listing)
        self.assertIn(f"error=carol@remote.example: 127.0.0.1: {why}", listing)
        # The code Twisted makes up for a missing STARTTLS, as a number of
        # its own: "502" inside a port, a queue id or a fingerprint is not it.
        self.assertEqual(re.findall(r"(?<![0-9A-Za-z])502(?![0-9A-Za-z])", server.log()), [])
        self.assertNotIn("Starting factory", server.log())
        self.assertEqual(sink.received, [])

    def test_relayedToSmarthost(self) -> None:
        """
        Mail for a non-local domain is queued and relayed to the smarthost
        with its envelope and content intact.
        """
        sink = Sink(self)
        server = self.startServer("--relay-host", f"127.0.0.1:{sink.port}", extraConfig=PLAINTEXT_SMARTHOST)
        client = self.smtp(server)
        client.login(ALICE, ALICE_PW)
        msg = message(to="carol@remote.example")
        client.sendmail(ALICE, ["carol@remote.example"], msg)
        client.quit()
        sink.waitFor(lambda: sink.received)
        sender, rcpts, content = sink.received[0]
        self.assertEqual((sender, rcpts), (ALICE, ["carol@remote.example"]))
        self.assertEqual(stripTrace(content), msg)
        deadline = time.monotonic() + 10
        while server.cli("queue", "list").stdout and time.monotonic() < deadline:
            time.sleep(0.1)
        self.assertEqual(server.cli("queue", "list").stdout, b"")

    def test_missingFromAdded(self) -> None:
        """
        A message submitted without From: is relayed with one holding the
        authenticated address, and nothing else changed.
        """
        sink = Sink(self)
        server = self.startServer("--relay-host", f"127.0.0.1:{sink.port}", extraConfig=PLAINTEXT_SMARTHOST)
        client = self.smtp(server)
        client.login(ALICE, ALICE_PW)
        msg = message(to="carol@remote.example")
        headless = msg.replace(f"From: {ALICE}\r\n".encode(), b"")
        client.sendmail(ALICE, ["carol@remote.example"], headless)
        client.quit()
        sink.waitFor(lambda: sink.received)
        [(sender, rcpts, content)] = sink.received
        self.assertEqual(stripTrace(content), f"From: {ALICE}\r\n".encode() + headless)

    def test_noHeaderSectionRelayed(self) -> None:
        """
        Data without a header section is relayed with the added fields
        (Message-ID, Date, From) followed by a blank line, so that the
        text arrives as the body.
        """
        sink = Sink(self)
        server = self.startServer("--relay-host", f"127.0.0.1:{sink.port}", extraConfig=PLAINTEXT_SMARTHOST)
        client = self.smtp(server)
        client.login(ALICE, ALICE_PW)
        client.sendmail(ALICE, ["carol@remote.example"], b"just text without headers\r\n")
        client.quit()
        sink.waitFor(lambda: sink.received)
        [(sender, rcpts, content)] = sink.received
        self.assertRegex(
            stripTrace(content),
            rb"^Message-ID: <[0-9a-f]{32}@[^>\r\n]+>\r\nDate: [^\r\n]+\r\n"
            + re.escape(f"From: {ALICE}\r\n\r\njust text without headers\r\n".encode())
            + rb"$",
        )

    def test_temporaryFailureRetried(self) -> None:
        """
        A 4xx from the smarthost keeps the message queued with its last error
        (C{queue list}); C{queue flush} retries it and it is delivered once.
        """
        sink = Sink(self, replies=("451 4.3.0 try again later", "250 OK"))
        server = self.startServer("--relay-host", f"127.0.0.1:{sink.port}", extraConfig=PLAINTEXT_SMARTHOST)
        client = self.smtp(server)
        client.login(ALICE, ALICE_PW)
        client.sendmail(ALICE, ["carol@remote.example"], message(to="carol@remote.example"))
        client.quit()
        sink.waitFor(lambda: sink.attempts >= 1)
        deadline = time.monotonic() + 10
        while b"try again later" not in server.cli("queue", "list").stdout:
            self.assertLess(time.monotonic(), deadline, server.cli("queue", "list").stdout)
            time.sleep(0.1)
        listing = server.cli("queue", "list").stdout.decode()
        self.assertIn("carol@remote.example", listing)
        self.assertIn(ALICE, listing)
        server.cli("queue", "flush")
        sink.waitFor(lambda: sink.received)
        self.assertEqual(len(sink.received), 1)
        self.assertEqual(self.fetchAll(server, ALICE, ALICE_PW), [])

    def test_permanentFailureBounces(self) -> None:
        """
        A 5xx from the smarthost produces one delivery status notification
        (multipart/report) in the sender's maildrop, and the queue empties.
        """
        sink = Sink(self, replies=("550 5.1.1 no such user here",))
        server = self.startServer("--relay-host", f"127.0.0.1:{sink.port}", extraConfig=PLAINTEXT_SMARTHOST)
        client = self.smtp(server)
        client.login(ALICE, ALICE_PW)
        client.sendmail(ALICE, ["carol@remote.example"], message(to="carol@remote.example"))
        client.quit()
        deadline = time.monotonic() + 30
        bounces: list = []
        while not bounces and time.monotonic() < deadline:
            time.sleep(0.2)
            bounces = self.fetchAll(server, ALICE, ALICE_PW)
        self.assertEqual(len(bounces), 1)
        report = email.message_from_bytes(bounces[0])
        self.assertEqual(report.get_content_type(), "multipart/report")
        self.assertIn("carol@remote.example", bounces[0].decode())
        self.assertEqual(server.cli("queue", "list").stdout, b"")


class SMTPUTF8RelayTests(SubmissionTestMixin, SynchronousTestCase):
    """
    A message submitted with SMTPUTF8 to a UTF-8 recipient, relayed to a
    smarthost that offers SMTPUTF8 or does not.
    """

    RECIPIENT = "j\u00f6rg@remote.example"

    def submit(self, sink) -> tuple:
        server = self.startServer("--relay-host", f"127.0.0.1:{sink.port}", extraConfig=PLAINTEXT_SMARTHOST)
        client = self.smtp(server)
        client.login(ALICE, ALICE_PW)
        msg = message(to=self.RECIPIENT, subject="gr\u00fc\u00dfe")
        self.assertEqual(client.sendmail(ALICE, [self.RECIPIENT], msg, mail_options=["SMTPUTF8"]), {})
        client.quit()
        return server, msg

    def test_relayedWithSMTPUTF8(self) -> None:
        """
        To a smarthost offering SMTPUTF8, MAIL carries the parameter and
        the UTF-8 recipient and message arrive unchanged.
        """
        sink = Sink(self, smtputf8=True)
        server, msg = self.submit(sink)
        sink.waitFor(lambda: sink.received)
        [(sender, rcpts, content)] = sink.received
        self.assertEqual((sender, rcpts), (ALICE, [self.RECIPIENT]))
        self.assertEqual(stripTrace(content), msg)
        self.assertIn("SMTPUTF8", sink.mailOptions[0])

    def test_bouncedWithoutSMTPUTF8(self) -> None:
        """
        To a smarthost that does not offer SMTPUTF8, nothing is sent; the
        sender gets one bounce with status 5.6.7 and the queue empties.
        """
        sink = Sink(self, smtputf8=False)
        server, msg = self.submit(sink)
        deadline = time.monotonic() + 30
        bounces: list = []
        while not bounces and time.monotonic() < deadline:
            time.sleep(0.2)
            bounces = self.fetchAll(server, ALICE, ALICE_PW)
        self.assertEqual(len(bounces), 1)
        report = email.message_from_bytes(bounces[0])
        self.assertEqual(report.get_content_type(), "multipart/report")
        self.assertIn(b"Status: 5.6.7", bounces[0])
        self.assertEqual(server.cli("queue", "list").stdout, b"")
        self.assertEqual(sink.received, [])


class RealClientTests(SubmissionTestMixin, SynchronousTestCase):
    def test_swaks(self) -> None:
        """
        swaks submits with AUTH PLAIN; the colleague fetches the message.
        """
        swaks = requireProgram(self, "swaks")
        server = self.startServer()
        result = subprocess.run(
            [swaks, "--server", "127.0.0.1", "--port", str(server.ports["submission"]), "--from", ALICE, "--to", BOB,
             "--auth", "PLAIN", "--auth-user", ALICE, "--auth-password", ALICE_PW, "--header", "Subject: via swaks",
             "--body", "sent by swaks", "--h-From", ALICE],
            capture_output=True, timeout=60, stdin=subprocess.DEVNULL)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        fetched = self.fetchAll(server, BOB, BOB_PW)
        self.assertEqual(len(fetched), 1)
        self.assertIn(b"sent by swaks", fetched[0])

    def test_msmtp(self) -> None:
        """
        msmtp submits with AUTH; the colleague fetches the message byte for
        byte apart from the trace header.
        """
        msmtp = requireProgram(self, "msmtp")
        server = self.startServer()
        work = tempfile.mkdtemp(prefix="pop3gw-msmtp-")
        self.addCleanup(__import__("shutil").rmtree, work, True)
        msg = message(subject="via msmtp")
        result = subprocess.run(
            [msmtp, "--host=127.0.0.1", f"--port={server.ports['submission']}", "--auth=plain", f"--user={ALICE}",
             f"--passwordeval=echo '{ALICE_PW}'", "--tls=off", f"--from={ALICE}", BOB],
            input=msg, capture_output=True, timeout=60, env=dict(os.environ, HOME=work))
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        fetched = self.fetchAll(server, BOB, BOB_PW)
        self.assertEqual([stripTrace(f) for f in fetched], [msg])

    def test_curlSmtp(self) -> None:
        """
        C{curl smtp://} submits with AUTH; the colleague fetches the message.
        """
        curl = requireProgram(self, "curl")
        server = self.startServer()
        work = tempfile.mkdtemp(prefix="pop3gw-curl-")
        self.addCleanup(__import__("shutil").rmtree, work, True)
        path = os.path.join(work, "msg")
        msg = message(subject="via curl")
        with open(path, "wb") as f:
            f.write(msg)
        result = subprocess.run(
            [curl, "-sS", "--max-time", "30", f"smtp://127.0.0.1:{server.ports['submission']}", "-u",
             f"{ALICE}:{ALICE_PW}", "--mail-from", ALICE, "--mail-rcpt", BOB, "--upload-file", path],
            capture_output=True, timeout=60)
        self.assertEqual(result.returncode, 0, result.stderr)
        fetched = self.fetchAll(server, BOB, BOB_PW)
        self.assertEqual([stripTrace(f) for f in fetched], [msg])
