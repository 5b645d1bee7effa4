# -*- test-case-name: tests.test_testing -*-
"""
Interfaces and shared exceptions.

Protocols see only these interfaces, L{pop3gw.address.Address} and a
C{twisted.cred.portal.Portal}; storage implements them.  Nothing here imports
anything local except L{pop3gw.address}.
"""

from __future__ import annotations

import errno
import os

from zope.interface import Attribute, Interface

# --- Exceptions ----------------------------------------------------------


class Pop3gwError(Exception):
    """
    Base class of the errors pop3gw raises on purpose.  The text of these
    exceptions is for operators (logs, CLI); protocols map the type to a
    fixed reply and never echo the text.
    """


class UnknownUser(Pop3gwError):
    """
    No such user (local recipient or login).
    """


class LookupWouldBlock(Pop3gwError):
    """
    L{IUserStore.peekUser}: the answer is not at hand without blocking
    I/O (ask L{IUserStore.lookupUser} from a thread).
    """


class UserExists(Pop3gwError):
    """
    C{user add} for an address that already has an entry.
    """


class AliasError(Pop3gwError):
    """
    C{alias add} or C{alias remove} refused: a bad address, an alias that
    would shadow a user, a target that is not a local user, or no such
    alias.  Its text is the operator's one-line message.
    """


class AliasShadowsUser(AliasError):
    """
    C{alias add} names an alias that is a user's address (the user would
    always win).
    """


class UnknownTarget(AliasError):
    """
    C{alias add} names a target that is not a local user.
    """


class AliasNotLocal(AliasError):
    """
    C{alias add} names an alias in a domain that is not local (no user has
    it and it was not given with C{--domain}): mail for it would never be
    accepted.
    """


class AddressIsAlias(Pop3gwError):
    """
    C{user add} names an address that is an alias (in any case): the new
    user would silently take the alias's mail.
    """


class MaildropLocked(Pop3gwError):
    """
    Another session holds the maildrop's exclusive lock (POP3 C{[IN-USE]}).
    """


class TemporaryFailure(Pop3gwError):
    """
    A transient server-side failure (disk full, I/O error, lock timeout):
    POP3 C{[SYS/TEMP]}, SMTP 451/452, sysexits 75.
    """

    @classmethod
    def fromOSError(cls, what: str, error: OSError) -> "TemporaryFailure":
        """
        The failure to raise when storage work fails with C{error}:
        L{InsufficientStorage} for a full disk or quota (C{ENOSPC},
        C{EDQUOT}), else a plain L{TemporaryFailure}.

        @param what: a fixed phrase saying what failed.
        @return: an exception whose text is C{"<what>: <the error in
            words>"}, e.g. C{"cannot write message: No space left on
            device"}.
        """
        words = error.strerror or os.strerror(error.errno or 0)
        kind = InsufficientStorage if error.errno in _STORAGE_FULL else TemporaryFailure
        return kind(f"{what}: {words}")



class QueueEntryLost(TemporaryFailure):
    """
    This node no longer holds a queue entry of a shared queue (its lease
    ran out and another node took it): it must neither attempt nor complete
    it, and forgets it.
    """


class SendingLimited(TemporaryFailure):
    """
    The user is over a sending limit, or suspended from sending (see
    L{pop3gw.sendlimits}); answered C{451 4.7.1}.
    """

class InsufficientStorage(TemporaryFailure):
    """
    The disk or the quota holding the data is full (C{ENOSPC}, C{EDQUOT}):
    SMTP C{452 4.3.1 Insufficient system storage}, POP3 C{[SYS/TEMP]},
    sysexits 75.
    """


class ServerStopping(TemporaryFailure):
    """
    The server is stopping and takes no more work: a pool's runner
    refuses work given after its drain found nothing in flight (see
    L{pop3gw.runner.ThreadPoolRunner.drain}).  The client is told to try
    again (SMTP C{451}, POP3 C{[SYS/TEMP]}); nothing was stored.
    """


#: The errno values that mean the storage is full.
_STORAGE_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})


class AuthenticationBusy(TemporaryFailure):
    """
    A password check was refused before it started: its client (an IPv4
    address, an IPv6 /64) has its share of checks running and waiting, or
    the hash threads are full.  POP3 C{[SYS/TEMP]}, SMTP 454.  The refusal
    is logged sparingly where it is decided, not per attempt.
    """


class PermanentFailure(Pop3gwError):
    """
    A permanent server-side refusal (POP3 C{[SYS/PERM]}, SMTP 5xx,
    sysexits 65 for bad input).
    """


class RelayDenied(PermanentFailure):
    """
    A recipient is not in a local domain, on a path that only delivers
    locally (the MX listener): SMTP C{550 5.7.1}.
    """


class MessageTooLarge(PermanentFailure):
    """
    A message is larger than the configured limit.
    """


class BadMessageData(PermanentFailure):
    """
    A message holds a bare CR (a CR not followed by LF) or a NUL octet.
    Neither is text (RFC 5322 2.3, RFC 5321 2.3.8), and storing them as
    anything else would change the message: a bare CR made a line break
    turns C{Subject: hi<CR>From: x} into two fields.  Refused as submission
    refuses them (SMTP 550 5.6.11 / 5.6.0), sysexits 65.
    """


# --- Users ----------------------------------------------------------------


class IBlockingRunner(Interface):
    """
    Where blocking work (file-system calls, fsyncs) runs: a thread pool in
    the server, at once in the CLI and tests (see L{pop3gw.runner}).
    """

    def run(f, *args):
        """
        Run C{f(*args)}, which may block.

        @return: a C{Deferred} firing (on the reactor thread) with C{f}'s
            result, or failing with what it raised.
        """


class IDirectorySnapshot(Interface):
    """
    An immutable snapshot of the users directory: the users, their aliases
    and the users' domains.  Every method answers from memory, without
    I/O, so it may be called on the reactor thread (SMTP C{RCPT}, the
    router, the avatars); a backend builds a new snapshot off the reactor
    thread and swaps it in whole (L{IUserStore.refresh}).

    Users and aliases are found whatever the case of the local part (by
    L{pop3gw.address.lookupKey}); every answer that names a user names it
    as stored, which is the spelling its maildrop, its sessions and the
    logs use.  L{pop3gw.directory.Directory} implements it for any backend
    that can list its users and aliases.

    Every method raises L{TemporaryFailure} if the backing store has never
    been readable (mail is then deferred, not bounced as unknown).
    """

    def exists(address):
        """
        @return: whether C{address} (an L{Address}) is a user.
        """

    def resolve(address):
        """
        The one recipient resolution of every path that accepts mail
        (submission, MX, LMTP, C{pop3gw deliver}, bounces): a user, then
        an alias (one target or a distribution list), then the implicit
        C{postmaster@} of a users' domain, then the base of a sub-address
        (C{alice+tag@} -> C{alice@}, resolved by the same three steps),
        then the domain's catch-all.

        @return: a tuple of the user L{Address}es (as stored) whose
            maildrops receive mail for C{address}, each once, in order;
            an empty tuple if no user does.
        """

    def owns(user, address):
        """
        @return: whether the user C{user} may use C{address} as a sender:
            its own address, an alias or the implicit postmaster address
            that resolves to it, or a sub-address of one of them (never a
            catch-all).
        """

    def sendersOf(user):
        """
        What C{user} may send as, fixed when asked (the submission avatar
        asks once, at login).

        @return: a L{pop3gw.directory.Senders} whose C{allows(address)}
            answers as L{owns}C{(user, address)} does.
        """

    def addresses():
        """
        @return: a sorted list of every user L{Address}.
        """

    def domains():
        """
        @return: the domains of the users (lower-case text), a frozenset:
            mail for them is delivered locally.
        """


class IUserDirectory(Interface):
    """
    The non-blocking side of the users database: what the reactor thread
    may ask.
    """

    def snapshot():
        """
        @return: the current L{IDirectorySnapshot}.  No I/O: the backend
            refreshes it off the reactor thread (L{IUserStore.refresh}).
        """


class IUserStore(Interface):
    """
    The blocking side of the users database: password hashes, changes, and
    re-reading the backing store.  Methods may block (file or database
    I/O): the server calls them only from a thread pool, the C{pop3gw}
    command directly.  A backend implements this and L{IUserDirectory}; a
    second backend (a shared SQL database) implements the same two.
    """

    def lookupUser(address):
        """
        @param address: an L{Address}, in any case.
        @return: C{(user, hash)}: the user as stored (an L{Address}) and its
            stored hash as C{"{SCHEME}..."} text; or C{None} if there is no
            such user (aliases are not followed).  Reflects changes made by
            the C{pop3gw user} command without a restart (and refreshes
            the directory snapshot if they changed it).
        """

    def peekUser(address):
        """
        The same answer as L{lookupUser}, but only if it is at hand without
        blocking (in memory and known to be current); the credentials
        checker uses it to confirm a cached login on the reactor thread,
        with no thread hop.

        @raise LookupWouldBlock: finding out would block (a database
            backend may always raise this).
        """

    def passwordHash(address):
        """
        @param address: an L{Address}, in any case.
        @return: the stored hash of the user L{lookupUser} finds, or
            C{None}.
        """

    def setPassword(address, hashed, create):
        """
        Store C{hashed} (C{"{SCHEME}..."}) for C{address}, durably.

        @param create: if true the user must not exist yet (L{UserExists});
            if false it must exist (L{UnknownUser}).
        """

    def upgradePasswordHash(address, oldHash, newHash):
        """
        Replace the user's stored hash C{oldHash}, which a login has just
        verified, with C{newHash} (the same password in the current
        scheme), durably; nothing happens if the stored hash is no longer
        C{oldHash} (changed meanwhile) or the user is gone.  Logged; a
        failure to store it is logged, not raised.

        @return: whether the hash was replaced.
        """

    def remove(address):
        """
        Remove a user, durably.

        @raise UnknownUser: no such user.
        """

    def refresh():
        """
        Re-read the backing store if it changed and swap in a new
        L{IDirectorySnapshot} (the server calls this in its I/O thread
        pool periodically and on SIGHUP).  A store that fails to load is
        logged and the old contents kept; nothing is raised.

        @return: the current L{IDirectorySnapshot}.
        """


# --- Maildrops ------------------------------------------------------------


class IMessageInfo(Interface):
    """
    One message of a maildrop snapshot.
    """

    size = Attribute(
        "Exact octet count of the message as RETR sends it: CRLF line ends, "
        "before dot-stuffing, without the terminating '.' line."
    )
    uid = Attribute(
        "The UIDL value: 1 to 70 characters in 0x21..0x7E, unique in the "
        "maildrop, stable across sessions and restarts, never reused."
    )
    seen = Attribute(
        "Whether the message had been retrieved (RETR) in an earlier "
        "session when the snapshot was taken: in a Maildir, whether its "
        "':2,' info carries the 'S' flag.  POP3's LAST (RFC 1225) starts at "
        "the highest message number that is seen."
    )


class IMessageColumns(Interface):
    """
    What an L{IMaildrop.messages} sequence may also provide: answers about
    all its messages, or a run of them, taken from the store's columns
    without making an L{IMessageInfo} per message, so that a session goes
    through a large maildrop at C speed (the login's total and C{LAST}, a
    whole C{LIST} or C{UIDL}).  Optional: the protocol derives the same from
    the L{IMessageInfo}s of a sequence that does not provide it.

    C{start} and C{stop} are 0-based indexes, as in a slice (C{0 <= start
    <= stop <= len(messages)}).
    """

    def totalSize():
        """
        @return: the sum of every message's L{IMessageInfo.size}.
        """

    def lastSeen():
        """
        @return: the 1-based number of the last message whose
            L{IMessageInfo.seen} is true, or 0 if none is.
        """

    def sizes(start, stop):
        """
        @return: an iterable of the L{IMessageInfo.size}s of messages
            C{start} to C{stop - 1}, in order.
        """

    def uids(start, stop):
        """
        @return: an iterable of the L{IMessageInfo.uid}s of messages
            C{start} to C{stop - 1}, in order.
        """


class IMaildrop(Interface):
    """
    One POP3 session's exclusive, snapshotted view of a user's maildrop.

    Indexes are 0-based positions in L{messages}; the protocol turns them
    into 1-based message numbers.
    """

    messages = Attribute("A sequence of L{IMessageInfo}, fixed at login.")

    def openMessage(index):
        """
        Open one message for reading.  A store whose messages are not
        local files (a database) fetches it off the reactor thread first,
        so the answer may come later.

        @return: a C{Deferred} firing with a binary file-like object whose
            C{read(n)} yields the message in wire form (CRLF line ends, not
            dot-stuffed), exactly C{messages[index].size} octets in all,
            without blocking for long (a local file).  The caller closes
            it.  The C{Deferred} fails with L{TemporaryFailure} when the
            message vanished or cannot be read, C{IndexError} for an index
            out of range.
        """

    def commit(deleted, seen=()):
        """
        The POP3 UPDATE state: remove the messages whose indexes are in
        C{deleted}, mark those in C{seen} (and not in C{deleted}) as seen
        (retrieved, so L{IMessageInfo.seen} is true in later snapshots),
        then release the lock.

        Marking is best effort: a message that cannot be marked is logged
        and never fails the commit (the deletions are what matter).

        @param deleted: indexes of messages to remove.
        @param seen: indexes of messages retrieved in this session.
        @return: a C{Deferred} that fires with C{None} when done, or fails
            with L{TemporaryFailure} (some could not be removed, RFC 1939:
            the reply to QUIT is then -ERR; the lock is released anyway) or
            C{IndexError} (an index is out of range; nothing is removed or
            marked and the lock is released).
        """

    def release():
        """
        Release the lock without deleting or marking anything (a dropped
        connection or a timeout).  Idempotent.
        """


class IDelivery(Interface):
    """
    One message being delivered: start (the factory method), then
    L{write} the body, then L{commit} or L{abort}.
    """

    def write(data):
        """
        Append C{data} (bytes; CRLF or LF line ends) to the message.

        @raise TemporaryFailure: the disk refused it (L{InsufficientStorage}
            when it is full).
        @raise BadMessageData: C{data} holds a bare CR or a NUL (a CR at
            its end is judged by the next write or the commit); the
            delivery is then discarded.
        """

    def commit():
        """
        Make the message durable everywhere it goes (file and directory
        fsync).  Nothing may be acknowledged before this fires.

        @return: a C{Deferred} firing with C{None} once durable, or failing
            with L{TemporaryFailure} (L{InsufficientStorage} when the disk
            is full), or with L{BadMessageData} when the message ends with
            a bare CR.
        """

    def abort():
        """
        Discard the message; nothing of it remains.  Idempotent.
        """


class IRoutedDelivery(IDelivery):
    """
    An L{IDelivery} from L{IMailRouter.beginDelivery} that says where the
    message goes, so the submission listener can log it and name it by one
    id from acceptance to relay.
    """

    queueId = Attribute(
        "The id of the outbound queue entry the commit creates (text made of "
        "letters, digits, '.', '-' and '_'), or None when every recipient is "
        "local."
    )
    localRecipients = Attribute("The local recipients, a tuple of L{Address}.")
    remoteRecipients = Attribute("The remote recipients, a tuple of L{Address}.")


class ITwoPhaseDelivery(IDelivery):
    """
    A delivery that can be made durable first and handed on later, so that
    it can still be withdrawn if another part of the same message fails.
    L{pop3gw.queue.OutboundQueue} deliveries provide it.
    """

    def prepare():
        """
        Make the message durable without acting on it yet.

        @return: a C{Deferred} firing once durable, or failing with
            L{TemporaryFailure}.
        """

    def release():
        """
        Let a prepared message go (the queue starts relaying it).
        """

    def discard():
        """
        Withdraw a prepared message (or abort an open one); nothing of it
        remains.

        @return: a C{Deferred} firing when done.
        """


class IMaildropStore(Interface):
    """
    The users' maildrops.
    """

    def openMaildrop(address):
        """
        Lock C{address}'s maildrop exclusively and take its snapshot.

        @return: a C{Deferred} firing with an L{IMaildrop}.
        @raise MaildropLocked: (as the Deferred's failure) another session
            holds it.
        @raise TemporaryFailure: (likewise) I/O trouble.
        """

    def beginDelivery(recipients, trace=b""):
        """
        Start delivering one message to the maildrops of C{recipients}
        (a sequence of user L{Address}es).

        @param trace: bytes prepended to the stored message (a C{Received:}
            header, CRLF or LF line ends), or C{b""}.
        @return: an L{IDelivery}.
        @raise TemporaryFailure: the maildrop cannot be written.
        """


# --- Outbound -----------------------------------------------------------


class IQueuedDelivery(IDelivery):
    """
    An L{IDelivery} from L{IOutboundQueue.beginDelivery} that names the
    queue entry its commit creates.
    """

    queueId = Attribute(
        "The id of the entry (text made of letters, digits, '.', '-' and '_'): "
        "the id 'pop3gw queue list', the relay's log lines and bounces use."
    )


class IOutboundQueue(Interface):
    """
    Durable queue of mail for non-local recipients.
    """

    def beginDelivery(sender, recipients, trace=b"", smtputf8=False):
        """
        Start queueing one message.

        @param sender: the envelope sender L{Address}, or C{None} for the
            null reverse path (bounces).
        @param recipients: a sequence of remote L{Address}es.
        @param smtputf8: whether the message was received with SMTPUTF8
            (RFC 6531), recorded in the entry for the relay.
        @return: an L{IDelivery} (an L{IQueuedDelivery} if the queue names
            its entries); its C{commit} fires once the entry is durable in
            the queue (it is then relayed in the background).
        """


class IQueueStore(Interface):
    """
    The durable side of the outbound queue, as the relay service sees it:
    entries (L{pop3gw.queue.Entry}), their messages, and flush requests.
    The relay changes an entry only through the entry's own methods and
    then saves it; it never touches the queue's files.
    """

    def loadEntries():
        """
        Remove debris of interrupted writes and read every entry (blocking;
        for start-up).

        @return: a list of entries, oldest first.
        """

    def saveEntry(entry):
        """
        Write C{entry}'s current state durably.  Saves of one entry run in
        call order.

        @return: a C{Deferred} firing once durable, or failing with
            L{QueueEntryLost} if another node relays the entry now (a
            shared queue).
        """

    def recordAttempt(entry):
        """
        Record durably that an attempt of C{entry} starts: its C{attempts}
        and C{nextAttempt} (what L{pop3gw.queue.Entry.beginAttempt}
        changed; a store may write only those).  Ordered with the entry's
        saves.

        @return: a C{Deferred} firing once durable; the attempt is made
            only then.
        """

    def removeEntry(entry):
        """
        Remove C{entry} from the queue.

        @return: a C{Deferred} firing once removed, or failing with
            L{QueueEntryLost} (see L{saveEntry}).
        """

    def openMessage(entry):
        """
        @return: C{entry}'s message (CRLF line ends), a binary file open for
            reading.
        @raise OSError: it cannot be opened.
        """

    def readHeaders(entry):
        """
        @return: a C{Deferred} firing with the header of C{entry}'s message
            (for a bounce), or C{b""} if unreadable.
        """

    def addListener(listener):
        """
        Call C{listener(entry)} for each newly committed entry.
        """

    def removeListener(listener):
        """
        Stop calling C{listener}.
        """

    def flushStamp():
        """
        @return: a value that changes each time an operator asks for every
            entry to be retried now (C{pop3gw queue flush}), or C{None}.
        """


class IMailRouter(Interface):
    """
    Sends each recipient to a local maildrop or the outbound queue.
    """

    def isLocalDomain(domain):
        """
        @return: whether mail for C{domain} (lower-case text) is delivered
            locally.
        """

    def checkLocalRecipient(address):
        """
        Like L{checkRecipient}, for mail that may only be delivered locally
        (received from the world).

        @return: the local users (a non-empty tuple of L{Address}) who
            receive mail for C{address}, as L{checkRecipient} returns them.
        @raise RelayDenied: C{address} is not in a local domain.
        @raise UnknownUser: C{address} is in a local domain but resolves to
            no user.
        """

    def beginLocalDelivery(sender, recipients, trace=b""):
        """
        Start delivering one message to local C{recipients} (as returned by
        L{checkLocalRecipient}) only: nothing ever goes to the outbound
        queue.

        @return: an L{IRoutedDelivery} without a remote part.
        @raise RelayDenied: a recipient is not in a local domain.
        """

    def checkRecipient(address):
        """
        @return: a non-empty tuple of L{Address}: the local users who
            receive mail for C{address} (L{IDirectorySnapshot.resolve}:
            several for a distribution list), or C{(address,)} if it is
            remote.
        @raise UnknownUser: C{address} is in a local domain but nothing
            resolves it to a user.
        """

    def beginDelivery(sender, recipients, trace=b"", smtputf8=False):
        """
        Start delivering one message to C{recipients} (the addresses
        L{checkRecipient} returned, one copy per address): local ones into
        maildrops, the rest into the outbound queue (C{smtputf8}, whether
        the message was received with SMTPUTF8, goes with them: see
        L{IOutboundQueue.beginDelivery}).

        @return: an L{IRoutedDelivery} whose C{commit} fires only once the
            message is durable in every maildrop and in the queue.
        """


# --- Avatars (handed out by the realm) -------------------------------------


class IPOP3Avatar(Interface):
    """
    A logged-in POP3 user.
    """

    address = Attribute("The user's L{Address}.")

    def openMaildrop():
        """
        @return: a C{Deferred} firing with the user's L{IMaildrop} (see
            L{IMaildropStore.openMaildrop} for failures).
        """


class ISubmissionAvatar(Interface):
    """
    A user authenticated on the submission listener.
    """

    address = Attribute("The user's L{Address}.")

    def mayUseSender(address):
        """
        @return: whether this user may send as C{address} (envelope
            C{MAIL FROM} or header C{From:}).
        """

    def checkRecipient(address, accepted=0):
        """
        See L{IMailRouter.checkRecipient}; C{accepted} is how many
        recipients the message being sent already has.

        @raise SendingLimited: (or fails with) the user may not send this
            message to one more recipient now.
        """

    def beginDelivery(sender, recipients, trace=b"", smtputf8=False):
        """
        See L{IMailRouter.beginDelivery}.  The message counts against the
        user's sending limits once committed.
        """


class IAppPasswords(Interface):
    """
    The users' app passwords and main-password scopes (see
    L{pop3gw.apppasswords}): a file under the data directory, or tables of
    the database store.  Every method but L{peekMainScope} may block: the
    server calls them in a thread pool, the C{pop3gw} command directly.
    """

    def find(user, password):
        """
        @return: the L{pop3gw.apppasswords.AppPassword} of C{user} that
            C{password} (bytes) would be, by its id (not verified), or
            C{None}; asks the backing store at each call, so an app password
            removed through any node is not found afterwards.
        """

    def mainScope(user):
        """
        @return: where C{user}'s main password may be used (one of
            L{pop3gw.apppasswords.MAIN_SCOPES}).
        """

    def peekMainScope(user):
        """
        L{mainScope} from memory, for the reactor thread.

        @return: the scope, or C{None} if it is not known to be current.
        """

    def list(user):
        """
        @return: C{user}'s app passwords, oldest first.
        """

    def add(user, name, scope, hashPassword, now=None):
        """
        Generate, store (hashed with C{hashPassword}) and return a new app
        password.

        @raise pop3gw.apppasswords.AppPasswordError: a bad name or scope,
            or the name taken.
        """

    def remove(user, name):
        """
        Remove C{user}'s app password C{name}.

        @raise pop3gw.apppasswords.AppPasswordError: there is none.
        """

    def setMainScope(user, scope):
        """
        Restrict (or free, with C{all}) C{user}'s main password.
        """

    def removeUser(user):
        """
        Forget everything of C{user} (the user was removed).
        """


class ISendingRecords(Interface):
    """
    The sending records, per-user limits and suspensions behind the
    sending limits (see L{pop3gw.sendlimits}): C{DATA/accounts.sqlite}, or
    tables of the database store.  Every method blocks: the server calls
    them through a runner, the C{pop3gw} command directly.
    """

    defaults = Attribute("The default L{pop3gw.sendlimits.Limits}.")
    path = Attribute("Where the records are, for the operator (a file, or a URI without its password).")
    errors = Attribute("The exception types that mean the records cannot be used now (the limits fail open).")

    def limitsOf(user):
        """
        @return: the L{pop3gw.sendlimits.Limits} of C{user} (text).
        """

    def usage(user):
        """
        @return: the L{pop3gw.sendlimits.Usage} of C{user}, now.
        """

    def admit(user, accepted, client):
        """
        Decide on one more recipient; see
        L{pop3gw.sendlimits.SendingLimits.admit}.
        """

    def admitWithUsage(user, accepted, client, unwritten=(0, 0)):
        """
        L{admit}, and the L{pop3gw.sendlimits.Usage} the decision was made
        on; C{unwritten} counts C{(messages, recipients)} not recorded yet.
        """

    def record(user, recipients, client):
        """
        Note one message sent by C{user} to C{recipients} recipients.
        """

    def recordMany(rows):
        """
        Note several messages, C{(user, at, recipients, client)} each, in
        one transaction.
        """

    def now():
        """
        @return: the time records are stamped with (POSIX seconds).
        """

    def unsuspend(user):
        """
        Lift a suspension and clear the user's counters.

        @return: whether the user was suspended.
        """

    def setLimits(user, messagesPerHour=None, recipientsPerDay=None, clear=()):
        """
        Set the user's own limits; C{clear} names the ones that go back to
        the defaults.
        """

    def recordUse(user, name, client):
        """
        Note that C{user}'s app password C{name} was just used from
        C{client}.
        """

    def lastUses(user):
        """
        @return: C{{name: (when, client)}} for C{user}'s app passwords.
        """

    def suspendedUsers():
        """
        @return: C{(user, since, reason)} for every suspended user.
        """

    def close():
        """
        Let go of this thread's connection, if any.
        """


class IDKIMKeyStore(Interface):
    """
    The DKIM signing keys (see L{pop3gw.dkimkeys}): files under the data
    directory, or rows of the database store.  Every method blocks: the
    server calls them in a thread pool, the C{pop3gw} command directly.
    Database failures raise L{TemporaryFailure}.
    """

    def records():
        """
        @return: every key's L{pop3gw.dkimkeys.KeyRecord}, oldest first.
        """

    def privateKey(record):
        """
        @return: the private key of C{record}, PEM.
        @raise pop3gw.dkimkeys.DKIMKeyError: it cannot be read.
        """

    def where(record):
        """
        @return: where C{record}'s key is (C{None}: the keys' index), for
            log lines and messages.
        """

    def publicRecord(record):
        """
        @return: the DNS name and TXT value to publish for C{record}.
        @raise pop3gw.dkimkeys.DKIMKeyError: its key cannot be read.
        """

    def stamp():
        """
        @return: a value that changes whenever the keys change (compared
            with C{==}), cheap to get.
        """

    def generate(domain, selector, algorithm, created=None):
        """
        Make a new key for C{domain} (see
        L{pop3gw.dkimkeys.KeyStore.generate}).

        @return: its L{pop3gw.dkimkeys.KeyRecord}.
        @raise pop3gw.dkimkeys.DKIMKeyError: the selector is taken or a
            name is malformed.
        """

    def activate(domain, selector):
        """
        Sign C{domain}'s mail with C{selector} from now on, instead of its
        other key of the same algorithm.

        @raise pop3gw.dkimkeys.DKIMKeyError: no such key, or it is unusable.
        """

    def remove(domain, selector):
        """
        Forget C{selector}'s key.

        @raise pop3gw.dkimkeys.DKIMKeyError: no such key, or another key
            should be activated first.
        """


class ILoginHistory(Interface):
    """
    Where the login history (see L{pop3gw.loginwatch}) is kept: a file
    under the data directory, or a table of the database store.  Both
    methods block: the server calls them at start-up and in a thread pool.
    """

    where = Attribute("Where the history is, for log lines (a file, or a URI without its password).")

    def read():
        """
        @return: the stored history (user key -> network -> C{[first seen,
            last seen]}).
        @raise TemporaryFailure: the database cannot be reached.
        """

    def merge(changes, now):
        """
        Store C{changes} (a history of the users whose history changed)
        merged with the stored history (earliest first-seen, latest
        last-seen), forgetting networks unseen for
        L{pop3gw.loginwatch.HISTORY_KEEP} seconds before C{now}.

        @return: the whole history as stored.
        """
