# -*- test-case-name: tests.test_pop3import -*-
"""
Moving from another POP3 server without every client downloading the
whole mailbox again.

POP3 clients that leave mail on the server remember each message by its
UIDL.  A maildrop may carry a C{pop3gw-uidlist} file mapping its messages
(by Maildir unique name) to the UIDLs the old server gave them; POP3 then
serves those UIDLs, so the clients see nothing new.  Two ways fill it:

  - C{pop3gw user import-uidl ADDRESS < FILE}, after the messages were
    copied over by other means: FILE is either a C{UIDL} listing captured
    from the old server (C{N uidl} lines, matched to the maildrop's
    messages by position) or Dovecot's C{dovecot-uidlist} (matched by file
    name; the UIDL is Dovecot's default C{%08Xu%08Xv}, or the C{P}
    extension's value when Dovecot stored one);
  - C{pop3gw import pop3://user@host}: copies every message from any POP3
    server over verified TLS with its UIDL, resumably.

Both write through an L{IUIDLTarget}.  In a data directory
(L{MaildirTarget}) the file has one C{KEY UIDL} line per message.  An
entry is written before its message is committed, so an interrupted
import never leaves a message without its UIDL; an entry whose message is
not (or no longer) in the maildrop is ignored and dropped at the next
import.  With C{--store postgresql://} (L{PostgresTarget}) the old UIDL is
the message's UIDL in the database, committed with the message.
"""

from __future__ import annotations

import os
import poplib
import re
import ssl
import urllib.parse
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

from zope.interface import Interface, implementer

from pop3gw import fsutil
from pop3gw.wire import DEFAULT_MAX_MESSAGE_SIZE

UIDLIST = "pop3gw-uidlist"

#: What RFC 1939 allows in a UIDL.
_UIDL = re.compile(r"^[\x21-\x7e]{1,70}$")


class MigrationError(Exception):
    """
    Something the operator must hear about, as one line.
    """


def keyOf(fileName: str) -> str:
    """
    The Maildir unique name of a file name (before C{,} and C{:}).
    """
    return fileName.split(":", 1)[0].split(",", 1)[0]


def readUidMap(maildir: str) -> Dict[str, str]:
    """
    The maildrop's imported UIDLs, by Maildir unique name (empty without
    the file; malformed lines are ignored).
    """
    try:
        with open(os.path.join(maildir, UIDLIST), "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return {}
    uids: Dict[str, str] = {}
    for raw in data.split(b"\n"):
        parts = raw.decode("ascii", "replace").split()
        if len(parts) == 2 and _UIDL.match(parts[1]):
            uids[parts[0]] = parts[1]
    return uids


def writeUidMap(maildir: str, uids: Dict[str, str], owner: Optional[fsutil.Owner] = None) -> None:
    """
    Replace the maildrop's UIDL map (atomically).
    """
    data = "".join(f"{key} {uid}\n" for key, uid in uids.items()).encode("ascii")
    fsutil.replaceFile(os.path.join(maildir, UIDLIST), data, owner)


def parseUIDLListing(text: str) -> List[Tuple[int, str]]:
    """
    C{(number, uidl)} pairs of a C{UIDL} listing (C{+OK} and C{.} lines
    and blank lines ignored).

    @raise MigrationError: a line that is not C{N uidl}.
    """
    pairs = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line == "." or line.startswith("+OK"):
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[0].isdigit() or not _UIDL.match(parts[1]):
            raise MigrationError(f"line {number}: expected 'N uidl', got {line[:60]!r}")
        pairs.append((int(parts[0]), parts[1]))
    return pairs


def parseDovecotUidlist(text: str) -> Dict[str, str]:
    """
    Dovecot's C{dovecot-uidlist}: the POP3 UIDL of each file, by Maildir
    unique name.

    @raise MigrationError: no header, or a line that cannot be read.
    """
    lines = text.splitlines()
    if not lines:
        raise MigrationError("empty dovecot-uidlist")
    header = lines[0].split()
    validity = None
    if header and header[0] == "3":
        for field in header[1:]:
            if field.startswith("V") and field[1:].isdigit():
                validity = int(field[1:])
    elif len(header) >= 2 and header[0] in ("1", "2") and header[1].isdigit():
        validity = int(header[1])
    if validity is None:
        raise MigrationError("not a dovecot-uidlist: no UID validity in its first line")
    out: Dict[str, str] = {}
    for number, line in enumerate(lines[1:], 2):
        if not line.strip():
            continue
        head, sep, fileName = line.partition(":")
        fields = head.split()
        if not sep or not fields or not fields[0].isdigit():
            raise MigrationError(f"line {number}: cannot read {line[:60]!r}")
        uid = int(fields[0])
        explicit = [f[1:] for f in fields[1:] if f.startswith("P") and len(f) > 1]
        uidl = explicit[0] if explicit else f"{uid:08X}{validity:08X}"
        if _UIDL.match(uidl):
            out[keyOf(fileName.strip())] = uidl
    return out


def mapListing(keys: Sequence[str], pairs: Sequence[Tuple[int, str]]) -> Dict[str, str]:
    """
    Match a UIDL listing to the maildrop's messages by position.

    @param keys: the unique names of the maildrop's messages in POP3 order.
    @raise MigrationError: the listing does not number exactly these
        messages, or repeats a UIDL.
    """
    if len(pairs) != len(keys) or [n for n, _ in pairs] != list(range(1, len(keys) + 1)):
        raise MigrationError(
            f"the listing numbers {len(pairs)} messages but the maildrop holds {len(keys)}: "
            "import the listing right after copying the messages, before any new mail")
    _noDuplicates(uid for _, uid in pairs)
    return {key: uid for key, (_, uid) in zip(keys, pairs)}


def _noDuplicates(uids: Iterable[str]) -> None:
    seen = set()
    for uid in uids:
        if uid in seen:
            raise MigrationError(f"UIDL {uid} appears twice")
        seen.add(uid)


class IUIDLTarget(Interface):
    """
    A maildrop that imported messages and UIDLs are recorded in: the
    C{pop3gw-uidlist} file of a Maildir (L{MaildirTarget}), or the UIDL
    column of the database's maildrop entries (L{PostgresTarget}).
    """

    def messageKeys() -> Sequence[str]:
        """
        A key per message of the maildrop, in POP3 order: the Maildir
        unique name, or the database entry.
        """

    def knownUIDLs() -> Iterable[str]:
        """
        The UIDLs that mark a message as copied already: the imported
        UIDLs of messages still in the Maildir; every UIDL of the
        database maildrop.
        """

    def setUIDLs(mapped: Dict[str, str]) -> None:
        """
        Give the messages of C{mapped} (by key) those UIDLs, all or none;
        a message not (or no longer) in the maildrop is ignored.

        @raise MigrationError: a UIDL would be served for two messages.
        """

    def deliver(chunks: Iterable[bytes], uidl: str) -> None:
        """
        Store one message with that UIDL, the UIDL recorded no later than
        the message is committed.

        @param chunks: the message (CRLF line ends), in pieces as it
            arrives; an exception from it ends the delivery, nothing kept.
        """


@implementer(IUIDLTarget)
class MaildirTarget:
    """
    A Maildir maildrop and its C{pop3gw-uidlist} file.

    @param keys: the unique names of the maildrop's messages in POP3 order
        (read anew at each call).
    @param deliver: stores one message, given as an iterable of chunks,
        and returns its Maildir unique name; called as C{deliver(chunks,
        before)} where C{before(key)} must run once the name is known and
        before the message is committed.
    """

    def __init__(self, maildir: str, keys: Callable[[], Sequence[str]],
                 deliver: Optional[Callable[[Iterable[bytes], Callable[[str], None]], str]] = None,
                 owner: Optional[fsutil.Owner] = None) -> None:
        self.maildir = maildir
        self._keys = keys
        self._deliver = deliver
        self.owner = owner
        self._uids: Optional[Dict[str, str]] = None

    def messageKeys(self) -> Sequence[str]:
        """
        See L{IUIDLTarget.messageKeys}.
        """
        return self._keys()

    def _present(self) -> Dict[str, str]:
        present = set(self._keys())
        return {k: v for k, v in readUidMap(self.maildir).items() if k in present}

    def knownUIDLs(self) -> Iterable[str]:
        """
        See L{IUIDLTarget.knownUIDLs}.
        """
        self._uids = self._present()
        return set(self._uids.values())

    def setUIDLs(self, mapped: Dict[str, str]) -> None:
        """
        See L{IUIDLTarget.setUIDLs}.
        """
        _noDuplicates(mapped.values())
        present = set(self._keys())
        uids = {k: v for k, v in readUidMap(self.maildir).items() if k in present}
        mapped = {k: v for k, v in mapped.items() if k in present}
        others = {v for k, v in uids.items() if k not in mapped}
        for uid in mapped.values():
            if uid in others:
                raise MigrationError(f"UIDL {uid} is already the UIDL of another message of the maildrop")
        uids.update(mapped)
        writeUidMap(self.maildir, uids, self.owner)

    def deliver(self, chunks: Iterable[bytes], uidl: str) -> None:
        """
        See L{IUIDLTarget.deliver}.
        """
        assert self._deliver is not None
        if self._uids is None:
            self._uids = self._present()
        uids = self._uids

        def record(key: str) -> None:
            uids[key] = uidl
            writeUidMap(self.maildir, uids, self.owner)

        self._deliver(chunks, record)


@implementer(IUIDLTarget)
class PostgresTarget:
    """
    A maildrop in the database (L{pop3gw.pgmail.PostgresMaildropStore}):
    a message's UIDL is its entry's C{uid} column, unique per maildrop.
    Keys are entry ids.
    """

    def __init__(self, store: Any, address: Any) -> None:
        self.store = store
        self.address = address
        self.maildrop = str(address)

    def messageKeys(self) -> Sequence[str]:
        """
        See L{IUIDLTarget.messageKeys}.
        """
        return [str(info.entry) for info in self.store.listMessages(self.maildrop)]

    def knownUIDLs(self) -> Iterable[str]:
        """
        See L{IUIDLTarget.knownUIDLs}.
        """
        return {info.uid for info in self.store.listMessages(self.maildrop)}

    def setUIDLs(self, mapped: Dict[str, str]) -> None:
        """
        See L{IUIDLTarget.setUIDLs}.
        """
        from pop3gw.pgmail import UIDLInUse

        _noDuplicates(mapped.values())
        try:
            self.store.setUIDLs(self.maildrop, {int(k): v for k, v in mapped.items()})
        except UIDLInUse as e:
            raise MigrationError(f"UIDL {e.uid} is already the UIDL of another message of the maildrop") from None

    def deliver(self, chunks: Iterable[bytes], uidl: str) -> None:
        """
        See L{IUIDLTarget.deliver}: the database stores a message as one
        value, so it is held whole here.
        """
        from psycopg import errors

        data = b"".join(chunks)
        try:
            self.store.importMessage(self.address, data, uidl)
        except errors.UniqueViolation:
            # Another run stored it after this one read the UIDLs.
            raise MigrationError(f"UIDL {uidl} was stored meanwhile, by another import? run again") from None


def importUIDLs(target: IUIDLTarget, text: str) -> int:
    """
    Map the UIDLs in C{text} (a listing, or a C{dovecot-uidlist}) onto the
    maildrop's messages and record them.

    @return: how many messages got an old UIDL.
    @raise MigrationError: the input cannot be used (nothing is written).
    """
    keys = list(target.messageKeys())
    first = text.lstrip().split("\n", 1)[0].split()
    dovecot = bool(first) and first[0] in ("1", "2", "3") and any(
        f.startswith("V") or f.isdigit() for f in first[1:]) and ":" in text
    if dovecot and not _looksLikeListing(text):
        byName = parseDovecotUidlist(text)
        mapped = {key: byName[key] for key in keys if key in byName}
        if not mapped and keys:
            raise MigrationError("no message of the maildrop is named in the dovecot-uidlist")
    else:
        mapped = mapListing(keys, parseUIDLListing(text))
    target.setUIDLs(mapped)
    return len(mapped)


def _looksLikeListing(text: str) -> bool:
    try:
        parseUIDLListing(text)
    except MigrationError:
        return False
    return True


def parseServerListing(lines: Sequence[bytes]) -> List[Tuple[int, str]]:
    """
    C{(number, uidl)} pairs of the lines of a server's C{UIDL} answer.

    @raise MigrationError: a line that is not C{N uidl} with a UIDL of 1
        to 70 printable ASCII characters (RFC 1939), or a UIDL given twice:
        such a listing cannot tell which messages were copied already.
    """
    pairs = []
    for index, raw in enumerate(lines, 1):
        text = raw.decode("ascii", "backslashreplace")
        parts = text.split()
        if not raw.isascii() or len(parts) != 2 or not parts[0].isdigit() or not _UIDL.match(parts[1]):
            shown = "".join(c if " " <= c <= "~" else f"\\x{ord(c):02x}" for c in text[:60])
            shown += "..." if len(text) > 60 else ""
            raise MigrationError(f"malformed UIDL listing line {index}: '{shown}'")
        pairs.append((int(parts[0]), parts[1]))
    seen: set = set()
    for _, uidl in pairs:
        if uidl in seen:
            raise MigrationError(f"UIDL listing names {uidl} twice")
        seen.add(uidl)
    return pairs


def parseSource(url: str) -> Tuple[str, str, int, bool]:
    """
    C{(user, host, port, implicitTLS)} from C{pop3://user@host[:port]}
    (STLS, port 110) or C{pop3s://user@host[:port]} (port 995).  The user
    may be a full address (C{alice@example.org@host} or C{%40}).

    @raise MigrationError: anything else.
    """
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("pop3", "pop3s") or not parsed.hostname:
        raise MigrationError(f"expected pop3://USER@HOST[:PORT] or pop3s://..., got {url!r}")
    user, _, _ = parsed.netloc.rpartition("@")
    if not user:
        raise MigrationError(f"no user in {url!r}")
    try:
        port = parsed.port or (995 if parsed.scheme == "pop3s" else 110)
    except ValueError:
        raise MigrationError(f"bad port in {url!r}") from None
    return urllib.parse.unquote(user), parsed.hostname, port, parsed.scheme == "pop3s"


#: Octets of a message being copied that are held at once.
COPY_CHUNK = 64 * 1024


class MessageRefused(MigrationError):
    """
    One message cannot be copied (the others can): its text says why.
    """


class _Retrieval:
    """
    The message a C{RETR} is answering, read from the session as it is
    iterated, in chunks of about L{COPY_CHUNK} octets (CRLF line ends,
    dot-stuffing undone as C{poplib.POP3.retr} undoes it), so that a large
    message is never held whole.  It must be read to its end before the
    session is used again.

    Lines are read from the session's socket file in pieces of at most
    L{COPY_CHUNK} octets, not with C{poplib}'s line reader, which refuses
    lines over 2048 octets: a line of any length up to C{maxLine} is
    copied without being held whole.

    @ivar octets: the octets yielded so far.
    @ivar maxLine: the longest line accepted, in octets without its line
        end; a longer one makes the iteration read the rest of the message
        (dropping it) and raise L{MessageRefused}.
    """

    def __init__(self, session: Any, maxLine: int) -> None:
        self._session = session
        self.maxLine = maxLine
        self.octets = 0

    def _piece(self) -> bytes:
        try:
            piece: bytes = self._session.file.readline(COPY_CHUNK)
        except OSError as e:
            raise MigrationError(f"connection lost in the middle of a message: {e}") from None
        if not piece:
            raise MigrationError("the server closed the connection in the middle of a message")
        return piece

    def _pieces(self) -> Iterator[Tuple[bytes, bool]]:
        """
        The message's lines, in pieces: C{(octets, ends the line)}, the
        line end not included, the leading C{"."} of a stuffed line
        removed, up to (not including) the final C{"."} line.
        """
        start = True
        heldCR = False
        while True:
            piece = self._piece()
            if heldCR:
                piece = b"\r" + piece
                heldCR = False
            if start:
                if piece in (b".\r\n", b".\n"):
                    return
                if piece.startswith(b".."):
                    piece = piece[1:]
            if piece.endswith(b"\n"):
                yield piece[:-2] if piece.endswith(b"\r\n") else piece[:-1], True
                start = True
                continue
            if piece.endswith(b"\r"):
                # Perhaps the first half of a CRLF split across two pieces.
                piece, heldCR = piece[:-1], True
            yield piece, False
            start = False

    def __iter__(self) -> Iterator[bytes]:
        held: List[bytes] = []
        size = 0
        line = 0
        pieces = self._pieces()
        for piece, ends in pieces:
            line += len(piece)
            if line > self.maxLine:
                for _ in pieces:
                    pass
                raise MessageRefused(f"it has a line longer than {self.maxLine} octets")
            held.append(piece)
            size += len(piece)
            if ends:
                held.append(b"\r\n")
                size += 2
                line = 0
            if size >= COPY_CHUNK:
                self.octets += size
                yield b"".join(held)
                held, size = [], 0
        if held:
            self.octets += size
            yield b"".join(held)


def retrieve(session: Any, number: int, maxLine: int = DEFAULT_MAX_MESSAGE_SIZE) -> _Retrieval:
    """
    Send C{RETR number} and read the server's answer.

    @param session: a C{poplib.POP3}, whose command and status primitives
        (C{_putcmd}, C{_getresp}: the ones its C{retr} is made of,
        undeclared in its type stubs) and socket file (C{file}) are used.
    @param maxLine: the longest line of the message accepted (see
        L{_Retrieval}).

    @return: the message, to be iterated (L{_Retrieval}).
    @raise poplib.error_proto: the server refused it.
    """
    session._putcmd(f"RETR {number}")
    session._getresp()
    return _Retrieval(session, maxLine)


class Importer:
    """
    Copies a mailbox from a POP3 server into a maildrop, with its UIDLs
    (blocking; the C{pop3gw import} command).

    @ivar target: where the messages and their UIDLs go.
    @ivar maxLine: the longest line of a message copied, in octets
        (without its line end): the largest message pop3gw accepts
        (C{max-message-size}), as a line is never held whole.
    @ivar refused: one line per message that could not be copied (a line
        over L{maxLine}) in the last L{run}; the others were copied.
    """

    def __init__(self, target: IUIDLTarget, timeout: float = 60.0,
                 maxLine: int = DEFAULT_MAX_MESSAGE_SIZE) -> None:
        self.target = target
        self.timeout = timeout
        self.maxLine = maxLine
        self.refused: List[str] = []

    def connect(self, host: str, port: int, implicit: bool, context: ssl.SSLContext) -> poplib.POP3:
        """
        A POP3 session in verified TLS (STLS on a plain port).

        @raise MigrationError: no TLS, or it cannot be verified.
        """
        try:
            if implicit:
                return poplib.POP3_SSL(host, port, timeout=self.timeout, context=context)
            session = poplib.POP3(host, port, timeout=self.timeout)
            try:
                if "STLS" not in session.capa():
                    raise MigrationError(f"{host}:{port} does not offer STLS: refusing to send a password in clear")
                session.stls(context)
            except BaseException:
                session.close()
                raise
            return session
        except ssl.SSLCertVerificationError as e:
            raise MigrationError(f"{host}:{port}: certificate not trusted: {e.verify_message}") from None
        except (OSError, poplib.error_proto) as e:
            raise MigrationError(f"{host}:{port}: {e}") from None

    def run(self, session: poplib.POP3, user: str, password: str,
            progress: Callable[[str], object] = lambda line: None) -> Tuple[int, int]:
        """
        Log in and copy every message not copied yet.

        A message that cannot be copied (see L{refused}) is read to its
        end and left out, and the next one copied.

        @return: C{(copied, skipped)}.
        @raise MigrationError: the login or a retrieval failed (what was
            copied stays, with its UIDLs: run again to resume).
        """
        self.refused = []
        try:
            session.user(user)
            session.pass_(password)
        except poplib.error_proto:
            raise MigrationError(f"login as {user} refused") from None
        try:
            listing = parseServerListing(session.uidl()[1])
        except poplib.error_proto as e:
            raise MigrationError(f"UIDL refused: {e}") from None
        have = set(self.target.knownUIDLs())
        copied = skipped = 0
        for number, uidl in listing:
            if uidl in have:
                skipped += 1
                continue
            try:
                chunks = retrieve(session, number, self.maxLine)
            except poplib.error_proto as e:
                raise MigrationError(f"RETR {number} refused: {e}") from None
            try:
                self.target.deliver(chunks, uidl)
            except MessageRefused as e:
                self.refused.append(f"message {number} (UIDL {uidl}) not copied: {e}")
                progress(self.refused[-1])
                continue
            have.add(uidl)
            copied += 1
            progress(f"copied message {number} ({chunks.octets} octets, UIDL {uidl})")
        try:
            session.quit()
        except (OSError, poplib.error_proto):
            pass
        return copied, skipped
