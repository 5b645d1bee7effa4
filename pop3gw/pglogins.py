# -*- test-case-name: tests.test_loginwatch -*-
"""
The login history (see L{pop3gw.loginwatch}) in the database store
(schema version 3): one row per user and network, with the first and last
time seen, merged by every node, so a network a user has used through any
node is not new on another.
"""

from __future__ import annotations

from typing import Any

from zope.interface import implementer

from pop3gw.interfaces import ILoginHistory
from pop3gw.loginwatch import HISTORY_KEEP, History
from pop3gw.pgdatabase import Database, redact

__all__ = ["PostgresLoginHistory", "insertHistory"]


def _history(conn: Any) -> History:
    history: History = {}
    for user, network, first, last in conn.execute(
        "SELECT user_key, network, first_seen, last_seen FROM pop3gw_login_history"
    ):
        history.setdefault(user, {})[network] = [first, last]
    return history


@implementer(ILoginHistory)
class PostgresLoginHistory:
    """
    The login history in the database.
    """

    def __init__(self, database: Database) -> None:
        self.database = database
        self.where = redact(database.uri)

    def read(self) -> History:
        """
        See L{ILoginHistory.read}.
        """
        with self.database.transaction() as conn:
            return _history(conn)

    def merge(self, changes: History, now: float) -> History:
        """
        See L{ILoginHistory.merge}: one transaction; the rows of networks
        unseen for L{HISTORY_KEEP} seconds are deleted.
        """
        rows = [
            (user.lower(), network, first, last)
            for user, networks in changes.items()
            for network, (first, last) in networks.items()
        ]
        with self.database.transaction() as conn:
            insertHistory(conn, rows)
            conn.execute("DELETE FROM pop3gw_login_history WHERE last_seen < %s", (now - HISTORY_KEEP,))
            return _history(conn)


def insertHistory(conn: Any, rows: list) -> None:
    """
    Merge C{(user key, network, first seen, last seen)} rows into the
    stored history (earliest first-seen, latest last-seen), in C{conn}'s
    transaction (L{PostgresLoginHistory}, C{pop3gw migrate}).
    """
    with conn.cursor() as cursor:
        cursor.executemany(
            "INSERT INTO pop3gw_login_history (user_key, network, first_seen, last_seen) "
            "VALUES (%s, %s, %s, %s) ON CONFLICT (user_key, network) DO UPDATE SET "
            "first_seen = LEAST(pop3gw_login_history.first_seen, excluded.first_seen), "
            "last_seen = GREATEST(pop3gw_login_history.last_seen, excluded.last_seen)",
            rows,
        )
