# -*- test-case-name: tests.test_auth -*-
"""
Authentication: the credentials checker, the realm and its avatars, and the
plaintext-authentication policy.

Protocols hand a C{twisted.cred.portal.Portal} built from L{PasswordChecker}
and L{Realm} the client's user name and password; they never see hashes or
the users database.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import secrets
import threading
from typing import Callable, Optional

import attr
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm
from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import directlyProvides, implementer, providedBy

from pop3gw.address import Address, AddressError, isLoopback
from pop3gw.anvil import AuthAccounting, CheckSlot
from pop3gw.apppasswords import USE_RECORD_INTERVAL, AppPassword, covers
from pop3gw.config import PLAINTEXT_MODES
from pop3gw.directory import Senders
from pop3gw.interfaces import (
    IAppPasswords,
    IMaildropStore,
    IMailRouter,
    IPOP3Avatar,
    ISubmissionAvatar,
    IUserDirectory,
    IUserStore,
    LookupWouldBlock,
    Pop3gwError,
    TemporaryFailure,
)
from pop3gw.loginwatch import LoginWatch
from pop3gw.passwords import canVerify, dummyHash, isMalformed, upgradedHash, verifyPassword
from pop3gw.runner import ThreadPoolRunner
from pop3gw.sendlimits import SendingPolicy

#: The client credentials without a C{peer} are counted as.
UNKNOWN_PEER = "unknown"

#: Seconds from the start of a failed attempt until its failure is
#: reported (slows down password guessing; fail2ban does the rest).
FAILURE_DELAY = 2.0

#: How long a verified (address, password) pair is trusted without running
#: the slow hash again, in seconds.
CACHE_TTL = 3600.0

#: The most verified pairs kept; the oldest is evicted first.
CACHE_SIZE = 10000

#: Prefixed to an app password in its cache key (see L{PasswordChecker}).
APP_PASSWORD_KEY = b"\0app\0"


class VerifiedCredentialsCache:
    """
    Remembers (address, password) pairs that were verified, like Dovecot's
    C{auth_cache}, so repeat logins skip the slow hash.

    Entries are keyed by C{BLAKE2b-256(address NUL password)} in its keyed
    (MAC) mode with a random key C{k} made per instance, so the cache never
    holds a password or anything an attacker could test guesses against
    offline.  Each entry holds the stored hash it was verified against: it
    is a hit only while the user's stored hash is still that string (a
    password change or removal invalidates it) and for at most C{ttl}
    seconds.  Failures are never cached.  Thread-safe.
    """

    def __init__(self, ttl: float = CACHE_TTL, maxSize: int = CACHE_SIZE):
        self._ttl = ttl
        self._maxSize = maxSize
        self._macKey = secrets.token_bytes(32)
        self._entries: collections.OrderedDict[bytes, tuple[str, float]] = collections.OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def key(self, address: Address, password: bytes) -> bytes:
        """
        The cache key for C{address} and C{password}.
        """
        # Keyed BLAKE2b holds the GIL for input this short; OpenSSL's HMAC
        # releases it for every call, and the reactor thread, which makes
        # this key at every cached login, then waits to get it back.
        return hashlib.blake2b(str(address).encode("utf-8") + b"\0" + password, key=self._macKey, digest_size=32).digest()

    def hit(self, key: bytes, stored: str, now: float) -> bool:
        """
        Whether C{key} was verified against C{stored} less than the TTL
        before C{now}.  A stale or invalidated entry is dropped.
        """
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return False
            cachedHash, added = entry
            if hmac.compare_digest(cachedHash.encode("utf-8"), stored.encode("utf-8")) and 0 <= now - added < self._ttl:
                return True
            del self._entries[key]
            return False

    def add(self, key: bytes, stored: str, now: float) -> None:
        """
        Record that C{key} verified against C{stored} at C{now}, evicting
        the oldest entries beyond the size limit.
        """
        with self._lock:
            self._entries.pop(key, None)
            self._entries[key] = (stored, now)
            while len(self._entries) > self._maxSize:
                self._entries.popitem(last=False)


@implementer(ICredentialsChecker)
class PasswordChecker:
    """
    Checks C{IUsernamePassword} credentials against an L{IUserStore}.

    The login name is normalised once, here, with L{Address.parse}; a name
    that does not parse is handled exactly like an unknown user.  The user
    lookup and the slow hash run in C{threadpool}, never on the reactor
    thread.  An unknown user is checked against C{pop3gw.passwords.DUMMY_HASH}
    so it costs as much as a known one.

    A successful login fires at once with the address as text.  A failed
    one fails with a bare C{UnauthorizedLogin} (never saying which part
    was wrong) no earlier than C{failureDelay} seconds after the attempt
    began, using C{reactor.callLater}: other sessions are not held up.

    Verified credentials are cached (see L{VerifiedCredentialsCache}): a
    repeat login with the same password, while the stored hash is
    unchanged and for up to L{CACHE_TTL} seconds, skips the slow hash.
    This is what lets mail clients that poll every minute log in cheaply,
    as with Dovecot's C{auth_cache}.  Failures are never cached, so the
    cache does not speed up guessing.

    Every check that needs the thread pool is accounted per client by an
    L{AuthAccounting} (the client comes from the credentials' C{peer}, see
    L{pop3gw.credentials.ClientCredentials}; credentials without one count
    as the client C{unknown}): a client over its share waits or gets
    L{pop3gw.interfaces.AuthenticationBusy} without taking a thread, and a
    client with repeated failures waits longer before each check.

    Passwords never appear in logs or exceptions.
    """

    credentialInterfaces = (IUsernamePassword,)

    _log = Logger()

    def __init__(
        self,
        users: IUserStore,
        reactor,
        threadpool,
        failureDelay: float = FAILURE_DELAY,
        *,
        verifier: Callable[[str, bytes], bool] = verifyPassword,
        dummy: Optional[Callable[[], str]] = None,
        cache: Optional[VerifiedCredentialsCache] = None,
        accounting: Optional[AuthAccounting] = None,
        watch: Optional[LoginWatch] = None,
        appPasswords: Optional[IAppPasswords] = None,
        recordUse: Optional[Callable[[str, str, str], None]] = None,
        runner: Optional[ThreadPoolRunner] = None,
    ):
        """
        @param users: the users database (its blocking side: L{_check}
            calls it in C{threadpool}).
        @param reactor: provides C{IReactorTime} and
            C{IReactorFromThreads}.
        @param threadpool: where lookups and hashing run (an object with
            C{callInThreadWithCallback}, such as a
            C{twisted.python.threadpool.ThreadPool}).
        @param failureDelay: seconds from the start of an attempt to its
            failure.
        @param verifier: checks a password against a stored hash (for
            tests).
        @param dummy: returns the hash unknown users are checked against
            (for tests); L{pop3gw.passwords.dummyHash} by default.
        @param cache: the verified-credentials cache; a new one by default.
        @param accounting: the per-client accounting of checks; a new one
            (on C{reactor}) by default.
        @param watch: told of every successful login (see
            L{pop3gw.loginwatch}); a new one in memory by default.
        @param appPasswords: the users' app passwords and main-password
            scopes (see L{pop3gw.apppasswords}); none by default.
        @param recordUse: called in the pool thread with C{(user, name,
            client)} when an app password is used (at most once a minute
            per password).
        @param runner: the runner over C{threadpool} through which the
            checks run; a new one by default.  A stopping server waits for
            its work in flight, failed logins' delays included (see
            L{pop3gw.runner.drainTogether}), and then it refuses checks
            with L{pop3gw.interfaces.ServerStopping}.
        """
        self._users = users
        self._reactor = reactor
        self._runner = runner if runner is not None else ThreadPoolRunner(reactor, threadpool)
        self._failureDelay = failureDelay
        self._verifier = verifier
        self._dummy = dummy if dummy is not None else dummyHash
        self.cache = cache if cache is not None else VerifiedCredentialsCache()
        self.accounting = accounting if accounting is not None else AuthAccounting(reactor)
        self.watch = watch if watch is not None else LoginWatch(reactor)
        self._apps = appPasswords
        self._recordUse = recordUse
        self._lastRecorded: dict = {}

    def requestAvatarId(self, credentials) -> defer.Deferred:
        """
        Check C{credentials}.

        @return: a C{defer.Deferred} firing with the user's address as
            text, or failing with C{UnauthorizedLogin} after the failure
            delay, with L{pop3gw.interfaces.AuthenticationBusy} if the
            client may not have another check now, or with
            L{TemporaryFailure} if the users database failed.
        """
        start = self._reactor.seconds()
        peer = getattr(credentials, "peer", None) or UNKNOWN_PEER
        try:
            username = _text(credentials.username)
            password = _text(credentials.password).encode("utf-8")
        except (UnicodeError, TypeError, AttributeError):
            digest = self.accounting.digest(_raw(credentials, "username"), _raw(credentials, "password"))
            self.accounting.failed(peer, digest)
            return self._delayedFailure(start)
        try:
            address: Optional[Address] = Address.parse(username)
        except AddressError:
            address = None
        service = getattr(credentials, "service", None)
        cached = self._cachedLogin(address, password, start, service) if address is not None else None
        if cached is not None:
            self.watch.loggedIn(cached, peer)
            return defer.succeed(cached)
        d = self.accounting.admit(peer)
        d.addCallback(self._checkInPool, address, password, start, service, peer)
        d.addCallbacks(
            self._cbChecked,
            self._ebServerFault,
            callbackArgs=(start, peer, username.encode("utf-8"), password),
        )
        return d

    def _checkInPool(
        self,
        slot: CheckSlot,
        address: Optional[Address],
        password: bytes,
        start: float,
        service: Optional[str] = None,
        peer: str = UNKNOWN_PEER,
    ) -> defer.Deferred:
        """
        Run L{_check} in the thread pool; the slot is given back when it
        has finished there, whether or not the client is still connected.
        """
        d = self._runner.run(self._check, address, password, start, service, peer)

        def release(result):
            self.accounting.release(slot)
            return result

        d.addBoth(release)
        return d

    def _cachedLogin(self, address: Address, password: bytes, now: float, service: Optional[str] = None) -> Optional[str]:
        """
        The avatar ID (the user as stored) if the credentials are confirmed
        by the cache, decided on the reactor thread when the users database
        has the user at hand (no thread hop for a client that logs in every
        minute); else C{None}.
        """
        try:
            found = self._users.peekUser(address)
        except LookupWouldBlock:
            return None
        if found is None:
            return None
        user, stored = found
        if self._apps is not None:
            scope = self._apps.peekMainScope(user)
            if scope is None or not covers(scope, service):
                return None
        return str(user) if self.cache.hit(self.cache.key(user, password), stored, now) else None

    def _check(
        self,
        address: Optional[Address],
        password: bytes,
        now: float,
        service: Optional[str] = None,
        peer: str = UNKNOWN_PEER,
    ) -> Optional[str]:
        """
        Look up and verify, in a pool thread.  The first successful login
        with a hash in an older scheme stores an Argon2id hash instead.

        @return: the avatar ID (the user as stored, whatever the case of
            the login name), or C{None} if the credentials are wrong.
        @raise TemporaryFailure: the user's stored hash is in a scheme
            pop3gw does not accept (plain text, CRAM-MD5...): a problem for
            the operator, warned about when the users file was loaded, and
            not a failed login to count against the user.
        """
        found = self._users.lookupUser(address) if address is not None else None
        if found is None:
            self._verifier(self._dummy(), password)
            return None
        address, stored = found
        if self._apps is not None:
            app = self._apps.find(address, password)
            if app is not None:
                return self._checkAppPassword(app, password, now, service, peer)
            if not covers(self._apps.mainScope(address), service):
                # Refused like a wrong password, at the same cost.
                self._verifier(self._dummy(), password)
                return None
        if not canVerify(stored):
            if isMalformed(stored):
                raise TemporaryFailure(f"the password hash of {address} is malformed for its scheme")
            raise TemporaryFailure(f"the password scheme of {address} cannot be verified")
        key = self.cache.key(address, password)
        if self.cache.hit(key, stored, now):
            return str(address)
        if self._verifier(stored, password):
            upgraded = upgradedHash(stored, password)
            if upgraded is not None and self._users.upgradePasswordHash(address, stored, upgraded):
                stored = upgraded
            self.cache.add(key, stored, now)
            return str(address)
        return None

    def _checkAppPassword(
        self, app: AppPassword, password: bytes, now: float, service: Optional[str], peer: str
    ) -> Optional[str]:
        """
        Verify an app password (cached like a password), then its scope;
        note its use.
        """
        if not canVerify(app.hashed):
            return None
        # A key of its own: the reactor-side check of the main password
        # must not find (and drop, as stale) this entry.
        key = self.cache.key(app.user, APP_PASSWORD_KEY + password)
        if not self.cache.hit(key, app.hashed, now):
            if not self._verifier(app.hashed, password):
                return None
            self.cache.add(key, app.hashed, now)
        if not covers(app.scope, service):
            return None
        if self._recordUse is not None:
            last = self._lastRecorded.get((app.user, app.id))
            if last is None or now - last >= USE_RECORD_INTERVAL:
                self._lastRecorded[(app.user, app.id)] = now
                try:
                    self._recordUse(str(app.user), app.name, peer)
                except Exception:
                    self._log.failure("cannot record the use of an app password of {user}", user=str(app.user))
        return str(app.user)

    def _cbChecked(self, avatarId: Optional[str], start: float, peer: str, username: bytes, password: bytes):
        if avatarId is None:
            self.accounting.failed(peer, self.accounting.digest(username, password))
            return self._delayedFailure(start)
        self.watch.loggedIn(avatarId, peer)
        return avatarId

    def _ebServerFault(self, reason: Failure) -> Failure:
        if reason.check(Pop3gwError):
            return reason
        self._log.failure("users database lookup failed", reason)
        return Failure(TemporaryFailure("users database lookup failed"))

    def _delayedFailure(self, start: float) -> defer.Deferred:
        """
        A C{defer.Deferred} failing with C{UnauthorizedLogin}
        C{failureDelay} seconds after C{start}, counted as work in flight
        on the runner (a stopping server answers it before it closes the
        connection).
        """
        remaining = start + self._failureDelay - self._reactor.seconds()
        if remaining <= 0:
            return defer.fail(UnauthorizedLogin())

        def fail() -> None:
            raise UnauthorizedLogin()

        return self._runner.track(task.deferLater(self._reactor, remaining, fail))


def _raw(credentials, name: str) -> bytes:
    """
    The attribute C{name} of C{credentials} as bytes, whatever it is, to
    recognise a repeated malformed attempt.
    """
    value = getattr(credentials, name, b"")
    if isinstance(value, bytes):
        return value
    return str(value).encode("utf-8", "surrogatepass")


def _text(value: str | bytes) -> str:
    """
    C{value} as text; bytes must be strict UTF-8.

    @raise UnicodeDecodeError: invalid UTF-8.
    @raise TypeError: neither text nor bytes.
    """
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, str):
        return value
    raise TypeError("credentials must be text or bytes")




@attr.s(frozen=True, auto_attribs=True)
class PlaintextAuthPolicy:
    """
    When a password may be sent without TLS.

    @ivar mode: C{"never"} (only over TLS), C{"loopback"} (also from
        127.0.0.0/8 and C{::1}) or C{"always"}.
    """

    mode: str = attr.ib(validator=attr.validators.in_(PLAINTEXT_MODES))

    def allows(self, secure: bool, peerHost: str) -> bool:
        """
        @param secure: whether TLS is active on the connection.
        @param peerHost: the client's numeric address.
        @return: whether a plaintext password may be accepted.
        """
        if secure or self.mode == "always":
            return True
        if self.mode == "loopback":
            return isLoopback(peerHost)
        return False


@implementer(IPOP3Avatar)
@attr.s(frozen=True, auto_attribs=True)
class POP3Avatar:
    """
    A logged-in POP3 user.
    """

    address: Address
    store: IMaildropStore

    def openMaildrop(self) -> defer.Deferred:
        """
        See L{IPOP3Avatar.openMaildrop}.
        """
        return self.store.openMaildrop(self.address)


@implementer(ISubmissionAvatar)
@attr.s(frozen=True, auto_attribs=True)
class SubmissionAvatar:
    """
    A user authenticated for submission.

    @ivar senders: what the user may send as, taken from the users
        directory at login
        (L{pop3gw.interfaces.IDirectorySnapshot.sendersOf}).
    """

    address: Address
    senders: Senders
    router: IMailRouter
    sending: Optional[SendingPolicy] = None
    peer: str = UNKNOWN_PEER

    def mayUseSender(self, address: Address) -> bool:
        """
        See L{ISubmissionAvatar.mayUseSender}: answered from what was
        fetched at login, without a lookup.
        """
        return self.senders.allows(address)

    def checkRecipient(self, address: Address, accepted: int = 0):
        """
        See L{ISubmissionAvatar.checkRecipient}: the router's answer, then
        the sending limits' (a recipient that does not exist is refused
        as such and counts for nothing).
        """
        if self.sending is None:
            return self.router.checkRecipient(address)
        sending = self.sending
        d = defer.maybeDeferred(self.router.checkRecipient, address)

        def admit(users):
            return sending.admit(str(self.address), accepted, self.peer).addCallback(lambda _: users)

        return d.addCallback(admit)

    def beginDelivery(self, sender, recipients, trace: bytes = b"", smtputf8: bool = False):
        """
        See L{ISubmissionAvatar.beginDelivery}.
        """
        delivery = self.router.beginDelivery(sender, recipients, trace, smtputf8=smtputf8)
        if self.sending is None:
            return delivery
        return _CountedDelivery(delivery, self.sending, str(self.address), len(recipients), self.peer)


class _CountedDelivery:
    """
    A delivery that, once committed, counts against its sender's limits;
    everything else is the wrapped delivery's.
    """

    def __init__(self, delivery, sending: SendingPolicy, user: str, recipients: int, peer: str) -> None:
        self._delivery = delivery
        self._sending = sending
        self._user = user
        self._recipients = recipients
        self._peer = peer
        directlyProvides(self, providedBy(delivery))

    def __getattr__(self, name: str):
        return getattr(self._delivery, name)

    def commit(self) -> defer.Deferred:
        d = self._delivery.commit()

        def committed(result):
            self._sending.record(self._user, self._recipients, self._peer)
            return result

        return d.addCallback(committed)


def _logout() -> None:
    """
    Nothing to undo: the protocols release maildrops themselves.
    """


@implementer(IRealm)
@attr.s(frozen=True, auto_attribs=True)
class Realm:
    """
    Hands out L{POP3Avatar}s and L{SubmissionAvatar}s for the addresses
    L{PasswordChecker} returns.  A submission avatar gets what its user may
    send as from the directory's snapshot, once, here.
    """

    users: IUserDirectory
    store: IMaildropStore
    router: IMailRouter
    sending: Optional[SendingPolicy] = None

    def requestAvatar(self, avatarId, mind, *interfaces):
        """
        See C{IRealm.requestAvatar}.

        @param avatarId: the address as text or UTF-8 bytes.
        @param mind: the client (as L{pop3gw.address.describePeer} names
            it) for a submission login, else unused.
        @return: C{(interface, avatar, logout)} for the first supported
            interface.
        @raise NotImplementedError: none of C{interfaces} is supported.
        """
        address = Address.parse(avatarId)
        for interface in interfaces:
            if interface is IPOP3Avatar:
                return IPOP3Avatar, POP3Avatar(address, self.store), _logout
            if interface is ISubmissionAvatar:
                senders = self.users.snapshot().sendersOf(address)
                peer = mind if isinstance(mind, str) else UNKNOWN_PEER
                avatar = SubmissionAvatar(address, senders, self.router, self.sending, peer)
                return ISubmissionAvatar, avatar, _logout
        raise NotImplementedError("no supported avatar interface")
