# -*- test-case-name: tests.test_auth -*-
"""
The credentials both protocols hand the portal: a user name and password,
plus the client they came from, so the one credentials checker can account
for password checks per client (see L{pop3gw.anvil}).
"""

from __future__ import annotations

from typing import Optional

from twisted.cred.credentials import IUsernamePassword, UsernamePassword
from zope.interface import implementer


@implementer(IUsernamePassword)
class ClientCredentials(UsernamePassword):
    """
    C{IUsernamePassword} credentials that also name the client.

    @ivar peer: the client as L{pop3gw.address.describePeer} names it (a
        numeric address, C{"unix"} or C{"unknown"}).
    @ivar service: the listener's service (C{"pop3"}, C{"submission"}),
        for scoped passwords (see L{pop3gw.apppasswords}).
    """

    def __init__(self, username: bytes, password: bytes, peer: str, service: Optional[str] = None) -> None:
        super().__init__(username, password)
        self.peer = peer
        self.service = service

    def __repr__(self) -> str:
        # Never the password.
        return f"<ClientCredentials username={self.username!r} peer={self.peer!r}>"
