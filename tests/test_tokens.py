"""
Random hex tokens drawn from the kernel a block at a time.
"""

from __future__ import annotations

import os
import threading

from twisted.trial.unittest import SynchronousTestCase

from pop3gw import tokens


class TokenHexTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.draws: list[int] = []
        realUrandom = os.urandom

        def urandom(n: int) -> bytes:
            self.draws.append(n)
            return realUrandom(n)

        self.patch(tokens.os, "urandom", urandom)
        # Start from an empty block, whatever earlier tests drew.
        tokens._forget()

    def test_lengthAndDigits(self) -> None:
        """
        C{tokenHex(n)} is C{2n} lower-case hex digits.
        """
        for n in (1, 8, 16, 32):
            token = tokens.tokenHex(n)
            self.assertEqual(len(token), 2 * n)
            self.assertEqual(token, token.lower())
            bytes.fromhex(token)

    def test_oneDrawPerBlock(self) -> None:
        """
        Tokens come from one C{os.urandom} block until it is used up, then
        from a new one; each octet is handed out once.
        """
        per = tokens.BLOCK // 16
        drawn = [tokens.tokenHex(16) for _ in range(per)]
        self.assertEqual(self.draws, [tokens.BLOCK])
        self.assertEqual(len(set(drawn)), per)
        tokens.tokenHex(16)
        self.assertEqual(self.draws, [tokens.BLOCK, tokens.BLOCK])

    def test_tokenNotSplitAcrossBlocks(self) -> None:
        """
        A token longer than what is left of the block comes whole from the
        next block.
        """
        tokens.tokenHex(tokens.BLOCK - 4)
        self.assertEqual(len(tokens.tokenHex(8)), 16)
        self.assertEqual(self.draws, [tokens.BLOCK, tokens.BLOCK])

    def test_badLength(self) -> None:
        """
        Zero, negative and longer-than-a-block lengths are refused.
        """
        for n in (0, -1, tokens.BLOCK + 1):
            self.assertRaises(ValueError, tokens.tokenHex, n)

    def test_threadsGetDistinctTokens(self) -> None:
        """
        Tokens taken by several threads at once are all different.
        """
        out: list[str] = []
        lock = threading.Lock()

        def take() -> None:
            mine = [tokens.tokenHex(8) for _ in range(500)]
            with lock:
                out.extend(mine)

        threads = [threading.Thread(target=take) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        self.assertEqual(len(out), 4000)
        self.assertEqual(len(set(out)), 4000)

    def test_forkedChildDrawsItsOwnBlock(self) -> None:
        """
        A child made by C{fork} does not hand out what is left of its
        parent's block: its next token is not the parent's next one.
        """
        tokens.tokenHex(8)
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            try:
                os.write(write, tokens.tokenHex(8).encode("ascii"))
            finally:
                os._exit(0)
        os.close(write)
        try:
            child = os.read(read, 64).decode("ascii")
        finally:
            os.close(read)
            os.waitpid(pid, 0)
        self.assertEqual(len(child), 16)
        self.assertNotEqual(child, tokens.tokenHex(8))
