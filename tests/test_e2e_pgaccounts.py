"""
End-to-end: the state that must look the same from every node (app
passwords, sending limits, DKIM keys) with two real C{twistd -n pop3gw
--store postgresql://...} nodes on one database (a private cluster,
L{tests.pgcluster}).
"""

from __future__ import annotations

import poplib
import re
import smtplib
import subprocess
import time

from twisted.trial.unittest import SynchronousTestCase

from tests import pgcluster
from tests.e2e import Pop3gwProcess, pop3gwCommand
from tests.test_e2e_pgstore import _closeQuietly

ALICE, ALICE_PW = "alice@example.org", "alice secret"
BOB, BOB_PW = "bob@example.org", "bob secret"
POSTMASTER, POSTMASTER_PW = "admin@example.org", "admin secret"

#: Seconds to wait for what a node writes a moment later (the sending
#: records are written within L{pop3gw.sendlimits.RECORD_DELAY}).
SETTLE_WITHIN = 30.0


def _message(subject: str, to: str = BOB) -> bytes:
    return (
        f"From: {ALICE}\r\nTo: {to}\r\nSubject: {subject}\r\nMessage-ID: <{subject}@example.org>\r\n"
        f"Date: Tue, 01 Dec 2026 12:00:00 +0000\r\n\r\nbody\r\n"
    ).encode()


class TwoNodesMixin:
    """
    A database with alice, bob and the postmaster, and two nodes on it.
    """

    def setUp(self) -> None:
        self.uri = pgcluster.database(self)
        self.cli("init")
        for user, password in ((ALICE, ALICE_PW), (BOB, BOB_PW), (POSTMASTER, POSTMASTER_PW)):
            self.cli("user", "add", user, input=password.encode() + b"\n")
        self.startNodes()

    def startNodes(self, *args: str, extraConfig: str = "") -> None:
        config = f"messages-per-hour = 3\n[pop3gw]\npostmaster = {POSTMASTER}\n{extraConfig}"
        self.nodeA, self.nodeB = (
            Pop3gwProcess(self, args=["--store", self.uri, "--domain", "example.org", *args],
                          extraConfig=config).start()
            for _ in range(2)
        )

    def cli(self, *args: str, input: bytes = b"", status: int = 0) -> subprocess.CompletedProcess:
        result = subprocess.run(pop3gwCommand() + ["--store", self.uri, *args], input=input,
                                capture_output=True, timeout=60)
        self.assertEqual(result.returncode, status, result.stderr)
        return result

    def pop(self, node: Pop3gwProcess, user: str, password: str) -> poplib.POP3:
        client = poplib.POP3("127.0.0.1", node.ports["pop3"], timeout=30)
        self.addCleanup(_closeQuietly, client)
        client.user(user)
        client.pass_(password)
        return client

    def refusedLogin(self, node: Pop3gwProcess, user: str, password: str) -> bytes:
        with self.assertRaises(poplib.error_proto) as refused:
            self.pop(node, user, password)
        return refused.exception.args[0]

    def submission(self, node: Pop3gwProcess) -> smtplib.SMTP:
        client = smtplib.SMTP("127.0.0.1", node.ports["submission"], timeout=30)
        self.addCleanup(_closeQuietly, client)
        client.login(ALICE, ALICE_PW)
        return client



class TwoNodesAccountsTests(TwoNodesMixin, SynchronousTestCase):
    def test_appPasswordAcrossNodes(self) -> None:
        """
        An app password added with the command logs in on both nodes; its
        use is listed; removed with the command, it is refused on both at
        the next login (both had verified and cached it), and the main
        password still works.
        """
        added = self.cli("user", "app-password", "add", ALICE, "--name", "phone", "--scope", "pop3")
        password = added.stdout.decode().splitlines()[-1]
        for node in (self.nodeB, self.nodeA):
            self.pop(node, ALICE, password).quit()
        listed = self.cli("user", "app-password", "list", ALICE).stdout.decode()
        self.assertRegex(listed, r"^phone scope=pop3 created .*, last used .* from 127\.0\.0\.1\n$")
        self.cli("user", "app-password", "remove", ALICE, "phone")
        for node in (self.nodeA, self.nodeB):
            self.assertTrue(self.refusedLogin(node, ALICE, password).startswith(b"-ERR [AUTH]"))
            self.pop(node, ALICE, ALICE_PW).quit()

    def test_mainScopeAcrossNodes(self) -> None:
        """
        A main password restricted to C{none} with the command is refused
        on both nodes within a few seconds; an app password still works.
        """
        self.pop(self.nodeB, ALICE, ALICE_PW).quit()
        added = self.cli("user", "app-password", "add", ALICE, "--name", "laptop", "--scope", "all")
        password = added.stdout.decode().splitlines()[-1]
        self.cli("user", "scope", ALICE, "none")
        deadline = time.monotonic() + SETTLE_WITHIN
        for node in (self.nodeA, self.nodeB):
            while True:
                try:
                    self.pop(node, ALICE, ALICE_PW).quit()
                except poplib.error_proto as e:
                    self.assertTrue(e.args[0].startswith(b"-ERR [AUTH]"), e.args)
                    break
                self.assertLess(time.monotonic(), deadline, "main scope never applied")
                time.sleep(0.5)
            self.pop(node, ALICE, password).quit()

    def waitForSent(self, count: int) -> None:
        """
        Wait until the records hold C{count} messages of alice.
        """
        deadline = time.monotonic() + SETTLE_WITHIN
        while f"sent {count} messages in the last hour".encode() not in self.cli("user", "limits", ALICE).stdout:
            self.assertLess(time.monotonic(), deadline, f"{count} messages never recorded")
            time.sleep(0.3)

    def test_limitsAcrossNodes(self) -> None:
        """
        With messages-per-hour 3, two messages through node A and one
        through node B use alice's allowance: the fourth, through A, is
        refused and suspends alice once (one notice); node B then refuses
        her too; C{user unsuspend} lets her send on both again.
        """
        client = self.submission(self.nodeA)
        for i in range(2):
            client.sendmail(ALICE, [BOB], _message(f"a{i}"))
        self.waitForSent(2)
        other = self.submission(self.nodeB)
        other.sendmail(ALICE, [BOB], _message("b0"))
        self.waitForSent(3)
        client.mail(ALICE)
        self.assertEqual(client.rcpt(BOB), (451, b"4.7.1 Sending limit reached; ask your administrator"))
        client.rset()
        other.mail(ALICE)
        self.assertEqual(other.rcpt(BOB), (451, b"4.7.1 Sending limit reached; ask your administrator"))
        other.rset()
        self.nodeA.waitForLog(r"sending suspended: user=alice@example\.org rhost=127\.0\.0\.1 "
                              r"reason=messages-per-hour: 3 sent in the last hour, limit 3")
        self.assertIsNone(re.search(r"sending suspended", self.nodeB.log()), self.nodeB.log())
        self.assertIn(b"alice@example.org (sending suspended)\n", self.cli("user", "list").stdout)
        notices = self.pop(self.nodeB, POSTMASTER, POSTMASTER_PW)
        self.assertEqual(notices.stat()[0], 1)
        self.assertIn(b"Subject: sending suspended for alice@example.org", notices.retr(1)[1])
        notices.quit()

        self.cli("user", "unsuspend", ALICE)
        other.sendmail(ALICE, [BOB], _message("b1"))
        client.sendmail(ALICE, [BOB], _message("a2"))
        client.quit()
        other.quit()
        self.assertEqual(self.pop(self.nodeA, BOB, BOB_PW).stat()[0], 5)




class TwoNodesDKIMTests(TwoNodesMixin, SynchronousTestCase):
    """
    Two nodes relaying to one sink: one key generated once signs on both.
    """

    def startNodes(self, *args: str, extraConfig: str = "") -> None:
        from tests.test_e2e_submission import PLAINTEXT_SMARTHOST, Sink

        self.sink = Sink(self)
        super().startNodes("--relay-host", f"127.0.0.1:{self.sink.port}", extraConfig=PLAINTEXT_SMARTHOST)

    def dnsfunc(self, name: bytes, timeout: float = 5) -> bytes:
        return "".join(self.records.get(name.decode().rstrip("."), [])).encode()

    def waitForLoad(self, pattern: str, before: list) -> None:
        """
        Wait until each node has logged C{pattern} more often than
        C{before} says.
        """
        deadline = time.monotonic() + SETTLE_WITHIN
        for node, count in zip((self.nodeA, self.nodeB), before):
            while len(re.findall(pattern, node.log())) <= count:
                self.assertLess(time.monotonic(), deadline, node.log())
                time.sleep(0.2)

    def relay(self, node: Pop3gwProcess, subject: str) -> bytes:
        """
        Submit a message to a remote address through C{node}; what the
        sink receives.
        """
        count = len(self.sink.received) + 1
        client = self.submission(node)
        client.sendmail(ALICE, ["carol@remote.example"], _message(subject, "carol@remote.example"))
        client.quit()
        self.sink.waitFor(lambda: len(self.sink.received) >= count)
        return self.sink.received[count - 1][2]

    def test_keyGeneratedOnceSignsEverywhere(self) -> None:
        """
        A key generated once with the command (no data directory involved)
        is loaded by both running nodes, and mail relayed through each is
        signed with it: dkimpy verifies both against the record the command
        printed.  After the key is removed, neither node signs.
        """
        import dkim

        from tests.test_e2e_dkim import publishedRecords

        nodes = (self.nodeA, self.nodeB)
        generated = self.cli("dkim", "generate", "example.org", "--selector", "s1", "--algorithm", "ed25519")
        self.records = publishedRecords(generated.stdout)
        self.waitForLoad(r"dkim: signing keys loaded for 1 domain", [0, 0])
        for node in nodes:
            content = self.relay(node, f"signed-{node.ports['submission']}")
            self.assertTrue(dkim.verify(content, dnsfunc=self.dnsfunc), content[:400])

        before = [len(re.findall(r"dkim: signing keys loaded for 0 domain", n.log())) for n in nodes]
        self.cli("dkim", "remove", "example.org", "s1")
        self.waitForLoad(r"dkim: signing keys loaded for 0 domain", before)
        self.assertNotIn(b"DKIM-Signature:", self.relay(self.nodeB, "unsigned"))
