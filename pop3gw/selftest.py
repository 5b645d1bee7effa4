# -*- test-case-name: tests.test_selftest -*-
"""
C{pop3gw selftest}: probe a running mail server from the outside.

The probes do what an auditor (or an attacker) would do with a plain
socket: look for passwords accepted in clear, commands injected before a
TLS handshake, SMTP smuggling, an open relay, a bad certificate or an old
TLS version, and (given an account) LIST sizes that do not match what RETR
sends.  Nothing here knows pop3gw's internals, so the same probes run
against any POP3 or SMTP server.

Each probe yields one L{Result}, printed as C{PASS name: detail} or
C{FAIL name: detail}.  The probes are blocking socket code: this is a
command-line tool, not part of the server.

The smuggling probes never complete a message: they send the suspicious
end-of-data sequence followed by a smuggled command and then listen.  A
server that accepts the message there, or answers the smuggled commands,
has ended the message early; one that stays silent is still reading the
message (the connection is then dropped, so nothing is delivered), and one
that refuses the look-alike with a single error reply (Postfix's
C{smtpd_forbid_bare_newline}) is safe too.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import re
import socket
import ssl
import time
import uuid
import warnings
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple

import attr

#: Seconds to wait for a reply the server owes.
TIMEOUT = 10.0

#: Seconds to listen for a reply the server must NOT send.
QUIET = 1.0

#: A certificate expiring sooner than this many days is a failure.
MIN_CERT_DAYS = 14

#: How long the dot-stuffing probe waits for its message to arrive.
DELIVERY_WAIT = 15.0

#: The end-of-data look-alikes of SMTP smuggling (Longford/SEC Consult
#: 2023): each must not end a message.
SMUGGLING_VECTORS: Tuple[Tuple[str, bytes], ...] = (
    ("LF.LF", b"\n.\n"),
    ("LF.CRLF", b"\n.\r\n"),
    ("CRLF.LF", b"\r\n.\n"),
    ("CR.CR", b"\r.\r"),
    ("CRLF.CR", b"\r\n.\r"),
)

#: Recipient forms that must never be relayed by an MX: each names a host
#: that is not the server's, dressed up as local mail.  C{{d}} is a local
#: domain.
RELAY_DISGUISES: Tuple[str, ...] = (
    "selftest@example.net",
    "selftest%example.net@{d}",
    "\"selftest@example.net\"@{d}",
    "@{d}:selftest@example.net",
    "example.net!selftest@{d}",
    "selftest@example.net@{d}",
    "selftest@example.net.",
    "selftest@EXAMPLE.NET",
)

LISTENER_KINDS = ("pop3", "pop3s", "submission", "submissions", "mx")


@attr.s(frozen=True, auto_attribs=True)
class Result:
    """
    The outcome of one probe.
    """

    name: str
    passed: bool
    detail: str

    def line(self) -> str:
        """
        The line printed for this result.
        """
        return f"{'PASS' if self.passed else 'FAIL'} {self.name}: {self.detail}"


@attr.s(frozen=True, auto_attribs=True)
class Target:
    """
    One listener to probe.

    @ivar kind: one of L{LISTENER_KINDS}.
    """

    kind: str
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@attr.s(auto_attribs=True)
class Account:
    """
    The login the authenticated probes use.
    """

    address: str
    password: str


@attr.s(auto_attribs=True)
class Options:
    """
    What the probes may use besides the targets.

    @ivar caFile: a PEM bundle of CAs to trust instead of the system's.
    @ivar domain: a local domain of the server (for C{postmaster@} on the
        MX and the relay probes).
    """

    account: Optional[Account] = None
    caFile: Optional[str] = None
    domain: Optional[str] = None
    timeout: float = TIMEOUT
    quiet: float = QUIET


class ProbeError(Exception):
    """
    The server did not do what a probe needed to go on (the message says
    what); the probe fails with it.
    """


def parseHostPort(text: str) -> Tuple[str, int]:
    """
    Parse C{HOST:PORT} or C{[V6]:PORT}.

    @raise ValueError: anything else.
    """
    m = re.fullmatch(r"\[([^\]]+)\]:(\d+)|([^:\[\]]+):(\d+)", text.strip())
    if not m:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    host = m.group(1) or m.group(3)
    port = int(m.group(2) or m.group(4))
    if not 0 < port < 65536:
        raise ValueError(f"bad port in {text!r}")
    return host, port


def _splitEndpoint(description: str) -> List[str]:
    parts, current, chars = [], "", iter(description)
    for ch in chars:
        if ch == "\\":
            current += next(chars, "")
        elif ch == ":":
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    return parts


def targetFromEndpoint(kind: str, description: str) -> Optional[Target]:
    """
    The address to probe for a server endpoint description such as
    C{tcp:1110:interface=127.0.0.1}, or C{None} for one that cannot be
    reached over TCP from here (a Unix socket).  A listener on every
    interface is probed on loopback.
    """
    parts = _splitEndpoint(description)
    if parts[0] not in ("tcp", "tcp6"):
        return None
    positional = [p for p in parts[1:] if "=" not in p]
    keywords = dict(p.split("=", 1) for p in parts[1:] if "=" in p)
    port = keywords.get("port") or (positional[0] if positional else None)
    if port is None or not port.isdigit() or int(port) == 0:
        return None
    interface = keywords.get("interface") or (positional[2] if len(positional) > 2 else "")
    if interface in ("", "0.0.0.0"):
        interface = "127.0.0.1"
    elif interface == "::":
        interface = "::1"
    return Target(kind, interface, int(port))


def _isLoopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class Conversation:
    """
    A blocking line conversation with one server, which may be switched
    to TLS.
    """

    def __init__(self, target: Target, timeout: float) -> None:
        self.target = target
        self.timeout = timeout
        self.sock: socket.socket = socket.create_connection((target.host, target.port), timeout=timeout)
        self.buffer = b""

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise ProbeError("the server closed the connection")
        self.buffer += data

    def readLine(self) -> bytes:
        """
        One line, without its line end.

        @raise ProbeError: the server closed the connection or said nothing
            in time.
        """
        try:
            while b"\n" not in self.buffer:
                if len(self.buffer) > 65536:
                    raise ProbeError("a line longer than 64 KiB")
                self._fill()
        except socket.timeout:
            raise ProbeError(f"no reply within {self.timeout:g} s") from None
        except OSError as e:
            raise ProbeError(f"connection failed: {e.strerror or e}") from None
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.rstrip(b"\r")

    def pending(self, wait: float) -> bytes:
        """
        Whatever the server sends within C{wait} seconds (and what was
        already read but not consumed); empty when it stays silent.
        """
        self.sock.settimeout(wait)
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    break
                self.buffer += data
        except (socket.timeout, ssl.SSLError, OSError):
            pass
        finally:
            self.sock.settimeout(self.timeout)
        data, self.buffer = self.buffer, b""
        return data

    def startTLS(self, context: ssl.SSLContext, serverName: str) -> None:
        """
        Wrap the connection in TLS.

        @raise ssl.SSLError: the handshake failed.
        """
        self.sock = context.wrap_socket(self.sock, server_hostname=serverName)

    # POP3

    def pop3(self, command: bytes) -> bytes:
        self.send(command + b"\r\n")
        return self.readLine()

    def pop3Multi(self) -> List[bytes]:
        lines: List[bytes] = []
        while True:
            line = self.readLine()
            if line == b".":
                return lines
            lines.append(line[1:] if line.startswith(b".") else line)

    # SMTP

    def smtpReply(self) -> Tuple[int, List[str]]:
        lines: List[str] = []
        while True:
            line = self.readLine().decode("utf-8", "replace")
            if len(line) < 3 or not line[:3].isdigit():
                raise ProbeError(f"not an SMTP reply: {line[:80]!r}")
            lines.append(line[4:])
            if line[3:4] != "-":
                return int(line[:3]), lines

    def smtp(self, command: str) -> Tuple[int, List[str]]:
        self.send(command.encode("utf-8") + b"\r\n")
        return self.smtpReply()


def _verifyingContext(options: Options) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=options.caFile)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def _anyContext() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def _oldTLSContext(version: ssl.TLSVersion) -> ssl.SSLContext:
    context = _anyContext()
    context.set_ciphers("ALL:@SECLEVEL=0")
    with warnings.catch_warnings():
        # Deprecated on purpose: this context exists to be refused.
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = version
        context.maximum_version = version
    return context


class Prober:
    """
    The probes of one target.

    @ivar implicit: whether the listener speaks TLS from the first byte.
    """

    def __init__(self, target: Target, options: Options) -> None:
        self.target = target
        self.options = options
        self.implicit = target.kind in ("pop3s", "submissions")
        self.pop3 = target.kind in ("pop3", "pop3s")
        self.tls = self.implicit

    def name(self, probe: str) -> str:
        return f"{self.target.kind}-{probe}"

    def connect(self, context: Optional[ssl.SSLContext] = None) -> Conversation:
        """
        Connect, wrap in TLS for an implicit-TLS listener, read the
        greeting.
        """
        conversation = Conversation(self.target, self.options.timeout)
        try:
            if self.implicit:
                conversation.startTLS(context or _anyContext(), self.target.host)
            if self.pop3:
                greeting = conversation.readLine()
                if not greeting.startswith(b"+OK"):
                    raise ProbeError(f"greeting {greeting[:80]!r}")
            else:
                code, lines = conversation.smtpReply()
                if code != 220:
                    raise ProbeError(f"greeting {code} {lines[0][:80]}")
        except BaseException:
            conversation.close()
            raise
        return conversation

    # The TLS switch of plaintext listeners.

    def capabilities(self, conversation: Conversation) -> List[str]:
        if self.pop3:
            if not conversation.pop3(b"CAPA").startswith(b"+OK"):
                return []
            return [line.decode("utf-8", "replace").upper() for line in conversation.pop3Multi()]
        code, lines = conversation.smtp(f"EHLO {self.heloName()}")
        if code != 250:
            raise ProbeError(f"EHLO refused: {code} {lines[0][:80]}")
        return [line.upper() for line in lines[1:]]

    def heloName(self) -> str:
        return "selftest.invalid"

    def tlsCommand(self) -> bytes:
        return b"STLS" if self.pop3 else b"STARTTLS"

    def offersTLS(self, capabilities: Sequence[str]) -> bool:
        word = self.tlsCommand().decode()
        return any(c.split()[0] == word for c in capabilities if c.split())

    def switchToTLS(self, conversation: Conversation, context: ssl.SSLContext) -> None:
        """
        Ask for TLS on a plaintext listener and do the handshake.
        """
        if self.pop3:
            reply = conversation.pop3(b"STLS")
            if not reply.startswith(b"+OK"):
                raise ProbeError(f"STLS refused: {reply[:80]!r}")
        else:
            code, lines = conversation.smtp("STARTTLS")
            if code != 220:
                raise ProbeError(f"STARTTLS refused: {code} {lines[0][:80]}")
        conversation.startTLS(context, self.target.host)

    def secureConnection(self, context: Optional[ssl.SSLContext] = None) -> Conversation:
        """
        A connection in TLS, ready for commands (EHLO said again on SMTP).
        """
        conversation = self.connect(context)
        try:
            if not self.implicit:
                self.capabilities(conversation)
                self.switchToTLS(conversation, context or _anyContext())
            if not self.pop3:
                self.capabilities(conversation)
        except BaseException:
            conversation.close()
            raise
        return conversation

    def plaintextLogins(self, capabilities: Sequence[str]) -> List[str]:
        """
        The password mechanisms offered before TLS.
        """
        offered = []
        for capability in capabilities:
            words = capability.split()
            if not words:
                continue
            if self.pop3 and words[0] == "USER":
                offered.append("USER/PASS")
            elif words[0] in ("SASL", "AUTH") or words[0].startswith("AUTH="):
                mechanisms = words[1:] if words[0] in ("SASL", "AUTH") else [words[0][5:]] + words[1:]
                offered += [m for m in mechanisms if m in ("PLAIN", "LOGIN")]
        return offered

    # Probes.

    def run(self) -> Iterator[Result]:
        try:
            conversation = self.connect()
        except (OSError, ProbeError, ssl.SSLError) as e:
            yield Result(self.name("connect"), False, f"cannot talk to {self.target}: {_describe(e)}")
            return
        try:
            capabilities = self.capabilities(conversation) if not self.implicit else []
        except ProbeError as e:
            yield Result(self.name("connect"), False, f"{self.target}: {e}")
            return
        finally:
            conversation.close()
        yield Result(self.name("connect"), True, f"{self.target} answers")
        self.tls = tls = self.implicit or self.offersTLS(capabilities)
        if not self.implicit:
            yield from self.probePlaintext(capabilities, tls)
        if tls:
            yield from self.probeTLS()
        if self.pop3:
            if self.options.account is not None:
                yield from self.probeMailbox()
        elif self.target.kind == "mx":
            yield from self.probeRelay()
            yield from self.probeSmuggling(self.postmaster())
        else:
            yield from self.probeRelay()
            if self.options.account is not None:
                yield from self.probeSubmission()

    def probePlaintext(self, capabilities: Sequence[str], tls: bool) -> Iterator[Result]:
        word = self.tlsCommand().decode()
        if tls:
            yield Result(self.name("tls-offered"), True, f"{word} offered")
        else:
            yield Result(self.name("tls-offered"), False, f"{word} not offered: everything crosses the network in clear")
        if self.target.kind == "mx":
            return
        offered = self.plaintextLogins(capabilities)
        if self.pop3 and "USER/PASS" not in offered:
            offered += self.userAcceptedAnyway()
        if not offered:
            yield Result(self.name("plaintext-auth"), True, "no password login before TLS")
        elif _isLoopback(self.target.host):
            yield Result(self.name("plaintext-auth"), True,
                         f"{', '.join(offered)} offered before TLS to this loopback client (probe from another "
                         "host to see what the network is offered)")
        else:
            yield Result(self.name("plaintext-auth"), False,
                         f"{', '.join(offered)} offered before TLS: passwords can be read on the wire")
        if tls:
            yield self.probeInjection()

    def userAcceptedAnyway(self) -> List[str]:
        """
        Whether C{USER} works before TLS even though C{CAPA} does not
        list it.
        """
        try:
            conversation = self.connect()
        except (OSError, ProbeError):
            return []
        try:
            reply = conversation.pop3(b"USER selftest@example.invalid")
            return ["USER/PASS"] if reply.startswith(b"+OK") else []
        except ProbeError:
            return []
        finally:
            conversation.close()

    def probeInjection(self) -> Result:
        """
        Send the TLS command and another command in one packet: the
        second must not be answered, neither in clear nor inside TLS.
        """
        name = self.name("tls-injection")
        word = self.tlsCommand()
        injected = b"CAPA" if self.pop3 else b"NOOP"
        try:
            conversation = self.connect()
        except (OSError, ProbeError) as e:
            return Result(name, False, f"cannot connect: {_describe(e)}")
        try:
            if not self.pop3:
                self.capabilities(conversation)
            conversation.send(word + b"\r\n" + injected + b"\r\n")
            first = conversation.readLine()
            if not (first.startswith(b"+OK") or first.startswith(b"220")):
                return Result(name, True, f"{word.decode()} with a pipelined command refused: {first[:60]!r}")
            clear = conversation.pending(self.options.quiet)
            if clear:
                return Result(name, False, f"answered the {injected.decode()} sent with {word.decode()} in clear")
            try:
                conversation.startTLS(_anyContext(), self.target.host)
            except (ssl.SSLError, OSError):
                return Result(name, True, f"the connection was dropped after the pipelined {injected.decode()}")
            answer = conversation.pending(self.options.quiet)
            if answer:
                return Result(name, False,
                              f"ran the {injected.decode()} sent before the TLS handshake inside TLS "
                              "(plaintext command injection)")
            return Result(name, True, f"the {injected.decode()} sent before the TLS handshake was discarded")
        except ProbeError as e:
            return Result(name, True, f"{word.decode()} with a pipelined command ended the session ({e})")
        finally:
            conversation.close()

    def probeTLS(self) -> Iterator[Result]:
        yield self.probeCertificate()
        yield self.probeVersions()

    def probeCertificate(self) -> Result:
        name = self.name("certificate")
        try:
            conversation = self.secureConnection(_verifyingContext(self.options))
        except ssl.SSLCertVerificationError as e:
            return Result(name, False, f"not trusted for {self.target.host}: {e.verify_message or e.reason}")
        except (OSError, ProbeError, ssl.SSLError) as e:
            return Result(name, False, f"TLS failed: {_describe(e)}")
        try:
            assert isinstance(conversation.sock, ssl.SSLSocket)
            cert: Any = conversation.sock.getpeercert() or {}
            version = conversation.sock.version()
        finally:
            conversation.close()
        notAfter = datetime.datetime.fromtimestamp(ssl.cert_time_to_seconds(cert["notAfter"]), datetime.timezone.utc)
        days = (notAfter - datetime.datetime.now(datetime.timezone.utc)).days
        subject = dict(x[0] for x in cert.get("subject", ()))
        issuer = dict(x[0] for x in cert.get("issuer", ()))
        detail = (f"{subject.get('commonName', '?')} issued by {issuer.get('commonName', '?')}, "
                  f"expires {notAfter:%Y-%m-%d} ({days} days), {version}")
        if days < MIN_CERT_DAYS:
            return Result(name, False, f"expires in {days} days: {detail}")
        return Result(name, True, detail)

    def probeVersions(self) -> Result:
        name = self.name("tls-versions")
        accepted, untested = [], []
        for label, version in (("TLS 1.0", ssl.TLSVersion.TLSv1), ("TLS 1.1", ssl.TLSVersion.TLSv1_1)):
            try:
                context = _oldTLSContext(version)
            except (ValueError, ssl.SSLError):
                untested.append(label)
                continue
            try:
                conversation = self.secureConnection(context)
            except (OSError, ProbeError, ssl.SSLError):
                continue
            conversation.close()
            accepted.append(label)
        try:
            conversation = self.secureConnection()
        except (OSError, ProbeError, ssl.SSLError) as e:
            return Result(name, False, f"no TLS 1.2 or later handshake: {_describe(e)}")
        assert isinstance(conversation.sock, ssl.SSLSocket)
        best = conversation.sock.version()
        conversation.close()
        if accepted:
            return Result(name, False, f"accepts {', '.join(accepted)} (best {best})")
        detail = f"TLS 1.0 and 1.1 refused, best {best}"
        if untested:
            detail = f"{', '.join(untested)} not testable by this client's TLS library; best {best}"
        return Result(name, True, detail)

    # SMTP transactions.

    def postmaster(self) -> Optional[str]:
        domain = self.options.domain
        if domain is None and self.options.account is not None:
            domain = self.options.account.address.rpartition("@")[2]
        return f"postmaster@{domain}" if domain else None

    def startTransaction(self, conversation: Conversation, sender: str, recipient: str) -> Optional[str]:
        """
        MAIL and RCPT; the refusal text if either is refused.
        """
        code, lines = conversation.smtp(f"MAIL FROM:<{sender}>")
        if code != 250:
            return f"MAIL FROM refused: {code} {lines[0][:80]}"
        code, lines = conversation.smtp(f"RCPT TO:<{recipient}>")
        if code not in (250, 251):
            return f"RCPT TO:<{recipient}> refused: {code} {lines[0][:80]}"
        return None

    def probeRelay(self) -> Iterator[Result]:
        """
        Recipients elsewhere must be refused without a login, however
        they are written.
        """
        name = self.name("open-relay")
        local = self.options.domain or (self.options.account.address.rpartition("@")[2]
                                        if self.options.account else "localhost")
        disguises = RELAY_DISGUISES if self.target.kind == "mx" else RELAY_DISGUISES[:1]
        try:
            if self.implicit or (self.tls and self.target.kind != "mx"):
                conversation = self.secureConnection()
            else:
                conversation = self.connect()
                self.capabilities(conversation)
        except (OSError, ProbeError, ssl.SSLError) as e:
            yield Result(name, False, f"cannot start a session: {_describe(e)}")
            return
        accepted = []
        try:
            code, lines = conversation.smtp("MAIL FROM:<selftest@example.com>")
            if code != 250:
                yield Result(name, True, f"MAIL FROM refused without a login: {code} {lines[0][:60]}")
                return
            for disguise in disguises:
                recipient = disguise.format(d=local)
                code, lines = conversation.smtp(f"RCPT TO:<{recipient}>")
                if 200 <= code < 300:
                    accepted.append(recipient)
            conversation.smtp("QUIT")
        except ProbeError as e:
            yield Result(name, False, f"session failed: {e}")
            return
        finally:
            conversation.close()
        if accepted:
            yield Result(name, False, f"accepted {', '.join(accepted)} without a login")
        else:
            yield Result(name, True, f"{len(disguises)} foreign recipient form(s) refused")

    def probeSmuggling(self, recipient: Optional[str], login: Optional[Account] = None) -> Iterator[Result]:
        name = self.name("smuggling")
        if recipient is None:
            yield Result(name, False, "no local domain to send to: give --domain or --user")
            return
        early, declined = [], []
        for label, vector in SMUGGLING_VECTORS:
            try:
                conversation = self.secureConnection() if (self.implicit or login) else self.connect()
                if not (self.implicit or login):
                    self.capabilities(conversation)
            except (OSError, ProbeError, ssl.SSLError) as e:
                yield Result(name, False, f"cannot start a session: {_describe(e)}")
                return
            try:
                if login is not None:
                    failure = self.login(conversation, login)
                    if failure:
                        yield Result(name, False, failure)
                        return
                sender = login.address if login else ""
                refused = self.startTransaction(conversation, sender, recipient)
                if refused:
                    yield Result(name, False, refused)
                    return
                code, lines = conversation.smtp("DATA")
                if code != 354:
                    yield Result(name, False, f"DATA refused: {code} {lines[0][:80]}")
                    return
                conversation.send(
                    b"Subject: pop3gw selftest " + label.encode() + b"\r\n\r\nsmuggling probe" + vector
                    + b"MAIL FROM:<selftest@example.com>\r\nRCPT TO:<" + recipient.encode()
                    + b">\r\nDATA\r\n"
                )
                replies = _finalReplies(conversation.pending(self.options.quiet))
                if replies and (replies[0][:1] == b"2" or len(replies) > 1):
                    early.append(label)
                elif replies:
                    declined.append(f"{label} ({replies[0][:40].decode('ascii', 'replace')})")
            except ProbeError as e:
                yield Result(name, False, f"session failed: {e}")
                return
            finally:
                conversation.close()
        if early:
            yield Result(name, False, f"ended the message at {', '.join(early)}: smuggled commands would run")
        elif declined:
            yield Result(name, True, f"no look-alike ends a message; refused: {', '.join(declined)}")
        else:
            yield Result(name, True, f"none of {', '.join(v[0] for v in SMUGGLING_VECTORS)} ends a message")

    def login(self, conversation: Conversation, account: Account) -> Optional[str]:
        """
        Log in; the failure text if that does not work.
        """
        if self.pop3:
            reply = conversation.pop3(b"USER " + account.address.encode("utf-8"))
            if reply.startswith(b"+OK"):
                reply = conversation.pop3(b"PASS " + account.password.encode("utf-8"))
            if not reply.startswith(b"+OK"):
                return f"login as {account.address} refused: {reply[:80].decode('utf-8', 'replace')}"
            return None
        token = base64.b64encode(b"\0" + account.address.encode("utf-8") + b"\0" + account.password.encode("utf-8"))
        code, lines = conversation.smtp("AUTH PLAIN " + token.decode("ascii"))
        if code != 235:
            return f"login as {account.address} refused: {code} {lines[0][:80]}"
        return None

    def probeSubmission(self) -> Iterator[Result]:
        account = self.options.account
        assert account is not None
        try:
            conversation = self.secureConnection()
        except (OSError, ProbeError, ssl.SSLError) as e:
            yield Result(self.name("login"), False, f"no TLS session: {_describe(e)}")
            return
        try:
            failure = self.login(conversation, account)
        except ProbeError as e:
            failure = str(e)
        finally:
            conversation.close()
        if failure:
            yield Result(self.name("login"), False, failure)
            return
        yield Result(self.name("login"), True, f"{account.address} logged in over TLS")
        yield from self.probeSmuggling(account.address, account)

    # POP3 mailbox.

    def popSession(self) -> Tuple[Conversation, Optional[str]]:
        account = self.options.account
        assert account is not None
        conversation = self.secureConnection()
        try:
            return conversation, self.login(conversation, account)
        except BaseException:
            conversation.close()
            raise

    def probeMailbox(self) -> Iterator[Result]:
        try:
            conversation, failure = self.popSession()
        except (OSError, ProbeError, ssl.SSLError) as e:
            yield Result(self.name("login"), False, f"no TLS session: {_describe(e)}")
            return
        try:
            if failure:
                yield Result(self.name("login"), False, failure)
                return
            yield Result(self.name("login"), True, f"{self.options.account.address} logged in over TLS")  # type: ignore[union-attr]
            yield self.probeSizes(conversation)
        except ProbeError as e:
            yield Result(self.name("list-size"), False, f"session failed: {e}")
        finally:
            conversation.close()

    def probeSizes(self, conversation: Conversation, limit: int = 20) -> Result:
        """
        LIST must give the octets RETR sends (CRLF line ends, dots
        unstuffed) for every message (the first C{limit} are checked).
        """
        name = self.name("list-size")
        if not conversation.pop3(b"LIST").startswith(b"+OK"):
            return Result(name, False, "LIST refused")
        listing = [line.split() for line in conversation.pop3Multi()]
        wrong = []
        for number, size in listing[:limit]:
            if not conversation.pop3(b"RETR " + number).startswith(b"+OK"):
                return Result(name, False, f"RETR {number.decode()} refused")
            octets = sum(len(line) + 2 for line in conversation.pop3Multi())
            if octets != int(size):
                wrong.append(f"{number.decode()} (LIST {int(size)}, RETR {octets})")
        if wrong:
            return Result(name, False, f"sizes differ: {', '.join(wrong)}")
        return Result(name, True, f"{min(len(listing), limit)} of {len(listing)} message(s) checked")


def probeDotStuffing(submission: Prober, pop3: Prober) -> Result:
    """
    Send a message with lines that start with dots through submission and
    read it back through POP3: it must come back unchanged (with the
    server's added headers before it), and LIST must give its size.  The
    message is deleted afterwards.
    """
    name = "dot-stuffing"
    account = submission.options.account
    assert account is not None
    token = uuid.uuid4().hex
    body = b".\r\n..\r\n.leading dot\r\n. \r\n..double\r\nlast line\r\n"
    message = (f"From: <{account.address}>\r\nTo: <{account.address}>\r\n"
               f"Subject: pop3gw selftest {token}\r\nMessage-ID: <{token}@selftest.invalid>\r\n\r\n").encode() + body
    try:
        conversation = submission.secureConnection()
        try:
            failure = submission.login(conversation, account) or submission.startTransaction(
                conversation, account.address, account.address)
            if failure:
                return Result(name, False, failure)
            code, lines = conversation.smtp("DATA")
            if code != 354:
                return Result(name, False, f"DATA refused: {code} {lines[0][:80]}")
            stuffed = b"".join(b"." + line if line.startswith(b".") else line
                               for line in message.splitlines(keepends=True))
            conversation.send(stuffed + b".\r\n")
            code, lines = conversation.smtpReply()
            if code != 250:
                return Result(name, False, f"message refused: {code} {lines[0][:80]}")
            conversation.smtp("QUIT")
        finally:
            conversation.close()
        deadline = time.monotonic() + DELIVERY_WAIT
        while True:
            found = _findAndDelete(pop3, token)
            if found is not None or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    except (OSError, ProbeError, ssl.SSLError) as e:
        return Result(name, False, f"session failed: {_describe(e)}")
    if found is None:
        return Result(name, False, f"the test message did not arrive within {DELIVERY_WAIT:g} s")
    retrieved, listed = found
    if not retrieved.endswith(b"\r\n\r\n" + body):
        return Result(name, False, "the message came back changed: lines starting with a dot were altered")
    if listed != len(retrieved):
        return Result(name, False, f"LIST says {listed} octets, RETR sent {len(retrieved)}")
    return Result(name, True, f"dotted lines came back unchanged, LIST size {listed} matches RETR")


def _findAndDelete(pop3: Prober, token: str) -> Optional[Tuple[bytes, int]]:
    conversation, failure = pop3.popSession()
    try:
        if failure:
            raise ProbeError(failure)
        if not conversation.pop3(b"LIST").startswith(b"+OK"):
            raise ProbeError("LIST refused")
        listing = [line.split() for line in conversation.pop3Multi()]
        marker = f"Subject: pop3gw selftest {token}".encode()
        for number, size in reversed(listing):
            if not conversation.pop3(b"RETR " + number).startswith(b"+OK"):
                continue
            lines = conversation.pop3Multi()
            if marker in lines:
                conversation.pop3(b"DELE " + number)
                conversation.pop3(b"QUIT")
                return b"".join(line + b"\r\n" for line in lines), int(size)
        conversation.pop3(b"QUIT")
        return None
    finally:
        conversation.close()


def _finalReplies(data: bytes) -> List[bytes]:
    """
    The last lines of the SMTP replies in C{data} (a multi-line reply
    counts once).
    """
    lines = data.replace(b"\r\n", b"\n").split(b"\n")
    return [line for line in lines if len(line) >= 3 and line[:3].isdigit() and line[3:4] != b"-"]


def _describe(error: BaseException) -> str:
    if isinstance(error, ssl.SSLError):
        return error.reason or str(error)
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error) or type(error).__name__


def run(targets: Sequence[Target], options: Options, write: Callable[[str], object]) -> bool:
    """
    Run every probe of every target, writing one line per result.

    @return: whether every probe passed.
    """
    passed = True
    probers = [Prober(t, options) for t in targets]
    for prober in probers:
        for result in prober.run():
            write(result.line() + "\n")
            passed = passed and result.passed
    if options.account is not None:
        pop3 = next((p for p in probers if p.pop3), None)
        submission = next((p for p in probers if p.target.kind in ("submission", "submissions")), None)
        if pop3 is not None and submission is not None:
            result = probeDotStuffing(submission, pop3)
            write(result.line() + "\n")
            passed = passed and result.passed
    return passed


def readPassword(path: str) -> str:
    """
    The first line of a password file.

    @raise OSError: unreadable.
    """
    with open(path, encoding="utf-8") as f:
        return f.readline().rstrip("\r\n")

