# -*- test-case-name: tests.test_config -*-
"""
Configuration: L{Options} (the C{twistd pop3gw} command line) merged with
the INI file given by C{--config} into one frozen L{Config}.

Precedence, lowest first: built-in defaults, the INI file, the command line.
An endpoint option given at least once replaces that listener's default
list; the value C{none} disables the listener.
"""

from __future__ import annotations

import configparser
import ipaddress
import os
import re
import socket
from typing import Optional

import attr
from twisted.python import usage

from pop3gw.address import Address, AddressError, parseDomain
from pop3gw.inboundpolicy import InboundPolicy
from pop3gw.wire import DEFAULT_MAX_MESSAGE_SIZE

DEFAULT_DATA_DIR = "pop3gw-data"

# Listener name -> default endpoint descriptions.
LISTENERS = {
    "pop3": ("tcp:1110:interface=127.0.0.1",),
    "pop3s": (),
    "submission": ("tcp:1587:interface=127.0.0.1",),
    "submissions": (),
    "mx": (),
    "lmtp": (),
    "postfix-map": (),
    "metrics": (),
}

# [limits] keys: name -> (default, type)
LIMITS = {
    "failure-delay": (2.0, float),
    "pop3-idle-timeout": (600.0, float),
    "smtp-idle-timeout": (300.0, float),
    "login-timeout": (180.0, float),
    "max-recipients": (100, int),
    "max-connections": (5000, int),
    "max-connections-per-ip": (20, int),
    "queue-lifetime": (5 * 86400.0, float),
    "hash-threads": (2, int),
    "messages-per-hour": (200, int),
    "recipients-per-day": (1000, int),
    "database-threads": (10, int),
    "relay-connections": (20, int),
}


#: The values of C{plaintext-auth} (L{pop3gw.auth.PlaintextAuthPolicy}).
PLAINTEXT_MODES = ("never", "loopback", "always")


@attr.s(auto_attribs=True, frozen=True)
class ACMESettings:
    """
    The C{[acme]} section (L{pop3gw.acmeclient}).

    Here rather than beside the ACME client, as C{PLAINTEXT_MODES} is not
    beside the login checks: every C{pop3gw} command reads the
    configuration, and neither the cryptography library nor Twisted's cred
    need be loaded for that.
    """

    directory: Optional[str] = None
    contact: Optional[str] = None
    http: tuple = ()
    caFile: Optional[str] = None

    @property
    def enabled(self) -> bool:
        return self.directory is not None


class ConfigError(Exception):
    """
    The configuration is invalid; the text is one line for the operator.
    """


@attr.s(frozen=True, auto_attribs=True)
class Config:
    """
    The complete, validated configuration.
    """

    dataDir: str
    domains: tuple
    listeners: dict  # name -> tuple of endpoint descriptions
    tlsCert: Optional[str]
    tlsKey: Optional[str]
    relayHost: Optional[str]
    relayPort: Optional[int]
    relayUsername: Optional[str]
    relayPasswordFile: Optional[str]
    relayVerifyTLS: bool
    plaintextAuth: str
    maxMessageSize: int
    hostname: str
    checkHeaderFrom: bool
    limits: dict
    postmaster: Optional[Address] = None
    recipientDelimiter: str = "+"
    inbound: InboundPolicy = InboundPolicy()
    acme: ACMESettings = ACMESettings()
    store: str = "maildir"
    mtaSTS: bool = True

    @property
    def usesDatabase(self) -> bool:
        """
        Whether users, aliases and maildrops live in a PostgreSQL database
        (C{--store postgresql://...}) rather than under the data directory.
        """
        return self.store != "maildir"
    workers: int = 1

    @property
    def mailDir(self) -> str:
        return os.path.join(self.dataDir, "mail")

    @property
    def queueDir(self) -> str:
        return os.path.join(self.dataDir, "queue")

    @property
    def usersPath(self) -> str:
        return os.path.join(self.dataDir, "users")

    @property
    def aliasesPath(self) -> str:
        return os.path.join(self.dataDir, "aliases")


def _splitList(value: str) -> list:
    return [v.strip() for v in value.replace(",", "\n").splitlines() if v.strip()]


def _bool(value: str, key: str) -> bool:
    v = value.strip().lower()
    if v in ("1", "yes", "true", "on"):
        return True
    if v in ("0", "no", "false", "off"):
        return False
    raise ConfigError(f"{key}: expected yes or no, got {value!r}")


def parseRelayHost(value: str) -> tuple:
    """
    Split C{HOST[:PORT]} (C{[v6]:PORT} for IPv6 literals).  Without a port,
    the port is C{None}: the relay service then uses 587 when relay
    credentials are configured, else 25.
    """
    value = value.strip()
    host, port = value, None
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            raise ConfigError(f"relay-host: bad value {value!r}")
        host, rest = value[1:end], value[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise ConfigError(f"relay-host: bad value {value!r}")
            port = rest[1:]
    elif value.count(":") == 1:
        host, port = value.split(":")
    if port is None:
        return host, None
    try:
        number = int(port)
    except ValueError:
        raise ConfigError(f"relay-host: bad port in {value!r}") from None
    if not host or not 0 < number < 65536:
        raise ConfigError(f"relay-host: bad value {value!r}")
    return host, number


def defaultHostname() -> str:
    """
    This host's fully qualified name, or C{localhost} when the system's
    name is not a valid host name.
    """
    name = socket.getfqdn()
    try:
        parseDomain(name)
    except AddressError:
        return "localhost"
    return name


#: The most worker processes C{--workers} accepts.
MAX_WORKERS = 64


def parseWorkers(value: str) -> int:
    """
    The number of worker processes C{value} names: a number from 1 to
    L{MAX_WORKERS}, or C{auto}, one per CPU.

    @raise ConfigError: anything else.
    """
    text = value.strip().lower()
    if text == "auto":
        return max(1, min(MAX_WORKERS, os.cpu_count() or 1))
    try:
        number = int(text)
    except ValueError:
        number = 0
    if not 1 <= number <= MAX_WORKERS:
        raise ConfigError(f"workers: must be a number from 1 to {MAX_WORKERS} or auto (got {value!r})")
    return number


def readINI(path: str) -> dict:
    """
    Read the INI file into C{{section: {key: value}}}.

    @raise ConfigError: unreadable or malformed file.
    """
    parser = configparser.ConfigParser(interpolation=None)
    try:
        with open(path, encoding="utf-8") as f:
            parser.read_file(f)
    except (OSError, configparser.Error, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from None
    known = {"pop3gw", "limits", "relay", "submission", "inbound", "acme"}
    for section in parser.sections():
        if section not in known:
            raise ConfigError(f"{path}: unknown section [{section}]")
    return {s: dict(parser.items(s)) for s in parser.sections()}


_SCALAR_KEYS = {
    "data-dir",
    "tls-cert",
    "tls-key",
    "relay-host",
    "plaintext-auth",
    "max-message-size",
    "hostname",
    "postmaster",
    "recipient-delimiter",
    "store",
    "workers",
}
_LIST_KEYS = {"domain"} | set(LISTENERS)


def buildConfig(cli: dict, configFile: Optional[str] = None) -> Config:
    """
    Merge defaults, the INI file and the command-line values C{cli}
    (key -> str for scalars, key -> list for repeatable options; keys are
    the long option names) into a L{Config}.

    @raise ConfigError: anything invalid, as one line.
    """
    ini = readINI(configFile) if configFile else {}
    main = dict(ini.get("pop3gw", {}))
    for key in main:
        if key not in _SCALAR_KEYS | _LIST_KEYS and key != "config":
            raise ConfigError(f"unknown key {key!r} in [pop3gw]")
    merged: dict = {}
    for key in _SCALAR_KEYS:
        if key in cli:
            merged[key] = cli[key]
        elif key in main:
            merged[key] = main[key]
    for key in _LIST_KEYS:
        if cli.get(key):
            merged[key] = list(cli[key])
        elif key in main:
            merged[key] = _splitList(main[key])

    dataDir = os.path.abspath(merged.get("data-dir", DEFAULT_DATA_DIR))

    domains = []
    for d in merged.get("domain", []):
        try:
            domains.append(parseDomain(d))
        except AddressError:
            raise ConfigError(f"domain: {d!r} is not a domain name") from None

    listeners = {}
    for name, default in LISTENERS.items():
        values = merged.get(name)
        if values is None:
            values = list(default)
        values = [v for v in values if v.lower() != "none"]
        listeners[name] = tuple(values)

    mode = merged.get("plaintext-auth", "loopback").strip().lower()
    if mode not in PLAINTEXT_MODES:
        raise ConfigError(f"plaintext-auth: must be one of never, loopback, always (got {mode!r})")

    try:
        maxSize = int(merged.get("max-message-size", DEFAULT_MAX_MESSAGE_SIZE))
    except ValueError:
        raise ConfigError("max-message-size: not a number") from None
    if maxSize < 1024:
        raise ConfigError("max-message-size: must be at least 1024")

    cert, key = merged.get("tls-cert"), merged.get("tls-key")
    if bool(cert) != bool(key):
        raise ConfigError("tls-cert and tls-key must be given together")

    relay = ini.get("relay", {})
    relayHost, relayPort = None, None
    if "relay-host" in merged:
        if not merged["relay-host"].strip():
            raise ConfigError("relay-host: empty value (leave it out to deliver to MX hosts)")
        relayHost, relayPort = parseRelayHost(merged["relay-host"])
    passwordFile = relay.get("password-file")
    if "password" in relay:
        raise ConfigError("[relay] password: keep the relay password in a 0600 file named by password-file")
    if bool(relay.get("username")) != bool(passwordFile):
        raise ConfigError("[relay] username and password-file must be given together")
    if relay.get("username") and not relayHost:
        raise ConfigError("[relay] username needs relay-host (credentials are only for a smarthost)")

    limits: dict[str, float] = {}
    section = ini.get("limits", {})
    for name in section:
        if name not in LIMITS:
            raise ConfigError(f"unknown key {name!r} in [limits]")
    for name, (fallback, kind) in LIMITS.items():
        raw = section.get(name)
        try:
            limits[name] = kind(raw) if raw is not None else fallback
        except ValueError:
            raise ConfigError(f"[limits] {name}: not a number") from None
        if limits[name] < 0:
            raise ConfigError(f"[limits] {name}: must not be negative")
    for name in ("hash-threads", "database-threads"):
        if limits[name] < 1:
            raise ConfigError(f"[limits] {name}: must be at least 1")

    store = parseStore(merged.get("store", "maildir"))
    if limits["relay-connections"] < 1:
        raise ConfigError("[limits] relay-connections: must be at least 1")

    submission = ini.get("submission", {})
    checkFrom = _bool(submission.get("check-header-from", "yes"), "check-header-from")

    hostname = merged.get("hostname")
    if hostname:
        try:
            parseDomain(hostname)
        except AddressError:
            raise ConfigError(f"hostname: {hostname!r} is not a host name") from None
    else:
        hostname = defaultHostname()

    postmaster = None
    if merged.get("postmaster", "").strip():
        try:
            postmaster = Address.parse(merged["postmaster"].strip())
        except AddressError:
            raise ConfigError(f"postmaster: {merged['postmaster'].strip()!r} is not an address (user@domain)") from None
    delimiter = merged.get("recipient-delimiter", "+").strip()
    if any(c in "@\"\\()<>[],;:" or not c.isprintable() or c.isspace() for c in delimiter):
        raise ConfigError(f"recipient-delimiter: {delimiter!r} holds a character that cannot be in a local part")

    workers = parseWorkers(merged["workers"]) if "workers" in merged else 1

    return Config(
        dataDir=dataDir,
        domains=tuple(domains),
        listeners=listeners,
        tlsCert=os.path.abspath(cert) if cert else None,
        tlsKey=os.path.abspath(key) if key else None,
        relayHost=relayHost,
        relayPort=relayPort,
        relayUsername=relay.get("username") or None,
        relayPasswordFile=passwordFile,
        relayVerifyTLS=_bool(relay.get("verify-tls", "yes"), "verify-tls"),
        mtaSTS=_bool(relay.get("mta-sts", "yes"), "[relay] mta-sts"),
        plaintextAuth=mode,
        maxMessageSize=maxSize,
        hostname=hostname,
        checkHeaderFrom=checkFrom,
        limits=limits,
        postmaster=postmaster,
        recipientDelimiter=delimiter,
        inbound=parseInbound(ini.get("inbound", {})),
        store=store,
        acme=parseACME(ini.get("acme", {}), bool(cert)),
        workers=workers,
    )


_ACME_KEYS = {"directory", "contact", "http", "ca-file"}


def parseACME(section: dict, operatorCertificate: bool = False) -> ACMESettings:
    """
    The C{[acme]} section (see L{pop3gw.acmeclient}).

    @param operatorCertificate: whether C{--tls-cert} names a certificate
        (then ACME may not be on).
    @raise ConfigError: an unknown key or a bad value.
    """
    for key in section:
        if key not in _ACME_KEYS:
            raise ConfigError(f"unknown key {key!r} in [acme]")
    directory = section.get("directory", "").strip() or None
    if directory is None:
        if any(section.get(k, "").strip() for k in ("http", "contact", "ca-file")):
            raise ConfigError("[acme] needs directory (the ACME server's directory URL) to be on")
        return ACMESettings()
    if not directory.startswith("https://"):
        raise ConfigError(f"[acme] directory: must be an https:// URL, got {directory!r}")
    if operatorCertificate:
        raise ConfigError("[acme] directory and --tls-cert both name the certificate to serve: use one")
    http = tuple(_splitList(section.get("http", "")))
    if not http:
        raise ConfigError("[acme] http: name the endpoint the CA's HTTP-01 validation reaches (port 80), e.g. tcp:80")
    contact = section.get("contact", "").strip() or None
    if contact is not None:
        try:
            Address.parse(contact.removeprefix("mailto:"))
        except AddressError:
            raise ConfigError(f"[acme] contact: {contact!r} is not an e-mail address") from None
        contact = contact.removeprefix("mailto:")
    caFile = section.get("ca-file", "").strip() or None
    return ACMESettings(directory, contact, http, os.path.abspath(caFile) if caFile else None)


_INBOUND_KEYS = {
    "checks",
    "dns-server",
    "dns-timeout",
    "deadline",
    "dmarc-reject",
    "dmarc-quarantine",
    "subject-tag",
    "allow-domains",
    "temperror",
    "rspamd-url",
    "rspamd-timeout",
    "rspamd-failure",
    "lmtp-checks",
    "trusted-authserv-ids",
    "lmtp-dmarc-reject",
}

#: What C{trusted-authserv-ids} takes: the host-name-like authserv-ids
#: front MTAs write (RFC 8601 2.5).
_AUTHSERV_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.\-_]{0,252}$")


def _seconds(section: dict, key: str, fallback: float) -> float:
    raw = section.get(key)
    if raw is None:
        return fallback
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"[inbound] {key}: not a number") from None
    if not value > 0:
        raise ConfigError(f"[inbound] {key}: must be more than 0")
    return value


def _acceptOrDefer(section: dict, key: str) -> bool:
    value = section.get(key, "accept").strip().lower()
    if value not in ("accept", "defer"):
        raise ConfigError(f"[inbound] {key}: must be accept or defer (got {value!r})")
    return value == "defer"


def parseInbound(section: dict) -> InboundPolicy:
    """
    The C{[inbound]} section (the checks of mail received on C{--mx}, and
    with C{lmtp-checks} on LMTP and C{pop3gw deliver}) as an
    L{InboundPolicy}.

    @raise ConfigError: an unknown key or a bad value.
    """
    for key in section:
        if key not in _INBOUND_KEYS:
            raise ConfigError(f"unknown key {key!r} in [inbound]")
    dnsServer = None
    if section.get("dns-server", "").strip():
        raw = section["dns-server"].strip()
        host, port = (raw, None) if raw.count(":") > 1 and not raw.startswith("[") else parseRelayHost(raw)
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ConfigError(f"[inbound] dns-server: {host!r} is not an IP address") from None
        dnsServer = (host, port or 53)
    allow = set()
    for domain in _splitList(section.get("allow-domains", "")):
        try:
            allow.add(parseDomain(domain).lower())
        except AddressError:
            raise ConfigError(f"[inbound] allow-domains: {domain!r} is not a domain name") from None
    trusted = set()
    for name in _splitList(section.get("trusted-authserv-ids", "")):
        if not _AUTHSERV_ID.match(name):
            raise ConfigError(f"[inbound] trusted-authserv-ids: {name!r} is not an authserv-id")
        trusted.add(name.lower())
    url = section.get("rspamd-url", "").strip() or None
    if url is not None and not url.lower().startswith(("http://", "https://")):
        raise ConfigError("[inbound] rspamd-url: must be an http:// or https:// URL")
    return InboundPolicy(
        checks=_bool(section.get("checks", "yes"), "[inbound] checks"),
        dnsServer=dnsServer,
        dnsTimeout=_seconds(section, "dns-timeout", 5.0),
        deadline=_seconds(section, "deadline", 20.0),
        dmarcReject=_bool(section.get("dmarc-reject", "yes"), "[inbound] dmarc-reject"),
        dmarcQuarantine=_bool(section.get("dmarc-quarantine", "yes"), "[inbound] dmarc-quarantine"),
        subjectTag=section.get("subject-tag", "[SPAM]").strip(),
        allowDomains=frozenset(allow),
        temperrorDefer=_acceptOrDefer(section, "temperror"),
        rspamdURL=url,
        rspamdTimeout=_seconds(section, "rspamd-timeout", 10.0),
        rspamdFailClosed=_acceptOrDefer(section, "rspamd-failure"),
        lmtpChecks=_bool(section.get("lmtp-checks", "no"), "[inbound] lmtp-checks"),
        trustedAuthservIDs=frozenset(trusted),
        lmtpDMARCReject=_bool(section.get("lmtp-dmarc-reject", "no"), "[inbound] lmtp-dmarc-reject"),
    )


def parseStore(value: str) -> str:
    """
    Check a C{--store} value: C{maildir} or a PostgreSQL connection URI
    (C{postgresql://...} or C{postgres://...}).

    @return: C{"maildir"} or the URI.
    @raise ConfigError: anything else.
    """
    value = value.strip()
    if value.lower() == "maildir":
        return "maildir"
    lowered = value.lower()
    if lowered.startswith("postgresql://") or lowered.startswith("postgres://"):
        return value
    raise ConfigError("store: must be maildir or a postgresql:// URI")


class Options(usage.Options):
    """
    C{twistd pop3gw} options.  After parsing, C{self.config} is the merged
    L{Config}.
    """

    synopsis = "[options]"
    longdesc = (
        "POP3 maildrop server and SMTP submission gateway. "
        "Endpoint options are Twisted strports descriptions and may be repeated; "
        "'none' disables a listener."
    )
    optParameters = [
        ["config", None, None, "INI file (see etc/pop3gw.ini); command-line options override it"],
        ["data-dir", None, None, f"all state lives here (default: ./{DEFAULT_DATA_DIR})"],
        ["tls-cert", None, None, "PEM certificate chain for STLS, STARTTLS and implicit TLS (default: a self-signed one generated under DATA/tls/)"],
        ["tls-key", None, None, "PEM private key for --tls-cert"],
        ["relay-host", None, None, "smarthost HOST[:PORT] for non-local mail (default: the domains' MX hosts)"],
        ["plaintext-auth", None, None, "never|loopback|always: where passwords may be sent without TLS (default loopback)"],
        ["max-message-size", None, None, f"largest message accepted, in octets (default {DEFAULT_MAX_MESSAGE_SIZE})"],
        ["hostname", None, None, "name used in greetings and trace headers (default: this host's FQDN)"],
        ["store", None, None, "where users, aliases and maildrops live: maildir (default, under --data-dir) or a postgresql:// URI shared by several nodes"],
        ["workers", None, None, "N processes serving the same listeners, or auto (one per CPU); default 1"],
    ]

    def __init__(self) -> None:
        super().__init__()
        self._lists: dict = {}

    def _append(self, key: str, value: str) -> None:
        self._lists.setdefault(key, []).append(value)

    def opt_domain(self, value: str) -> None:
        """a local domain; mail for it is delivered locally (repeatable)"""
        self._append("domain", value)

    def opt_pop3(self, value: str) -> None:
        """POP3 listener endpoint (repeatable; default tcp:1110:interface=127.0.0.1)"""
        self._append("pop3", value)

    def opt_pop3s(self, value: str) -> None:
        """POP3 over implicit TLS endpoint, e.g. tcp:995 (repeatable)"""
        self._append("pop3s", value)

    def opt_submission(self, value: str) -> None:
        """SMTP submission endpoint (repeatable; default tcp:1587:interface=127.0.0.1)"""
        self._append("submission", value)

    def opt_submissions(self, value: str) -> None:
        """submission over implicit TLS endpoint, e.g. tcp:465 (repeatable)"""
        self._append("submissions", value)

    def opt_mx(self, value: str) -> None:
        """SMTP endpoint receiving mail from the world for the local domains, e.g. tcp:25 (repeatable; off by default)"""
        self._append("mx", value)

    def opt_lmtp(self, value: str) -> None:
        """LMTP (RFC 2033) endpoint for an MTA in front, e.g. unix:/run/pop3gw/lmtp (repeatable; off by default)"""
        self._append("lmtp", value)

    def opt_postfix_map(self, value: str) -> None:
        """Postfix socketmap lookup endpoint answering whether an address is a local recipient, e.g. unix:/run/pop3gw/map (repeatable; off by default)"""
        self._append("postfix-map", value)

    def opt_metrics(self, value: str) -> None:
        """HTTP endpoint serving /metrics (Prometheus) and /healthz, e.g. tcp:9134:interface=127.0.0.1 (off by default)"""
        self._append("metrics", value)

    def postOptions(self) -> None:
        cli = {k: v for k, v in self.items() if v is not None and k != "config"}
        cli.update(self._lists)
        try:
            self.config = buildConfig(cli, self["config"])
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None
