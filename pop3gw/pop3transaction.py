# -*- test-case-name: tests.test_pop3 -*-
"""
The POP3 TRANSACTION and UPDATE states: STAT, LIST, UIDL, DELE, NOOP,
RSET, LAST (RFC 1225), RETR, TOP and QUIT with its commit.
"""

from __future__ import annotations

from itertools import compress
from operator import not_
from typing import TYPE_CHECKING, Callable, Iterable, Optional, Sequence, Union

import attr
from twisted.internet import defer
from twisted.python.failure import Failure
from zope.interface import implementer

from pop3gw import events
from pop3gw.interfaces import IMaildrop, IMessageColumns, IMessageInfo, TemporaryFailure
from pop3gw.pop3replies import (
    _TRANSACTION,
    _UPDATE,
    ERR_COMMIT,
    ERR_INTERNAL,
    ERR_MESSAGE_UNAVAILABLE,
    GOODBYE,
    _MessageDeleted,
    _noArguments,
    _NoSuchMessage,
    _numbers,
)
from pop3gw.pop3transfer import READ_CHUNK_SIZE, _MessageSender, _Sender, _sendWhole


@attr.s(slots=True, auto_attribs=True)
class _Transaction:
    """
    What RSET undoes: made at login, replaced whole by a new one at RSET,
    handed to L{IMaildrop.commit} at QUIT.

    @ivar last: the highest message number accessed (RFC 1225 LAST).
    @ivar deleted: the 0-based indexes of the messages marked deleted.
    @ivar accessed: the 0-based indexes of the messages retrieved (marked
        seen at QUIT unless deleted).
    """

    last: int = 0
    deleted: set[int] = attr.Factory(set)
    accessed: set[int] = attr.Factory(set)


class _ReadAheadSource:
    """
    A message file whose first chunk was read before the client asked for
    the message (see L{TransactionCommands._readAhead}): hands out that
    chunk first, then reads on from the file.  A failure of that first
    read is raised by the first L{read}, where reading the file at once
    would have raised it.
    """

    __slots__ = ("_source", "_chunk", "_error")

    def __init__(self, source) -> None:
        self._source = source
        self._error: Optional[Exception] = None
        try:
            self._chunk: bytes = source.read(READ_CHUNK_SIZE)
        except Exception as e:
            self._chunk = b""
            self._error = e

    def read(self, size: int) -> bytes:
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        chunk = self._chunk
        if not chunk:
            return self._source.read(size)
        if len(chunk) <= size:
            self._chunk = b""
            return chunk
        self._chunk = chunk[size:]
        return chunk[:size]

    def takeWhole(self) -> Optional[bytes]:
        """
        Hand out the whole message at once if the chunk read ahead is all
        of it: the first read did not fail and the file tells it is
        exhausted (a file that does not tell never is).

        @return: the message, or C{None} (nothing is then taken).
        """
        if self._error is not None or not getattr(self._source, "exhausted", False):
            return None
        chunk, self._chunk = self._chunk, b""
        return chunk

    @property
    def exhausted(self) -> bool:
        """
        Whether the whole message has been handed out (see
        L{pop3gw.maildirfiles.WireReader.exhausted}).
        """
        return not self._chunk and self._error is None and bool(getattr(self._source, "exhausted", False))

    def close(self) -> None:
        self._source.close()


def _closeUnused(result: object) -> None:
    """
    Close a message file read ahead and not asked for; a failure to open
    it is of no interest to anyone.
    """
    if isinstance(result, Failure):
        return
    try:
        result.close()  # type: ignore[attr-defined]
    except Exception:
        pass


#: Largest message (its listed size, octets) read ahead after a RETR (see
#: L{TransactionCommands._readAhead}): at most this much is held per session
#: between commands.
READ_AHEAD_MAX_SIZE = 65536

#: Lines of a C{LIST} or C{UIDL} listing formatted and written at a time.  A
#: longer listing is streamed (L{_ListingSender}): one piece per write,
#: while the client reads.
LISTING_LINES_AT_ONCE = 2048

#: Each listing line, by command: the message number, then its size or its
#: UIDL.
_LINE_FORMATS = {"LIST": "%d %d\r\n", "UIDL": "%d %s\r\n"}


@implementer(IMessageColumns)
class _InfoColumns:
    """
    L{IMessageColumns} of a C{messages} sequence that does not provide it
    (a store whose listing is made of L{IMessageInfo}s already), derived
    from its L{IMessageInfo}s.
    """

    __slots__ = ("_messages",)

    def __init__(self, messages: Sequence[IMessageInfo]) -> None:
        self._messages = messages

    def totalSize(self) -> int:
        return sum(message.size for message in self._messages)

    def lastSeen(self) -> int:
        last = 0
        for number, message in enumerate(self._messages, 1):
            if message.seen:
                last = number
        return last

    def sizes(self, start: int, stop: int) -> Iterable[int]:
        messages = self._messages
        return [messages[index].size for index in range(start, stop)]

    def uids(self, start: int, stop: int) -> Iterable[str]:
        messages = self._messages
        return [messages[index].uid for index in range(start, stop)]


def _columns(messages: Sequence[IMessageInfo]) -> IMessageColumns:
    """
    @return: C{messages} itself if it provides L{IMessageColumns}, else an
        L{_InfoColumns} of it.
    """
    if IMessageColumns.providedBy(messages):
        return messages
    return _InfoColumns(messages)


def _listingLines(
    command: str, messages: Sequence[IMessageInfo], deleted: Union[set[int], frozenset[int]], start: int, stop: int
) -> bytes:
    """
    Format the C{LIST} or C{UIDL} (C{command}) lines of messages C{start}
    to C{stop - 1} (0-based), leaving out those in C{deleted}: one C-level
    pass over the store's columns, no object per message.  No line needs
    dot-stuffing: each begins with a message number.
    """
    columns = _columns(messages)
    values = columns.sizes(start, stop) if command == "LIST" else columns.uids(start, stop)
    lines: Iterable = zip(range(start + 1, stop + 1), values)
    if deleted:
        lines = compress(lines, map(not_, map(deleted.__contains__, range(start, stop))))
    return "".join(map(_LINE_FORMATS[command].__mod__, lines)).encode("utf-8")


class _ListingSender(_Sender):
    """
    Streams the lines of a long C{LIST} or C{UIDL} response and its C{.}
    line to a transport, L{LISTING_LINES_AT_ONCE} lines per write, while
    the transport accepts them; the server's L{pop3gw.flow.OutputFlow}
    pauses and resumes it, as it does a L{_MessageSender}.  The client thus
    starts reading while the rest is formatted, and the server never holds
    more than a few pieces of a listing of any length.

    @param format: formats the lines of messages C{start} to C{stop - 1}.
    @param count: how many messages there are.
    @param onDone: called with the sender and C{None} at the end, or a
        L{Failure} if formatting failed (the response is then cut short).
    """

    def __init__(
        self,
        transport,
        format: Callable[[int, int], bytes],
        count: int,
        onDone: Callable[["_ListingSender", Optional[Failure]], None],
        onProgress: Callable[[], None],
    ) -> None:
        super().__init__(transport, onProgress)
        self._format: Optional[Callable[[int, int], bytes]] = format
        self._count = count
        self._onDone = onDone
        self._next = 0

    def stopProducing(self) -> None:
        """
        The connection is going away: send nothing more, and let go of the
        listing.
        """
        self._finished = True
        self._format = None

    def _run(self) -> None:
        if self._running or self._finished:
            return
        self._running = True
        ended = False
        try:
            while not (self._paused or self._finished):
                start = self._next
                stop = self._next = min(start + LISTING_LINES_AT_ONCE, self._count)
                assert self._format is not None
                data = self._format(start, stop)
                if stop == self._count:
                    self.stopProducing()
                    ended = True
                    self._transport.write(data + b".\r\n")
                else:
                    self._transport.write(data)
        except Exception:
            self.stopProducing()
            self._onDone(self, Failure())
            return
        finally:
            self._running = False
        if ended:
            self._onDone(self, None)


if TYPE_CHECKING:
    from pop3gw.lineproto import LineProtocol as _Host
    from pop3gw.pop3 import POP3Factory
else:
    _Host = object


class TransactionCommands(_Host):
    """
    The handlers of the TRANSACTION state and the commit at QUIT, mixed
    into L{pop3gw.pop3.POP3Server}, whose state they use.
    """

    if TYPE_CHECKING:
        # What POP3Server provides.
        factory: POP3Factory
        state: str
        _avatar: object
        _logout: Optional[Callable[[], None]]
        _maildrop: Optional[IMaildrop]
        _messages: Sequence[IMessageInfo]
        _initialLast: int
        _totalSize: int
        _transaction: Optional[_Transaction]
        _sender: Optional[Union[_MessageSender, _ListingSender]]
        _ahead: Optional[tuple[int, defer.Deferred]]
        _loggedOut: bool
        _committing: bool
        _retrieved: int
        _topped: int
        _bytesSent: int

        def _reply(self, text: str) -> None: ...
        def _replyMultiline(self, first: str, lines: list[str]) -> None: ...
        def _replyBlock(self, first: str, body: bytes) -> None: ...
        def _close(self, text: Optional[str] = None) -> None: ...
        def _callLogout(self) -> None: ...
        def _avatarName(self) -> str: ...

    @property
    def _current(self) -> _Transaction:
        """
        The transaction, set for as long as the state is TRANSACTION (the
        only state whose handlers ask for it).
        """
        assert self._transaction is not None
        return self._transaction

    @property
    def _openMaildrop(self) -> IMaildrop:
        """
        The maildrop, open from login until the commit or the hang-up.
        """
        assert self._maildrop is not None
        return self._maildrop

    def _beginTransaction(self, maildrop) -> None:
        """
        Enter the TRANSACTION state with the maildrop just opened.  LAST
        starts at the highest number whose message is seen.  The
        maildrop's messages are gone through once, here: STAT and RSET
        then cost as much as the deletions marked, not the maildrop.
        """
        self._maildrop = maildrop
        self._messages = messages = maildrop.messages
        columns = _columns(messages)
        self._initialLast = columns.lastSeen()
        self._totalSize = columns.totalSize()
        self._transaction = _Transaction(last=self._initialLast)
        self.state = _TRANSACTION
        self.loggedIn()

    def _message(self, number: int) -> int:
        """
        @return: the 0-based index of the live message C{number}.
        @raise _NoSuchMessage: out of range.
        @raise _MessageDeleted: marked as deleted.
        """
        if not 1 <= number <= len(self._messages):
            raise _NoSuchMessage()
        index = number - 1
        if index in self._current.deleted:
            raise _MessageDeleted()
        return index

    def _liveTotals(self) -> tuple[int, int]:
        """
        @return: how many messages are not marked deleted, and their size.
        """
        deleted = self._current.deleted
        messages = self._messages
        return len(messages) - len(deleted), self._totalSize - sum(messages[i].size for i in deleted)

    def _sendListing(self, command: str, first: str) -> None:
        """
        Answer C{LIST} or C{UIDL} (C{command}) without an argument: the
        C{+OK} line C{first}, a line per message not marked deleted, and
        the C{.} line.  A listing of at most L{LISTING_LINES_AT_ONCE}
        messages goes out in one write; a longer one is streamed by a
        L{_ListingSender}, and the next command waits for its end.
        """
        messages = self._messages
        deleted = frozenset(self._current.deleted)
        count = len(messages)
        if count <= LISTING_LINES_AT_ONCE:
            self._replyBlock(first, _listingLines(command, messages, deleted, 0, count) + b".\r\n")
            return
        self._reply(first)
        if self._disconnected:
            return
        done: defer.Deferred = defer.Deferred()
        sender = _ListingSender(
            self.transport,
            lambda start, stop: _listingLines(command, messages, deleted, start, stop),
            count,
            onDone=lambda sender, failure: self._listingDone(sender, failure, done),
            onProgress=self.resetTimeout,
        )
        self._sender = sender
        self.hold(done)
        sender.start(paused=self._output.paused)

    def _listingDone(self, sender: _ListingSender, failure: Optional[Failure], done: defer.Deferred) -> None:
        """
        A streamed listing ended: close if it could not be formatted (its
        C{+OK} line and part of it are out), then fire C{done}, the command
        in flight.
        """
        if self._sender is sender:
            self._sender = None
        if failure is not None:
            self.log.failure("formatting a listing failed", failure)
            self._close()
        else:
            self.resetTimeout()
        done.callback(None)

    def do_STAT(self, rest: str) -> None:
        _noArguments(rest)
        self._reply("+OK %d %d" % self._liveTotals())

    def do_LIST(self, rest: str) -> None:
        args = _numbers(rest, 0, 1)
        if args:
            index = self._message(args[0])
            self._reply("+OK %d %d" % (args[0], self._messages[index].size))
            return
        self._sendListing("LIST", "+OK %d messages (%d octets)" % self._liveTotals())

    def do_UIDL(self, rest: str) -> None:
        args = _numbers(rest, 0, 1)
        if args:
            index = self._message(args[0])
            self._reply("+OK %d %s" % (args[0], self._messages[index].uid))
            return
        self._sendListing("UIDL", "+OK Unique-ID listing follows.")

    def do_DELE(self, rest: str) -> None:
        (number,) = _numbers(rest, 1, 1)
        index = self._message(number)
        self._current.deleted.add(index)
        self._reply("+OK Message %d deleted." % (number,))

    def do_NOOP(self, rest: str) -> None:
        _noArguments(rest)
        self._reply("+OK")

    def do_RSET(self, rest: str) -> None:
        """
        Unmark every deletion and, as RFC 1225 says, put the highest
        message number accessed back to its value at the beginning of the
        session: the messages retrieved so far are no longer marked seen at
        QUIT.
        """
        _noArguments(rest)
        self._transaction = _Transaction(last=self._initialLast)
        self._reply("+OK Maildrop has %d messages (%d octets)." % self._liveTotals())

    def do_LAST(self, rest: str) -> None:
        """
        RFC 1225: the highest message number accessed, in this session or
        (through the seen flags) an earlier one; 0 if none.
        """
        _noArguments(rest)
        self._reply("+OK %d" % (self._current.last,))

    def do_RETR(self, rest: str) -> None:
        (number,) = _numbers(rest, 1, 1)
        index = self._message(number)
        message = self._takeWholeAhead(index)
        if message is not None:
            self._retrWhole(index, number, message)
            return
        self.hold(self._open(index).addCallback(self._cbRetr, index, number))

    def _takeWholeAhead(self, index: int) -> Optional[bytes]:
        """
        Take message C{index} if it was read ahead whole (see
        L{_ReadAheadSource.takeWhole}) and its file is closed.

        @return: the message in wire form, or C{None} if it was not read
            ahead, not yet opened (a database store), failed to open or
            read, or is larger than the chunk read: the read-ahead is then
            left for L{_open}.
        """
        ahead = self._ahead
        if ahead is None or ahead[0] != index:
            return None
        d = ahead[1]
        if not d.called:
            return None
        # Nothing but _open and _dropReadAhead adds callbacks, once the
        # read-ahead is theirs: a result that is the file is the last one.
        source = d.result
        if not isinstance(source, _ReadAheadSource):
            return None
        message = source.takeWhole()
        if message is None:
            return None
        self._ahead = None
        try:
            source.close()
        except Exception:
            pass
        return message

    def _retrWhole(self, index: int, number: int, message: bytes) -> None:
        """
        Answer the RETR of message C{index} (C{number}) read ahead whole,
        within the command's own call: the status line, the message and
        the C{.} line in one write, counted as a streamed transfer is
        (L{_cbRetr}, L{_transferDone}); then read the next one ahead.
        """
        self._accessed(index, number)
        self._badCommands = 0
        _sendWhole(self.transport, self._retrHead(index), message)
        self._bytesSent += len(message)
        self._countTransfer(whole=True)
        self._readAhead(index + 1)

    def _cbRetr(self, source, index: int, number: int) -> Optional[defer.Deferred]:
        if source is None:
            return None
        self._accessed(index, number)
        return self._send(source, None, self._retrHead(index)).addCallback(self._cbRetrSent, index + 1)

    def _retrHead(self, index: int) -> bytes:
        """
        @return: the status line of a RETR of message C{index}.
        """
        return b"+OK %d octets\r\n" % (self._messages[index].size,)

    def _accessed(self, index: int, number: int) -> None:
        """
        Message C{index} (C{number}) is being retrieved: LAST counts it,
        and QUIT marks it seen.
        """
        transaction = self._current
        transaction.last = max(transaction.last, number)
        transaction.accessed.add(index)

    def _cbRetrSent(self, ignored: None, following: int) -> None:
        self._readAhead(following)

    def do_TOP(self, rest: str) -> None:
        number, lines = _numbers(rest, 2, 2)
        index = self._message(number)
        self.hold(self._open(index).addCallback(self._cbTop, lines))

    def _cbTop(self, source, lines: int) -> Optional[defer.Deferred]:
        if source is None:
            return None
        return self._send(source, lines, b"+OK Top of message follows.\r\n")

    def _open(self, index: int) -> defer.Deferred:
        """
        Open message C{index} (L{IMaildrop.openMessage}, which a database
        store answers later), or take it as read ahead.

        @return: a C{Deferred} firing with the message file, or with
            C{None} after replying if it is unavailable or the connection
            was lost meanwhile (the file is then closed).
        """
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[0] == index:
            d = ahead[1]
        else:
            if ahead is not None:
                ahead[1].addBoth(_closeUnused)
            d = defer.maybeDeferred(self._openMaildrop.openMessage, index)

        def opened(source):
            if self._disconnected:
                source.close()
                return None
            return source

        def failed(reason: Failure) -> None:
            if reason.check(TemporaryFailure):
                self.log.warn(
                    "message unavailable: user={user} index={index} error={error}",
                    user=events.sanitize(self._avatarName()),
                    index=index,
                    error=str(reason.value),
                )
                reply = ERR_MESSAGE_UNAVAILABLE
            else:
                # A server fault, answered like one in any other command:
                # the session goes on.
                self.log.failure("unexpected error handling a POP3 command", reason)
                reply = ERR_INTERNAL
            if not self._disconnected:
                self._reply(reply)
            return None

        return d.addCallbacks(opened, failed)

    def _send(self, source, topLines: Optional[int], head: bytes) -> defer.Deferred:
        """
        Stream C{source} (its top for C{TOP}) after the status line C{head}
        (a C{+OK} line, sent in the same write as the start of the message).

        @return: a C{Deferred} firing once the transfer has ended.
        """
        done: defer.Deferred = defer.Deferred()
        self._badCommands = 0
        sender = _MessageSender(
            self.transport,
            source,
            topLines,
            onDone=lambda sender, failure: self._transferDone(sender, failure, topLines is None, done),
            onProgress=self.resetTimeout,
            onSent=self._countSent,
            head=head,
        )
        self._sender = sender
        sender.start(paused=self._output.paused)
        return done

    def _countSent(self, octets: int) -> None:
        """
        Count message octets written for RETR or TOP (the logout line's
        C{bytes}).
        """
        self._bytesSent += octets

    def _transferDone(
        self, sender: _MessageSender, failure: Optional[Failure], whole: bool, done: defer.Deferred
    ) -> None:
        """
        A RETR (C{whole}) or TOP transfer ended: count it, or close if the
        message could not be read; then fire C{done}, the command in flight.
        """
        if self._sender is sender:
            self._sender = None
        if failure is not None:
            # The +OK line and part of the message are out: never let the
            # client mistake a truncated message for a whole one.
            self.log.failure("reading message failed", failure)
            self._close()
        else:
            self._countTransfer(whole)
        done.callback(None)

    def _countTransfer(self, whole: bool) -> None:
        """
        A RETR (C{whole}) or TOP transfer was sent whole: count it for the
        logout line and restart the idle timer.
        """
        if whole:
            self._retrieved += 1
        else:
            self._topped += 1
        self.resetTimeout()

    def _readAhead(self, index: int) -> None:
        """
        After a RETR, open message C{index} (the next one, 0-based) and read
        its first chunk while the client reads what was sent: a client
        fetching every message asks for it next, and its RETR then costs
        only the sending.  Only a message of at most L{READ_AHEAD_MAX_SIZE}
        octets, not marked deleted; whatever the store answers (a failure
        too) waits for the next RETR or TOP, which takes it if it is for
        the same message and closes it otherwise, as do QUIT and the end
        of the connection.
        """
        messages = self._messages
        if (
            self._ahead is not None
            or self._maildrop is None
            or self.ended()
            or index >= len(messages)
            or index in self._current.deleted
            or messages[index].size > READ_AHEAD_MAX_SIZE
        ):
            return
        d = defer.maybeDeferred(self._maildrop.openMessage, index)
        d.addCallback(_ReadAheadSource)
        self._ahead = (index, d)

    def _dropReadAhead(self) -> None:
        """
        Close the message read ahead, if any.
        """
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            ahead[1].addBoth(_closeUnused)

    def do_QUIT_transaction(self, rest: str) -> None:
        """
        Enter the UPDATE state: delete the marked messages and mark the
        other retrieved ones seen, then close.
        """
        _noArguments(rest)
        self.state = _UPDATE
        self._committing = True
        self.cancelTimeout()
        transaction = self._current
        deleted = sorted(transaction.deleted)
        seen = sorted(transaction.accessed - transaction.deleted)
        self._dropReadAhead()
        maildrop, self._maildrop = self._openMaildrop, None
        # Nothing reads the listing from here on; see _releaseMaildrop.
        self._messages = ()
        d = maildrop.commit(deleted, seen=seen)
        d.addCallbacks(self._cbCommitted, self._ebCommit, callbackArgs=(len(deleted),))
        self.hold(d)

    def _cbCommitted(self, ignored, deleted: int) -> None:
        self._committing = False
        self._logSessionEnd(deleted=deleted)
        self._callLogout()
        self._close(GOODBYE.format(hostname=self.factory.hostname))

    def _ebCommit(self, reason: Failure) -> None:
        self._committing = False
        if reason.check(TemporaryFailure):
            self.log.warn(
                "commit failed: user={user} error={error}",
                user=events.sanitize(self._avatarName()),
                error=str(reason.value),
            )
        else:
            self.log.failure("commit failed", reason)
        self._logSessionEnd(deleted=0)
        self._callLogout()
        self._close(ERR_COMMIT)

    def _logSessionEnd(self, deleted: int) -> None:
        if self._loggedOut:
            return
        self._loggedOut = True
        events.loggedOut(
            self.log,
            "pop3",
            self._avatarName(),
            self.peer,
            retrieved=self._retrieved,
            top=self._topped,
            deleted=deleted,
            bytes=self._bytesSent,
        )
