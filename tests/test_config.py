"""
Command-line options and the INI file merge into one L{Config}.
"""

import os

from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from pop3gw.config import ConfigError, Options, buildConfig, parseACME, parseRelayHost


def parse(*args):
    o = Options()
    o.parseOptions(list(args))
    return o.config


class OptionsTests(SynchronousTestCase):
    def writeINI(self, text: str) -> str:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_defaults(self) -> None:
        """
        With no options: POP3 on tcp:1110 and submission on tcp:1587, both
        on loopback, no implicit TLS, data in ./pop3gw-data, policy loopback,
        40 MiB limit.
        """
        c = parse()
        self.assertEqual(c.listeners["pop3"], ("tcp:1110:interface=127.0.0.1",))
        self.assertEqual(c.listeners["submission"], ("tcp:1587:interface=127.0.0.1",))
        self.assertEqual(c.listeners["pop3s"], ())
        self.assertEqual(c.dataDir, os.path.abspath("pop3gw-data"))
        self.assertEqual(c.plaintextAuth, "loopback")
        self.assertEqual(c.maxMessageSize, 41943040)

    def test_relayConnectionsDefault(self) -> None:
        """
        The relay sends at most 20 messages at once by default, Postfix's
        default concurrency per destination.
        """
        self.assertEqual(parse().limits["relay-connections"], 20)

    def test_repeatedEndpointReplacesDefault(self) -> None:
        """
        An endpoint option given (twice) replaces that listener's default;
        C{none} disables a listener.
        """
        c = parse("--pop3", "tcp:110", "--pop3", "tcp:2110", "--submission", "none")
        self.assertEqual(c.listeners["pop3"], ("tcp:110", "tcp:2110"))
        self.assertEqual(c.listeners["submission"], ())

    def test_iniThenCommandLine(self) -> None:
        """
        INI values apply, lists split on commas and newlines, and the command
        line overrides the INI file.
        """
        ini = self.writeINI(
            "[pop3gw]\ndata-dir = /srv/x\ndomain = Example.ORG, example.net\n"
            "pop3 = tcp:110\n  tcp:2110\nplaintext-auth = never\n[limits]\nfailure-delay = 0.5\n"
        )
        c = parse("--config", ini, "--plaintext-auth", "always")
        self.assertEqual(c.dataDir, "/srv/x")
        self.assertEqual(c.domains, ("example.org", "example.net"))
        self.assertEqual(c.listeners["pop3"], ("tcp:110", "tcp:2110"))
        self.assertEqual(c.plaintextAuth, "always")
        self.assertEqual(c.limits["failure-delay"], 0.5)

    def test_badValues(self) -> None:
        """
        Invalid values are usage errors with one clear line.
        """
        for args in (
            ["--plaintext-auth", "sometimes"],
            ["--max-message-size", "lots"],
            ["--domain", "a/b"],
            ["--tls-cert", "x.pem"],
            ["--relay-host", "host:notaport"],
            ["--relay-host", ""],
            ["--hostname", "bad host name"],
        ):
            self.assertRaises(usage.UsageError, Options().parseOptions, args)

    def test_store(self) -> None:
        """
        C{--store} is C{maildir} by default; a C{postgresql://} URI is kept
        as given, from the command line or the INI file's C{store} key,
        with the C{[limits] database-threads} setting; anything else is
        refused with one line.
        """
        self.assertEqual(parse().store, "maildir")
        self.assertFalse(parse().usesDatabase)
        self.assertEqual(parse().limits["database-threads"], 10)
        uri = "postgresql://pop3gw@db1,db2/mail?target_session_attrs=read-write"
        self.assertEqual(parse("--store", uri).store, uri)
        self.assertTrue(parse("--store", uri).usesDatabase)
        ini = self.writeINI(f"[pop3gw]\nstore = {uri}\n[limits]\ndatabase-threads = 4\n")
        config = parse("--config", ini)
        self.assertEqual((config.store, config.limits["database-threads"]), (uri, 4))
        self.assertEqual(parse("--config", ini, "--store", "maildir").store, "maildir")
        with self.assertRaises(usage.UsageError) as caught:
            Options().parseOptions(["--store", "mysql://x/y"])
        self.assertEqual(str(caught.exception), "store: must be maildir or a postgresql:// URI")
        zero = self.writeINI("[limits]\ndatabase-threads = 0\n")
        self.assertRaises(usage.UsageError, Options().parseOptions, ["--config", zero])

    def test_lmtpListener(self) -> None:
        """
        C{--lmtp} is off by default, repeatable, and C{none} turns it off.
        """
        self.assertEqual(buildConfig({}, None).listeners["lmtp"], ())
        options = Options()
        options.parseOptions(["--lmtp", "unix:/run/pop3gw/lmtp", "--lmtp", "tcp:24:interface=127.0.0.1"])
        self.assertEqual(options.config.listeners["lmtp"], ("unix:/run/pop3gw/lmtp", "tcp:24:interface=127.0.0.1"))
        options = Options()
        options.parseOptions(["--lmtp", "none"])
        self.assertEqual(options.config.listeners["lmtp"], ())

    def test_mxListener(self) -> None:
        """
        C{--mx} is off by default, repeatable, and C{none} turns it off
        again.
        """
        self.assertEqual(buildConfig({}, None).listeners["mx"], ())
        options = Options()
        options.parseOptions(["--mx", "tcp:25", "--mx", "tcp:2525:interface=127.0.0.1"])
        self.assertEqual(options.config.listeners["mx"], ("tcp:25", "tcp:2525:interface=127.0.0.1"))
        options = Options()
        options.parseOptions(["--mx", "none"])
        self.assertEqual(options.config.listeners["mx"], ())

    def test_postfixMapListener(self) -> None:
        """
        C{--postfix-map} is off by default, repeatable, settable in the INI
        file, and C{none} turns it off again.
        """
        self.assertEqual(buildConfig({}, None).listeners["postfix-map"], ())
        options = Options()
        options.parseOptions(["--postfix-map", "unix:/run/pop3gw/map", "--postfix-map", "tcp:7000:interface=127.0.0.1"])
        self.assertEqual(options.config.listeners["postfix-map"], ("unix:/run/pop3gw/map", "tcp:7000:interface=127.0.0.1"))
        options = Options()
        options.parseOptions(["--postfix-map", "none"])
        self.assertEqual(options.config.listeners["postfix-map"], ())
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("[pop3gw]\npostfix-map = unix:/run/pop3gw/map\n")
        self.assertEqual(buildConfig({}, path).listeners["postfix-map"], ("unix:/run/pop3gw/map",))

    def test_badINI(self) -> None:
        """
        Unknown sections and keys, and an unreadable file, are refused.
        """
        for text in (
            "[nope]\n",
            "[pop3gw]\ncolour = blue\n",
            "[limits]\nspeed = 3\n",
            "[relay]\npassword = x\n",
            "[limits]\nhash-threads = 0\n",
            "[limits]\nrelay-connections = 0\n",
            "[pop3gw]\nrelay-host = smtp.example\n[relay]\nusername = gw\n",
            "[relay]\nusername = gw\npassword-file = /etc/pw\n",
        ):
            self.assertRaises(ConfigError, buildConfig, {}, self.writeINI(text))
        self.assertRaises(ConfigError, buildConfig, {}, self.mktemp())

    def test_relayHost(self) -> None:
        """
        C{HOST[:PORT]} and C{[v6]:PORT} parse; without a port the relay
        service picks it (L{None}).
        """
        self.assertEqual(parseRelayHost("smtp.example"), ("smtp.example", None))
        self.assertEqual(parseRelayHost("smtp.example:587"), ("smtp.example", 587))
        self.assertEqual(parseRelayHost("[::1]:2525"), ("::1", 2525))
        self.assertRaises(ConfigError, parseRelayHost, "h:0")


class HostnameTests(SynchronousTestCase):
    def test_defaultHostnameFallsBack(self) -> None:
        """
        Without C{--hostname}, the system's FQDN is used, or C{localhost}
        when that is not a valid host name.
        """
        import socket

        from pop3gw import config

        self.patch(socket, "getfqdn", lambda: "mail.Example.org")
        self.assertEqual(parse().hostname, "mail.Example.org")
        self.patch(socket, "getfqdn", lambda: "bad_name here")
        self.assertEqual(config.defaultHostname(), "localhost")
        self.assertEqual(parse().hostname, "localhost")


class SampleConfigTests(SynchronousTestCase):
    SAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "etc", "pop3gw.ini")

    def test_sampleCoversEveryOptionAndParses(self) -> None:
        """
        etc/pop3gw.ini mentions every long option of C{twistd pop3gw}, and
        with the first commented value of each key uncommented it is a
        valid configuration.
        """
        import re

        with open(self.SAMPLE) as f:
            text = f.read()
        keys = set(re.findall(r"^#([a-z][a-z0-9-]*) = ", text, re.M))
        longOptions = {name for name, *_ in Options.optParameters} | {
            "domain", "pop3", "pop3s", "submission", "submissions", "mx", "lmtp", "postfix-map"}
        self.assertEqual(longOptions - {"config"} - keys, set())

        seen, lines = set(), []
        for line in text.splitlines():
            m = re.match(r"#([a-z][a-z0-9-]*) = (.*)", line)
            if m and m.group(1) not in seen:
                seen.add(m.group(1))
                lines.append(f"{m.group(1)} = {m.group(2)}")
            else:
                lines.append(line)
        uncommented = "\n".join(lines).replace("(this host's fully qualified name)", "mail.example.org")
        # [acme] and tls-cert exclude each other: the sample's [acme] is
        # checked apart, without tls-cert.
        acmeSection = re.search(r"^\[acme\]\n(.*?)^\[", uncommented, re.M | re.S).group(1)
        acme = parseACME(dict(re.findall(r"^([a-z-]+) = (.*)$", acmeSection, re.M)))
        self.assertEqual((acme.directory, acme.http), ("https://acme-v02.api.letsencrypt.org/directory", ("tcp:80",)))
        uncommented = uncommented.replace(acmeSection, "")
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(uncommented)
        config = buildConfig({}, path)
        self.assertEqual(config.dataDir, "/var/lib/pop3gw")
        self.assertEqual(config.relayPort, 587)
        self.assertEqual(config.listeners["pop3"], ("tcp:1110:interface=127.0.0.1",))


class AliasSettingsTests(SynchronousTestCase):
    """
    C{[pop3gw] postmaster} and C{recipient-delimiter}.
    """

    def build(self, text: str):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("[pop3gw]\n" + text)
        return buildConfig({}, path)

    def test_defaults(self) -> None:
        """
        No postmaster, and C{+} as the sub-address delimiter.
        """
        c = self.build("")
        self.assertEqual((c.postmaster, c.recipientDelimiter), (None, "+"))

    def test_values(self) -> None:
        """
        The postmaster is parsed as an address; an empty delimiter turns
        sub-addressing off.
        """
        from pop3gw.address import Address

        c = self.build("postmaster = Boss@Example.ORG\nrecipient-delimiter =\n")
        self.assertEqual((c.postmaster, c.recipientDelimiter), (Address("Boss", "example.org"), ""))
        self.assertEqual(self.build("recipient-delimiter = -+\n").recipientDelimiter, "-+")

    def test_bad(self) -> None:
        """
        A postmaster that is not an address, or a delimiter that cannot be
        in a local part, is one clear error.
        """
        e = self.assertRaises(ConfigError, self.build, "postmaster = nobody\n")
        self.assertEqual(str(e), "postmaster: 'nobody' is not an address (user@domain)")
        e = self.assertRaises(ConfigError, self.build, "recipient-delimiter = @\n")
        self.assertEqual(str(e), "recipient-delimiter: '@' holds a character that cannot be in a local part")


class MTASTSSettingTests(SynchronousTestCase):
    """
    C{[relay] mta-sts}: MTA-STS for direct MX delivery, on by default.
    """

    def test_values(self) -> None:
        """
        Default yes; C{no} turns it off; anything else is one error line.
        """
        path = self.mktemp()
        self.assertTrue(parse().mtaSTS)
        for text, expected in (("no", False), ("yes", True)):
            with open(path, "w") as f:
                f.write(f"[relay]\nmta-sts = {text}\n")
            self.assertEqual(buildConfig({}, path).mtaSTS, expected)
        with open(path, "w") as f:
            f.write("[relay]\nmta-sts = sometimes\n")
        e = self.assertRaises(ConfigError, buildConfig, {}, path)
        self.assertEqual(str(e), "[relay] mta-sts: expected yes or no, got 'sometimes'")


class InboundSettingsTests(SynchronousTestCase):
    """
    The C{[inbound]} section: the checks of mail received on C{--mx}.
    """

    def build(self, text: str):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("[inbound]\n" + text)
        return buildConfig({}, path)

    def test_defaults(self) -> None:
        """
        Checks on through the system's resolver; p=reject refused,
        p=quarantine tagged; temperrors delivered; no rspamd.
        """
        from pop3gw.inbound import InboundPolicy

        self.assertEqual(self.build("").inbound, InboundPolicy())
        self.assertEqual(parse().inbound, InboundPolicy(
            checks=True, dnsServer=None, dnsTimeout=5.0, deadline=20.0, dmarcReject=True, dmarcQuarantine=True,
            subjectTag="[SPAM]", allowDomains=frozenset(), temperrorDefer=False, rspamdURL=None,
            rspamdTimeout=10.0, rspamdFailClosed=False, lmtpChecks=False, trustedAuthservIDs=frozenset(),
            lmtpDMARCReject=False))

    def test_lmtpValues(self) -> None:
        """
        The LMTP/deliver keys: checks on, trusted front MTAs (lower case,
        comma or newline separated), p=reject refused there too.
        """
        c = self.build("lmtp-checks = yes\ntrusted-authserv-ids = MX1.example.org,\n  mx2.example.org\n"
                       "lmtp-dmarc-reject = yes\n")
        self.assertEqual((c.inbound.lmtpChecks, c.inbound.trustedAuthservIDs, c.inbound.lmtpDMARCReject),
                         (True, frozenset({"mx1.example.org", "mx2.example.org"}), True))

    def test_values(self) -> None:
        """
        Every key parses.
        """
        from pop3gw.inbound import InboundPolicy

        c = self.build(
            "checks = no\ndns-server = 127.0.0.1:5353\ndns-timeout = 2\ndeadline = 8\ndmarc-reject = no\n"
            "dmarc-quarantine = no\nsubject-tag = ***SPAM***\nallow-domains = Lists.Example.NET, example.com\n"
            "temperror = defer\nrspamd-url = http://127.0.0.1:11333/checkv2\nrspamd-timeout = 3\n"
            "rspamd-failure = defer\n")
        self.assertEqual(c.inbound, InboundPolicy(
            checks=False, dnsServer=("127.0.0.1", 5353), dnsTimeout=2.0, deadline=8.0, dmarcReject=False,
            dmarcQuarantine=False, subjectTag="***SPAM***", allowDomains=frozenset({"lists.example.net", "example.com"}),
            temperrorDefer=True, rspamdURL="http://127.0.0.1:11333/checkv2", rspamdTimeout=3.0, rspamdFailClosed=True))
        self.assertEqual(self.build("dns-server = ::1\n").inbound.dnsServer, ("::1", 53))
        self.assertEqual(self.build("dns-server = [::1]:5353\n").inbound.dnsServer, ("::1", 5353))

    def test_bad(self) -> None:
        """
        Each bad value is one clear error.
        """
        for text, message in (
            ("colour = red\n", "unknown key 'colour' in [inbound]"),
            ("dns-server = ns.example\n", "[inbound] dns-server: 'ns.example' is not an IP address"),
            ("deadline = soon\n", "[inbound] deadline: not a number"),
            ("dns-timeout = 0\n", "[inbound] dns-timeout: must be more than 0"),
            ("temperror = bounce\n", "[inbound] temperror: must be accept or defer (got 'bounce')"),
            ("rspamd-failure = maybe\n", "[inbound] rspamd-failure: must be accept or defer (got 'maybe')"),
            ("rspamd-url = ftp://x/checkv2\n", "[inbound] rspamd-url: must be an http:// or https:// URL"),
            ("allow-domains = a b\n", "[inbound] allow-domains: 'a b' is not a domain name"),
            ("trusted-authserv-ids = mx1;x\n", "[inbound] trusted-authserv-ids: 'mx1;x' is not an authserv-id"),
            ("lmtp-checks = maybe\n", "[inbound] lmtp-checks: expected yes or no, got 'maybe'"),
        ):
            e = self.assertRaises(ConfigError, self.build, text)
            self.assertEqual(str(e), message)


class WorkersSettingTests(SynchronousTestCase):
    """
    C{--workers N} and the INI key C{workers}.
    """

    def test_default(self) -> None:
        """
        Without the option one process serves everything.
        """
        self.assertEqual(parse().workers, 1)

    def test_number(self) -> None:
        """
        A number is taken as given, from the command line or the INI file;
        the command line wins.
        """
        self.assertEqual(parse("--workers", "3").workers, 3)
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("[pop3gw]\nworkers = 2\n")
        self.assertEqual(parse("--config", path).workers, 2)
        self.assertEqual(parse("--config", path, "--workers", "4").workers, 4)

    def test_auto(self) -> None:
        """
        C{auto} is one worker per CPU (at least one).
        """
        self.patch(os, "cpu_count", lambda: 6)
        self.assertEqual(parse("--workers", "auto").workers, 6)
        self.assertEqual(parse("--workers", "AUTO").workers, 6)
        self.patch(os, "cpu_count", lambda: None)
        self.assertEqual(parse("--workers", "auto").workers, 1)

    def test_bad(self) -> None:
        """
        Anything but a number from 1 to 64 or C{auto} is one clear error.
        """
        for value in ("0", "-1", "many", "65", ""):
            e = self.assertRaises(ConfigError, buildConfig, {"workers": value})
            self.assertEqual(str(e), f"workers: must be a number from 1 to 64 or auto (got {value!r})")
