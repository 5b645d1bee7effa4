"""
End-to-end: two real C{twistd -n pop3gw --store postgresql://...} nodes on
one database (a private cluster, L{tests.pgcluster}), each with its own
data directory: mail submitted on one node is fetched from the other, and
a maildrop is locked across nodes.
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

ALICE, ALICE_PW = "alice@example.org", "alice secret"
BOB, BOB_PW = "bob@example.org", "bob secret"
MESSAGE = (
    b"From: alice@example.org\r\nTo: bob@example.org\r\nSubject: across nodes\r\n"
    b"Message-ID: <nodes@example.org>\r\nDate: Tue, 01 Dec 2026 12:00:00 +0000\r\n\r\n"
    b"first line\r\n.a line starting with a dot\r\n" + b"x" * 998 + b"\r\nlast line\r\n"
)

#: Seconds within which a dead node's maildrop locks must be free (the
#: issue's bound; L{pop3gw.pgmail.LOCK_LEASE} is 25).
LOCK_FREED_WITHIN = 30.0


class TwoNodesTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.uri = pgcluster.database(self)
        self.cli("init")
        self.cli("user", "add", ALICE, input=ALICE_PW.encode() + b"\n")
        self.cli("user", "add", BOB, input=BOB_PW.encode() + b"\n")
        self.nodeA = Pop3gwProcess(self, args=["--store", self.uri]).start()
        self.nodeB = Pop3gwProcess(self, args=["--store", self.uri]).start()

    def cli(self, *args: str, input: bytes = b"") -> subprocess.CompletedProcess:
        result = subprocess.run(pop3gwCommand() + ["--store", self.uri, *args], input=input,
                                capture_output=True, timeout=60)
        self.assertEqual(result.returncode, 0, result.stderr)
        return result

    def pop(self, node: Pop3gwProcess, user: str, password: str) -> poplib.POP3:
        client = poplib.POP3("127.0.0.1", node.ports["pop3"], timeout=30)
        self.addCleanup(_closeQuietly, client)
        client.user(user)
        client.pass_(password)
        return client

    def test_submittedOnOneFetchedOnOther(self) -> None:
        """
        A message submitted on node A is listed on node B with its exact
        size and retrieved byte for byte (after the C{Received:} line node
        A adds); a second login on node A meanwhile gets C{[IN-USE]}; after
        DELE and QUIT on B it is gone everywhere, and a new message gets a
        new UIDL.  A password changed afterwards is refused in its old form
        on both nodes, which had both verified (and cached) it.
        """
        with smtplib.SMTP("127.0.0.1", self.nodeA.ports["submission"], timeout=30) as smtp:
            smtp.login(ALICE, ALICE_PW)
            smtp.sendmail(ALICE, [BOB], MESSAGE)
        client = self.pop(self.nodeB, BOB, BOB_PW)
        count, size = client.stat()
        response, lines, octets = client.retr(1)
        served = b"\r\n".join(lines) + b"\r\n"
        self.assertEqual(count, 1)
        self.assertEqual(size, len(served))
        self.assertTrue(served.startswith(b"Received: "), served[:80])
        self.assertTrue(served.endswith(b"\r\n\r\n" + MESSAGE.split(b"\r\n\r\n", 1)[1]))
        self.assertIn(b"\r\nSubject: across nodes\r\n", served)
        uid = client.uidl(1).split()[2]

        with self.assertRaises(poplib.error_proto) as caught:
            self.pop(self.nodeA, BOB, BOB_PW)
        self.assertTrue(caught.exception.args[0].startswith(b"-ERR [IN-USE]"), caught.exception.args)

        client.dele(1)
        client.quit()
        self.cli("deliver", BOB, input=b"Subject: second\r\n\r\nagain\r\n")
        again = self.pop(self.nodeA, BOB, BOB_PW)
        self.assertEqual(again.stat()[0], 1)
        self.assertNotEqual(again.uidl(1).split()[2], uid)
        self.assertEqual(again.retr(1)[1], [b"Subject: second", b"", b"again"])
        again.quit()

        # Both nodes have verified bob's password (and may cache it): a new
        # password set through either is the only one either accepts.
        self.cli("user", "passwd", BOB, input=b"new secret\n")
        for node in (self.nodeA, self.nodeB):
            with self.assertRaises(poplib.error_proto) as refused:
                self.pop(node, BOB, BOB_PW)
            self.assertTrue(refused.exception.args[0].startswith(b"-ERR [AUTH]"), refused.exception.args)
            self.pop(node, BOB, "new secret").quit()

    def test_killedNodeFreesLock(self) -> None:
        """
        A node killed with SIGKILL in the middle of a session leaves the
        maildrop locked on the other node only until its lease runs out
        (at most L{pop3gw.pgmail.LOCK_LEASE} seconds); nothing it marked
        deleted is deleted.
        """
        self.cli("deliver", ALICE, input=b"Subject: kept\r\n\r\nbody\r\n")
        client = self.pop(self.nodeB, ALICE, ALICE_PW)
        client.dele(1)
        self.nodeB.proc.kill()
        self.nodeB.proc.wait(30)
        killed = time.monotonic()
        with self.assertRaises(poplib.error_proto):
            self.pop(self.nodeA, ALICE, ALICE_PW)
        while True:
            try:
                survivor = self.pop(self.nodeA, ALICE, ALICE_PW)
                break
            except poplib.error_proto as e:
                self.assertTrue(e.args[0].startswith(b"-ERR [IN-USE]"), e.args)
                self.assertLess(time.monotonic() - killed, LOCK_FREED_WITHIN, "lock never freed")
                time.sleep(1)
        self.assertEqual(survivor.retr(1)[1], [b"Subject: kept", b"", b"body"])
        survivor.quit()

    def test_stoppedNodeFreesLockAtOnce(self) -> None:
        """
        A node stopped cleanly (SIGTERM) while a session holds a maildrop
        frees it at once: the other node's next login succeeds.
        """
        self.cli("deliver", ALICE, input=b"Subject: one\r\n\r\nbody\r\n")
        self.pop(self.nodeB, ALICE, ALICE_PW)
        self.nodeB.stop()
        self.assertIsNone(re.search(r"Traceback|cannot release", self.nodeB.log()), self.nodeB.log())
        self.assertEqual(self.pop(self.nodeA, ALICE, ALICE_PW).stat()[0], 1)


def _closeQuietly(client) -> None:
    try:
        client.close()
    except OSError:
        pass


class DatabaseOutageTests(SynchronousTestCase):
    """
    A node whose database goes away (its own private cluster, stopped and
    started again).
    """

    def test_temporaryFailuresThenResumes(self) -> None:
        """
        While the database is down, a POP3 login gets C{-ERR [SYS/TEMP]},
        submission's AUTH C{454}, C{deliver} exits 75, and the node does
        not crash; once the database is back, logins work again by
        themselves and the message delivered before is there.
        """
        cluster = pgcluster.private(self)
        self.uri = cluster.newDatabase()
        TwoNodesTests.cli(self, "init")  # type: ignore[arg-type]
        TwoNodesTests.cli(self, "user", "add", ALICE, input=ALICE_PW.encode() + b"\n")  # type: ignore[arg-type]
        TwoNodesTests.cli(self, "deliver", ALICE, input=b"Subject: before\r\n\r\nbody\r\n")  # type: ignore[arg-type]
        node = Pop3gwProcess(self, args=["--store", self.uri]).start()
        cluster.stopServer()

        client = poplib.POP3("127.0.0.1", node.ports["pop3"], timeout=60)
        self.addCleanup(_closeQuietly, client)
        client.user(ALICE)
        with self.assertRaises(poplib.error_proto) as caught:
            client.pass_(ALICE_PW)
        self.assertTrue(caught.exception.args[0].startswith(b"-ERR [SYS/TEMP]"), caught.exception.args)
        client.quit()
        with smtplib.SMTP("127.0.0.1", node.ports["submission"], timeout=60) as smtp:
            with self.assertRaises(smtplib.SMTPAuthenticationError) as refused:
                smtp.login(ALICE, ALICE_PW)
            self.assertEqual(refused.exception.smtp_code, 454)
        result = subprocess.run(pop3gwCommand() + ["--store", self.uri, "deliver", ALICE], input=b"x\r\n",
                                capture_output=True, timeout=60)
        self.assertEqual(result.returncode, 75, result.stderr)
        self.assertTrue(result.stderr.startswith(b"pop3gw: database unavailable: "), result.stderr)

        cluster.startServer()
        restarted = time.monotonic()
        while True:
            client = poplib.POP3("127.0.0.1", node.ports["pop3"], timeout=60)
            self.addCleanup(_closeQuietly, client)
            client.user(ALICE)
            try:
                client.pass_(ALICE_PW)
                break
            except poplib.error_proto as e:
                self.assertTrue(e.args[0].startswith(b"-ERR [SYS/TEMP]"), e.args)
                self.assertLess(time.monotonic() - restarted, 60, "never resumed")
                client.quit()
                time.sleep(1)
        self.assertEqual(client.retr(1)[1], [b"Subject: before", b"", b"body"])
        client.quit()
        self.assertIsNone(node.proc.poll())
        self.assertNotIn("Traceback", node.log())


    def test_startedWithDatabaseDown(self) -> None:
        """
        A node started while its database is down starts serving at once
        (the schema check is logged as a warning): a POP3 login gets
        C{-ERR [SYS/TEMP]}, submission's AUTH C{454}; once the database is
        started, with no restart of the node, the user logs in, finds the
        message delivered before, and mail submitted then is queued and
        delivered.
        """
        cluster = pgcluster.private(self)
        self.uri = cluster.newDatabase()
        TwoNodesTests.cli(self, "init")  # type: ignore[arg-type]
        TwoNodesTests.cli(self, "user", "add", ALICE, input=ALICE_PW.encode() + b"\n")  # type: ignore[arg-type]
        TwoNodesTests.cli(self, "deliver", ALICE, input=b"Subject: before\r\n\r\nbody\r\n")  # type: ignore[arg-type]
        cluster.stopServer()
        node = Pop3gwProcess(self, args=["--store", self.uri]).start()
        self.assertIn("cannot check the database schema: database unavailable: ", node.log())

        client = poplib.POP3("127.0.0.1", node.ports["pop3"], timeout=60)
        self.addCleanup(_closeQuietly, client)
        client.user(ALICE)
        with self.assertRaises(poplib.error_proto) as caught:
            client.pass_(ALICE_PW)
        self.assertTrue(caught.exception.args[0].startswith(b"-ERR [SYS/TEMP]"), caught.exception.args)
        client.quit()
        with smtplib.SMTP("127.0.0.1", node.ports["submission"], timeout=60) as smtp:
            with self.assertRaises(smtplib.SMTPAuthenticationError) as refused:
                smtp.login(ALICE, ALICE_PW)
            self.assertEqual(refused.exception.smtp_code, 454)

        cluster.startServer()
        restarted = time.monotonic()
        while True:
            client = poplib.POP3("127.0.0.1", node.ports["pop3"], timeout=60)
            self.addCleanup(_closeQuietly, client)
            client.user(ALICE)
            try:
                client.pass_(ALICE_PW)
                break
            except poplib.error_proto as e:
                self.assertTrue(e.args[0].startswith(b"-ERR [SYS/TEMP]"), e.args)
                self.assertLess(time.monotonic() - restarted, 60, "never resumed")
                client.quit()
                time.sleep(0.5)
        self.assertEqual(client.retr(1)[1], [b"Subject: before", b"", b"body"])
        client.quit()
        # Submission needs the users directory too, which the node re-reads
        # every two seconds.
        while True:
            with smtplib.SMTP("127.0.0.1", node.ports["submission"], timeout=60) as smtp:
                try:
                    smtp.login(ALICE, ALICE_PW)
                except smtplib.SMTPAuthenticationError as e:
                    self.assertEqual(e.smtp_code, 454)
                    self.assertLess(time.monotonic() - restarted, 60, "never resumed")
                    time.sleep(0.5)
                    continue
                smtp.sendmail(ALICE, [ALICE], MESSAGE)
                break
        client = poplib.POP3("127.0.0.1", node.ports["pop3"], timeout=60)
        self.addCleanup(_closeQuietly, client)
        client.user(ALICE)
        client.pass_(ALICE_PW)
        self.assertEqual(client.stat()[0], 2)
        client.quit()
        self.assertIsNone(node.proc.poll())
        self.assertNotIn("Traceback", node.log())


class QueueHandOverTests(SynchronousTestCase):
    """
    The outbound queue shared by two nodes.
    """

    def test_killedMidRelay(self) -> None:
        """
        A node killed with SIGKILL while its relay waits for the smarthost's
        answer to DATA hands the entry to the other node once its lease
        runs out; the smarthost receives exactly one copy, and the queue is
        empty afterwards, as C{queue list} shows from any node.
        """
        import asyncio
        import socket
        import threading

        from aiosmtpd.controller import Controller

        received: list = []
        stalled = threading.Event()
        attempts = []

        class Handler:
            async def handle_DATA(self, server, session, envelope):
                attempts.append(envelope.rcpt_tos)
                if len(attempts) == 1:
                    stalled.set()
                    await asyncio.sleep(90)
                    return "451 4.3.0 too late"
                received.append(envelope.original_content)
                return "250 OK"

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        controller = Controller(Handler(), hostname="127.0.0.1", port=port)
        controller.start()
        self.addCleanup(controller.stop)

        self.uri = pgcluster.database(self)
        TwoNodesTests.cli(self, "init")  # type: ignore[arg-type]
        TwoNodesTests.cli(self, "user", "add", ALICE, input=ALICE_PW.encode() + b"\n")  # type: ignore[arg-type]
        args = ["--store", self.uri, "--relay-host", f"127.0.0.1:{port}"]
        nodeA = Pop3gwProcess(self, args=args).start()
        nodeB = Pop3gwProcess(self, args=args).start()
        with smtplib.SMTP("127.0.0.1", nodeA.ports["submission"], timeout=30) as smtp:
            smtp.login(ALICE, ALICE_PW)
            smtp.sendmail(ALICE, ["carol@example.net"], MESSAGE)
        self.assertTrue(stalled.wait(60), nodeA.log())
        self.assertIn(b"carol@example.net", TwoNodesTests.cli(self, "queue", "list").stdout)  # type: ignore[arg-type]
        assert nodeA.proc is not None
        nodeA.proc.kill()
        nodeA.proc.wait(30)
        deadline = time.monotonic() + 90
        while not received and time.monotonic() < deadline:
            time.sleep(0.5)
        self.assertEqual(len(received), 1, nodeB.log())
        self.assertTrue(received[0].endswith(MESSAGE.split(b"\r\n\r\n", 1)[1]))
        nodeB.waitForLog(r"relay: \S+ done: delivered=1 failed=0", timeout=30)
        self.assertEqual(TwoNodesTests.cli(self, "queue", "list").stdout, b"")  # type: ignore[arg-type]
        self.assertEqual(len(attempts), 2)


class FailoverTests(SynchronousTestCase):
    """
    A node on a multi-host URI over a primary and its streaming-replication
    standby (two private clusters).
    """

    def test_promotedStandby(self) -> None:
        """
        When the primary stops and the standby is promoted, a node whose
        URI lists both (C{target_session_attrs=read-write}) answers
        C{[SYS/TEMP]} for a few seconds at most, then serves again from the
        new primary: the message acknowledged before is there, and new
        mail is accepted and stored.
        """
        from urllib.parse import quote

        primary = pgcluster.private(self)
        first = primary.newDatabase()
        name = first.split("/")[3].split("?")[0]
        standby = primary.standby()
        self.addCleanup(standby.stop)
        hosts = ",".join(quote(c.socketDir, safe="") for c in (primary, standby))
        self.uri = f"postgresql://{pgcluster.SUPERUSER}@/{name}?host={hosts}&target_session_attrs=read-write"
        TwoNodesTests.cli(self, "init")  # type: ignore[arg-type]
        TwoNodesTests.cli(self, "user", "add", ALICE, input=ALICE_PW.encode() + b"\n")  # type: ignore[arg-type]
        TwoNodesTests.cli(self, "deliver", ALICE, input=b"Subject: before\r\n\r\nbody\r\n")  # type: ignore[arg-type]
        node = Pop3gwProcess(self, args=["--store", self.uri]).start()

        primary.stopServer()
        standby.promote()
        promoted = time.monotonic()
        while True:
            client = poplib.POP3("127.0.0.1", node.ports["pop3"], timeout=60)
            self.addCleanup(_closeQuietly, client)
            client.user(ALICE)
            try:
                client.pass_(ALICE_PW)
                break
            except poplib.error_proto as e:
                self.assertTrue(e.args[0].startswith(b"-ERR [SYS/TEMP]"), e.args)
                self.assertLess(time.monotonic() - promoted, 60, "never resumed")
                client.quit()
                time.sleep(0.5)
        self.assertEqual(client.retr(1)[1], [b"Subject: before", b"", b"body"])
        client.quit()
        with smtplib.SMTP("127.0.0.1", node.ports["submission"], timeout=60) as smtp:
            smtp.login(ALICE, ALICE_PW)
            smtp.sendmail(ALICE, [ALICE], MESSAGE)
        client = self.pop(node)
        self.assertEqual(client.stat()[0], 2)
        client.quit()
        self.assertNotIn("Traceback", node.log())

    def pop(self, node: Pop3gwProcess) -> poplib.POP3:
        client = poplib.POP3("127.0.0.1", node.ports["pop3"], timeout=60)
        self.addCleanup(_closeQuietly, client)
        client.user(ALICE)
        client.pass_(ALICE_PW)
        return client


class WorkersTests(SynchronousTestCase):
    """
    C{twistd -n pop3gw --workers 2 --store postgresql://...}: each worker
    process has its own connection pool on the one database.
    """

    def test_twoWorkersOneDatabase(self) -> None:
        """
        Both workers serve logins from the database; while a session
        through one worker holds a maildrop, a login to it through the
        other gets C{[IN-USE]}; mail for another domain submitted through
        a worker is relayed once, by the supervisor, and leaves the queue.
        """
        from tests.test_e2e_submission import Sink, message
        from tests.test_e2e_workers import WorkersEndToEndTests

        sink = Sink(self)
        self.uri = pgcluster.database(self)
        TwoNodesTests.cli(self, "init")  # type: ignore[arg-type]
        TwoNodesTests.cli(self, "user", "add", ALICE, input=ALICE_PW.encode() + b"\n")  # type: ignore[arg-type]
        TwoNodesTests.cli(self, "deliver", ALICE, input=b"Subject: kept\r\n\r\nbody\r\n")  # type: ignore[arg-type]
        server = Pop3gwProcess(
            self, args=["--workers", "2", "--store", self.uri, "--relay-host", f"127.0.0.1:{sink.port}"]
        ).start()
        helper = WorkersEndToEndTests()
        helper.assertEqual = self.assertEqual  # type: ignore[method-assign]
        pids = helper.waitReady(server)

        mark = len(server.output)
        holder = poplib.POP3("127.0.0.1", server.ports["pop3"], timeout=30)
        self.addCleanup(_closeQuietly, holder)
        holder.user(ALICE)
        holder.pass_(ALICE_PW)
        [holding] = helper.waitForLines(server, 1, r'login: service=pop3 .*user="alice@example.org"', mark)
        helper.assertInUseThrough(server, pids, 3 - holding, ALICE, ALICE_PW)
        others = helper.waitForLines(server, 1, r'maildrop in use: service=pop3 .*user="alice@example.org"', mark)
        self.assertEqual(others, [3 - holding], server.log())
        self.assertEqual(holder.retr(1)[1], [b"Subject: kept", b"", b"body"])
        holder.quit()

        # Each worker serves a login of its own (each from its pool).
        helper.loginThroughEach(server, pids, ALICE, ALICE_PW, lambda client: self.assertEqual(client.stat()[0], 1))

        with smtplib.SMTP("127.0.0.1", server.ports["submission"], timeout=30) as smtp:
            smtp.login(ALICE, ALICE_PW)
            smtp.sendmail(ALICE, ["carol@remote.example"], message(to="carol@remote.example", subject="out"))
        sink.waitFor(lambda: len(sink.received) == 1)
        server.waitForLog(r"relay: \S+ done: delivered=1 failed=0", timeout=30)
        queued = [line for line in server.output if "queue: queued " in line]
        self.assertEqual(len(queued), 1, server.log())
        self.assertNotIn("(worker", queued[0])
        self.assertEqual(TwoNodesTests.cli(self, "queue", "list").stdout, b"")  # type: ignore[arg-type]
        self.assertEqual(sink.attempts, 1)
        self.assertNotIn("Traceback", server.log())
