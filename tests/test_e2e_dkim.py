"""
End-to-end: mail submitted to the real C{twistd pop3gw} and relayed to a
sink SMTP server (aiosmtpd) leaves DKIM-signed with the keys made by
C{pop3gw dkim}; dkimpy and OpenDKIM's C{opendkim-testmsg} verify what the
sink received.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import smtplib
import subprocess
import sys
import tempfile
import time

import dkim
from twisted.trial.unittest import SynchronousTestCase

from tests.e2e import missing, requireProgram
from tests.test_e2e_submission import (
    ALICE,
    ALICE_PW,
    PLAINTEXT_SMARTHOST,
    Sink,
    SubmissionTestMixin,
    message,
)

_RECORD = re.compile(r'^(\S+)\. IN TXT ((?:"[^"]*" ?)+)$', re.M)
NETNS_DNS = os.path.join(os.path.dirname(__file__), "netnsdns.py")


def publishedRecords(output: bytes) -> dict:
    """
    The TXT records printed by C{pop3gw dkim generate}: name -> strings.
    """
    return {m.group(1): re.findall(r'"([^"]*)"', m.group(2)) for m in _RECORD.finditer(output.decode())}


class DKIMRelayTests(SubmissionTestMixin, SynchronousTestCase):
    def setUp(self) -> None:
        self.records: dict = {}

    def dnsfunc(self, name: bytes, timeout: float = 5) -> bytes:
        return "".join(self.records.get(name.decode().rstrip("."), [])).encode()

    def generate(self, server, *args: str) -> None:
        loads = len(re.findall("dkim: signing keys loaded", server.log()))
        self.records.update(publishedRecords(server.cli("dkim", "generate", *args).stdout))
        self.waitForLoads(server, loads + 1)

    def waitForLoads(self, server, count: int) -> None:
        """
        Wait until the server has loaded its keys C{count} times (each
        change of the key index is one load).
        """
        deadline = time.monotonic() + 30
        while len(re.findall("dkim: signing keys loaded", server.log())) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"keys not loaded {count} times:\n{server.log()}")
            time.sleep(0.1)

    def send(self, server, sink, count: int) -> bytes:
        client = self.smtp(server)
        client.login(ALICE, ALICE_PW)
        client.sendmail(ALICE, ["carol@remote.example"], message(to="carol@remote.example", subject=f"m{count}"))
        client.quit()
        sink.waitFor(lambda: len(sink.received) >= count)
        return sink.received[count - 1][2]

    def test_signedAndRotated(self) -> None:
        """
        A key generated while the server runs signs the next relayed
        message (no restart); dkimpy verifies it against the record the
        command printed.  After a second selector is generated and
        activated, mail is signed with it, and the first one's record
        still verifies the earlier message.
        """
        sink = Sink(self)
        server = self.startServer("--relay-host", f"127.0.0.1:{sink.port}", extraConfig=PLAINTEXT_SMARTHOST)
        self.generate(server, "example.org", "--selector", "first")
        first = self.send(server, sink, 1)
        self.assertTrue(first.startswith(b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=example.org;"), first[:200])
        self.assertIn(b"s=first;", first.split(b"\r\nReceived:")[0].replace(b"\r\n ", b" "))
        self.assertTrue(dkim.verify(first, dnsfunc=self.dnsfunc))
        self.assertFalse(dkim.verify(first.replace(b"hello", b"jello"), dnsfunc=self.dnsfunc))
        self.generate(server, "example.org", "--selector", "second")
        loads = len(re.findall("dkim: signing keys loaded", server.log()))
        server.cli("dkim", "activate", "example.org", "second")
        self.waitForLoads(server, loads + 1)
        second = self.send(server, sink, 2)
        self.assertIn(b"s=second;", second.split(b"\r\nReceived:")[0].replace(b"\r\n ", b" "))
        self.assertTrue(dkim.verify(second, dnsfunc=self.dnsfunc))
        self.assertTrue(dkim.verify(first, dnsfunc=self.dnsfunc))
        server.waitForLog(r"dkim: signed id=\S+ d=example.org s=second")

    def test_unusableKeyRefused(self) -> None:
        """
        When the active key's file is damaged, the next message gets
        C{451 4.3.0} (the client keeps it), nothing reaches the sink, and the
        log names the file; the client is told nothing more.
        """
        sink = Sink(self)
        server = self.startServer("--relay-host", f"127.0.0.1:{sink.port}", extraConfig=PLAINTEXT_SMARTHOST)
        self.generate(server, "example.org", "--selector", "s1", "--algorithm", "ed25519")
        path = os.path.join(server.dataDir, "dkim", "example.org", "s1.pem")
        with open(path, "w") as f:
            f.write("damaged\n")
        # Any key command rewrites the index, which makes the server reload.
        self.generate(server, "example.net", "--algorithm", "ed25519")
        client = self.smtp(server)
        client.login(ALICE, ALICE_PW)
        with self.assertRaises(smtplib.SMTPDataError) as e:
            client.sendmail(ALICE, ["carol@remote.example"], message(to="carol@remote.example"))
        self.assertEqual((e.exception.smtp_code, e.exception.smtp_error), (451, b"4.3.0 Temporary failure, try again later"))
        client.quit()
        server.waitForLog(re.escape(f"the key for example.org is unusable: {path} is not a readable ed25519 private key"))
        self.assertEqual(sink.received, [])

    def test_openDKIMVerifies(self) -> None:
        """
        OpenDKIM's C{opendkim-testmsg}, an independent verifier, accepts the
        RSA and the Ed25519 signature of a relayed message (its resolver
        asks a DNS server on loopback in a private network namespace, which
        serves the records the command printed), and refuses the message
        once its body is changed.
        """
        testmsg = requireProgram(self, "opendkim-testmsg")
        unshare = requireProgram(self, "unshare")
        # A user namespace (mapped to root inside) lets anyone make the
        # network and mount namespaces.
        namespaces = [unshare, "--user", "--map-root-user", "--net", "--mount"]
        probe = subprocess.run([*namespaces, "true"], capture_output=True)
        if probe.returncode != 0:
            missing(self, "unshare cannot make user, network and mount namespaces here: " + probe.stderr.decode().strip())
        sink = Sink(self)
        server = self.startServer("--relay-host", f"127.0.0.1:{sink.port}", extraConfig=PLAINTEXT_SMARTHOST)
        self.generate(server, "example.org", "--selector", "r1")
        self.generate(server, "example.org", "--selector", "e1", "--algorithm", "ed25519")
        received = self.send(server, sink, 1)
        self.assertEqual(len(re.findall(rb"^DKIM-Signature:", received, re.M)), 2)
        scratch = tempfile.mkdtemp(prefix="pop3gw-opendkim-")
        self.addCleanup(shutil.rmtree, scratch, True)
        recordsPath = os.path.join(scratch, "records.json")
        with open(recordsPath, "w") as f:
            json.dump(self.records, f)

        def verify(data: bytes, records: str = recordsPath) -> subprocess.CompletedProcess:
            return subprocess.run(
                [*namespaces, sys.executable, NETNS_DNS, records, "--", testmsg],
                input=data, capture_output=True, timeout=60,
            )

        signatures = re.findall(rb"DKIM-Signature:.*?\r\n(?=[^ \t])", received, re.S)
        self.assertEqual(len(signatures), 2)
        body = received.split(signatures[-1], 1)[1]
        for signature, algorithm in zip(signatures, (b"rsa-sha256", b"ed25519-sha256")):
            self.assertIn(b"a=" + algorithm, signature)
            result = verify(signature + body)
            self.assertEqual((result.returncode, result.stderr), (0, b""), algorithm)
        bad = verify(signatures[0] + body.replace(b"hello", b"jello"))
        self.assertEqual((bad.returncode, bad.stderr), (70, b"opendkim-testmsg: dkim_eom(): Bad signature\n"))
        empty = os.path.join(scratch, "empty.json")
        with open(empty, "w") as f:
            f.write("{}")
        unpublished = verify(signatures[0] + body, empty)
        self.assertEqual(unpublished.returncode, 70)
