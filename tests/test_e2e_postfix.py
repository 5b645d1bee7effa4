"""
End-to-end: a private Postfix instance (L{tests.postfixhelpers}) in front
of the real C{twistd -n pop3gw}, with the README's Postfix lines:

  - Postfix relays to C{--mx}; an unknown recipient comes back to Postfix
    as a 5xx and is bounced (to a pop3gw user, through C{--mx} again), not
    deferred;
  - Postfix delivers to virtual mailbox domains through C{--lmtp} on a
    Unix socket, and refuses unknown recipients at its own RCPT with
    C{virtual_mailbox_maps} on C{--postfix-map}; without the map, the
    unknown recipient LMTP refuses is bounced, not deferred;
  - C{relay_recipient_maps} on C{--postfix-map} makes Postfix refuse
    unknown recipients at its own RCPT;
  - a C{pipe(8)} transport runs C{pop3gw deliver ${recipient}};
  - with C{lmtp_send_xforward_command = yes}, the LMTP checks see the
    client Postfix received the message from.

Each message is sent to Postfix's SMTP server with smtplib and fetched back
over POP3 byte for byte.
"""

from __future__ import annotations

import os
import poplib
import pwd
import re
import smtplib
import subprocess
import time

from twisted.trial.unittest import SynchronousTestCase

from tests.dnshelpers import startProcess
from tests.e2e import Pop3gwProcess, pop3gwCommand
from tests.postfixhelpers import PrivatePostfix, requirePostfix, shareWithPostfix

PASSWORDS = {
    "alice@example.org": "alice-secret",
    "bob@example.org": "bob-secret",
}
MESSAGE = (
    b"From: Carol <carol@remote.example>\r\n"
    b"To: bob@example.org\r\n"
    b"Subject: through Postfix\r\n"
    b"Date: Tue, 01 Dec 2026 12:00:00 +0000\r\n"
    b"Message-ID: <postfix-e2e@remote.example>\r\n"
    b"\r\n"
    b"Hello Bob,\r\n"
    b".leading dot\r\n"
    b"caf\xc3\xa9 8-bit\r\n"
)

#: pop3gw's Received: field on --mx (from Postfix's smtp client, over
#: STARTTLS).
_MX_RECEIVED = (
    rb"Received: from mta\.example\.org \(\S+ \[127\.0\.0\.1\]\)\r\n"
    rb"\t\(using TLSv1\.[23] with cipher [A-Z0-9_-]+\)\r\n"
    rb"\tby mail\.example\.org \(pop3gw\) with ESMTPS id [0-9A-F]{16};\r\n"
    rb"\t[^\r\n]+\r\n"
)
#: pop3gw's Received: field on --lmtp (from Postfix's lmtp client).
_LMTP_RECEIVED = (
    rb"Received: from mta\.example\.org \(unix\)\r\n"
    rb"\tby mail\.example\.org \(pop3gw\) with LMTP id [0-9A-F]{16};\r\n"
    rb"\t[^\r\n]+\r\n"
)
#: Postfix's Received: field for the test's smtplib client.
_POSTFIX_RECEIVED = (
    rb"Received: from client\.example \(\S+ \[127\.0\.0\.1\]\)\r\n"
    rb"\tby mta\.example\.org \(Postfix\) with ESMTP id [0-9A-F]+;?\r\n"
    rb"\t[^\r\n]+\r\n"
)


class PostfixInFrontTests(SynchronousTestCase):
    """
    Postfix hands mail to pop3gw.
    """

    def setUp(self) -> None:
        requirePostfix(self)

    def startPop3gw(self, *args: str, listeners=("pop3",), dataDir=None, config=None) -> Pop3gwProcess:
        """
        Start pop3gw for example.org with alice and bob, and the team list
        (both of them).
        """
        server = Pop3gwProcess(self, args=["--domain", "example.org", *args], listeners=listeners,
                               dataDir=dataDir, config=config)
        for user, password in PASSWORDS.items():
            server.addUser(user, password)
        server.cli("alias", "add", "team@example.org", "alice@example.org", "bob@example.org")
        server.start()
        return server

    def send(self, postfix: PrivatePostfix, sender: str, recipients: list, message: bytes = MESSAGE) -> dict:
        """
        Send C{message} to Postfix's SMTP server; return what refused
        recipients it names (smtplib's C{sendmail} result, or the RCPT
        replies when all were refused).
        """
        smtp = smtplib.SMTP("127.0.0.1", postfix.port, local_hostname="client.example", timeout=60)
        self.addCleanup(smtp.close)
        try:
            refused = smtp.sendmail(sender, recipients, message)
        except smtplib.SMTPRecipientsRefused as e:
            refused = e.recipients
        smtp.quit()
        return refused

    def fetchAll(self, server: Pop3gwProcess, user: str, count: int = 1) -> list:
        """
        The messages in C{user}'s maildrop over POP3, as bytes with CRLF,
        once it holds C{count} of them (Postfix delivers in the background).
        """
        deadline = time.monotonic() + 60
        while True:
            pop = poplib.POP3("127.0.0.1", server.ports["pop3"], timeout=30)
            try:
                pop.user(user)
                pop.pass_(PASSWORDS[user])
                found, _ = pop.stat()
                if found >= count or time.monotonic() > deadline:
                    out = [b"\r\n".join(pop.retr(i)[1]) + b"\r\n" for i in range(1, found + 1)]
                    pop.quit()
                    return out
                pop.quit()
            finally:
                pop.close()
            time.sleep(0.2)

    def assertTraced(self, fetched: bytes, *fields: bytes) -> None:
        """
        C{fetched} is C{MESSAGE} after the trace fields matching the
        regular expressions C{fields}, in that order.
        """
        m = re.match(b"".join(fields), fetched)
        self.assertIsNotNone(m, fetched[:600])
        assert m is not None
        self.assertEqual(fetched[m.end():], MESSAGE)

    def test_relayToMX(self) -> None:
        """
        Postfix relays example.org to C{--mx} (C{relay_domains},
        C{relay_transport}) over STARTTLS (C{smtp_tls_security_level =
        may}, Debian's default): bob gets the message as sent after
        Postfix's Received: field and pop3gw's, which names the TLS version
        and cipher.  An unknown recipient is refused by
        pop3gw with 550 5.1.1, which Postfix reports as C{status=bounced}
        (never deferred) in a bounce to the sender, alice, who gets it
        through C{--mx} with the null sender.
        """
        server = self.startPop3gw(listeners=("pop3", "mx"))
        mx = server.ports["mx"]
        postfix = PrivatePostfix(self, mainCf=(
            "relay_domains = example.org\n"
            f"relay_transport = smtp:[127.0.0.1]:{mx}\n"
            # Debian's default: STARTTLS when offered, unverified.
            "smtp_tls_security_level = may\n"
        )).start()
        self.assertEqual(self.send(postfix, "alice@example.org", ["bob@example.org", "nobody@example.org"]), {})
        [fetched] = self.fetchAll(server, "bob@example.org")
        self.assertTraced(fetched, _MX_RECEIVED, _POSTFIX_RECEIVED)
        postfix.waitForLog(
            rf"to=<nobody@example\.org>, relay=127\.0\.0\.1\[127\.0\.0\.1\]:{mx}, .* dsn=5\.1\.1, status=bounced "
            r"\(host 127\.0\.0\.1\[127\.0\.0\.1\] said: 550 5\.1\.1 Recipient address rejected: user unknown"
        )
        [bounce] = self.fetchAll(server, "alice@example.org")
        self.assertRegex(bounce, rb"\r\nSubject: Undelivered Mail Returned to Sender\r\n")
        self.assertIn(b"\r\nFinal-Recipient: rfc822; nobody@example.org\r\nOriginal-Recipient: rfc822;"
                      b"nobody@example.org\r\nAction: failed\r\nStatus: 5.1.1\r\n", bounce)
        server.waitForLog(r'mx: accepted id=\S+ rhost=127\.0\.0\.1 from="" recipients=1 ')
        self.assertNotIn("status=deferred", postfix.log())

    def test_virtualLMTP(self) -> None:
        """
        The README's virtual mailbox lines: Postfix refuses an unknown
        recipient at its own RCPT (C{virtual_mailbox_maps} on
        C{--postfix-map}) and delivers the others through C{--lmtp} on a
        Unix socket: bob gets the message once (directly and through the
        team list), alice once, each as sent after Postfix's and pop3gw's
        Received: fields.
        """
        postfix = PrivatePostfix(self)
        lmtp = os.path.join(postfix.top, "lmtp")
        recipients = os.path.join(postfix.top, "map")
        server = self.startPop3gw("--lmtp", f"unix:{lmtp}", "--postfix-map", f"unix:{recipients}",
                                  listeners=("pop3", "lmtp"))
        server.waitForLog(r"postfix-map listening on ")
        shareWithPostfix(lmtp)
        shareWithPostfix(recipients)
        with open(os.path.join(postfix.configDirectory, "main.cf"), "a") as f:
            f.write(
                "virtual_mailbox_domains = example.org\n"
                f"virtual_mailbox_maps = socketmap:unix:{recipients}:recipients\n"
                f"virtual_transport = lmtp:unix:{lmtp}\n"
            )
        postfix.start()
        refused = self.send(postfix, "carol@remote.example", ["bob@example.org", "nobody@example.org",
                                                              "team@example.org"])
        self.assertEqual(list(refused), ["nobody@example.org"])
        code, reply = refused["nobody@example.org"]
        self.assertEqual(code, 550)
        self.assertEqual(reply, b"5.1.1 <nobody@example.org>: Recipient address rejected: "
                                b"User unknown in virtual mailbox table")
        for rcpt in ("bob", "team"):
            postfix.waitForLog(rf"to=<{rcpt}@example\.org>, relay=\S+lmtp\]?, .*status=sent \(250 2\.0\.0 OK queued as")
        for user in ("alice@example.org", "bob@example.org"):
            [fetched] = self.fetchAll(server, user)
            self.assertTraced(fetched, _LMTP_RECEIVED, _POSTFIX_RECEIVED)
        self.assertNotIn("status=bounced", postfix.log())

    def test_lmtpXForwardChecked(self) -> None:
        """
        With C{lmtp_send_xforward_command = yes}, Postfix's XFORWARD gives
        pop3gw's LMTP checks (C{lmtp-checks = yes}) the client Postfix
        received the message from: SPF passes for 127.0.0.1, so DMARC
        passes for a p=reject domain whose message is not signed, and the
        message is stored with the results on top.
        """
        port = startProcess(self, {
            "remote.example": [["TXT", "v=spf1 ip4:127.0.0.1 -all"]],
            "_dmarc.remote.example": [["TXT", "v=DMARC1; p=reject"]],
        })
        postfix = PrivatePostfix(self)
        lmtp = os.path.join(postfix.top, "lmtp")
        server = Pop3gwProcess(self, args=["--domain", "example.org", "--lmtp", f"unix:{lmtp}"],
                               listeners=("pop3", "lmtp"),
                               extraConfig=f"[inbound]\ndns-server = 127.0.0.1:{port}\nlmtp-checks = yes\n")
        server.addUser("bob@example.org", PASSWORDS["bob@example.org"])
        server.start()
        shareWithPostfix(lmtp)
        with open(os.path.join(postfix.configDirectory, "main.cf"), "a") as f:
            f.write(
                "virtual_mailbox_domains = example.org\n"
                "virtual_mailbox_maps = static:yes\n"
                f"virtual_transport = lmtp:unix:{lmtp}\n"
                "lmtp_send_xforward_command = yes\n"
            )
        postfix.start()
        self.assertEqual(self.send(postfix, "carol@remote.example", ["bob@example.org"]), {})
        [fetched] = self.fetchAll(server, "bob@example.org")
        self.assertTraced(
            fetched,
            rb"Authentication-Results: mail\.example\.org;\r\n"
            rb"\tspf=pass smtp\.mailfrom=carol@remote\.example;\r\n"
            rb"\tdkim=none;\r\n"
            rb"\tdmarc=pass header\.from=remote\.example policy\.dmarc=reject\r\n",
            _LMTP_RECEIVED,
            _POSTFIX_RECEIVED,
        )
        server.waitForLog(r'lmtp: checked rhost=unix client=127\.0\.0\.1 from="carol@remote\.example" spf=pass '
                          r'dkim=none dmarc=pass action=deliver')

    def test_lmtpUnknownBounced(self) -> None:
        """
        Without C{virtual_mailbox_maps}, Postfix accepts an unknown
        recipient and hands it to C{--lmtp}, which refuses it with 550
        5.1.1 at RCPT: Postfix bounces it (C{status=bounced}, never
        deferred) to the sender, alice, who gets the bounce through LMTP;
        bob gets the message.
        """
        postfix = PrivatePostfix(self)
        lmtp = os.path.join(postfix.top, "lmtp")
        server = self.startPop3gw("--lmtp", f"unix:{lmtp}", listeners=("pop3", "lmtp"))
        shareWithPostfix(lmtp)
        with open(os.path.join(postfix.configDirectory, "main.cf"), "a") as f:
            f.write(
                "virtual_mailbox_domains = example.org\n"
                f"virtual_transport = lmtp:unix:{lmtp}\n"
            )
        postfix.start()
        self.assertEqual(self.send(postfix, "alice@example.org", ["bob@example.org", "nobody@example.org"]), {})
        postfix.waitForLog(
            r"to=<nobody@example\.org>, relay=\S+, .* dsn=5\.1\.1, status=bounced \(host \S+ said: "
            r"550 5\.1\.1 Recipient address rejected: user unknown \(in reply to RCPT TO command\)\)"
        )
        [fetched] = self.fetchAll(server, "bob@example.org")
        self.assertTraced(fetched, _LMTP_RECEIVED, _POSTFIX_RECEIVED)
        [bounce] = self.fetchAll(server, "alice@example.org")
        self.assertIn(b"\r\nSubject: Undelivered Mail Returned to Sender\r\n", bounce)
        self.assertIn(b"\r\nFinal-Recipient: rfc822; nobody@example.org\r\n", bounce)
        server.waitForLog(r'lmtp: accepted id=\S+ rhost=unix from="" recipients=1 ')
        self.assertNotIn("status=deferred", postfix.log())

    def test_relayRecipientMaps(self) -> None:
        """
        C{relay_recipient_maps} on C{--postfix-map}: Postfix's own RCPT
        refuses an unknown recipient with 550 5.1.1 and accepts a
        sub-address in any case, which it relays (here through
        C{--lmtp}) to alice, as sent.
        """
        postfix = PrivatePostfix(self)
        lmtp = os.path.join(postfix.top, "lmtp")
        recipients = os.path.join(postfix.top, "map")
        server = self.startPop3gw("--lmtp", f"unix:{lmtp}", "--postfix-map", f"unix:{recipients}",
                                  listeners=("pop3", "lmtp"))
        server.waitForLog(r"postfix-map listening on ")
        shareWithPostfix(lmtp)
        shareWithPostfix(recipients)
        with open(os.path.join(postfix.configDirectory, "main.cf"), "a") as f:
            f.write(
                "relay_domains = example.org\n"
                f"relay_recipient_maps = socketmap:unix:{recipients}:recipients\n"
                f"relay_transport = lmtp:unix:{lmtp}\n"
            )
        postfix.start()
        refused = self.send(postfix, "carol@remote.example", ["nobody@example.org"])
        self.assertEqual(refused, {"nobody@example.org": (
            550, b"5.1.1 <nobody@example.org>: Recipient address rejected: User unknown in relay recipient table")})
        self.assertEqual(self.send(postfix, "carol@remote.example", ["Alice+News@Example.ORG"]), {})
        [fetched] = self.fetchAll(server, "alice@example.org")
        self.assertTraced(fetched, _LMTP_RECEIVED, _POSTFIX_RECEIVED)
        postfix.waitForLog(r"postfix/smtpd\[\d+\]: NOQUEUE: reject: RCPT from \S+\[127\.0\.0\.1\]: 550 5\.1\.1 "
                           r"<nobody@example\.org>")

    def test_proxyMap(self) -> None:
        """
        The map through Postfix's proxymap (C{proxy:socketmap:...}, for a
        chrooted smtpd): the same answers at RCPT.
        """
        postfix = PrivatePostfix(self)
        recipients = os.path.join(postfix.top, "map")
        server = self.startPop3gw("--postfix-map", f"unix:{recipients}")
        server.waitForLog(r"postfix-map listening on ")
        shareWithPostfix(recipients)
        with open(os.path.join(postfix.configDirectory, "main.cf"), "a") as f:
            f.write(
                "relay_domains = example.org\n"
                f"relay_recipient_maps = proxy:socketmap:unix:{recipients}:recipients\n"
            )
        postfix.start()
        smtp = smtplib.SMTP("127.0.0.1", postfix.port, local_hostname="client.example", timeout=60)
        self.addCleanup(smtp.close)
        smtp.ehlo("client.example")
        smtp.mail("carol@remote.example")
        self.assertEqual(smtp.rcpt("team@example.org"), (250, b"2.1.5 Ok"))
        self.assertEqual(smtp.rcpt("nobody@example.org"), (
            550, b"5.1.1 <nobody@example.org>: Recipient address rejected: User unknown in relay recipient table"))
        smtp.rset()
        smtp.quit()

    def test_pipe(self) -> None:
        """
        The README's C{pipe(8)} transport (C{flags=DRq}, one recipient per
        delivery) runs C{pop3gw deliver ${recipient}} as the data
        directory's owner: alice and bob get the
        message as sent after Postfix's Received: field and the
        C{Return-Path:} and C{Delivered-To:} lines pipe adds; an unknown
        recipient (exit 67) is bounced, not deferred.
        """
        postfix = PrivatePostfix(self)
        owner = pwd.getpwnam("nobody")
        dataDir = os.path.join(postfix.top, "pop3gw")
        os.mkdir(dataDir, 0o700)
        os.chown(dataDir, owner.pw_uid, owner.pw_gid)
        command = pop3gwCommand()
        pop3gw = " ".join(command)
        try:
            probe = subprocess.run([*command, "--version"], user=owner.pw_uid, group=owner.pw_gid, extra_groups=[],
                                   cwd=postfix.top, capture_output=True, stdin=subprocess.DEVNULL, timeout=60)
            problem = probe.stderr.decode(errors="replace").strip() if probe.returncode else ""
        except OSError as e:
            problem = str(e)
        if problem:
            # Not something .ci/run can install: the interpreter (or the
            # checkout) lives where only root may read, e.g. under /root.
            self.skipTest(f"the pipe(8) user nobody cannot run {pop3gw} (the Python of its virtualenv and the "
                          f"checkout must be readable by other users): {problem}")
        config = os.path.join(postfix.top, "pop3gw.ini")
        with open(config, "w") as f:
            f.write(f"[pop3gw]\ndata-dir = {dataDir}\n[limits]\nfailure-delay = 0.2\n")
        server = self.startPop3gw(dataDir=dataDir, config=config)
        with open(os.path.join(postfix.configDirectory, "main.cf"), "a") as f:
            f.write(
                "virtual_mailbox_domains = example.org\n"
                "virtual_transport = pop3gw\n"
                "pop3gw_destination_recipient_limit = 1\n"
            )
        with open(os.path.join(postfix.configDirectory, "master.cf"), "a") as f:
            f.write(
                "pop3gw    unix  -       n       n       -       -       pipe\n"
                f"  flags=DRq user=nobody argv={pop3gw} --config {config} deliver ${{recipient}}\n"
            )
        postfix.start()
        self.assertEqual(self.send(postfix, "carol@remote.example", ["alice@example.org", "bob@example.org",
                                                                    "nobody@example.org"]), {})
        for user in ("alice@example.org", "bob@example.org"):
            [fetched] = self.fetchAll(server, user)
            self.assertTraced(fetched, rb"Return-Path: <carol@remote\.example>\r\n",
                              rb"Delivered-To: " + re.escape(user.encode()) + rb"\r\n", _POSTFIX_RECEIVED)
        postfix.waitForLog(r"to=<nobody@example\.org>, relay=pop3gw, .* dsn=5\.1\.1, status=bounced")
        self.assertNotIn("status=deferred", postfix.log())
