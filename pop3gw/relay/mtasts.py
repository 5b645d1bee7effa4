# -*- test-case-name: tests.test_relay_mtasts -*-
"""
MTA-STS (RFC 8461) for direct MX delivery: the recipient domain's policy,
discovered through its C{_mta-sts} TXT record, fetched over HTTPS from
C{https://mta-sts.DOMAIN/.well-known/mta-sts.txt} with a verified
certificate, parsed, and cached in memory for its C{max_age}.

L{PolicySource.policyFor} gives the policy to apply to one delivery, or
C{None}:

  - the record's id names a cached policy still within its C{max_age}:
    that policy, without a fetch;
  - otherwise a record exists: the policy is fetched; if the fetch or the
    parse fails, the cached one (if any, still within its age) is used;
  - no record, or the lookup failed: the cached policy if any (RFC 8461
    5.1: an attacker who removes the record must not remove the policy
    with it), else none.

What the relay does with it is L{pop3gw.relay.dispatch}'s business.

The cache is kept in a file too (L{CacheFile}, C{DATA/mta-sts.json} in the
server), read at start and rewritten (atomically, mode 0600) when a new
policy is cached: a policy is honoured for its whole C{max_age} across
restarts (RFC 8461 5.1), so an attacker who blocks the policy fetch gains
nothing by waiting for one.  It holds at most L{MAX_CACHED_DOMAINS}
policies (those expiring first make room); a file that cannot be read as
one is an empty cache, with one warning line.
"""

from __future__ import annotations

import json
import re
from typing import Any, Callable, Optional, Sequence

import attr
from twisted.internet import defer, protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

#: The longest policy file read, in octets (RFC 8461 3.3 suggests 64 KiB).
MAX_POLICY_SIZE = 64 * 1024
#: The largest C{max_age} accepted (RFC 8461 3.2: 31557600 seconds).
MAX_AGE_LIMIT = 31557600
#: How long a policy fetch may take, in seconds (RFC 8461 3.3: 60 s).
FETCH_TIMEOUT = 60.0

MODES = ("enforce", "testing", "none")

#: Policies cached at most (in memory and in the file).
MAX_CACHED_DOMAINS = 10000
#: The largest cache file read, in octets.
MAX_CACHE_FILE = 16 * 1024 * 1024
#: The version of the cache file's format.
CACHE_VERSION = 1

_ID = re.compile(r"^[A-Za-z0-9]{1,32}$")


class PolicyError(Exception):
    """
    A policy file is malformed.
    """


@attr.s(auto_attribs=True, frozen=True)
class Policy:
    """
    One domain's policy.

    @ivar mode: C{enforce}, C{testing} or C{none}.
    @ivar mx: the MX host patterns (lower case, no trailing dot).
    @ivar maxAge: how long it may be cached, in seconds.
    """

    mode: str
    mx: tuple
    maxAge: int

    def allows(self, host: str) -> bool:
        """
        Whether the MX host C{host} matches one of the patterns.
        """
        return any(mxMatches(pattern, host) for pattern in self.mx)


def parsePolicy(data: bytes) -> Policy:
    """
    Parse a policy file (RFC 8461 3.2).

    @raise PolicyError: it is malformed.
    """
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise PolicyError("not ASCII") from None
    fields: dict = {}
    mx = []
    for line in text.replace("\r\n", "\n").split("\n"):
        if not line.strip():
            continue
        key, sep, value = line.partition(":")
        if not sep:
            raise PolicyError("a line without ':'")
        key, value = key.strip(), value.strip()
        if key == "mx":
            mx.append(value.lower().rstrip("."))
        else:
            fields.setdefault(key, value)
    if fields.get("version") != "STSv1":
        raise PolicyError("no 'version: STSv1'")
    mode = fields.get("mode")
    if mode not in MODES:
        raise PolicyError("mode is not enforce, testing or none")
    maxAge = fields.get("max_age", "")
    if not maxAge.isdigit() or int(maxAge) > MAX_AGE_LIMIT:
        raise PolicyError("bad max_age")
    if mode != "none" and not mx:
        raise PolicyError("no mx")
    return Policy(mode, tuple(mx), int(maxAge))


def policyId(texts: Sequence[str]) -> Optional[str]:
    """
    The C{id} of the C{_mta-sts} TXT record among C{texts}, or C{None} if
    there is not exactly one record starting with C{v=STSv1}, or its id is
    malformed (RFC 8461 3.1).
    """
    records = [t for t in texts if t.startswith("v=STSv1")]
    if len(records) != 1:
        return None
    for part in records[0].split(";"):
        key, _, value = part.strip().partition("=")
        if key == "id":
            return value if _ID.match(value) else None
    return None


def mxMatches(pattern: str, host: str) -> bool:
    """
    Whether the MX host C{host} matches the policy's C{pattern}: the same
    name, or for C{*.example.net} a name with exactly one more label on
    the left (RFC 8461 4.1).
    """
    host = host.lower().rstrip(".")
    pattern = pattern.lower().rstrip(".")
    if pattern.startswith("*."):
        first, dot, rest = host.partition(".")
        return bool(first) and bool(dot) and rest == pattern[2:]
    return host == pattern


@attr.s(auto_attribs=True)
class _Cached:
    policyId: str
    policy: Policy
    expires: float


def _bounded(entries: dict) -> dict:
    """
    C{entries} (domain -> L{_Cached}) cut to the L{MAX_CACHED_DOMAINS}
    that expire last.
    """
    if len(entries) <= MAX_CACHED_DOMAINS:
        return entries
    kept = sorted(entries.items(), key=lambda item: item[1].expires, reverse=True)[:MAX_CACHED_DOMAINS]
    return dict(kept)


def _entry(domain: Any, value: Any, now: float) -> Optional[tuple[str, _Cached]]:
    """
    One cache file entry as C{(domain, cached)}, or C{None} if it expired.

    @raise ValueError: it is malformed.
    """
    if not isinstance(domain, str) or not isinstance(value, dict):
        raise ValueError("bad entry")
    policyId, mode, mx = value.get("id"), value.get("mode"), value.get("mx")
    maxAge: Any = value.get("max_age")
    expires: Any = value.get("expires")
    if not isinstance(policyId, str) or not _ID.match(policyId) or mode not in MODES:
        raise ValueError("bad entry")
    if not isinstance(mx, list) or not all(isinstance(m, str) for m in mx) or (mode != "none" and not mx):
        raise ValueError("bad entry")
    if type(maxAge) is not int or not 0 <= maxAge <= MAX_AGE_LIMIT:
        raise ValueError("bad entry")
    if type(expires) not in (int, float):
        raise ValueError("bad entry")
    if expires <= now:
        return None
    # A clock set back must not stretch a policy beyond its max_age.
    expires = min(expires, now + maxAge)
    return domain.lower().rstrip("."), _Cached(policyId, Policy(mode, tuple(mx), maxAge), expires)


class CacheFile:
    """
    The policy cache kept in a file (JSON, see the module docstring).

    @param path: the file.
    @param runner: an L{pop3gw.interfaces.IBlockingRunner} the writes run
        in (one at a time; the last state wins).
    @param owner: who a new file is given to (see L{pop3gw.fsutil}).
    """

    log = Logger()

    def __init__(self, path: str, runner: Any, owner: Any = None) -> None:
        self.path = path
        self.runner = runner
        self.owner = owner
        self._writing = False
        self._pending: Optional[bytes] = None

    def load(self, now: float) -> dict:
        """
        Read the cache (blocking: at start).

        @return: domain -> L{_Cached}, the expired policies left out; empty
            when the file is missing or is not a cache (one warning line).
        """
        try:
            with open(self.path, "rb") as f:
                data = f.read(MAX_CACHE_FILE + 1)
        except FileNotFoundError:
            return {}
        except OSError as e:
            self.log.warn("mta-sts: cannot read {path}: {why}; starting with an empty cache", path=self.path,
                          why=e.strerror)
            return {}
        try:
            if len(data) > MAX_CACHE_FILE:
                raise ValueError("too large")
            document = json.loads(data)
            if not isinstance(document, dict) or document.get("version") != CACHE_VERSION:
                raise ValueError("not a cache")
            policies = document.get("policies")
            if not isinstance(policies, dict):
                raise ValueError("not a cache")
            entries = {}
            for domain, value in policies.items():
                entry = _entry(domain, value, now)
                if entry is not None:
                    entries[entry[0]] = entry[1]
        except (ValueError, RecursionError):
            self.log.warn("mta-sts: {path} is not a policy cache; starting with an empty one", path=self.path)
            return {}
        return _bounded(entries)

    def save(self, entries: dict) -> None:
        """
        Write C{entries} (domain -> L{_Cached}) in the runner, after any
        write in progress.
        """
        document = {
            "version": CACHE_VERSION,
            "policies": {
                domain: {
                    "id": cached.policyId,
                    "mode": cached.policy.mode,
                    "mx": list(cached.policy.mx),
                    "max_age": cached.policy.maxAge,
                    "expires": int(cached.expires) if float(cached.expires).is_integer() else cached.expires,
                }
                for domain, cached in sorted(entries.items())
            },
        }
        self._pending = json.dumps(document, indent=1).encode("ascii") + b"\n"
        if not self._writing:
            self._writeNext()

    def _writeNext(self) -> None:
        data, self._pending = self._pending, None
        if data is None:
            self._writing = False
            return
        self._writing = True
        d = self.runner.run(self._write, data)
        d.addErrback(self._ebWrite)
        d.addBoth(lambda ignored: self._writeNext())

    def _write(self, data: bytes) -> None:
        from pop3gw import fsutil

        fsutil.replaceFile(self.path, data, self.owner)

    def _ebWrite(self, failure: Failure) -> None:
        error = failure.value
        why = getattr(error, "strerror", None) or str(error) or type(error).__name__
        self.log.warn("mta-sts: cannot write {path}: {why}", path=self.path, why=why)


class PolicySource:
    """
    The MTA-STS policies of recipient domains (see the module docstring).

    @param clock: gives the time (C{seconds}).
    @param lookupTXT: C{lookupTXT(name)} -> a C{Deferred} firing with the
        texts of the TXT records at C{name} (an empty list if none).
    @param fetch: C{fetch(domain)} -> a C{Deferred} firing with the policy
        file's octets (see L{makeFetcher}).
    @param cacheFile: the L{CacheFile} the cache is read from now and
        written to, or C{None} to keep it in memory only.
    """

    log = Logger()

    def __init__(self, clock, lookupTXT: Callable, fetch: Callable, cacheFile: Optional[CacheFile] = None) -> None:
        self.clock = clock
        self._lookupTXT = lookupTXT
        self._fetch = fetch
        self._cacheFile = cacheFile
        self._cache: dict = {} if cacheFile is None else cacheFile.load(clock.seconds())

    def _cached(self, domain: str) -> Optional[_Cached]:
        cached = self._cache.get(domain)
        if cached is not None and cached.expires <= self.clock.seconds():
            del self._cache[domain]
            return None
        return cached

    @defer.inlineCallbacks
    def policyFor(self, domain: str):
        """
        @return: a C{Deferred} firing with C{domain}'s L{Policy} or C{None}
            (never failing).
        """
        domain = domain.lower().rstrip(".")
        try:
            texts = yield self._lookupTXT(f"_mta-sts.{domain}")
        except Exception:
            texts = []
        newId = policyId(texts)
        cached = self._cached(domain)
        if newId is None or (cached is not None and cached.policyId == newId):
            return None if cached is None else cached.policy
        try:
            data = yield self._fetch(domain)
            if len(data) > MAX_POLICY_SIZE:
                raise PolicyError("larger than 64 KiB")
            policy = parsePolicy(data)
        except Exception as e:
            self.log.warn(
                "mta-sts: cannot get the policy of {domain}: {why}", domain=domain, why=str(e) or type(e).__name__
            )
            return None if cached is None else cached.policy
        self._cache[domain] = _Cached(newId, policy, self.clock.seconds() + policy.maxAge)
        self._cache = _bounded(self._cache)
        if self._cacheFile is not None:
            now = self.clock.seconds()
            self._cacheFile.save({d: c for d, c in self._cache.items() if c.expires > now})
        self.log.info(
            "mta-sts: policy of {domain} id={id} mode={mode} max_age={maxAge}",
            domain=domain,
            id=newId,
            mode=policy.mode,
            maxAge=policy.maxAge,
        )
        return policy


class _LimitedBody(protocol.Protocol):
    """
    Collects a response body of at most L{MAX_POLICY_SIZE} octets.
    """

    def __init__(self, done: defer.Deferred) -> None:
        self.done = done
        self.parts: list = []
        self.size = 0

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        self.size += len(data)
        if self.size > MAX_POLICY_SIZE:
            self.done.errback(PolicyError("larger than 64 KiB"))
            # The response's transport is a producer: stop reading.
            stop = getattr(self.transport, "stopProducing", None)
            if stop is not None:
                stop()
            return
        self.parts.append(data)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        from twisted.web.client import ResponseDone
        from twisted.web.http import PotentialDataLoss

        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self.parts))
        else:
            self.done.errback(reason)


def _policyBody(response) -> defer.Deferred:
    """
    The body of a policy response: a C{200} with C{text/plain} (RFC 8461
    3.3); redirects are not followed.
    """
    if response.code != 200:
        raise PolicyError(f"HTTP status {response.code}")
    kind = (response.headers.getRawHeaders(b"content-type") or [b""])[0]
    if kind.split(b";")[0].strip().lower() != b"text/plain":
        raise PolicyError("not text/plain")
    done: defer.Deferred = defer.Deferred()
    response.deliverBody(_LimitedBody(done))
    return done


def makeFetcher(reactor, agent=None) -> Callable:
    """
    A C{fetch(domain)} for L{PolicySource}: C{GET
    https://mta-sts.DOMAIN/.well-known/mta-sts.txt}, the certificate
    verified against the system's trust roots for that name, within
    L{FETCH_TIMEOUT} seconds.

    @param agent: the C{twisted.web.client.Agent} (tests give one that
        reaches a server on loopback); by default one that connects only to
        public addresses (L{pop3gw.relay.mx.PublicOnlyReactor}), as direct
        MX delivery does.
    """
    if agent is None:
        from twisted.web.client import Agent, BrowserLikePolicyForHTTPS

        from pop3gw.relay.mx import PublicOnlyReactor

        agent = Agent(PublicOnlyReactor(reactor), BrowserLikePolicyForHTTPS(), connectTimeout=FETCH_TIMEOUT)

    def fetch(domain: str) -> defer.Deferred:
        from twisted.web.http_headers import Headers

        url = f"https://mta-sts.{domain}/.well-known/mta-sts.txt".encode("ascii")
        d = agent.request(b"GET", url, Headers({b"user-agent": [b"pop3gw"]}))
        d.addCallback(_policyBody)
        d.addTimeout(FETCH_TIMEOUT, reactor)
        return d

    return fetch
