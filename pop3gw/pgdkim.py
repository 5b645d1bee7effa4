# -*- test-case-name: tests.test_dkimkeys -*-
"""
DKIM keys in the database store (schema version 2): the same keys, rules
and commands as L{pop3gw.dkimkeys.KeyStore}, in rows every node reads, so
a key generated, activated or removed through any node is used by every
node at its next key check (every two seconds).

Each change moves the version row (and holds its lock, so changes are
serialised across nodes); a node's L{pop3gw.dkimkeys.Keyring} asks only
for that version until it moves.  The private keys are stored as PEM, as
the files are: whoever can read the database can read them.
"""

from __future__ import annotations

from typing import Any, Optional

from zope.interface import implementer

from pop3gw.dkimkeys import (
    DKIMKeyError,
    KeyRecord,
    activated,
    checkDomain,
    checkRemovable,
    checkSelector,
    findRecord,
    generatePrivateKey,
    newRecord,
    publicKeyData,
    publicRecordOf,
)
from pop3gw.interfaces import IDKIMKeyStore
from pop3gw.pgdatabase import Database

__all__ = ["PostgresKeyStore", "insertKeys"]


def _records(conn: Any) -> list[KeyRecord]:
    rows = conn.execute(
        "SELECT domain, selector, algorithm, created, active FROM pop3gw_dkim_keys ORDER BY position"
    ).fetchall()
    return [KeyRecord(*row) for row in rows]


def _changing(conn: Any) -> list[KeyRecord]:
    """
    Start a change: take the version row's lock, move the version, and
    read the keys under it.
    """
    conn.execute("UPDATE pop3gw_dkim_version SET version = version + 1")
    return _records(conn)


def _privateKey(conn: Any, record: KeyRecord) -> bytes:
    row = conn.execute(
        "SELECT private_key FROM pop3gw_dkim_keys WHERE domain = %s AND selector = %s",
        (record.domain, record.selector),
    ).fetchone()
    if row is None:
        raise DKIMKeyError(f"no key with selector {record.selector} for {record.domain}")
    return bytes(row[0])


@implementer(IDKIMKeyStore)
class PostgresKeyStore:
    """
    The DKIM keys in the database; see the module docstring.
    """

    def __init__(self, database: Database) -> None:
        self.database = database

    def records(self) -> list[KeyRecord]:
        """
        See L{IDKIMKeyStore.records}.
        """
        with self.database.transaction() as conn:
            return _records(conn)

    def where(self, record: Optional[KeyRecord]) -> str:
        """
        See L{IDKIMKeyStore.where}.
        """
        if record is None:
            return "the database's DKIM keys"
        return f"the database's key {record.selector} of {record.domain}"

    def privateKey(self, record: KeyRecord) -> bytes:
        """
        See L{IDKIMKeyStore.privateKey}.
        """
        with self.database.transaction() as conn:
            return _privateKey(conn, record)

    def publicRecord(self, record: KeyRecord) -> tuple[str, str]:
        """
        See L{IDKIMKeyStore.publicRecord}.
        """
        return publicRecordOf(self, record)

    def stamp(self) -> object:
        """
        See L{IDKIMKeyStore.stamp}: the version row.
        """
        with self.database.transaction() as conn:
            return conn.execute("SELECT version FROM pop3gw_dkim_version").fetchone()[0]

    def generate(self, domain: str, selector: Optional[str], algorithm: str, created: Optional[str] = None) -> KeyRecord:
        """
        See L{IDKIMKeyStore.generate}.
        """
        newRecord([], domain, selector, algorithm, created)
        pem = generatePrivateKey(algorithm)
        with self.database.transaction() as conn:
            record = newRecord(_changing(conn), domain, selector, algorithm, created)
            insertKeys(conn, [(record, pem)])
        return record

    def activate(self, domain: str, selector: str) -> KeyRecord:
        """
        See L{IDKIMKeyStore.activate}.
        """
        domain, selector = checkDomain(domain), checkSelector(selector)
        with self.database.transaction() as conn:
            records = _changing(conn)
            chosen = findRecord(records, domain, selector)
            pem = _privateKey(conn, chosen)
            try:
                publicKeyData(chosen.algorithm, pem)
            except ValueError:
                raise DKIMKeyError(f"{self.where(chosen)} is not a readable {chosen.algorithm} private key") from None
            for r in activated(records, chosen):
                conn.execute(
                    "UPDATE pop3gw_dkim_keys SET active = %s WHERE domain = %s AND selector = %s",
                    (r.active, r.domain, r.selector),
                )
        return findRecord(activated(records, chosen), domain, selector)

    def remove(self, domain: str, selector: str) -> KeyRecord:
        """
        See L{IDKIMKeyStore.remove}.
        """
        domain, selector = checkDomain(domain), checkSelector(selector)
        with self.database.transaction() as conn:
            records = _changing(conn)
            chosen = findRecord(records, domain, selector)
            checkRemovable(records, chosen)
            conn.execute("DELETE FROM pop3gw_dkim_keys WHERE domain = %s AND selector = %s", (domain, selector))
        return chosen


def insertKeys(conn: Any, keys: list[tuple[KeyRecord, bytes]]) -> None:
    """
    Add keys (record and PEM) in C{conn}'s transaction, in order (C{pop3gw
    migrate}, L{PostgresKeyStore.generate}).
    """
    if keys:
        conn.execute("UPDATE pop3gw_dkim_version SET version = version + 1")
    for record, pem in keys:
        conn.execute(
            "INSERT INTO pop3gw_dkim_keys (domain, selector, algorithm, created, active, private_key) "
            "VALUES (%s, %s, %s, %s, %s, %s)",
            (record.domain, record.selector, record.algorithm, record.created, record.active, pem),
        )
