"""
End-to-end: C{pop3gw selftest} against the real server on every listener.
"""

import os
import re
import shutil
import subprocess
import tempfile
from unittest import TestCase

from tests.e2e import pop3gwCommand
from tests.test_e2e_tls import ALICE, PASSWORD, TLSServerMixin


class SelftestTests(TLSServerMixin, TestCase):
    """
    The probes pass against pop3gw with a trusted certificate.
    """

    def setUp(self) -> None:
        self.server = self.startServer(
            listeners=("pop3", "pop3s", "submission", "submissions", "mx"))
        self.work = tempfile.mkdtemp(prefix="pop3gw-selftest-")
        self.addCleanup(shutil.rmtree, self.work, True)
        self.passwordFile = os.path.join(self.work, "password")
        with open(self.passwordFile, "w") as f:
            f.write(PASSWORD + "\n")

    def selftest(self, *args: str, before: tuple = ()) -> subprocess.CompletedProcess:
        return subprocess.run(pop3gwCommand() + [*before, "selftest", *args], capture_output=True, text=True,
                              timeout=300, stdin=subprocess.DEVNULL)

    def listeners(self) -> list:
        ports = self.server.ports
        return [arg for kind in ("pop3", "pop3s", "submission", "submissions", "mx")
                for arg in (f"--{kind}", f"127.0.0.1:{ports[kind]}")]

    def test_everyProbePasses(self) -> None:
        """
        With the account and the CA that signed the server's certificate,
        every probe on every listener passes, exit status 0, and the
        dot-stuffing message is removed from the maildrop afterwards.
        """
        result = self.selftest(*self.listeners(), "--user", ALICE, "--password-file", self.passwordFile,
                               "--ca-file", self.certs["ca.pem"])
        lines = result.stdout.splitlines()
        self.assertEqual([line for line in lines if not line.startswith("PASS ")], [], result.stdout + result.stderr)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        names = {line.split()[1].rstrip(":") for line in lines}
        for expected in ("pop3-tls-injection", "pop3s-certificate", "submission-tls-injection",
                         "submission-smuggling", "submissions-smuggling", "mx-open-relay", "mx-smuggling",
                         "pop3-list-size", "dot-stuffing", "pop3-tls-versions"):
            self.assertIn(expected, names)
        self.assertRegex(result.stdout, r"PASS mx-open-relay: 8 foreign recipient form\(s\) refused")
        cur = os.path.join(self.server.maildir(ALICE), "cur")
        new = os.path.join(self.server.maildir(ALICE), "new")
        self.assertEqual(os.listdir(cur) + os.listdir(new), [])

    def test_untrustedCertificateFails(self) -> None:
        """
        Without the CA, the certificate probes fail and the exit status is
        1; the other probes still run.
        """
        ports = self.server.ports
        result = self.selftest("--pop3s", f"127.0.0.1:{ports['pop3s']}", "--domain", "example.org")
        self.assertEqual(result.returncode, 1, result.stdout)
        self.assertRegex(result.stdout, r"(?m)^FAIL pop3s-certificate: not trusted for 127\.0\.0\.1: ")
        self.assertRegex(result.stdout, r"(?m)^PASS pop3s-tls-versions: ")

    def test_configuredListeners(self) -> None:
        """
        With no listener named, the ones in the configuration file are
        probed.
        """
        config = os.path.join(self.work, "pop3gw.ini")
        with open(config, "w") as f:
            f.write(f"[pop3gw]\npop3 = tcp:{self.server.ports['pop3']}:interface=127.0.0.1\n"
                    "submission = none\ndomain = example.org\n")
        result = self.selftest("--ca-file", self.certs["ca.pem"], before=("--config", config))
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        kinds = {re.match(r"PASS (\w+)-", line).group(1) for line in result.stdout.splitlines()}
        self.assertEqual(kinds, {"pop3"})


class SelftestAgainstPostfixTests(TestCase):
    """
    The probes are not a mirror of pop3gw: run against a private Postfix
    MX, they see what Postfix does.
    """

    def selftestMX(self, forbidBareNewline: str) -> subprocess.CompletedProcess:
        from tests.postfixhelpers import PrivatePostfix

        postfix = PrivatePostfix(self, mainCf=(
            # Loopback is not trusted, so relaying needs a local domain.
            "mynetworks = 192.0.2.0/24\n"
            "relay_domains = example.org\n"
            # Never used: the probes finish no message.
            "relay_transport = smtp:[127.0.0.1]:1\n"
            f"smtpd_forbid_bare_newline = {forbidBareNewline}\n"
        )).start()
        return subprocess.run(pop3gwCommand() + ["selftest", "--mx", f"127.0.0.1:{postfix.port}",
                                                 "--domain", "example.org"],
                              capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)

    def test_postfixSmugglingCaught(self) -> None:
        """
        A Postfix that accepts a bare LF as a line end (the default of
        Postfix 3.7) ends a message at LF.LF: the smuggling probe fails
        (exit 1); the relay probe passes (Postfix refuses every disguise);
        STARTTLS is reported missing.
        """
        result = self.selftestMX("no")
        self.assertEqual(result.returncode, 1, result.stdout)
        self.assertRegex(result.stdout, r"(?m)^FAIL mx-smuggling: ended the message at LF\.LF")
        self.assertIn("PASS mx-open-relay: 8 foreign recipient form(s) refused\n", result.stdout)
        self.assertIn("FAIL mx-tls-offered: STARTTLS not offered", result.stdout)

    def test_postfixForbidBareNewline(self) -> None:
        """
        With smtpd_forbid_bare_newline = yes, Postfix refuses the
        look-alikes with one error: the smuggling probe passes.
        """
        result = self.selftestMX("yes")
        self.assertRegex(result.stdout, r"(?m)^PASS mx-smuggling: ")
