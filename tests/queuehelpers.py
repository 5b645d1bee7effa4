"""
Shared fixtures for the queue and relay tests: addresses, a fake clock and
thread pool, fake SMTP endpoints, a fake resolver and a queue in a temp dir.
"""

from __future__ import annotations

import json
import os

from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.names import dns
from twisted.python.failure import Failure

from pop3gw.address import Address
from pop3gw.queue import OutboundQueue
from pop3gw.runner import ThreadPoolRunner

ALICE = Address("alice", "example.org")
BOB = Address("bob", "remote.example")
CAROL = Address("carol", "remote.example")
DAVE = Address("dave", "remote.example")
ERIN = Address("erin", "other.example")

TRACE = b"Received: by test\r\n"
BODY = b"Subject: hi\n\n.leading dot\nbody\n"
STORED = b"Received: by test\r\nSubject: hi\r\n\r\n.leading dot\r\nbody\r\n"
SENT = b"Received: by test\r\nSubject: hi\r\n\r\n..leading dot\r\nbody\r\n.\r\n"

GREETING = b"220 mx.remote.example ESMTP\r\n"
EHLO_OK = b"250-mx.remote.example\r\n250 8BITMIME\r\n"
EHLO_UTF8 = b"250-mx.remote.example\r\n250-8BITMIME\r\n250 SMTPUTF8\r\n"
#: A recipient whose local part is not ASCII.
JORG = Address("j\u00f6rg", "remote.example")
OK = b"250 2.0.0 ok\r\n"


class ThreadClock(Clock):
    """
    A clock that also runs C{callFromThread} calls at once.
    """

    def callFromThread(self, f, *args, **kw):
        f(*args, **kw)


class TLSStringTransport(StringTransport):
    """
    A L{StringTransport} that records C{startTLS}.
    """

    tlsContext = None

    def startTLS(self, contextFactory):
        self.tlsContext = contextFactory


class FakeEndpoint:
    """
    Records the connection attempt; the test completes it with L{serve} or
    fails it with L{refuse}.
    """

    def __init__(self, host, port, connects):
        self.host = host
        self.port = port
        self.connects = connects
        self.factory = None
        self.deferred = None

    def connect(self, factory):
        self.factory = factory
        self.deferred = defer.Deferred()
        self.connects.append(self)
        return self.deferred

    def refuse(self):
        self.deferred.errback(ConnectionRefusedError("refused"))

    def open(self, transport=None):
        self.transport = transport if transport is not None else TLSStringTransport()
        self.protocol = self.factory.buildProtocol(IPv4Address("TCP", "192.0.2.1", self.port))
        self.protocol.makeConnection(self.transport)
        self.deferred.callback(self.protocol)

    def feed(self, reply: bytes) -> bytes:
        """
        Send one server reply; return what the client wrote in response
        (the message body included).
        """
        self.protocol.dataReceived(reply)
        while self.transport.producer is not None:
            self.transport.producer.resumeProducing()
        out = self.transport.value()
        self.transport.clear()
        return out

    def close(self):
        self.protocol.connectionLost(Failure(ConnectionDone()))

    def serve(self, replies):
        """
        Open the connection, feed C{replies} one by one, close it.

        @return: the list of client writes after each reply.
        """
        self.open()
        sent = [self.feed(r) for r in replies]
        self.close()
        return sent


def rr(name, payload):
    return dns.RRHeader(name=name, type=payload.TYPE, payload=payload)


class FakeResolver:
    """
    MX and address records from dicts; C{errors} maps C{(kind, domain)} to
    an exception; C{queries} records the lookups.
    """

    def __init__(self, mx=None, a=None, aaaa=None, errors=None):
        self.mx = mx or {}
        self.a = a or {}
        self.aaaa = aaaa or {}
        self.errors = errors or {}
        self.queries = []

    def _answer(self, kind, name, records):
        self.queries.append((kind, name))
        if (kind, name) in self.errors:
            return defer.fail(self.errors[(kind, name)])
        return defer.succeed((records, [], []))

    def lookupMailExchange(self, name):
        return self._answer(
            "MX", name, [rr(name, dns.Record_MX(p, h)) for p, h in self.mx.get(name, [])]
        )

    def lookupAddress(self, name):
        return self._answer("A", name, [rr(name, dns.Record_A(a)) for a in self.a.get(name, [])])

    def lookupIPV6Address(self, name):
        return self._answer("AAAA", name, [rr(name, dns.Record_AAAA(a)) for a in self.aaaa.get(name, [])])


def readJSON(root, queueId):
    with open(os.path.join(root, queueId + ".json"), "rb") as f:
        return json.loads(f.read())


def successReplies(count=1):
    """
    Server replies for a session where every one of C{count} recipients
    and the data are accepted.
    """
    return [GREETING, EHLO_OK, OK] + [OK] * count + [b"354 go ahead\r\n", OK, b"221 bye\r\n"]


class QueueTestMixin:
    """
    A queue in a temp dir on a fake clock, and helpers to queue messages.
    """

    def setUpQueue(self, threadpool=None):
        self.root = self.mktemp()
        self.clock = ThreadClock()
        self.clock.advance(1000)
        runner = None if threadpool is None else ThreadPoolRunner(self.clock, threadpool)
        self.queue = OutboundQueue(self.root, self.clock, runner)

    def enqueue(self, sender=ALICE, recipients=(BOB,), body=BODY, trace=TRACE, smtputf8=False):
        announced = []
        self.queue.addListener(announced.append)
        d = self.queue.beginDelivery(sender, list(recipients), trace, smtputf8=smtputf8)
        d.write(body)
        self.successResultOf(d.commit())
        self.queue.removeListener(announced.append)
        [entry] = announced
        return entry
