# -*- test-case-name: tests.test_tokens -*-
"""
Random hex tokens for unique names and ids, drawn from the kernel's random
source a block at a time.

A Maildir unique name, a queue id and an added C{Message-ID} each want a few
random octets on the reactor thread, for every message.  C{secrets.token_hex}
asks the kernel each time (a C{getrandom} system call, during which the
interpreter lets other threads run, so the reactor thread may then wait for
an I/O thread to hand the interpreter back).  L{tokenHex} takes them from a
block of L{BLOCK} octets of C{os.urandom} instead, one system call per 256
tokens of 16 octets; every octet is handed out once.  A process made by
C{fork} draws a block of its own before its first token (the block is
dropped in the child, C{os.register_at_fork}), so parent and child never
share one.
"""

from __future__ import annotations

import os
import threading

__all__ = ["BLOCK", "tokenHex"]

#: Octets drawn from C{os.urandom} at a time.
BLOCK = 4096

_lock = threading.Lock()
_block = b""
_used = 0


def _forget() -> None:
    """
    Drop the block, and the lock another thread may have held at the
    C{fork} (in a child made by C{fork}).
    """
    global _block, _used, _lock
    _block, _used, _lock = b"", 0, threading.Lock()


os.register_at_fork(after_in_child=_forget)


def tokenHex(octets: int) -> str:
    """
    @return: C{octets} random octets (from C{os.urandom}, each used once),
        as C{2 * octets} lower-case hex digits.  Safe in any thread.
    @raise ValueError: C{octets} is not between 1 and L{BLOCK}.
    """
    global _block, _used
    if not 0 < octets <= BLOCK:
        raise ValueError(f"tokenHex takes 1 to {BLOCK} octets, not {octets}")
    with _lock:
        if _used + octets > len(_block):
            _block, _used = os.urandom(BLOCK), 0
        start = _used
        _used = start + octets
        return _block[start:_used].hex()
