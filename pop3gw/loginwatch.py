# -*- test-case-name: tests.test_loginwatch -*-
"""
Warnings about successful logins that look like a stolen password.

Two patterns, each one C{login warning:} line an operator can alert on (and
that the fail2ban filter does not count: the login succeeded):

  - B{many networks}: one user logs in from L{BURST_NETWORKS} or more
    networks within L{BURST_WINDOW} seconds (a password shared or sold);
  - B{new network}: a user with at least L{SETTLED_AFTER} seconds of
    history logs in from a network not seen for that user in the last
    L{HISTORY_KEEP} seconds (a login from another country after months
    from home).

A network is the client's IPv4 /16 or IPv6 /48: about one provider in one
region, which needs no GeoIP database.  Loopback and Unix-socket clients
are not watched.

The history (user -> network -> first and last seen, by the day) is kept
in C{DATA/logins.json} (L{LoginHistoryFile}), or with C{--store
postgresql://...} in the database (L{pop3gw.pglogins}), and survives a
restart; what changed is written at most once a minute, merged with what
is stored (under a lock, or in one transaction), so several processes, or
nodes, share it.
"""

from __future__ import annotations

import collections
import fcntl
import ipaddress
import json
import os
import time
from typing import Callable, Deque, Dict, List, Optional, Tuple

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from pop3gw import fsutil
from pop3gw.address import isLoopback
from pop3gw.interfaces import ILoginHistory, TemporaryFailure

#: Prefix lengths of one "network".
NETWORK_V4 = 16
NETWORK_V6 = 48

#: Distinct networks within L{BURST_WINDOW} that make a burst.
BURST_NETWORKS = 4
BURST_WINDOW = 3600.0

#: History a user needs before a new network is worth a warning.
SETTLED_AFTER = 30 * 86400.0

#: A network unseen this long is forgotten.
HISTORY_KEEP = 180 * 86400.0

#: Last-seen times are kept to the day, so the file changes at most daily
#: per user and network.
GRANULARITY = 86400.0

#: Logins kept per user for the burst rule.
RECENT_MAX = 64

FILE_VERSION = 1

#: The history file's name in the data directory.
HISTORY_FILE = "logins.json"

log = Logger()


def networkOf(peer: str) -> Optional[str]:
    """
    The network a client address belongs to (C{203.0.0.0/16},
    C{2001:db8:1::/48}), or C{None} for a client not watched (loopback,
    Unix socket, unknown).
    """
    if isLoopback(peer):
        return None
    try:
        address = ipaddress.ip_address(peer)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    prefix = NETWORK_V4 if address.version == 4 else NETWORK_V6
    return str(ipaddress.ip_network(f"{address}/{prefix}", strict=False))


History = Dict[str, Dict[str, List[float]]]


def mergeHistories(mine: History, theirs: History, now: float) -> History:
    """
    The union of two histories (earliest first-seen, latest last-seen),
    without the networks unseen for L{HISTORY_KEEP} seconds.
    """
    merged: History = {}
    for source in (theirs, mine):
        for user, networks in source.items():
            target = merged.setdefault(user, {})
            for network, (first, last) in networks.items():
                if now - last > HISTORY_KEEP:
                    continue
                known = target.get(network)
                target[network] = [min(first, known[0]), max(last, known[1])] if known else [first, last]
    return {user: networks for user, networks in merged.items() if networks}


@implementer(ILoginHistory)
class LoginHistoryFile:
    """
    The login history in a JSON file, rewritten atomically under the
    C{flock} of C{PATH.lock}.
    """

    def __init__(self, path: str, owner: Optional[fsutil.Owner] = None) -> None:
        self.where = self._path = path
        self._owner = owner

    def read(self) -> History:
        """
        See L{ILoginHistory.read}.  A missing file is an empty history; an
        unreadable or malformed one is logged and ignored (it is rewritten
        at the next save).
        """
        try:
            with open(self._path, encoding="utf-8") as f:
                data = json.load(f)
            users = data["users"]
            if data.get("version") != FILE_VERSION or not isinstance(users, dict):
                raise ValueError("unknown version")
            return {
                str(user): {str(net): [float(seen[0]), float(seen[1])] for net, seen in networks.items()}
                for user, networks in users.items()
            }
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
            log.warn("login history {path} unreadable ({error}); starting a new one", path=self._path,
                     error=getattr(e, "strerror", None) or str(e))
            return {}

    def merge(self, changes: History, now: float) -> History:
        """
        See L{ILoginHistory.merge}.
        """
        lockFD = fsutil.openLockFile(self._path + ".lock", self._owner)
        try:
            fcntl.flock(lockFD, fcntl.LOCK_EX)
            merged = mergeHistories(changes, self.read(), now)
            data = json.dumps({"version": FILE_VERSION, "users": merged}, sort_keys=True).encode("utf-8")
            fsutil.replaceFile(self._path, data, self._owner)
            return merged
        finally:
            os.close(lockFD)


class LoginWatch:
    """
    Watches successful logins; see the module docstring.

    @ivar history: user -> network -> C{[firstSeen, lastSeen]} (wall-clock
        seconds).
    """

    def __init__(self, reactor, path: Optional[str] = None, runner=None, owner: Optional[fsutil.Owner] = None,
                 wallclock: Callable[[], float] = time.time, store: Optional[ILoginHistory] = None) -> None:
        """
        @param reactor: C{IReactorTime}, for the burst window.
        @param path: the history file (L{LoginHistoryFile}).
        @param runner: an L{pop3gw.interfaces.IBlockingRunner} for the
            store's work (needed with C{path} or C{store}).
        @param store: where the history is kept, instead of C{path};
            with neither, the history is kept in memory.
        """
        self._reactor = reactor
        self._store = store if store is not None or path is None else LoginHistoryFile(path, owner)
        self._runner = runner
        self._wallclock = wallclock
        self.history: History = {}
        self._recent: Dict[str, Deque[Tuple[float, str, str]]] = {}
        self._burstWarned: Dict[str, float] = {}
        #: The users whose history changed since the last save.
        self._changed: set = set()
        self._saving: Optional[defer.Deferred] = None

    def load(self) -> None:
        """
        Read the stored history (blocking; at start-up).  A store that
        cannot be read is logged, and the history starts empty (what is
        stored is merged in at the next save).
        """
        if self._store is None:
            return
        try:
            self.history = self._store.read()
        except TemporaryFailure as e:
            log.warn("cannot read the login history {where}: {error}", where=self._store.where, error=str(e))

    def loadLater(self) -> defer.Deferred:
        """
        Read the stored history in the runner (a database store: the
        reactor thread never waits for it), merged with what was seen
        meanwhile.  Fires when done; never fails (a store that cannot be
        read is logged, as by L{load}).
        """
        if self._store is None:
            return defer.succeed(None)
        store = self._store

        def read() -> History:
            try:
                return store.read()
            except TemporaryFailure as e:
                log.warn("cannot read the login history {where}: {error}", where=store.where, error=str(e))
                return {}

        d = self._runner.run(read)

        def loaded(stored: History) -> None:
            self.history = mergeHistories(self.history, stored, self._wallclock())

        d.addCallback(loaded)
        d.addErrback(lambda f: log.failure("cannot read the login history", f))
        return d

    def loggedIn(self, user: str, peer: str) -> None:
        """
        Note a successful login of C{user} (as stored) from C{peer} (a
        numeric address), and log a warning if it fits a pattern.
        """
        network = networkOf(peer)
        if network is None:
            return
        key = user.lower()
        now = self._wallclock()
        self._checkNewNetwork(key, user, peer, network, now)
        self._checkBurst(key, user, peer, network)

    def _checkNewNetwork(self, key: str, user: str, peer: str, network: str, now: float) -> None:
        networks = self.history.setdefault(key, {})
        seen = networks.get(network)
        if seen is not None and now - seen[1] <= HISTORY_KEEP:
            if now - seen[1] >= GRANULARITY:
                seen[1] = now
                self._changed.add(key)
            return
        current = {net: s for net, s in networks.items() if now - s[1] <= HISTORY_KEEP}
        if current and now - min(s[0] for s in current.values()) >= SETTLED_AFTER:
            usual = sorted(current, key=lambda net: -current[net][1])
            since = time.strftime("%Y-%m-%d", time.gmtime(min(s[0] for s in current.values())))
            log.warn(
                "login warning: new network: user={user} rhost={rhost} network={network} "
                "usual={usual} since={since}",
                user=user, rhost=peer, network=network, usual=",".join(usual[:3]), since=since,
            )
        networks[network] = [now, now]
        self._changed.add(key)

    def _checkBurst(self, key: str, user: str, peer: str, network: str) -> None:
        now = self._reactor.seconds()
        recent = self._recent.get(key)
        if recent is None:
            recent = self._recent[key] = collections.deque(maxlen=RECENT_MAX)
        while recent and now - recent[0][0] > BURST_WINDOW:
            recent.popleft()
        recent.append((now, network, peer))
        networks: Dict[str, str] = {}
        for _, net, host in recent:
            networks.setdefault(net, host)
        warned = self._burstWarned.get(key)
        if len(networks) >= BURST_NETWORKS and (warned is None or now - warned > BURST_WINDOW):
            self._burstWarned[key] = now
            log.warn(
                "login warning: many networks: user={user} networks={count} window={window}s rhosts={rhosts}",
                user=user, count=len(networks), window=int(BURST_WINDOW), rhosts=",".join(networks.values()),
            )
        self._forgetIdle(now)

    def _forgetIdle(self, now: float) -> None:
        if len(self._recent) <= 1024:
            return
        for key in [k for k, d in self._recent.items() if not d or now - d[-1][0] > BURST_WINDOW]:
            del self._recent[key]
            self._burstWarned.pop(key, None)

    def save(self) -> defer.Deferred:
        """
        Write the history of the users whose history changed, merged with
        the stored one (in the runner), and take in what the other
        processes or nodes stored.  Fires when written; never fails (a
        failure is logged).
        """
        if self._store is None or not self._changed or self._saving is not None:
            return self._saving or defer.succeed(None)
        changed, self._changed = self._changed, set()
        snapshot = {
            user: {net: list(seen) for net, seen in self.history[user].items()}
            for user in changed if user in self.history
        }
        # Noted before the callbacks are added: a runner that answers at
        # once runs them (and ends the save) right there.
        self._saving = d = self._runner.run(self._store.merge, snapshot, self._wallclock())

        def written(merged: History) -> None:
            for user, networks in merged.items():
                mine = self.history.setdefault(user, {})
                for net, seen in networks.items():
                    known = mine.get(net)
                    mine[net] = [min(seen[0], known[0]), max(seen[1], known[1])] if known else seen

        def failed(reason) -> None:
            self._changed |= changed
            assert self._store is not None
            log.warn("cannot write login history {path}: {error}", path=self._store.where,
                     error=getattr(reason.value, "strerror", None) or str(reason.value))

        def done(result):
            self._saving = None
            return None

        d.addCallbacks(written, failed)
        d.addBoth(done)
        return d
