"""
End-to-end: the real C{twistd pop3gw} on loopback, users added and mail
delivered with the C{pop3gw} command, retrieved with real POP3 clients.
"""

from __future__ import annotations

import os
import poplib
import signal
import subprocess
import tempfile
import time

from twisted.trial.unittest import SynchronousTestCase

from tests.e2e import Pop3gwProcess, requirePortsFree, requireProgram, twistdCommand

ALICE = "alice@example.org"
PASSWORD = "correct horse battery"

MESSAGE = (
    b"From: bob@example.org\n"
    b"To: alice@example.org\n"
    b"Subject: hello\n"
    b"\n"
    b"first line\n"
    b".a line starting with a dot\n"
    b".\n"
    b"..two dots\n"
    b"last line\n"
)
WIRE = MESSAGE.replace(b"\n", b"\r\n")
#: The embedded default listeners: POP3 and submission on loopback.
DEFAULT_PORTS = (1110, 1587)


class ServerTestMixin:
    def startServer(self, **kw) -> Pop3gwProcess:
        server = Pop3gwProcess(self, **kw).start()
        server.addUser(ALICE, PASSWORD)
        return server

    def pop(self, server) -> poplib.POP3:
        client = poplib.POP3("127.0.0.1", server.ports["pop3"], timeout=30)
        self.addCleanup(_closeQuietly, client)
        return client


def _closeQuietly(client) -> None:
    try:
        client.close()
    except OSError:
        pass


class PoplibTests(ServerTestMixin, SynchronousTestCase):
    def test_retrieveByteForByteAndDelete(self) -> None:
        """
        A message delivered with C{pop3gw deliver} is listed with its exact
        CRLF size, retrieved byte for byte (dot-stuffing undone by the
        client), and gone after DELE and QUIT; UIDL is the same in the next
        session.
        """
        server = self.startServer()
        server.deliver(ALICE, MESSAGE)
        client = self.pop(server)
        client.user(ALICE)
        client.pass_(PASSWORD)
        count, size = client.stat()
        self.assertEqual((count, size), (1, len(WIRE)))
        self.assertEqual(client.list()[1], [b"1 %d" % len(WIRE)])
        uid = client.uidl(1).split()[2]
        response, lines, octets = client.retr(1)
        self.assertEqual(b"\r\n".join(lines) + b"\r\n", WIRE)
        client.quit()

        client = self.pop(server)
        client.user(ALICE)
        client.pass_(PASSWORD)
        self.assertEqual(client.uidl(1).split()[2], uid)
        client.dele(1)
        client.quit()

        client = self.pop(server)
        client.user(ALICE)
        client.pass_(PASSWORD)
        self.assertEqual(client.stat(), (0, 0))
        client.quit()
        server.waitForLog(r"logout: service=pop3 rhost=127\.0\.0\.1 user=\"alice@example\.org\".*deleted=1")

    def test_deliverRefusesBareCR(self) -> None:
        """
        C{pop3gw deliver} refuses a message with a bare CR (exit 65, one
        line) instead of turning it into a line break: nothing is stored.
        """
        server = self.startServer()
        result = server.cli("deliver", ALICE, input=b"Subject: hi\rFrom: ceo@example.org\n\nbody\n", check=False)
        self.assertEqual(
            (result.returncode, result.stderr),
            (65, b"pop3gw: message refused: it contains a bare CR (a CR not followed by LF)\n"),
        )
        client = self.pop(server)
        client.user(ALICE)
        client.pass_(PASSWORD)
        self.assertEqual(client.stat(), (0, 0))
        client.quit()

    def test_droppedConnectionDeletesNothing(self) -> None:
        """
        DELE followed by a dropped connection (no QUIT) deletes nothing, and
        the lock is free for the next session.
        """
        server = self.startServer()
        server.deliver(ALICE, MESSAGE)
        client = self.pop(server)
        client.user(ALICE)
        client.pass_(PASSWORD)
        client.dele(1)
        client.close()
        deadline = time.monotonic() + 10
        while True:
            client = self.pop(server)
            client.user(ALICE)
            try:
                client.pass_(PASSWORD)
                break
            except poplib.error_proto as e:
                if b"IN-USE" not in e.args[0] or time.monotonic() > deadline:
                    raise
                client.close()
                time.sleep(0.1)
        self.assertEqual(client.stat()[0], 1)
        client.quit()

    def test_secondSessionInUse(self) -> None:
        """
        While one session holds the maildrop, a second login gets
        C{-ERR [IN-USE]}.
        """
        server = self.startServer()
        first = self.pop(server)
        first.user(ALICE)
        first.pass_(PASSWORD)
        second = self.pop(server)
        second.user(ALICE)
        with self.assertRaises(poplib.error_proto) as e:
            second.pass_(PASSWORD)
        self.assertIn(b"[IN-USE]", e.exception.args[0])
        first.quit()

    def test_badPasswordLoggedForFail2ban(self) -> None:
        """
        A wrong password gets C{-ERR [AUTH]} and one log line with the peer
        address and the user, never the password.
        """
        server = self.startServer()
        client = self.pop(server)
        client.user(ALICE)
        with self.assertRaises(poplib.error_proto) as e:
            client.pass_("wrong password")
        self.assertIn(b"[AUTH]", e.exception.args[0])
        server.waitForLog(r"authentication failed: service=pop3 rhost=127\.0\.0\.1 user=\"alice@example\.org\"")
        self.assertNotIn("wrong password", server.log())
        self.assertNotIn(PASSWORD, server.log())

    def test_userChangesNeedNoRestart(self) -> None:
        """
        A user added and a password changed with the C{pop3gw} command while
        the server runs take effect at the next login.
        """
        server = self.startServer()
        server.addUser("carol@example.org", "first")
        client = self.pop(server)
        client.user("carol@example.org")
        client.pass_("first")
        client.quit()
        server.cli("user", "passwd", "carol@example.org", input=b"second\n")
        client = self.pop(server)
        client.user("carol@example.org")
        client.pass_("second")
        client.quit()


class DefaultsTests(SynchronousTestCase):
    def test_embeddedDefaults(self) -> None:
        """
        C{twistd -n pop3gw} with no options keeps its state in
        C{./pop3gw-data} and logs where it listens (POP3 on 1110 and
        submission on 1587, loopback) and where its data lives.  Skipped
        when either port is taken (by the server from the README's first
        set-up step, say).
        """
        requirePortsFree(self, DEFAULT_PORTS)
        cwd = tempfile.mkdtemp(prefix="pop3gw-defaults-")
        self.addCleanup(__import__("shutil").rmtree, cwd, True)
        proc = subprocess.Popen(twistdCommand() + ["-n", "--pidfile=", "--logfile=-", "pop3gw"], cwd=cwd,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

        def stop():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            proc.stdout.close()

        self.addCleanup(stop)
        seen = []
        deadline = time.monotonic() + 60
        wanted = ("pop3 listening on 127.0.0.1:1110", "submission listening on 127.0.0.1:1587")
        while time.monotonic() < deadline and not all(any(w in s for s in seen) for w in wanted):
            line = proc.stdout.readline().decode()
            if not line:
                break
            seen.append(line)
        text = "".join(seen)
        for w in wanted:
            self.assertIn(w, text)
        self.assertIn(os.path.join(os.path.realpath(cwd), "pop3gw-data"), text)
        self.assertTrue(os.path.isdir(os.path.join(cwd, "pop3gw-data")))


class PluginTests(SynchronousTestCase):
    def test_pluginListedWithContractOptions(self) -> None:
        """
        The installed C{twistd} lists the C{pop3gw} plugin, and C{twistd
        pop3gw --help} lists every option of the operator interface.
        """
        cwd = tempfile.mkdtemp(prefix="pop3gw-help-")
        self.addCleanup(__import__("shutil").rmtree, cwd, True)
        listing = subprocess.run(twistdCommand() + ["--help"], capture_output=True, timeout=60, cwd=cwd)
        self.assertRegex(listing.stdout.decode(), r"\n\s+pop3gw\s+POP3")
        helpText = subprocess.run(twistdCommand() + ["pop3gw", "--help"], capture_output=True, timeout=60, cwd=cwd)
        self.assertEqual(helpText.returncode, 0, helpText.stderr)
        for option in ("--config", "--data-dir", "--domain", "--pop3", "--pop3s", "--submission", "--submissions",
                       "--mx", "--lmtp", "--tls-cert", "--tls-key", "--relay-host", "--plaintext-auth",
                       "--max-message-size"):
            self.assertIn(option + "=", helpText.stdout.decode())


class CurlTests(ServerTestMixin, SynchronousTestCase):
    def test_curlRetrieves(self) -> None:
        """
        C{curl pop3://} logs in with the full address and retrieves the
        message byte for byte.
        """
        curl = requireProgram(self, "curl")
        server = self.startServer()
        server.deliver(ALICE, MESSAGE)
        result = subprocess.run([curl, "-sS", "--max-time", "30", "-u", f"{ALICE}:{PASSWORD}",
                                 f"pop3://127.0.0.1:{server.ports['pop3']}/1"], capture_output=True, timeout=60)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout, WIRE)


class RealClientTests(ServerTestMixin, SynchronousTestCase):
    def test_fetchmail(self) -> None:
        """
        fetchmail retrieves the message into an MDA and deletes it from the
        server; the logout line counts the octets it was sent, whether it
        fetched with RETR or with TOP.
        """
        fetchmail = requireProgram(self, "fetchmail")
        server = self.startServer()
        server.deliver(ALICE, MESSAGE)
        work = tempfile.mkdtemp(prefix="pop3gw-fetchmail-")
        self.addCleanup(__import__("shutil").rmtree, work, True)
        out = os.path.join(work, "out")
        rc = os.path.join(work, "fetchmailrc")
        with open(rc, "w") as f:
            f.write(
                f"poll 127.0.0.1 port {server.ports['pop3']} protocol pop3 uidl\n"
                f"  user '{ALICE}' password '{PASSWORD}'\n"
                f"  sslproto '' no sslcertck\n"
                f"  mda \"cat > {out}\"\n"
            )
        os.chmod(rc, 0o600)
        env = dict(os.environ, HOME=work, FETCHMAILHOME=work)
        result = subprocess.run([fetchmail, "-f", rc, "--nodetach", "--nosyslog", "-v"], capture_output=True,
                                timeout=120, env=env, stdin=subprocess.DEVNULL)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        with open(out, "rb") as f:
            fetched = f.read()
        # fetchmail prepends its own Received: header and writes LF line ends.
        self.assertTrue(fetched.endswith(MESSAGE), fetched)
        server.waitForLog(r'logout: service=pop3 rhost=127\.0\.0\.1 user="alice@example\.org" bytes=%d deleted=1 '
                          % (len(WIRE),))
        client = self.pop(server)
        client.user(ALICE)
        client.pass_(PASSWORD)
        self.assertEqual(client.stat(), (0, 0))
        client.quit()

    def test_mpop(self) -> None:
        """
        mpop retrieves the message into a Maildir and deletes it from the
        server.
        """
        mpop = requireProgram(self, "mpop")
        server = self.startServer()
        server.deliver(ALICE, MESSAGE)
        work = tempfile.mkdtemp(prefix="pop3gw-mpop-")
        self.addCleanup(__import__("shutil").rmtree, work, True)
        target = os.path.join(work, "Maildir")
        for sub in ("cur", "new", "tmp"):
            os.makedirs(os.path.join(target, sub))
        result = subprocess.run(
            [mpop, "--host=127.0.0.1", f"--port={server.ports['pop3']}", f"--user={ALICE}",
             f"--passwordeval=echo '{PASSWORD}'", "--tls=off", "--auth=user", "--keep=off",
             f"--delivery=maildir,{target}", "--uidls-file=" + os.path.join(work, "uidls"), "-q"],
            capture_output=True, timeout=120, env=dict(os.environ, HOME=work), stdin=subprocess.DEVNULL)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        files = os.listdir(os.path.join(target, "new"))
        self.assertEqual(len(files), 1)
        with open(os.path.join(target, "new", files[0]), "rb") as f:
            self.assertTrue(f.read().endswith(MESSAGE))
        client = self.pop(server)
        client.user(ALICE)
        client.pass_(PASSWORD)
        self.assertEqual(client.stat(), (0, 0))
        client.quit()
