"""
End-to-end: moving a mailbox from another POP3 server (here a second
pop3gw over implicit TLS) with C{pop3gw import}, and C{pop3gw user
import-uidl}.
"""

from __future__ import annotations

import os
import poplib
import ssl
import subprocess

from twisted.trial.unittest import SynchronousTestCase

from tests.e2e import Pop3gwProcess, pop3gwCommand
from tests.test_e2e_tls import ALICE, PASSWORD, TLSServerMixin

MESSAGES = [
    b"Subject: one\r\n\r\n.leading dot\r\n..two dots\r\nend\r\n",
    b"Subject: two\r\n\r\nplain\r\n",
    b"Subject: three\r\n\r\n.\r\n",
]


def listing(port: int, user: str, password: str, context=None) -> tuple:
    pop = poplib.POP3_SSL("127.0.0.1", port, context=context, timeout=30) if context else \
        poplib.POP3("127.0.0.1", port, timeout=30)
    try:
        pop.user(user)
        pop.pass_(password)
        uidls = [line.split()[1] for line in pop.uidl()[1]]
        bodies = [b"\r\n".join(pop.retr(i + 1)[1]) + b"\r\n" for i in range(len(uidls))]
        pop.quit()
    finally:
        pop.close()
    return uidls, bodies


def uidls(port: int, context) -> list:
    """
    The UIDLs alice's maildrop on the server at C{port} (POP3S) serves.
    """
    pop = poplib.POP3_SSL("127.0.0.1", port, context=context, timeout=30)
    try:
        pop.user(ALICE)
        pop.pass_(PASSWORD)
        found = [line.split()[1] for line in pop.uidl()[1]]
        pop.quit()
    finally:
        pop.close()
    return found


class ImportEndToEndTests(TLSServerMixin, SynchronousTestCase):
    def test_importResumableWithUIDLs(self) -> None:
        """
        C{pop3gw import pop3s://alice@...} copies every message byte for
        byte with its UIDL (POP3 on the new server serves the old UIDLs),
        and a second run copies nothing; a wrong password is one line and
        exit 75.
        """
        old = self.startServer(listeners=("pop3s",))
        for message in MESSAGES:
            old.deliver(ALICE, message)
        context = ssl.create_default_context(cafile=self.certs["ca.pem"])
        oldUidls, oldBodies = listing(old.ports["pop3s"], ALICE, PASSWORD, context)
        new = Pop3gwProcess(self, args=["--domain", "example.org"], listeners=("pop3",)).start()
        new.addUser(ALICE, "new password")
        source = f"pop3s://{ALICE}@127.0.0.1:{old.ports['pop3s']}"
        command = pop3gwCommand() + ["--data-dir", new.dataDir, "import", source, "--ca-file", self.certs["ca.pem"]]
        first = subprocess.run(command, input=PASSWORD.encode() + b"\n", capture_output=True, timeout=120)
        self.assertEqual((first.returncode, first.stderr), (0, b""))
        self.assertEqual(first.stdout, b"alice@example.org: copied 3 messages from 127.0.0.1, 0 already copied before\n")
        again = subprocess.run(command, input=PASSWORD.encode() + b"\n", capture_output=True, timeout=120)
        self.assertEqual(again.stdout, b"alice@example.org: copied 0 messages from 127.0.0.1, 3 already copied before\n")
        newUidls, newBodies = listing(new.ports["pop3"], ALICE, "new password")
        self.assertEqual(newUidls, oldUidls)
        self.assertEqual(newBodies, oldBodies)
        wrong = subprocess.run(command, input=b"wrong\n", capture_output=True, timeout=120)
        self.assertEqual((wrong.returncode, wrong.stdout), (75, b""))
        self.assertEqual(wrong.stderr, b"pop3gw: import from 127.0.0.1: login as alice@example.org refused\n")

    def test_importIntoDatabase(self) -> None:
        """
        C{pop3gw --store postgresql://... import pop3s://alice@...} copies
        every message byte for byte with its UIDL into the database; a node
        on that database serves them over POP3 with the old UIDLs, and a
        second run copies nothing.
        """
        from tests import pgcluster

        old = self.startServer(listeners=("pop3s",))
        for message in MESSAGES:
            old.deliver(ALICE, message)
        context = ssl.create_default_context(cafile=self.certs["ca.pem"])
        oldUidls, oldBodies = listing(old.ports["pop3s"], ALICE, PASSWORD, context)
        uri = pgcluster.database(self)
        store = pop3gwCommand() + ["--store", uri]
        subprocess.run(store + ["init"], capture_output=True, timeout=60, check=True)
        subprocess.run(store + ["user", "add", ALICE], input=b"new password\n", capture_output=True, timeout=60,
                       check=True)
        command = store + ["import", f"pop3s://{ALICE}@127.0.0.1:{old.ports['pop3s']}", "--ca-file",
                           self.certs["ca.pem"]]
        first = subprocess.run(command, input=PASSWORD.encode() + b"\n", capture_output=True, timeout=120)
        self.assertEqual((first.returncode, first.stderr), (0, b""))
        self.assertEqual(first.stdout, b"alice@example.org: copied 3 messages from 127.0.0.1, 0 already copied before\n")
        again = subprocess.run(command, input=PASSWORD.encode() + b"\n", capture_output=True, timeout=120)
        self.assertEqual((again.returncode, again.stderr), (0, b""))
        self.assertEqual(again.stdout, b"alice@example.org: copied 0 messages from 127.0.0.1, 3 already copied before\n")
        node = Pop3gwProcess(self, args=["--store", uri, "--domain", "example.org"], listeners=("pop3",)).start()
        newUidls, newBodies = listing(node.ports["pop3"], ALICE, "new password")
        self.assertEqual(newUidls, oldUidls)
        self.assertEqual(newBodies, oldBodies)

    def test_importLongLines(self) -> None:
        """
        A message with a 10,000-octet line (base64 without line breaks) is
        copied byte for byte; one with a line longer than the new side's
        C{max-message-size} is left out with one line on stderr (exit 65)
        while the messages after it are copied.
        """
        wide = b"Subject: wide\r\n\r\n" + b"QUJD" * 2500 + b"\r\n"
        wider = b"Subject: wider\r\n\r\n" + b"x" * 20000 + b"\r\n"
        old = self.startServer(listeners=("pop3s",))
        for message in (wide, wider, MESSAGES[1]):
            old.deliver(ALICE, message)
        new = Pop3gwProcess(self, args=["--domain", "example.org"], listeners=("pop3",)).start()
        new.addUser(ALICE, "new password")
        config = os.path.join(new.dataDir, "import.ini")
        with open(config, "w") as f:
            f.write(f"[pop3gw]\ndata-dir = {new.dataDir}\nmax-message-size = 15000\n")
        command = pop3gwCommand() + ["--config", config, "import", f"pop3s://{ALICE}@127.0.0.1:{old.ports['pop3s']}",
                                     "--ca-file", self.certs["ca.pem"]]
        served = uidls(old.ports["pop3s"], ssl.create_default_context(cafile=self.certs["ca.pem"]))
        result = subprocess.run(command, input=PASSWORD.encode() + b"\n", capture_output=True, timeout=120)
        self.assertEqual(result.returncode, 65, result.stderr)
        self.assertEqual(result.stdout, b"alice@example.org: copied 2 messages from 127.0.0.1, 0 already copied before\n")
        self.assertEqual(result.stderr, b"pop3gw: import from 127.0.0.1: message 2 (UIDL " + served[1]
                         + b") not copied: it has a line longer than 15000 octets\n")
        stored = []
        for sub in ("cur", "new"):
            folder = os.path.join(new.maildir(ALICE), sub)
            for name in os.listdir(folder):
                with open(os.path.join(folder, name), "rb") as f:
                    stored.append(f.read())
        self.assertEqual(sorted(stored), sorted(m.replace(b"\r\n", b"\n") for m in (wide, MESSAGES[1])))

    def test_untrustedRefused(self) -> None:
        """
        Without the CA the old server's certificate is not trusted: nothing
        is sent, one line.
        """
        old = self.startServer(listeners=("pop3s",))
        new = Pop3gwProcess(self, args=["--domain", "example.org"], listeners=("pop3",)).start()
        new.addUser(ALICE, "new password")
        result = subprocess.run(
            pop3gwCommand() + ["--data-dir", new.dataDir, "import", f"pop3s://{ALICE}@127.0.0.1:{old.ports['pop3s']}"],
            input=PASSWORD.encode() + b"\n", capture_output=True, timeout=120)
        self.assertEqual(result.returncode, 75)
        self.assertRegex(result.stderr, rb"^pop3gw: import from 127\.0\.0\.1: 127\.0\.0\.1:\d+: certificate not trusted")

    def test_importUIDL(self) -> None:
        """
        C{user import-uidl} with a listing captured from the old server
        makes POP3 serve those UIDLs.
        """
        server = Pop3gwProcess(self, args=["--domain", "example.org"], listeners=("pop3",)).start()
        server.addUser(ALICE, "pw")
        for message in MESSAGES:
            server.deliver(ALICE, message)
        result = server.cli("user", "import-uidl", ALICE, input=b"+OK\r\n1 AAA1\r\n2 AAA2\r\n3 AAA3\r\n.\r\n")
        self.assertEqual(result.stdout, b"alice@example.org: 3 of 3 messages now have their old UIDL\n")
        self.assertEqual(listing(server.ports["pop3"], ALICE, "pw")[0], [b"AAA1", b"AAA2", b"AAA3"])
        bad = server.cli("user", "import-uidl", ALICE, input=b"1 AAA1\n", check=False)
        self.assertEqual(bad.returncode, 65)
