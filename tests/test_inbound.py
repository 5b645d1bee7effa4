"""
Tests for L{pop3gw.inbound}: the policy acting on SPF/DKIM/DMARC results
and rspamd's verdicts, the rewriting of the stored header, the deadline,
and the rspamd client against a fake rspamd (a C{twisted.web} resource on
loopback).
"""

from __future__ import annotations

import json

from twisted.internet import defer, reactor, task
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web import resource, server
from twisted.web.client import Agent

from pop3gw import inbound, mailauth
from pop3gw.runner import ImmediateRunner

HOST = "mail.example.org"
SESSION = inbound.Session("192.0.2.7", "client.example", "x@remote.example", ("bob@example.org", "alice@example.org"),
                          "mx.client.example")
MESSAGE = b"Received: from client.example\r\nFrom: x@remote.example\r\nSubject: hello\r\n\r\nbody\r\n"
AR_PASS = (b"Authentication-Results: mail.example.org;\r\n\tspf=pass smtp.mailfrom=x@remote.example;\r\n"
           b"\tdkim=none;\r\n\tdmarc=pass header.from=remote.example policy.dmarc=reject\r\n")


def results(dmarc: str = "pass", disposition: str = "none", domain: str = "remote.example",
            spf: str = "pass") -> mailauth.AuthenticationResults:
    return mailauth.AuthenticationResults(
        mailauth.SPFResult(spf, "mailfrom", "remote.example", "x@remote.example"),
        (),
        mailauth.DMARCResult(dmarc, domain, "" if dmarc in ("none", "temperror") else "reject", disposition),
    )


def text(reply) -> str:
    """
    A reply as it is sent, without its CRLF.
    """
    return f"{reply.code} {reply.text}"


class PendingRunner:
    """
    An C{IBlockingRunner} whose work never finishes.
    """

    def __init__(self) -> None:
        self.calls: list = []

    def run(self, f, *args):
        self.calls.append((f, args))
        return defer.Deferred()


class FakeRspamd:
    """
    An L{inbound.RspamdClient} answering with a fixed dict or failure.
    """

    def __init__(self, answer) -> None:
        self.answer = answer
        self.calls: list = []

    def check(self, message, session):
        self.calls.append((message, session))
        if isinstance(self.answer, Exception):
            return defer.fail(self.answer)
        return defer.succeed(self.answer)


class PolicyTests(SynchronousTestCase):
    """
    L{inbound.InboundChecker.check}: what each result leads to.
    """

    def check(self, authResults, policy=None, rspamd=None, message=MESSAGE) -> inbound.Verdict:
        checker = inbound.InboundChecker(HOST, policy or inbound.InboundPolicy(), ImmediateRunner(), task.Clock(),
                                         rspamd=rspamd, authenticate=lambda m, s: authResults)
        return self.successResultOf(checker.check(message, SESSION))

    def test_pass(self) -> None:
        """
        A pass is delivered with the results on top.
        """
        verdict = self.check(results())
        self.assertEqual(verdict, inbound.Verdict(None, AR_PASS + MESSAGE, "spf=pass dkim=none dmarc=pass", "deliver"))

    def test_reject(self) -> None:
        """
        DMARC fail with the disposition reject: 550 5.7.1.
        """
        verdict = self.check(results("fail", "reject"))
        self.assertEqual((verdict.reply, verdict.action), (inbound.DMARC_REJECTED, "reject"))
        self.assertEqual(text(verdict.reply), "550 5.7.1 Message rejected by the sender domain's DMARC policy")

    def test_rejectTurnedOff(self) -> None:
        """
        With C{dmarc-reject = no} a p=reject failure is quarantined.
        """
        verdict = self.check(results("fail", "reject"), inbound.InboundPolicy(dmarcReject=False))
        self.assertIsNone(verdict.reply)
        self.assertEqual(verdict.action, "quarantine")
        self.assertIn(b"X-Spam-Flag: YES\r\n", verdict.message)

    def test_quarantine(self) -> None:
        """
        DMARC fail with the disposition quarantine: the subject tag and
        C{X-Spam-Flag: YES}.
        """
        verdict = self.check(results("fail", "quarantine"))
        self.assertIsNone(verdict.reply)
        self.assertTrue(verdict.message.endswith(
            b"X-Spam-Flag: YES\r\nReceived: from client.example\r\nFrom: x@remote.example\r\n"
            b"Subject: [SPAM] hello\r\n\r\nbody\r\n"), verdict.message)

    def test_quarantineOff(self) -> None:
        """
        With C{dmarc-quarantine = no} a quarantine failure is only recorded.
        """
        verdict = self.check(results("fail", "quarantine"), inbound.InboundPolicy(dmarcQuarantine=False))
        self.assertEqual(verdict.action, "deliver")
        self.assertNotIn(b"X-Spam-Flag", verdict.message)

    def test_quarantineNoSubject(self) -> None:
        """
        A quarantined message without a subject gets one holding the tag.
        """
        verdict = self.check(results("fail", "quarantine"), message=b"Received: x\r\n\r\nbody\r\n")
        self.assertTrue(verdict.message.endswith(b"X-Spam-Flag: YES\r\nSubject: [SPAM]\r\nReceived: x\r\n\r\nbody\r\n"))

    def test_tagNotRepeated(self) -> None:
        """
        A subject that already starts with the tag is kept; an incoming
        C{X-Spam-Flag} is replaced.
        """
        message = b"Received: x\r\nX-Spam-Flag: NO\r\nSubject: [SPAM] hi\r\n\r\nbody\r\n"
        verdict = self.check(results("fail", "quarantine"), message=message)
        self.assertTrue(verdict.message.endswith(b"X-Spam-Flag: YES\r\nReceived: x\r\nSubject: [SPAM] hi\r\n\r\nbody\r\n"),
                        verdict.message)

    def test_allowList(self) -> None:
        """
        A failure of an allow-listed domain, or of a subdomain of one, is
        recorded only.
        """
        policy = inbound.InboundPolicy(allowDomains=frozenset({"remote.example"}))
        self.assertEqual(self.check(results("fail", "reject"), policy).action, "deliver")
        self.assertEqual(self.check(results("fail", "reject", "lists.remote.example"), policy).action, "deliver")
        self.assertEqual(self.check(results("fail", "reject", "xremote.example"), policy).action, "reject")

    def test_temperrorDelivered(self) -> None:
        """
        A DNS temperror is delivered with the result recorded by default.
        """
        verdict = self.check(results("temperror", spf="temperror"))
        self.assertIsNone(verdict.reply)
        self.assertIn(b"spf=temperror smtp.mailfrom=x@remote.example;\r\n\tdkim=none;\r\n"
                      b"\tdmarc=temperror header.from=remote.example\r\n", verdict.message)

    def test_temperrorDeferred(self) -> None:
        """
        With C{temperror = defer}, a temperror gets 451 4.4.3.
        """
        verdict = self.check(results("temperror"), inbound.InboundPolicy(temperrorDefer=True))
        self.assertEqual(text(verdict.reply), "451 4.4.3 Temporary DNS failure checking the sender, try again later")

    def test_checksOff(self) -> None:
        """
        With C{checks = no} the message is stored as it came, and nothing
        is looked up.
        """
        runner = PendingRunner()
        checker = inbound.InboundChecker(HOST, inbound.InboundPolicy(checks=False), runner, task.Clock(),
                                         authenticate=lambda m, s: results())
        verdict = self.successResultOf(checker.check(MESSAGE, SESSION))
        self.assertEqual(verdict, inbound.Verdict(None, MESSAGE, "checks=off", "deliver"))
        self.assertEqual(runner.calls, [])

    def test_deadline(self) -> None:
        """
        Checks that have not answered by the deadline (and its grace) are
        recorded as temperror, and the message delivered.
        """
        clock = task.Clock()
        checker = inbound.InboundChecker(HOST, inbound.InboundPolicy(deadline=20), PendingRunner(), clock,
                                         authenticate=lambda m, s: results())
        d = checker.check(MESSAGE, SESSION)
        clock.advance(20 + inbound.DEADLINE_GRACE - 0.1)
        self.assertNoResult(d)
        clock.advance(0.1)
        verdict = self.successResultOf(d)
        self.assertEqual(verdict.summary, "spf=temperror dkim=none dmarc=temperror")
        self.assertTrue(verdict.message.startswith(
            b"Authentication-Results: mail.example.org;\r\n\tspf=temperror smtp.mailfrom=remote.example;\r\n"
            b"\tdkim=none;\r\n\tdmarc=temperror\r\n"), verdict.message)

    def test_rspamdReject(self) -> None:
        """
        rspamd's C{reject}: 550 5.7.1; it was given the message and the
        session.
        """
        rspamd = FakeRspamd({"action": "reject", "score": 20.5})
        verdict = self.check(results(), rspamd=rspamd)
        self.assertEqual(text(verdict.reply), "550 5.7.1 Message rejected as spam")
        self.assertEqual(verdict.summary, "spf=pass dkim=none dmarc=pass rspamd=reject")
        self.assertEqual(rspamd.calls, [(MESSAGE, SESSION)])

    def test_rspamdSoftReject(self) -> None:
        """
        C{soft reject} and C{greylist}: 451 4.7.1.
        """
        for action in ("soft reject", "greylist"):
            verdict = self.check(results(), rspamd=FakeRspamd({"action": action}))
            self.assertEqual(text(verdict.reply), "451 4.7.1 Try again later")

    def test_rspamdAddHeader(self) -> None:
        """
        C{add header}: tagged, flagged, scored, and rspamd's milter fields
        added (folding kept); names that are not C{X-} fields, or that are
        pop3gw's own spam fields, are dropped.
        """
        answer = {"action": "add header", "score": 7.25, "milter": {"add_headers": {
            "X-Spamd-Result": {"value": "default: False [7.25 / 15.00];\n\tBAYES_SPAM(5.10)", "order": 0},
            "X-Rspamd-Server": "filter1",
            "Bad Name": "x",
            "Authentication-Results": "forged",
            "Received": "forged",
            "X-Spam-Flag": "NO",
        }}}
        verdict = self.check(results(), rspamd=FakeRspamd(answer))
        self.assertEqual(verdict.action, "quarantine")
        self.assertEqual(
            verdict.message,
            AR_PASS + b"X-Spam-Flag: YES\r\nX-Spam-Score: 7.25\r\n"
            b"X-Spamd-Result: default: False [7.25 / 15.00];\r\n\tBAYES_SPAM(5.10)\r\nX-Rspamd-Server: filter1\r\n"
            b"Received: from client.example\r\nFrom: x@remote.example\r\nSubject: [SPAM] hello\r\n\r\nbody\r\n",
        )

    def test_rspamdRewriteSubject(self) -> None:
        """
        C{rewrite subject}: rspamd's subject replaces the message's.
        """
        verdict = self.check(results(), rspamd=FakeRspamd({"action": "rewrite subject", "subject": "*** SPAM *** hello"}))
        self.assertIn(b"\r\nSubject: *** SPAM *** hello\r\n\r\n", verdict.message)

    def test_rspamdNoAction(self) -> None:
        """
        C{no action}: delivered with the score only.
        """
        verdict = self.check(results(), rspamd=FakeRspamd({"action": "no action", "score": -0.5}))
        self.assertEqual(verdict.message, AR_PASS + b"X-Spam-Score: -0.50\r\n" + MESSAGE)

    def test_rspamdFailOpen(self) -> None:
        """
        rspamd unusable, fail-open (the default): delivered, and a warning
        logged.
        """
        verdict = self.check(results(), rspamd=FakeRspamd(inbound.RspamdError("HTTP 500")))
        self.assertEqual((verdict.reply, verdict.action), (None, "deliver"))
        self.assertEqual(verdict.summary, "spf=pass dkim=none dmarc=pass rspamd=unavailable")
        self.flushLoggedErrors()

    def test_logLinesNameTheListener(self) -> None:
        """
        The checks' warnings start with the listener they ran for: C{mx}
        by default, C{lmtp} for a message that came over LMTP.
        """
        from twisted.logger import formatEvent, globalLogPublisher

        events: list = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)

        def broken(message, session):
            raise RuntimeError("resolver exploded")

        for service in ("mx", "lmtp"):
            checker = inbound.InboundChecker(HOST, inbound.InboundPolicy(), ImmediateRunner(), task.Clock(),
                                             rspamd=FakeRspamd(inbound.RspamdError("HTTP 500")), authenticate=broken)
            self.successResultOf(checker.check(MESSAGE, SESSION, service=service))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)
        self.assertEqual(
            [formatEvent(e) for e in events if "rspamd" in formatEvent(e) or "checks failed" in formatEvent(e)],
            [
                "mx: authentication checks failed",
                'mx: rspamd not usable: "RspamdError: HTTP 500"',
                "lmtp: authentication checks failed",
                'lmtp: rspamd not usable: "RspamdError: HTTP 500"',
            ],
        )

    def test_rspamdFailClosed(self) -> None:
        """
        rspamd unusable, fail-closed: 451 4.7.1.
        """
        policy = inbound.InboundPolicy(rspamdFailClosed=True)
        verdict = self.check(results(), policy, rspamd=FakeRspamd(inbound.RspamdError("HTTP 500")))
        self.assertEqual(text(verdict.reply), "451 4.7.1 The message could not be checked, try again later")

    def test_dmarcRejectWinsOverRspamd(self) -> None:
        """
        A DMARC rejection stands whatever rspamd says.
        """
        verdict = self.check(results("fail", "reject"), rspamd=FakeRspamd({"action": "no action"}))
        self.assertEqual(verdict.reply, inbound.DMARC_REJECTED)


class AuthservIDTests(SynchronousTestCase):
    """
    L{inbound.authservID}.
    """

    def test_forms(self) -> None:
        """
        The id, lower-cased, after comments, before a version or C{;}.
        """
        self.assertEqual(inbound.authservID(b"Authentication-Results: Mail.Example.ORG; spf=pass\r\n"),
                         "mail.example.org")
        self.assertEqual(inbound.authservID(b"Authentication-Results: (c (nested)) mail.example.org 1;\r\n none\r\n"),
                         "mail.example.org")
        self.assertEqual(inbound.authservID(b'Authentication-Results: "mail.example.org"; none\r\n'),
                         "mail.example.org")
        self.assertEqual(inbound.authservID(b"Authentication-Results:\r\n\tmail.example.org;none\r\n"),
                         "mail.example.org")
        self.assertEqual(inbound.authservID(b"Authentication-Results: ;\r\n"), "")


class RspamdResource(resource.Resource):
    """
    A fake rspamd: C{/checkv2} answers C{answer} and records requests.
    """

    isLeaf = True

    def __init__(self, answer: bytes, code: int = 200, hang: bool = False) -> None:
        super().__init__()
        self.answer = answer
        self.code = code
        self.hang = hang
        self.requests: list = []

    def render_POST(self, request):
        self.requests.append((request.path, dict(request.requestHeaders.getAllRawHeaders()), request.content.read()))
        if self.hang:
            return server.NOT_DONE_YET
        request.setResponseCode(self.code)
        return self.answer


class RspamdClientTests(TestCase):
    """
    L{inbound.RspamdClient} against a fake rspamd on loopback.
    """

    def serve(self, fake: RspamdResource) -> inbound.RspamdClient:
        site = server.Site(fake)
        site.noisy = False
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        agent = Agent(reactor)
        return inbound.RspamdClient(agent, f"http://127.0.0.1:{port.getHost().port}/checkv2", reactor, 5.0, HOST)

    def tearDown(self):
        # Let the HTTP connection close before the reactor is checked.
        return task.deferLater(reactor, 0, lambda: None)

    def test_request(self):
        """
        The message is POSTed to /checkv2 with the envelope in rspamd's
        headers; the JSON answer is returned.
        """
        fake = RspamdResource(json.dumps({"action": "add header", "score": 6.0}).encode())
        d = self.serve(fake).check(MESSAGE, SESSION)

        def check(answer):
            self.assertEqual(answer, {"action": "add header", "score": 6.0})
            [(path, headers, body)] = fake.requests
            self.assertEqual(path, b"/checkv2")
            self.assertEqual(body, MESSAGE)
            self.assertEqual(headers[b"Ip"], [b"192.0.2.7"])
            self.assertEqual(headers[b"Helo"], [b"client.example"])
            self.assertEqual(headers[b"From"], [b"x@remote.example"])
            self.assertEqual(headers[b"Rcpt"], [b"bob@example.org", b"alice@example.org"])
            self.assertEqual(headers[b"Hostname"], [b"mx.client.example"])
            self.assertEqual(headers[b"Mta-Name"], [b"mail.example.org"])

        d.addCallback(check)
        return d

    def test_httpError(self):
        """
        A non-200 answer is an L{inbound.RspamdError}.
        """
        d = self.serve(RspamdResource(b"oops", code=500)).check(MESSAGE, SESSION)
        return self.assertFailure(d, inbound.RspamdError)

    def test_notJSON(self):
        """
        An answer that is not rspamd's JSON is an L{inbound.RspamdError}.
        """
        d = self.serve(RspamdResource(b"[1, 2]")).check(MESSAGE, SESSION)
        return self.assertFailure(d, inbound.RspamdError)

    def test_timeout(self):
        """
        No answer within the timeout: the request is cancelled
        (C{TimeoutError}), and a checker lets the message through.
        """
        fake = RspamdResource(b"", hang=True)
        client = self.serve(fake)
        client.timeout = 0.2
        checker = inbound.InboundChecker(HOST, inbound.InboundPolicy(), ImmediateRunner(), reactor, rspamd=client,
                                         authenticate=lambda m, s: results())
        d = checker.check(MESSAGE, SESSION)
        d.addCallback(lambda verdict: self.assertEqual((verdict.reply, verdict.summary),
                                                       (None, "spf=pass dkim=none dmarc=pass rspamd=unavailable")))
        return d
