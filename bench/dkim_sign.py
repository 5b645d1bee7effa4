"""
CPU cost of DKIM signing, as pop3gw signs relayed mail (its
C{pop3gw.dkimsign.signatures}, in one thread): milliseconds per message
for RSA-2048 and Ed25519 keys at a few message sizes, each repeated, with
the spread.  Unlike the load generators beside it, it imports pop3gw (run
it with the venv's python); it is never run by the test suite.

    .venv/bin/python bench/dkim_sign.py [--repeat N]
    .venv/bin/python bench/dkim_sign.py --stall [--repeat N]

C{--stall} signs a 10 MB text message (RSA and Ed25519) beside a running
reactor, once in a thread and once in a L{pop3gw.runner.ProcessPoolRunner}
process, and prints the longest pause of a 5 ms C{LoopingCall}: how long
the reactor could not serve anyone.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from pop3gw.dkimkeys import Keyring, KeyStore  # noqa: E402
from pop3gw.dkimsign import signatures  # noqa: E402

SIZES = (2_000, 100_000, 10_000_000)


def message(size: int, text: bool = True) -> bytes:
    """
    A message of about C{size} octets: text (a space every few octets, the
    slow case of relaxed body canonicalisation) or base64 lines (an
    attachment: no white space).
    """
    head = (
        b"From: Alice <alice@example.org>\r\nTo: bob@remote.example\r\nSubject: bench\r\n"
        b"Date: Tue, 01 Dec 2026 23:00:00 +0000\r\nMessage-ID: <b@example.org>\r\n"
        b"MIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\n"
    )
    if text:
        line = b"The quick brown fox jumps over the lazy dog, again and again  \r\n"
    else:
        line = b"VGhlIHF1aWNrIGJyb3duIGZveCBqdW1wcyBvdmVyIHRoZSBsYXp5IGRvZywgYWdhaW4gYW5kIGFn\r\n"
    return head + line * (size // len(line) + 1)


def stall(keys: list, repeat: int) -> None:
    """
    Print the reactor's longest pause while a 10 MB message is signed in a
    thread, then in another process.
    """
    from twisted.internet import defer, reactor, task, threads

    from pop3gw.runner import ProcessPoolRunner

    data = message(10_000_000)

    @defer.inlineCallbacks
    def measure():
        runner = ProcessPoolRunner(reactor, workers=1)
        yield runner.run(signatures, message(100), keys)  # start the process
        for name, sign in (
            ("thread", lambda: threads.deferToThread(signatures, data, keys)),
            ("process", lambda: runner.run(signatures, data, keys)),
        ):
            for _ in range(repeat):
                gaps: list = []
                last = [time.perf_counter()]

                def tick(gaps: list = gaps, last: list = last) -> None:
                    now = time.perf_counter()
                    gaps.append(now - last[0])
                    last[0] = now

                loop = task.LoopingCall(tick)
                loop.start(0.005)
                start = time.perf_counter()
                yield sign()
                loop.stop()
                print(f"{name:>8}: signed in {time.perf_counter() - start:.2f} s, longest reactor pause {max(gaps) * 1000:.0f} ms")
        runner.stop()

    def run() -> None:
        measure().addErrback(lambda f: f.printTraceback()).addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(run)
    reactor.run()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="rounds per size and algorithm (default 5)")
    parser.add_argument("--stall", action="store_true", help="measure the reactor's pauses (thread or process)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as dataDir:
        store = KeyStore(dataDir)
        store.generate("example.org", "r", "rsa")
        store.generate("example.org", "e", "ed25519")
        keyring = Keyring(dataDir)
        keyring.refresh()
        rsaKey, edKey = keyring.keysFor("example.org")
        if args.stall:
            stall([rsaKey, edKey], args.repeat)
            return
        print(f"{'size':>10} {'body':>6} {'algorithm':>9} {'median ms':>10} {'min ms':>8} {'max ms':>8}")
        for size, text in [(size, text) for size in SIZES for text in (True, False)]:
            data = message(size, text)
            for name, key in (("rsa", rsaKey), ("ed25519", edKey)):
                count = max(1, min(50, 2_000_000 // size))
                rounds = []
                for _ in range(args.repeat):
                    start = time.perf_counter()
                    for _ in range(count):
                        signatures(data, [key])
                    rounds.append((time.perf_counter() - start) * 1000 / count)
                body = "text" if text else "base64"
                print(
                    f"{len(data):>10} {body:>6} {name:>9} {statistics.median(rounds):>10.2f}"
                    f" {min(rounds):>8.2f} {max(rounds):>8.2f}"
                )


if __name__ == "__main__":
    main()
