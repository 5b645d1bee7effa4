"""
MTA-STS (RFC 8461): the policy file and TXT record parsers, MX pattern
matching, and the policy cache with its fetch and lookup.
"""

from __future__ import annotations

import json
import os
import stat

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from pop3gw.queue import listEntries
from pop3gw.relay import mtasts
from pop3gw.relay.mtasts import (
    CacheFile,
    Policy,
    PolicyError,
    PolicySource,
    mxMatches,
    parsePolicy,
    policyId,
)
from pop3gw.runner import ImmediateRunner

POLICY = b"version: STSv1\r\nmode: enforce\r\nmx: mail.example.com\r\nmx: *.example.net\r\nmax_age: 86400\r\n"


class ParseTests(SynchronousTestCase):
    def test_policy(self) -> None:
        """
        The RFC 8461 3.2 example parses: mode, every mx pattern in order,
        max_age; LF line ends too; unknown keys are ignored.
        """
        self.assertEqual(
            parsePolicy(POLICY),
            Policy("enforce", ("mail.example.com", "*.example.net"), 86400),
        )
        self.assertEqual(
            parsePolicy(b"version: STSv1\nmode: testing\nmx: MX.example.org.\nmax_age: 5\nx-extra: 1\n"),
            Policy("testing", ("mx.example.org",), 5),
        )

    def test_badPolicies(self) -> None:
        """
        A policy without version, with an unknown mode, without max_age,
        with a max_age over a year, or (unless mode none) without mx is
        refused.
        """
        for bad in (
            b"mode: enforce\nmx: a.example\nmax_age: 5\n",
            b"version: STSv1\nmode: strict\nmx: a.example\nmax_age: 5\n",
            b"version: STSv1\nmode: enforce\nmx: a.example\n",
            b"version: STSv1\nmode: enforce\nmx: a.example\nmax_age: 31557601\n",
            b"version: STSv1\nmode: enforce\nmax_age: 5\n",
            b"\xff\xfe",
        ):
            self.assertRaises(PolicyError, parsePolicy, bad)
        self.assertEqual(parsePolicy(b"version: STSv1\nmode: none\nmax_age: 5\n"), Policy("none", (), 5))

    def test_record(self) -> None:
        """
        The TXT record's id is found only in exactly one record starting
        with C{v=STSv1}.
        """
        self.assertEqual(policyId(["v=STSv1; id=20160831085700Z;"]), "20160831085700Z")
        self.assertEqual(policyId(["other", "v=STSv1;id=abc"]), "abc")
        self.assertIsNone(policyId([]))
        self.assertIsNone(policyId(["v=STSv1; id=a", "v=STSv1; id=b"]))
        self.assertIsNone(policyId(["v=STSv1; id=a b"]))
        self.assertIsNone(policyId(["v=STSv1;"]))

    def test_mxMatches(self) -> None:
        """
        A pattern matches its host name exactly (any case, trailing dot
        ignored); a wildcard matches exactly one leftmost label.
        """
        self.assertTrue(mxMatches("mail.example.com", "MAIL.example.com."))
        self.assertTrue(mxMatches("*.example.net", "mx1.example.net"))
        self.assertFalse(mxMatches("*.example.net", "a.b.example.net"))
        self.assertFalse(mxMatches("*.example.net", "example.net"))
        self.assertFalse(mxMatches("mail.example.com", "mail.example.com.evil.example"))


class FakeSource:
    """
    The DNS and HTTPS sides of a L{PolicySource}, answered by the test.
    """

    def __init__(self) -> None:
        self.txt: dict = {}
        self.files: dict = {}
        self.fetches: list = []

    def lookupTXT(self, name: str) -> defer.Deferred:
        found = self.txt.get(name, [])
        if isinstance(found, Exception):
            return defer.fail(found)
        return defer.succeed(found)

    def fetch(self, domain: str) -> defer.Deferred:
        self.fetches.append(domain)
        found = self.files.get(domain)
        if isinstance(found, Exception) or found is None:
            return defer.fail(found or OSError("connection refused"))
        return defer.succeed(found)


class PolicySourceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.fake = FakeSource()
        self.source = PolicySource(self.clock, self.fake.lookupTXT, self.fake.fetch)

    def policy(self, domain: str = "example.com"):
        return self.successResultOf(self.source.policyFor(domain))

    def test_noRecordNoPolicy(self) -> None:
        """
        A domain without an C{_mta-sts} record has no policy, and nothing
        is fetched.
        """
        self.assertIsNone(self.policy())
        self.assertEqual(self.fake.fetches, [])

    def test_fetchedAndCached(self) -> None:
        """
        The policy is fetched once and used from the cache while its
        record's id is unchanged; a new id fetches it again.
        """
        self.fake.txt["_mta-sts.example.com"] = ["v=STSv1; id=1"]
        self.fake.files["example.com"] = POLICY
        self.assertEqual(self.policy().mode, "enforce")
        self.assertEqual(self.policy().mode, "enforce")
        self.assertEqual(self.fake.fetches, ["example.com"])
        self.fake.txt["_mta-sts.example.com"] = ["v=STSv1; id=2"]
        self.fake.files["example.com"] = POLICY.replace(b"enforce", b"testing")
        self.assertEqual(self.policy().mode, "testing")
        self.assertEqual(self.fake.fetches, ["example.com", "example.com"])

    def test_cacheOutlivesFailures(self) -> None:
        """
        While the cached policy's max_age has not passed, it is used when
        the record disappears, the lookup fails, or the new policy cannot
        be fetched (RFC 8461 5.1: a downgrade attacker must not remove
        it); after max_age, it is gone.
        """
        self.fake.txt["_mta-sts.example.com"] = ["v=STSv1; id=1"]
        self.fake.files["example.com"] = POLICY
        self.policy()
        del self.fake.txt["_mta-sts.example.com"]
        self.assertEqual(self.policy().mode, "enforce")
        self.fake.txt["_mta-sts.example.com"] = OSError("timeout")
        self.assertEqual(self.policy().mode, "enforce")
        self.fake.txt["_mta-sts.example.com"] = ["v=STSv1; id=2"]
        del self.fake.files["example.com"]
        self.assertEqual(self.policy().mode, "enforce")
        self.clock.advance(86401)
        self.assertIsNone(self.policy())

    def test_unfetchableWithoutCache(self) -> None:
        """
        A record whose policy cannot be fetched or parsed, with nothing
        cached, means no policy (delivery stays opportunistic).
        """
        self.fake.txt["_mta-sts.example.com"] = ["v=STSv1; id=1"]
        self.assertIsNone(self.policy())
        self.fake.files["example.com"] = b"garbage"
        self.assertIsNone(self.policy())


class PersistedCacheTests(SynchronousTestCase):
    """
    The cache kept in a file across restarts (RFC 8461 5.1: a policy is
    honoured for its max_age even when a later fetch fails).
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1700000000)
        self.fake = FakeSource()
        self.path = os.path.join(os.path.abspath(self.mktemp()), "mta-sts.json")
        os.makedirs(os.path.dirname(self.path))

    def source(self) -> PolicySource:
        return PolicySource(self.clock, self.fake.lookupTXT, self.fake.fetch,
                            CacheFile(self.path, ImmediateRunner()))

    def test_keptAcrossRestart(self) -> None:
        """
        A fetched policy is written to the file (mode 0600); a new source
        on the same file (a restart) honours it without a fetch while the
        record is gone and the fetch fails, until its max_age passes.
        """
        self.fake.txt["_mta-sts.example.com"] = ["v=STSv1; id=1"]
        self.fake.files["example.com"] = POLICY
        self.successResultOf(self.source().policyFor("example.com"))
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        with open(self.path) as f:
            self.assertEqual(json.load(f), {"version": 1, "policies": {"example.com": {
                "id": "1", "mode": "enforce", "mx": ["mail.example.com", "*.example.net"], "max_age": 86400,
                "expires": 1700086400}}})
        del self.fake.txt["_mta-sts.example.com"]
        del self.fake.files["example.com"]
        restarted = self.source()
        self.assertEqual(self.successResultOf(restarted.policyFor("example.com")),
                         Policy("enforce", ("mail.example.com", "*.example.net"), 86400))
        self.fake.txt["_mta-sts.example.com"] = ["v=STSv1; id=2"]
        self.assertEqual(self.successResultOf(restarted.policyFor("example.com")).mode, "enforce")
        self.assertEqual(self.fake.fetches, ["example.com", "example.com"])
        self.clock.advance(86400)
        self.assertIsNone(self.successResultOf(self.source().policyFor("example.com")))

    def test_sameIdNotRefetchedAfterRestart(self) -> None:
        """
        After a restart, a record whose id is the cached one's uses the
        cached policy without a fetch.
        """
        self.fake.txt["_mta-sts.example.com"] = ["v=STSv1; id=1"]
        self.fake.files["example.com"] = POLICY
        self.successResultOf(self.source().policyFor("example.com"))
        self.assertEqual(self.successResultOf(self.source().policyFor("example.com")).mode, "enforce")
        self.assertEqual(self.fake.fetches, ["example.com"])

    def test_corruptFileIsEmpty(self) -> None:
        """
        A file that is not the cache (not JSON, a wrong shape, a bad
        entry, too large) is an empty cache, with one warning line.
        """
        self.fake.txt["_mta-sts.example.com"] = ["v=STSv1; id=1"]
        bad = [
            b"{not json",
            b"[]",
            json.dumps({"version": 1, "policies": {"example.com": {"id": "1", "mode": "fierce", "mx": [],
                                                                   "max_age": 1, "expires": 1800000000}}}).encode(),
            b" " * (mtasts.MAX_CACHE_FILE + 1),
        ]
        for data in bad:
            with open(self.path, "wb") as f:
                f.write(data)
            with capturedLogs() as events:
                source = self.source()
            self.assertIsNone(self.successResultOf(source.policyFor("example.com")))
            self.assertEqual([formatEvent(e) for e in events if e.get("log_level").name != "info"],
                             [f"mta-sts: {self.path} is not a policy cache; starting with an empty one"])

    def test_bounded(self) -> None:
        """
        At most L{mtasts.MAX_CACHED_DOMAINS} policies are kept: the ones
        that expire first make room.
        """
        self.patch(mtasts, "MAX_CACHED_DOMAINS", 2)
        source = self.source()
        for domain, age in (("a.example", 300), ("b.example", 100), ("c.example", 200)):
            self.fake.txt[f"_mta-sts.{domain}"] = ["v=STSv1; id=1"]
            self.fake.files[domain] = POLICY.replace(b"86400", str(age).encode())
            self.successResultOf(source.policyFor(domain))
        with open(self.path) as f:
            self.assertEqual(sorted(json.load(f)["policies"]), ["a.example", "c.example"])


class _StaticPolicies:
    """
    A policy source answering one policy for every domain.
    """

    def __init__(self, policy) -> None:
        self.policy = policy
        self.asked: list = []

    def policyFor(self, domain: str) -> defer.Deferred:
        self.asked.append(domain)
        return defer.succeed(self.policy)


class DispatchTests(SynchronousTestCase):
    """
    What direct MX delivery does with a domain's policy.
    """

    def setUp(self) -> None:
        from tests.queuehelpers import FakeResolver
        from tests.test_relay_service import RelayTestMixin

        class Harness(RelayTestMixin):
            pass

        self.h = Harness()
        self.h.mktemp = self.mktemp
        self.h.successResultOf = self.successResultOf
        self.h.addCleanup = self.addCleanup
        self.contexts: list = []

        class Result:
            verified = True

        class Context:
            result = Result()

        self.Context = Context
        self.h.setUpRelay(
            resolver=FakeResolver(mx={"remote.example": [(10, "mx1.remote.example"), (20, "backup.elsewhere.example")]}),
            clientTLS=lambda host, verify: self.contexts.append((host, verify)) or Context(),
        )

    def deliverWith(self, policy, replies=None):
        """
        Queue one message for bob@remote.example under C{policy}; the
        first MX host connected to answers C{replies}, if given.

        @return: the entry and the relay's log lines.
        """
        self.h.relay.dispatcher.mtaSTS = _StaticPolicies(policy)
        self.h.start()
        entry = self.h.enqueue()
        with capturedLogs() as events:
            self.h.clock.advance(0)
            if replies is not None:
                self.sent = self.h.connects[0].serve(replies)
        return entry, [formatEvent(e) for e in events]

    def test_enforceVerifiedTLS(self) -> None:
        """
        Under an C{enforce} policy only the MX hosts it names are tried
        (the other is logged as skipped), STARTTLS is required and the
        certificate verified (C{verify=True}).
        """
        from tests.queuehelpers import GREETING, successReplies

        policy = Policy("enforce", ("*.remote.example",), 86400)
        replies = [GREETING, b"250-mx\r\n250 STARTTLS\r\n", b"220 go\r\n"] + successReplies()[1:]
        _, lines = self.deliverWith(policy, replies)
        self.assertTrue(any("host=backup.elsewhere.example is not in the enforce policy (skipped)" in line for line in lines))
        self.assertTrue(any("host=mx1.remote.example:25 delivered=1 deferred=0 failed=0 tls=yes verified=yes" in line for line in lines))
        self.assertEqual([e.host for e in self.h.connects], ["mx1.remote.example"])
        self.assertEqual(self.contexts, [("mx1.remote.example", True)])
        self.assertEqual(listEntries(self.h.root), [])

    def test_enforceWithoutSTARTTLSDefers(self) -> None:
        """
        Under an C{enforce} policy, an MX host that offers no STARTTLS gets
        no mail: the recipient is deferred, never sent in plaintext.
        """
        from tests.queuehelpers import GREETING

        entry, _ = self.deliverWith(Policy("enforce", ("mx1.remote.example",), 86400), [GREETING, b"250 mx\r\n", b"221 bye\r\n"])
        self.assertEqual(self.sent, [b"EHLO mx.example.org\r\n", b"QUIT\r\n", b""])
        [stored] = listEntries(self.h.root)
        self.assertEqual([r.state.value for r in stored.recipients], ["pending"])
        self.assertEqual(len(self.h.connects), 1)

    def test_enforceNoMatchingHost(self) -> None:
        """
        An C{enforce} policy naming none of the MX hosts defers the
        recipients (4.7.5) without connecting anywhere.
        """
        entry, lines = self.deliverWith(Policy("enforce", ("mx.other.example",), 86400))
        self.assertEqual(self.h.connects, [])
        state = self.h.json(entry)
        self.assertEqual(state["recipients"][0]["state"], "pending")
        self.assertEqual(state["lastError"], "bob@remote.example: MTA-STS policy of remote.example names none of its MX hosts")

    def test_testingOnlyLogs(self) -> None:
        """
        Under a C{testing} policy, delivery is as without one
        (opportunistic TLS, C{verify=None}, every MX host), and what
        C{enforce} would have refused is logged.
        """
        from tests.queuehelpers import GREETING, successReplies

        self.Context.result.verified = False
        replies = [GREETING, b"250-mx\r\n250 STARTTLS\r\n", b"220 go\r\n"] + successReplies()[1:]
        _, lines = self.deliverWith(Policy("testing", ("mx9.remote.example",), 86400), replies)
        self.assertEqual(self.contexts, [("mx1.remote.example", None)])
        self.assertEqual(listEntries(self.h.root), [])
        mtaSTS = [line.split(" ", 2)[2] for line in lines if line.startswith("mta-sts: ")]
        self.assertEqual(
            mtaSTS,
            [
                "domain=remote.example host=mx1.remote.example is not in the testing policy",
                "domain=remote.example host=backup.elsewhere.example is not in the testing policy",
                "domain=remote.example host=mx1.remote.example no verified TLS (testing policy: not enforced)",
            ],
        )
