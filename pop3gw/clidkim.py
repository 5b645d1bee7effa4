# -*- test-case-name: tests.test_clidkim -*-
"""
The C{pop3gw dkim} and C{pop3gw dns} commands: DKIM keys in the data
directory or the database store (L{pop3gw.dkimkeys}, L{pop3gw.pgdkim}) and
the DNS records a domain should publish (L{pop3gw.dnsrecords}).
"""

from __future__ import annotations

import argparse
from typing import Optional, TextIO

from pop3gw import fsutil
from pop3gw.interfaces import IDKIMKeyStore

#: The key algorithms C{dkim generate} offers: L{pop3gw.dkimkeys.ALGORITHMS},
#: named here so that building the C{pop3gw} parser (for every command)
#: does not load the keys' module.
ALGORITHMS = ("rsa", "ed25519")

EX_OK = 0


def addParsers(sub: "argparse._SubParsersAction") -> None:
    """
    Add the C{dkim} and C{dns} commands to the C{pop3gw} parser.
    """
    dkim = sub.add_parser("dkim", help="DKIM signing keys")
    dsub = dkim.add_subparsers(dest="action", required=True)
    gen = dsub.add_parser("generate", help="make a key for DOMAIN and print its DNS record")
    gen.add_argument("domain")
    gen.add_argument("--selector", help="the selector (default: ALGORITHM + today's date, e.g. rsa20261201)")
    gen.add_argument("--algorithm", choices=ALGORITHMS, default=ALGORITHMS[0], help="rsa (2048 bits, default) or ed25519")
    dsub.add_parser("list", help="list keys: domain, selector, algorithm, created, active")
    for action, text in (
        ("activate", "sign DOMAIN's mail with SELECTOR instead of its other key of that algorithm"),
        ("remove", "delete a key (not the active one while another of its algorithm exists)"),
    ):
        a = dsub.add_parser(action, help=text)
        a.add_argument("domain")
        a.add_argument("selector")

    dns = sub.add_parser("dns", help="print the DNS records DOMAIN should publish")
    dns.add_argument("domain")
    dns.add_argument("--host", help="the mail server's public host name (default: the configured hostname)")
    dns.add_argument("--check", action="store_true", help="look the records up and say which are missing or wrong")


def cmdDkim(config, args, stdout: TextIO, owner: "fsutil.Owner | None" = None,
            store: Optional[IDKIMKeyStore] = None) -> int:
    """
    C{dkim generate|list|activate|remove}.

    @param store: the keys (by default, those of the data directory).
    @raise pop3gw.dkimkeys.DKIMKeyError: the command cannot be done (one
        line).
    """
    from pop3gw import dkimkeys

    if store is None:
        store = dkimkeys.KeyStore(config.dataDir, owner)
    if args.action == "list":
        for r in store.records():
            stdout.write(f"{r.domain} {r.selector} {r.algorithm} {r.created} {'active' if r.active else 'inactive'}\n")
        return EX_OK
    if args.action == "generate":
        record = store.generate(args.domain, args.selector, args.algorithm)
        name, value = store.publicRecord(record)
        if record.active:
            state = f"active: mail from {record.domain} leaving through the relay is signed with it"
        else:
            state = (
                f"inactive: publish it, wait for the DNS, then "
                f"'pop3gw dkim activate {record.domain} {record.selector}'"
            )
        stdout.write(f"generated {record.algorithm} key {record.selector} for {record.domain} ({state})\n")
        stdout.write("publish this DNS record:\n")
        stdout.write(dkimkeys.zoneLine(name, value) + "\n")
        return EX_OK
    if args.action == "activate":
        record = store.activate(args.domain, args.selector)
        stdout.write(
            f"{record.domain} is signed with {record.selector} ({record.algorithm}) from now on; "
            "keep the previous key published for a few days before removing it\n"
        )
        return EX_OK
    record = store.remove(args.domain, args.selector)
    stdout.write(
        f"removed {record.algorithm} key {record.selector} of {record.domain}; "
        f"delete its DNS record {record.selector}._domainkey.{record.domain}\n"
    )
    return EX_OK


def publicHostProblem(host: str) -> Optional[str]:
    """
    Why C{host} cannot be the name other mail servers and mail clients
    find this server by, or C{None} if it may be.

    >>> publicHostProblem("localhost")
    'is not a public DNS name'
    >>> publicHostProblem("mail.example.org") is None
    True
    """
    labels = host.split(".")
    if len(labels) < 2 or labels[-1] in ("localhost", "localdomain", "local", "internal", "lan", "home", "invalid", "test"):
        return "is not a public DNS name"
    return None


def cmdDns(
    config, args, stdout: TextIO, store: Optional[IDKIMKeyStore] = None, stderr: Optional[TextIO] = None
) -> int:
    """
    C{dns DOMAIN [--host NAME] [--check]}: print the records; with
    C{--check}, one line per record (C{OK}, C{MISSING}, C{WRONG}, C{ERROR})
    and exit status 1 unless every record is C{OK}.  A mail server name
    that is not a public DNS name (C{localhost}, a name without a dot) is
    used as given, with a warning on C{stderr}.

    @param store: the DKIM keys (by default, those of the data directory).
    """
    from pop3gw import dkimkeys, dnsrecords

    domain = dkimkeys.checkDomain(args.domain)
    host = (args.host or config.hostname).lower().rstrip(".")
    problem = publicHostProblem(host)
    if problem is not None and stderr is not None:
        where = "--host" if args.host else "the configured hostname (--hostname, or hostname in the INI file)"
        stderr.write(f"pop3gw: warning: mail server name {host} {problem}; set {where} to the name published in DNS\n")
    records = dnsrecords.domainRecords(store if store is not None else dkimkeys.KeyStore(config.dataDir), domain, host)
    if not args.check:
        stdout.write(f"; DNS records for {domain}, mail server {host}\n")
        for record in records:
            stdout.write(f"{record.commentLines()}{record.zoneLine()}\n")
        return EX_OK
    lookup = dnsrecords.dnspythonLookup(dnsrecords.resolverFromEnvironment())
    bad = 0
    for status, record, detail in dnsrecords.checkRecords(records, lookup):
        bad += status != dnsrecords.OK
        stdout.write(f"{status:<7} {record.name} {record.rtype}: {detail}\n")
    return 1 if bad else EX_OK


__all__ = ["ALGORITHMS", "addParsers", "cmdDkim", "cmdDns"]
