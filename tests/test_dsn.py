"""
Tests for L{pop3gw.dsn}.
"""

from __future__ import annotations

import email
import email.policy

from twisted.trial.unittest import SynchronousTestCase

from pop3gw.address import Address
from pop3gw.dsn import makeBounce, oneLine, originalHeaders

SENDER = Address("alice", "example.org")
HEADERS = b"From: alice@example.org\r\nTo: bob@remote.example\r\nSubject: hi\r\n"


def bounce(**kw) -> bytes:
    args = dict(
        reportingHost="mx.example.org",
        sender=SENDER,
        failures=[
            (Address("bob", "remote.example"), "5.1.1", "550 5.1.1 no such user"),
            (Address("carol", "other.example"), "4.4.7", "delivery time expired"),
        ],
        originalHeaders=HEADERS,
        queueId="0000000000001-abcdef01",
        now=86400.0,
        arrivalDate=3600.0,
    )
    args.update(kw)
    return makeBounce(**args)


class MakeBounceTests(SynchronousTestCase):
    """
    Tests for L{makeBounce}.
    """

    def parse(self, data: bytes):
        return email.message_from_bytes(data, policy=email.policy.compat32)

    def test_crlfOnly(self):
        """
        Every line of the bounce ends with CRLF, and it ends with the closing
        boundary.
        """
        data = bounce(boundary="BOUNDARY")
        self.assertEqual(data.count(b"\n"), data.count(b"\r\n"))
        self.assertNotIn(b"\r\r", data)
        self.assertTrue(data.endswith(b"\r\n--BOUNDARY--\r\n"))

    def test_headers(self):
        """
        The bounce comes from MAILER-DAEMON at the reporting host, goes to
        the sender, is marked auto-replied and has a Date and Message-ID.
        """
        msg = self.parse(bounce(messageId="<id@mx.example.org>"))
        self.assertEqual(msg["From"], "Mail Delivery System <MAILER-DAEMON@mx.example.org>")
        self.assertEqual(msg["To"], "<alice@example.org>")
        self.assertEqual(msg["Auto-Submitted"], "auto-replied")
        self.assertEqual(msg["Date"], "Fri, 02 Jan 1970 00:00:00 GMT")
        self.assertEqual(msg["Message-ID"], "<id@mx.example.org>")
        self.assertEqual(msg.get_content_type(), "multipart/report")
        self.assertEqual(msg.get_param("report-type"), "delivery-status")

    def test_postmasterNotice(self):
        """
        A postmaster notice is the same report to the postmaster, with its
        own subject and a text saying why it could not be returned; the
        notice's lines are made single lines.
        """
        postmaster = Address("postmaster", "example.org")
        data = bounce(sender=postmaster, boundary="BOUNDARY",
                      notice=["The report could not be returned to its sender <alice@example.org>:",
                              "the sender is not a local user\r\nany more."])
        msg = self.parse(data)
        self.assertEqual(msg["To"], "<postmaster@example.org>")
        self.assertEqual(msg["Subject"], "Postmaster Copy: Undelivered Mail")
        self.assertIn(
            b"\r\n\r\nThis is the mail system at host mx.example.org.\r\n\r\n"
            b"A message could not be delivered to one or more recipients.\r\n"
            b"The report could not be returned to its sender <alice@example.org>:\r\n"
            b"the sender is not a local user any more.\r\n"
            b"This report goes to you, the postmaster, instead; the original\r\n"
            b"header is attached.\r\n\r\nQueue id: 0000000000001-abcdef01\r\n\r\n"
            b"<bob@remote.example>: 550 5.1.1 no such user\r\n",
            data,
        )
        self.assertEqual(data.replace(b"Postmaster Copy: Undelivered Mail", b"Undelivered Mail Returned to Sender")
                         .split(b"Content-Description: Delivery report")[1],
                         bounce(boundary="BOUNDARY").split(b"Content-Description: Delivery report")[1])

    def test_randomMessageId(self):
        """
        Without an explicit Message-ID, each bounce gets a different one
        naming the queue id and the reporting host.
        """
        a = self.parse(bounce())["Message-ID"]
        b = self.parse(bounce())["Message-ID"]
        self.assertNotEqual(a, b)
        self.assertTrue(a.startswith("<0000000000001-abcdef01."))
        self.assertTrue(a.endswith("@mx.example.org>"))

    def test_parts(self):
        """
        The report has three parts: text/plain, message/delivery-status and
        text/rfc822-headers.
        """
        msg = self.parse(bounce())
        self.assertEqual(
            [p.get_content_type() for p in msg.get_payload()],
            ["text/plain", "message/delivery-status", "text/rfc822-headers"],
        )

    def test_humanReadable(self):
        """
        The first part names the queue id and each recipient with its
        diagnostic.
        """
        text = self.parse(bounce()).get_payload()[0].get_payload(decode=True)
        self.assertIn(b"Queue id: 0000000000001-abcdef01\n", text.replace(b"\r\n", b"\n"))
        self.assertIn(b"<bob@remote.example>: 550 5.1.1 no such user", text)
        self.assertIn(b"<carol@other.example>: delivery time expired", text)

    def test_deliveryStatus(self):
        """
        The delivery-status part has the per-message fields and one block of
        per-recipient fields per failure.
        """
        status = self.parse(bounce()).get_payload()[1]
        blocks = status.get_payload()
        self.assertEqual(len(blocks), 3)
        self.assertEqual(blocks[0]["Reporting-MTA"], "dns; mx.example.org")
        self.assertEqual(blocks[0]["Arrival-Date"], "Thu, 01 Jan 1970 01:00:00 GMT")
        self.assertEqual(
            dict(blocks[1].items()),
            {
                "Final-Recipient": "rfc822; bob@remote.example",
                "Action": "failed",
                "Status": "5.1.1",
                "Diagnostic-Code": "smtp; 550 5.1.1 no such user",
            },
        )
        self.assertEqual(blocks[2]["Status"], "4.4.7")
        self.assertEqual(blocks[2]["Final-Recipient"], "rfc822; carol@other.example")

    def test_originalHeaders(self):
        """
        The third part holds the original header exactly.
        """
        data = bounce(boundary="B")
        self.assertIn(
            b"Content-Type: text/rfc822-headers\r\nContent-Transfer-Encoding: 7bit\r\n\r\n"
            + HEADERS
            + b"\r\n--B--\r\n",
            data,
        )

    def test_originalHeadersLF(self):
        """
        Original headers with LF line ends and blank lines come out CRLF
        with no blank line that would end the part's header early.
        """
        data = bounce(boundary="B", originalHeaders=b"\nA: 1\n\nB: 2")
        self.assertIn(b"7bit\r\n\r\nA: 1\r\nB: 2\r\n\r\n--B--\r\n", data)

    def test_hostileDiagnostic(self):
        """
        A remote reply with line breaks cannot add header fields or lines
        to the report.
        """
        data = bounce(
            failures=[(Address("bob", "remote.example"), "5.1.1", "550 bad\r\nAction: delivered\n--B--")],
            boundary="B",
        )
        self.assertIn(b"Diagnostic-Code: smtp; 550 bad Action: delivered --B--\r\n", data)
        self.assertEqual(data.count(b"\r\n--B--"), 1)

    def test_nonASCIIRecipient(self):
        """
        A non-ASCII recipient is written as RFC 6533 utf-8-addr-xtext
        (non-QCHAR characters as C{\\x{HEX}}), so the delivery-status part
        stays ASCII as C{message/delivery-status} requires.
        """
        data = bounce(
            failures=[(Address("j\u00fcr+gen", "remote.example"), "5.6.7", "SMTPUTF8 is not supported")],
            boundary="B",
        )
        self.assertIn(b"Final-Recipient: utf-8; j\\x{FC}r\\x{2B}gen@remote.example\r\n", data)
        status = data.split(b"Content-Type: message/delivery-status\r\n", 1)[1].split(b"--B", 1)[0]
        self.assertTrue(status.isascii())

    def test_diagnosticType(self):
        """
        A remote server's reply is a diagnostic of type C{smtp}; this
        server's own text (expiry, DNS) is of type C{X-pop3gw}.
        """
        blocks = self.parse(bounce()).get_payload()[1].get_payload()
        self.assertEqual(blocks[1]["Diagnostic-Code"], "smtp; 550 5.1.1 no such user")
        self.assertEqual(blocks[2]["Diagnostic-Code"], "X-pop3gw; delivery time expired")

    def test_badStatus(self):
        """
        A malformed status is reported as 5.0.0.
        """
        status = self.parse(
            bounce(failures=[(Address("bob", "remote.example"), "nonsense", "x")])
        ).get_payload()[1]
        self.assertEqual(status.get_payload()[1]["Status"], "5.0.0")


class HelperTests(SynchronousTestCase):
    """
    Tests for L{oneLine} and L{originalHeaders}.
    """

    def test_oneLine(self):
        """
        L{oneLine} joins lines, replaces unprintable characters and cuts.
        """
        self.assertEqual(oneLine(b"a\r\n b\tc\x00\xc3\xa9"), "a b c??")
        self.assertEqual(oneLine("x" * 20, 10), "xxxxxxx...")

    def test_originalHeaders(self):
        """
        L{originalHeaders} returns the header up to the blank line, CRLF.
        """
        self.assertEqual(originalHeaders(b"A: 1\nB: 2\n\nbody\n"), b"A: 1\r\nB: 2\r\n")
        self.assertEqual(originalHeaders(b"\r\nbody"), b"")
        self.assertEqual(originalHeaders(b"A: 1\r\nB: 2\r\n\r\n", limit=8), b"A: 1\r\n")
