# -*- test-case-name: tests.test_anvil -*-
"""
Per-client accounting of password checks, after Dovecot's and Postfix's
C{anvil}: which client (an IPv4 address, an IPv6 /64; see
L{pop3gw.address.clientNetwork}) has how many checks in the hash threads,
how many waiting, and how many recent failures.

A flood of guesses from one client must not lock out everyone else.  So:

  - A client may have L{CHECKS_PER_CLIENT} checks in the hash threads at
    once.  Its further checks wait, without a thread, until one of its own
    checks finishes (up to L{WAITING_PER_CLIENT} of them); beyond that a
    login gets L{AuthenticationBusy} at once.  A check counts until it
    finishes in the pool, even if its client hung up long before, so
    hanging up does not free a share.
  - Every client's failures (wrong password, unknown user) are counted,
    repeats of the same user and password once, and decay by one every
    L{PENALTY_DECAY} seconds.  Past L{PENALTY_FREE_FAILURES}, each new
    check of that client waits first (without a thread): 2 s, then 4, 8
    and at most 15 s, as Dovecot's C{auth_penalty} does.
  - Loopback and Unix-socket clients (the operator's own tools, a webmail
    on the same host) get their share like any client, each loopback
    address its own, but no failure delay (their failures still count
    for the order of turns, below).
  - In all, at most L{PENDING_PER_THREAD} checks per hash thread are in
    the hash threads (running or in the pool's own first-come queue).  A
    check that finds them full waits its turn without a thread.  Turns go
    first to clients without recent failures, then to the others; within
    each group they go round the waiting clients one check each.  So
    clients whose logins succeed are not held up by many guessing clients
    together, and no guessing client is shut out.  At most
    L{MAX_WAITING_CHECKS} checks wait in all; beyond that a login gets
    L{AuthenticationBusy} at once.

Everything runs on the reactor thread.  Refusals are logged at most once
per L{REFUSAL_LOG_INTERVAL} seconds, with a count.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import itertools
import secrets
from typing import Optional

from twisted.internet import defer
from twisted.logger import Logger

from pop3gw.address import clientNetwork, isLoopback
from pop3gw.interfaces import AuthenticationBusy

#: Password checks one client may have in the hash threads at once.
CHECKS_PER_CLIENT = 2

#: Further checks of one client that may wait (for one of its running
#: checks to finish, or for its failure penalty) without a thread.
WAITING_PER_CLIENT = 16

#: Password checks handed to the hash threads (running or queued there),
#: per thread.  The rest wait their turn here, where turns are fair, so the
#: pool's own first-come queue stays short.
PENDING_PER_THREAD = 2

#: Password checks waiting in all, over every client.
MAX_WAITING_CHECKS = 1024

#: Recent failures of a client that cost it nothing beyond the failure
#: delay every failed login has (a user mistyping a password twice).
PENALTY_FREE_FAILURES = 2

#: The wait before a check of the first penalised level, in seconds; it
#: doubles with each further failure up to L{PENALTY_MAX_DELAY}.
PENALTY_INITIAL_DELAY = 2.0

#: The longest wait before a check, in seconds (Dovecot's 15 s).
PENALTY_MAX_DELAY = 15.0

#: The most failures counted per client.
PENALTY_MAX_LEVEL = 8

#: Seconds after which one counted failure is forgotten.
PENALTY_DECAY = 60.0

#: Distinct failed (user, password) pairs remembered per client: a client
#: retrying one wrong password (a mail client with a stale one, polling)
#: is counted once, as Dovecot does with a checksum.
PENALTY_REMEMBERED = 4

#: The most clients with a penalty remembered; beyond that the one whose
#: penalty is oldest is forgotten.
MAX_CLIENTS = 10000

#: Seconds between two log lines about refused checks.
REFUSAL_LOG_INTERVAL = 60.0


def penaltyDelay(failures: int) -> float:
    """
    The wait before a check of a client with C{failures} recent failures.
    """
    if failures <= PENALTY_FREE_FAILURES:
        return 0.0
    return min(PENALTY_INITIAL_DELAY * 2 ** (failures - PENALTY_FREE_FAILURES - 1), PENALTY_MAX_DELAY)


class _Client:
    """
    The accounting of one client.

    @ivar running: its checks in the hash threads.
    @ivar queue: its checks waiting for a place in the hash threads (one
        of its own running checks to end, or its turn when they are full).
    @ivar ready: whether it is in the round of clients waiting for a turn.
    @ivar delayed: its checks waiting out their penalty delay.
    @ivar failures: its recent failures, as of C{since}.
    @ivar since: when C{failures} last changed.
    @ivar recent: digests of its last failed credentials.
    """

    def __init__(self, key: str) -> None:
        self.key = key
        self.running = 0
        self.queue: collections.deque = collections.deque()
        self.ready = False
        self.delayed = 0
        self.failures = 0
        self.since = 0.0
        self.recent: collections.deque = collections.deque(maxlen=PENALTY_REMEMBERED)

    def held(self) -> int:
        return self.running + len(self.queue) + self.delayed

    def decay(self, now: float) -> None:
        """
        Forget one failure per L{PENALTY_DECAY} seconds since C{since}.
        """
        if not self.failures:
            return
        steps = int((now - self.since) // PENALTY_DECAY)
        if steps <= 0:
            return
        if steps >= self.failures:
            self.failures = 0
            self.recent.clear()
        else:
            self.failures -= steps
            self.since += steps * PENALTY_DECAY


class CheckSlot:
    """
    The right to run one password check in the hash threads; give it back
    with L{AuthAccounting.release} when the check has finished.
    """

    def __init__(self, client: _Client) -> None:
        self._client: Optional[_Client] = client

    @property
    def key(self) -> str:
        """
        The client the slot belongs to (L{clientNetwork}).
        """
        assert self._client is not None
        return self._client.key


class AuthAccounting:
    """
    Password checks per client: see the module docstring.

    @ivar pending: checks in the hash threads, over every client.
    @ivar waiting: checks waiting, over every client.
    """

    log = Logger()

    def __init__(
        self,
        clock,
        *,
        checksPerClient: int = CHECKS_PER_CLIENT,
        waitingPerClient: int = WAITING_PER_CLIENT,
        hashThreads: int = 2,
        maxPending: Optional[int] = None,
        maxWaiting: int = MAX_WAITING_CHECKS,
        maxClients: int = MAX_CLIENTS,
    ) -> None:
        """
        @param clock: an C{IReactorTime}.
        @param hashThreads: the threads password checks run in; at most
            L{PENDING_PER_THREAD} checks each are handed to them at once.
        @param maxPending: that total, if given (for tests).
        """
        self._clock = clock
        self.checksPerClient = checksPerClient
        self.waitingPerClient = waitingPerClient
        self.maxPending = maxPending if maxPending is not None else PENDING_PER_THREAD * hashThreads
        self.maxWaiting = maxWaiting
        self.maxClients = maxClients
        self.pending = 0
        self.waiting = 0
        # Ordered by last use, oldest first.
        self._clients: collections.OrderedDict[str, _Client] = collections.OrderedDict()
        # Clients with a check waiting and room in their share, in turn:
        # those without recent failures first.
        self._cleanRound: collections.deque[_Client] = collections.deque()
        self._round: collections.deque[_Client] = collections.deque()
        self._dispatching = False
        self._digestKey = secrets.token_bytes(32)
        self._lastRefusalLog: Optional[float] = None
        self._unloggedRefusals = 0

    # -- queries ----------------------------------------------------------

    def running(self, peer: str) -> int:
        """
        The checks of C{peer}'s client in the hash threads.
        """
        client = self._clients.get(clientNetwork(peer))
        return client.running if client is not None else 0

    def held(self, peer: str) -> int:
        """
        The checks of C{peer}'s client running or waiting.
        """
        client = self._clients.get(clientNetwork(peer))
        return client.held() if client is not None else 0

    def delayFor(self, peer: str) -> float:
        """
        The wait a new check of C{peer} would have now for its client's
        recent failures.
        """
        if isLoopback(peer):
            return 0.0
        client = self._clients.get(clientNetwork(peer))
        if client is None:
            return 0.0
        client.decay(self._clock.seconds())
        return penaltyDelay(client.failures)

    def __len__(self) -> int:
        """
        The clients with something accounted.
        """
        return len(self._clients)

    # -- checks -----------------------------------------------------------

    def admit(self, peer: str) -> defer.Deferred:
        """
        Ask to run a password check for C{peer}.

        @param peer: the client as L{pop3gw.address.describePeer} names it.
        @return: a C{defer.Deferred} firing with a L{CheckSlot} when the
            check may go to the hash threads (at once, or once the client's
            penalty delay, one of its running checks or its turn is over),
            or failing with L{AuthenticationBusy} (at once) when the
            client's share or the total of waiting checks is used up.  Cancelling it while it waits gives the
            place up.
        """
        client = self._client(clientNetwork(peer))
        if client.held() >= self.checksPerClient + self.waitingPerClient:
            return self._refuse(peer, client, "its password checks are all running or waiting")
        delay = 0.0 if isLoopback(peer) else self.delayFor(peer)
        mustWait = (
            delay > 0
            or client.running >= self.checksPerClient
            or bool(client.queue)
            or self.pending >= self.maxPending
        )
        if mustWait and self.waiting >= self.maxWaiting:
            return self._refuse(peer, client, "too many password checks are waiting")
        if delay > 0:
            return self._delay(client, peer, delay)
        return self._enqueue(client, peer, None)

    def release(self, slot: CheckSlot) -> None:
        """
        A check has finished in the hash threads (whether or not its client
        is still there): its client's next waiting check, if any, takes its
        place.
        """
        client, slot._client = slot._client, None
        if client is None:
            return
        client.running -= 1
        self.pending -= 1
        self._joinRound(client)
        self._dispatch()
        self._forgetIfIdle(client)

    def digest(self, username: bytes, password: bytes) -> bytes:
        """
        A keyed digest of a user name and password (the key is made per
        instance), to recognise a repeated failure without keeping the
        password.
        """
        return hmac.new(self._digestKey, username + b"\0" + password, hashlib.sha256).digest()[:16]

    def failed(self, peer: str, digest: bytes) -> None:
        """
        Count a failed login of C{peer} (wrong password, unknown user,
        malformed credentials) with the L{digest} of what it sent.
        Loopback and Unix-socket clients get no delay for it (see
        L{delayFor}), but wait behind clients without failures.
        """
        now = self._clock.seconds()
        client = self._client(clientNetwork(peer))
        client.decay(now)
        if digest not in client.recent:
            client.recent.append(digest)
            client.failures = min(client.failures + 1, PENALTY_MAX_LEVEL)
        client.since = now
        self._prune(now)

    # -- internals ----------------------------------------------------------

    def _client(self, key: str) -> _Client:
        client = self._clients.get(key)
        if client is None:
            client = self._clients[key] = _Client(key)
        else:
            self._clients.move_to_end(key)
        return client

    def _enqueue(self, client: _Client, peer: str, d: Optional[defer.Deferred]) -> defer.Deferred:
        """
        Start a check of C{client} now if nothing of it waits and its share
        and the total allow, else queue it for its turn.
        """
        if not client.queue and client.running < self.checksPerClient and self.pending < self.maxPending:
            client.running += 1
            self.pending += 1
            slot = CheckSlot(client)
            if d is None:
                return defer.succeed(slot)
            d.callback(slot)
            return d
        if d is None:
            d = defer.Deferred(lambda waiter: self._cancelQueued(client, waiter))
        client.queue.append(d)
        self.waiting += 1
        self._joinRound(client)
        return d

    def _joinRound(self, client: _Client) -> None:
        """
        Put C{client} at the end of the round if it has a check waiting and
        room in its share.
        """
        if client.queue and client.running < self.checksPerClient and not client.ready:
            client.ready = True
            client.decay(self._clock.seconds())
            (self._round if client.failures else self._cleanRound).append(client)

    def _dispatch(self) -> None:
        """
        Give free places in the hash threads to waiting checks, one per
        client in turn.
        """
        if self._dispatching:
            return  # a check started below finished at once: the loop goes on
        self._dispatching = True
        try:
            while self.pending < self.maxPending and (self._cleanRound or self._round):
                client = (self._cleanRound or self._round).popleft()
                client.ready = False
                if not client.queue or client.running >= self.checksPerClient:
                    continue
                waiter = client.queue.popleft()
                self.waiting -= 1
                client.running += 1
                self.pending += 1
                self._joinRound(client)
                waiter.callback(CheckSlot(client))
        finally:
            self._dispatching = False

    def _delay(self, client: _Client, peer: str, delay: float) -> defer.Deferred:
        """
        Make a check of C{client} wait C{delay} seconds before it asks for
        a place in the hash threads.
        """
        client.delayed += 1
        self.waiting += 1
        timer = None

        def cancel(waiter: defer.Deferred) -> None:
            if timer is not None and timer.active():
                timer.cancel()
                client.delayed -= 1
                self.waiting -= 1
                self._forgetIfIdle(client)
            else:
                self._cancelQueued(client, waiter)

        d: defer.Deferred = defer.Deferred(cancel)

        def over() -> None:
            client.delayed -= 1
            self.waiting -= 1
            self._enqueue(client, peer, d)
            self._forgetIfIdle(client)

        timer = self._clock.callLater(delay, over)
        return d

    def _cancelQueued(self, client: _Client, waiter: defer.Deferred) -> None:
        try:
            client.queue.remove(waiter)
        except ValueError:
            return
        self.waiting -= 1
        self._forgetIfIdle(client)

    def _forgetIfIdle(self, client: _Client) -> None:
        """
        Drop C{client}'s record once nothing of it is left to account.
        """
        if client.held():
            return
        client.decay(self._clock.seconds())
        if not client.failures and self._clients.get(client.key) is client:
            del self._clients[client.key]

    def _prune(self, now: float) -> None:
        """
        Forget the oldest idle records whose penalty has decayed, and the
        oldest idle ones beyond L{maxClients}.
        """
        for key in list(itertools.islice(self._clients, 8)):
            client = self._clients[key]
            if client.held():
                continue
            client.decay(now)
            if not client.failures:
                del self._clients[key]
        if len(self._clients) > self.maxClients:
            for key in list(self._clients):
                if len(self._clients) <= self.maxClients:
                    break
                if not self._clients[key].held():
                    del self._clients[key]

    def _refuse(self, peer: str, client: _Client, why: str) -> defer.Deferred:
        """
        Refuse a check of C{peer} (logged at most once per
        L{REFUSAL_LOG_INTERVAL} seconds, with a count).
        """
        self._logRefusal(peer, client, why)
        self._forgetIfIdle(client)
        return defer.fail(AuthenticationBusy(why))

    def _logRefusal(self, peer: str, client: _Client, why: str) -> None:
        now = self._clock.seconds()
        if self._lastRefusalLog is not None and now - self._lastRefusalLog < REFUSAL_LOG_INTERVAL:
            self._unloggedRefusals += 1
            return
        self._lastRefusalLog = now
        self.log.warn(
            "password check refused: rhost={peer} client={client} running={running} waiting={waiting}"
            " total_running={pending} total_waiting={allWaiting}: {why}"
            " (and {more} more refused since the last such line)",
            peer=peer,
            client=client.key,
            running=client.running,
            waiting=len(client.queue) + client.delayed,
            pending=self.pending,
            allWaiting=self.waiting,
            why=why,
            more=self._unloggedRefusals,
        )
        self._unloggedRefusals = 0
