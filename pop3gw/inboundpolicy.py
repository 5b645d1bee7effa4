"""
The settings of the inbound checks (C{[inbound]}) and what the checks know
of an SMTP session: plain values, apart from L{pop3gw.inbound} (which
needs DNS, DKIM and HTTP libraries) so that reading the configuration, and
the C{pop3gw} commands that do not check mail, do not load those.
"""

from __future__ import annotations

from typing import Optional

import attr


@attr.s(frozen=True, auto_attribs=True)
class InboundPolicy:
    """
    The C{[inbound]} settings.

    @ivar checks: whether SPF, DKIM and DMARC are checked at all.
    @ivar dnsServer: C{(address, port)} of the name server the checks ask,
        or C{None} for the system's.
    @ivar dnsTimeout: seconds one DNS query may take.
    @ivar deadline: seconds all of one message's checks may take.
    @ivar dmarcReject: refuse DMARC p=reject failures (else quarantine).
    @ivar dmarcQuarantine: tag DMARC p=quarantine failures.
    @ivar subjectTag: what a quarantined message's subject starts with
        (then a space).
    @ivar allowDomains: From domains (and their subdomains) whose failures
        are recorded only.
    @ivar temperrorDefer: answer C{451} when DNS failures leave DMARC
        without a verdict.
    @ivar rspamdURL: rspamd's C{/checkv2} URL, or C{None}.
    @ivar rspamdTimeout: seconds rspamd may take.
    @ivar rspamdFailClosed: answer C{451} when rspamd cannot be asked.
    @ivar lmtpChecks: check what arrives over LMTP and C{pop3gw deliver}
        too (unless a trusted front MTA checked it).
    @ivar trustedAuthservIDs: the authserv-ids (lower case) of the front
        MTAs whose topmost C{Authentication-Results:} field stands for the
        checks on LMTP and C{pop3gw deliver}.
    @ivar lmtpDMARCReject: refuse DMARC p=reject failures on LMTP and
        C{pop3gw deliver} (else quarantine them: refusing there makes the
        front MTA bounce to a sender that may be forged).
    """

    checks: bool = True
    dnsServer: Optional[tuple[str, int]] = None
    dnsTimeout: float = 5.0
    deadline: float = 20.0
    dmarcReject: bool = True
    dmarcQuarantine: bool = True
    subjectTag: str = "[SPAM]"
    allowDomains: frozenset = frozenset()
    temperrorDefer: bool = False
    rspamdURL: Optional[str] = None
    rspamdTimeout: float = 10.0
    rspamdFailClosed: bool = False
    lmtpChecks: bool = False
    trustedAuthservIDs: frozenset = frozenset()
    lmtpDMARCReject: bool = False

    def allowed(self, domain: str) -> bool:
        """
        Whether C{domain} is, or is under, an allow-listed domain.
        """
        labels = domain.lower().rstrip(".").split(".")
        return any(".".join(labels[i:]) in self.allowDomains for i in range(len(labels)))


@attr.s(frozen=True, auto_attribs=True)
class Session:
    """
    What the checks know of the SMTP session.

    @ivar ip: the client's address.
    @ivar helo: its HELO/EHLO argument.
    @ivar sender: the envelope sender, C{None} for C{<>}.
    @ivar recipients: the envelope recipients.
    @ivar reverseName: the client's reverse DNS name, or C{None}.
    """

    ip: str
    helo: str
    sender: Optional[str]
    recipients: tuple[str, ...] = ()
    reverseName: Optional[str] = None


__all__ = ["InboundPolicy", "Session"]
