# -*- test-case-name: tests.test_socketmap -*-
"""
The Postfix socketmap lookup server (C{--postfix-map ENDPOINT}).

A Postfix in front of pop3gw asks it, at its own RCPT time, whether an
address is a deliverable local recipient, so it refuses unknown
recipients itself instead of accepting and bouncing later (backscatter)::

    relay_recipient_maps = socketmap:unix:/run/pop3gw/map:recipients

The protocol is Postfix's socketmap_table(5): requests and replies are
netstrings (C{LEN:DATA,}); a request is C{NAME SP KEY}; several requests
may follow one another on one connection, each answered in order.  One
map is served, C{recipients}:

  - C{OK USERS} when C{KEY} is an address of a local domain that the
    users directory resolves to at least one user (directly, by alias or
    list, catch-all or sub-address, in any case): C{USERS} are those
    users' addresses, comma-separated (Postfix only needs a result;
    C{postmap -q} shows where the address goes).
  - C{NOTFOUND } for an unknown user, a domain that is not local, a key
    that is not a plain C{local@domain} address (Postfix also asks for
    C{@domain}: not found, a catch-all is answered on the full address),
    or one the MX listener refuses as a disguised relay (C{%}, C{!}, a
    trailing dot), even with a catch-all.
  - C{TEMP directory unavailable} when the users directory cannot be read
    (Postfix then defers with a 4xx, it does not refuse).
  - C{PERM unknown map} for any other map name, C{PERM invalid request}
    for a request without a space.

A netstring longer than L{MAX_NETSTRING} (Postfix's own limit) or
malformed closes the connection with one log line; so does a connection
idle for longer than the factory's C{idleTimeout}.  Lookups are not
logged: a Postfix asks for every recipient of every message.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet.protocol import Protocol, ServerFactory
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin

from pop3gw.address import Address, AddressError, describePeer, isDisguisedRelay
from pop3gw.interfaces import PermanentFailure, TemporaryFailure, UnknownUser

#: The largest netstring accepted, in octets of data (Postfix's own limit
#: for socketmap replies).
MAX_NETSTRING = 100000

#: Seconds a connection may stay idle before it is closed (Postfix's
#: socketmap client closes its own idle connections after 10 seconds).
DEFAULT_IDLE_TIMEOUT = 60.0

#: The name of the one map served.
RECIPIENTS_MAP = b"recipients"

_MAX_LENGTH_DIGITS = len(str(MAX_NETSTRING))


def netstring(data: bytes) -> bytes:
    """
    C{data} as a netstring: C{LEN:DATA,}.
    """
    return b"%d:%s," % (len(data), data)


class _Malformed(Exception):
    """
    The client sent something that is not an acceptable netstring.
    """


class SocketmapProtocol(Protocol, TimeoutMixin):
    """
    One connection from a socketmap client.
    """

    log = Logger()
    factory: "SocketmapFactory"
    transport: Any

    def __init__(self) -> None:
        self._buffer = b""
        self._closing = False

    def connectionMade(self) -> None:
        self.setTimeout(self.factory.idleTimeout)

    def connectionLost(self, reason=None) -> None:
        self.setTimeout(None)
        self._closing = True

    def timeoutConnection(self) -> None:
        self._closing = True
        self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        self.resetTimeout()
        self._buffer += data
        try:
            while not self._closing:
                request = self._nextNetstring()
                if request is None:
                    return
                self.transport.write(netstring(self.factory.answer(request)))
        except _Malformed as e:
            self.log.info(
                "postfix-map: closing connection rhost={rhost}: {reason}",
                rhost=describePeer(self.transport.getPeer()),
                reason=str(e),
            )
            self._closing = True
            self._buffer = b""
            self.transport.loseConnection()

    def _nextNetstring(self) -> "bytes | None":
        """
        Take one complete netstring off the buffer.

        @return: its data, or C{None} if it is not complete yet.
        @raise _Malformed: it can never be a valid netstring under the limit.
        """
        colon = self._buffer.find(b":", 0, _MAX_LENGTH_DIGITS + 1)
        if colon < 0:
            partial = self._buffer
            if len(partial) > _MAX_LENGTH_DIGITS or (partial and not (partial.isascii() and partial.isdigit())):
                raise _Malformed("malformed netstring")
            return None
        digits = self._buffer[:colon]
        if not digits.isdigit() or not digits.isascii():
            raise _Malformed("malformed netstring")
        length = int(digits)
        if length > MAX_NETSTRING:
            raise _Malformed("netstring too long")
        end = colon + 1 + length
        if len(self._buffer) <= end:
            return None
        if self._buffer[end : end + 1] != b",":
            raise _Malformed("malformed netstring")
        data = self._buffer[colon + 1 : end]
        self._buffer = self._buffer[end + 1 :]
        return data


if TYPE_CHECKING:
    _ServerFactory = ServerFactory[SocketmapProtocol]
else:
    # Subscripted for the type checker only (as in L{pop3gw.pop3}).
    _ServerFactory = ServerFactory


class SocketmapFactory(_ServerFactory):
    """
    Serves the C{recipients} map from C{router}'s local domains and users
    directory.

    @param router: an L{IMailRouter}; its C{checkLocalRecipient} decides.
    @param idleTimeout: seconds of silence before a connection is closed.
    """

    protocol = SocketmapProtocol
    noisy = False

    def __init__(self, router, idleTimeout: float = DEFAULT_IDLE_TIMEOUT) -> None:
        self.router = router
        self.idleTimeout = idleTimeout

    def answer(self, request: bytes) -> bytes:
        """
        The reply (without its netstring framing) to one request.
        """
        name, space, key = request.partition(b" ")
        if not space:
            return b"PERM invalid request"
        if name != RECIPIENTS_MAP:
            return b"PERM unknown map"
        if isDisguisedRelay(key.decode("utf-8", "replace")):
            return b"NOTFOUND "
        try:
            address = Address.parse(key)
        except AddressError:
            return b"NOTFOUND "
        try:
            users = self.router.checkLocalRecipient(address)
        except TemporaryFailure:
            return b"TEMP directory unavailable"
        except (UnknownUser, PermanentFailure):
            return b"NOTFOUND "
        return b"OK " + ",".join(str(u) for u in users).encode("utf-8")
