"""
The C{pop3gw dkim} and C{pop3gw dns} commands.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import tempfile

from twisted.trial.unittest import SynchronousTestCase

from pop3gw import cli
from pop3gw.dkimkeys import KeyStore

from .util import OTHER_GID, OTHER_UID, effectiveUser, requireRoot, treeModesAndOwners


def runCLI(dataDir: str, *args: str) -> tuple:
    out, err = io.StringIO(), io.StringIO()
    status = cli.main(["--data-dir", dataDir, *args], stdin=io.StringIO(), stdout=out, stderr=err)
    return status, out.getvalue(), err.getvalue()


class DKIMCommandTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dataDir = self.mktemp()
        os.makedirs(self.dataDir)

    def command(self, *args: str) -> tuple:
        return runCLI(self.dataDir, *args)

    def keys(self):
        """
        The keys the commands work on.
        """
        return KeyStore(self.dataDir)

    def test_generatePrintsRecord(self) -> None:
        """
        C{dkim generate} says what it made and prints the exact zone-file
        line of the TXT record to publish, the key in 255-octet strings.
        """
        status, out, err = self.command("dkim", "generate", "Example.org", "--selector", "s1")
        self.assertEqual((status, err), (0, ""))
        name, value = self.keys().publicRecord(self.keys().records()[0])
        strings = " ".join(f'"{value[i:i + 255]}"' for i in range(0, len(value), 255))
        self.assertEqual(
            out,
            "generated rsa key s1 for example.org (active: mail from example.org leaving through the relay is signed with it)\n"
            "publish this DNS record:\n"
            f"s1._domainkey.example.org. IN TXT {strings}\n",
        )
        self.assertTrue(value.startswith("v=DKIM1; k=rsa; p=MII"))

    def test_rotationCommands(self) -> None:
        """
        A second key is generated inactive (the output says how to activate
        it); C{list} shows domain, selector, algorithm, created and state;
        C{activate} switches; C{remove} of the active key is refused with
        one line and exit 1, of the old key done.
        """
        self.command("dkim", "generate", "example.org", "--selector", "old", "--algorithm", "ed25519")
        status, out, _ = self.command("dkim", "generate", "example.org", "--selector", "new", "--algorithm", "ed25519")
        self.assertEqual(status, 0)
        self.assertEqual(
            out.splitlines()[0],
            "generated ed25519 key new for example.org (inactive: publish it, wait for the DNS, then "
            "'pop3gw dkim activate example.org new')",
        )
        status, out, _ = self.command("dkim", "list")
        self.assertEqual(status, 0)
        self.assertEqual(
            re.sub(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", "TIME", out),
            "example.org old ed25519 TIME active\nexample.org new ed25519 TIME inactive\n",
        )
        self.assertEqual(
            self.command("dkim", "activate", "example.org", "new"),
            (0, "example.org is signed with new (ed25519) from now on; keep the previous key published "
                "for a few days before removing it\n", ""),
        )
        self.assertEqual(
            self.command("dkim", "remove", "example.org", "new"),
            (1, "", "pop3gw: new is example.org's active ed25519 key; activate another first "
                    "(pop3gw dkim activate example.org old)\n"),
        )
        self.assertEqual(
            self.command("dkim", "remove", "example.org", "old"),
            (0, "removed ed25519 key old of example.org; delete its DNS record old._domainkey.example.org\n", ""),
        )

    def test_errors(self) -> None:
        """
        A bad domain or an unknown key is one line on stderr, exit 1.
        """
        self.assertEqual(self.command("dkim", "generate", "localhost"), (1, "", "pop3gw: bad domain 'localhost'\n"))
        self.assertEqual(
            self.command("dkim", "activate", "example.org", "s"),
            (1, "", "pop3gw: no key with selector s for example.org\n"),
        )

    def test_dnsPrintsRecords(self) -> None:
        """
        C{dns DOMAIN} prints, with comments, the MX, address hint, SPF,
        each DKIM key, DMARC, MTA-STS (with its policy file), TLS-RPT, the
        RFC 6186 SRV records and the autoconfig names.
        """
        self.command("dkim", "generate", "example.org", "--selector", "e1", "--algorithm", "ed25519")
        status, out, err = self.command("dns", "example.org", "--host", "mail.example.org")
        self.assertEqual((status, err), (0, ""))
        records = [line for line in out.splitlines() if not line.startswith(";")]
        public = self.keys().publicRecord(self.keys().records()[0])[1]
        self.assertEqual(
            [re.sub(r"id=[0-9a-f]{16}", "id=ID", r) for r in records],
            [
                "example.org. IN MX 10 mail.example.org.",
                "mail.example.org. IN A <this server's public IPv4 address>",
                'example.org. IN TXT "v=spf1 mx -all"',
                f'e1._domainkey.example.org. IN TXT "{public}"',
                '_dmarc.example.org. IN TXT "v=DMARC1; p=none; rua=mailto:postmaster@example.org"',
                '_mta-sts.example.org. IN TXT "v=STSv1; id=ID"',
                "mta-sts.example.org. IN CNAME mail.example.org.",
                '_smtp._tls.example.org. IN TXT "v=TLSRPTv1; rua=mailto:postmaster@example.org"',
                "_submissions._tcp.example.org. IN SRV 0 1 465 mail.example.org.",
                "_submission._tcp.example.org. IN SRV 10 1 587 mail.example.org.",
                "_pop3s._tcp.example.org. IN SRV 0 1 995 mail.example.org.",
                "_pop3._tcp.example.org. IN SRV 10 1 110 mail.example.org.",
                "autoconfig.example.org. IN CNAME mail.example.org.",
                "autodiscover.example.org. IN CNAME mail.example.org.",
            ],
        )
        self.assertIn(";     version: STSv1\n;     mode: testing\n;     mx: mail.example.org\n;     max_age: 86400\n", out)
        self.assertIn("tighten to p=quarantine, then p=reject", out)

    def test_dnsWarnsOfLocalHostName(self) -> None:
        """
        A mail server name that is not a public DNS name (the default
        C{localhost} of a fresh install, or a name without a dot) still
        gives the records, with one warning line on stderr naming what to
        set; a public name gives none.
        """
        status, out, err = self.command("dns", "example.org", "--host", "localhost")
        self.assertEqual(
            (status, err),
            (0, "pop3gw: warning: mail server name localhost is not a public DNS name; set --host to the name published in DNS\n"),
        )
        self.assertIn("example.org. IN MX 10 localhost.\n", out)
        status, out, err = self.command("dns", "example.org", "--host", "mail.example.org")
        self.assertEqual((status, err), (0, ""))
        status, out, err = self.command("dns", "example.org", "--host", "mailhost.localdomain")
        self.assertIn("mailhost.localdomain is not a public DNS name", err)


class DatabaseDKIMCommandTests(DKIMCommandTests):
    """
    The same commands with C{--store postgresql://...}: the keys are in the
    database, and no data directory is needed.
    """

    def setUp(self) -> None:
        from pop3gw.pgdatabase import Database
        from pop3gw.pgdkim import PostgresKeyStore
        from tests import pgcluster

        self.uri = pgcluster.database(self)
        self.assertEqual(self.command("init")[0], 0)
        database = Database(self.uri, maxConnections=1)
        self.addCleanup(database.close)
        self.store = PostgresKeyStore(database)

    def command(self, *args: str) -> tuple:
        out, err = io.StringIO(), io.StringIO()
        status = cli.main(["--store", self.uri, "--data-dir", "/nonexistent", *args], stdin=io.StringIO(), stdout=out,
                          stderr=err)
        return status, out.getvalue(), err.getvalue()

    def keys(self):
        return self.store


class DKIMOwnerTests(SynchronousTestCase):
    """
    The key commands follow the data directory's owner rule.
    """

    def setUp(self) -> None:
        requireRoot(self)
        parent = tempfile.mkdtemp(prefix="pop3gw-owner-")
        self.addCleanup(shutil.rmtree, parent, True)
        os.chmod(parent, 0o755)
        self.dataDir = os.path.join(parent, "data")
        os.mkdir(self.dataDir, 0o700)
        os.chown(self.dataDir, OTHER_UID, OTHER_GID)

    def test_rootKeepsOwner(self) -> None:
        """
        Run as root, C{dkim generate}, C{activate} and C{remove} leave every
        file and directory they make owned by the data directory's owner,
        files 0600 and directories 0700.
        """
        self.assertEqual(runCLI(self.dataDir, "dkim", "generate", "example.org", "--selector", "a", "--algorithm", "ed25519")[0], 0)
        self.assertEqual(runCLI(self.dataDir, "dkim", "generate", "example.org", "--selector", "b", "--algorithm", "ed25519")[0], 0)
        self.assertEqual(runCLI(self.dataDir, "dkim", "activate", "example.org", "b")[0], 0)
        self.assertEqual(runCLI(self.dataDir, "dkim", "remove", "example.org", "a")[0], 0)
        found = treeModesAndOwners(self.dataDir)
        self.assertEqual(sorted(found), [".", "dkim", "dkim/.lock", "dkim/example.org", "dkim/example.org/b.pem", "dkim/keys"])
        for path, (kind, mode, uid, gid) in found.items():
            self.assertEqual((uid, gid), (OTHER_UID, OTHER_GID), path)
            self.assertEqual(mode, 0o700 if kind == "d" else 0o600, path)

    def test_otherUserRefused(self) -> None:
        """
        Someone neither root nor the owner cannot generate a key (exit 77);
        C{dkim list} only reads.
        """
        os.chmod(self.dataDir, 0o775)
        with effectiveUser(OTHER_UID + 1, OTHER_GID):
            status, _, err = runCLI(self.dataDir, "dkim", "generate", "example.org")
            listed = runCLI(self.dataDir, "dkim", "list")
        self.assertEqual(status, cli.EX_NOPERM)
        self.assertIn("belongs to uid", err)
        self.assertEqual(listed, (0, "", ""))


class ParserTests(SynchronousTestCase):
    """
    The C{dkim} parser, built for every command without the keys' module.
    """

    def test_algorithmsOfTheKeys(self) -> None:
        """
        C{dkim generate --algorithm} offers the algorithms the keys'
        module makes, the first its default.
        """
        from pop3gw import clidkim, dkimkeys

        self.assertEqual(clidkim.ALGORITHMS, dkimkeys.ALGORITHMS)
        self.assertEqual(clidkim.ALGORITHMS[0], dkimkeys.RSA)
