#!/usr/bin/env python3
"""
Micro benchmark of the server's text log: the CPU time of one
C{login:} line (as a submission logs it, through C{Logger.info} and the
global publisher's machinery) written to a C{twistd} C{LogFile}, by
Twisted's C{textFileLogObserver} (a C{write} and a C{flush} per line)
and by L{pop3gw.textlog.TurnLogObserver} with the lines of each turn
written together (C{--per-turn} lines per turn: a busy server logs
several lines per turn of its event loop, an idle one one).

Run with the project's venv (it imports pop3gw)::

    .venv/bin/python bench/log_lines.py --lines 20000 --repeats 5

The two observers take turns in each repeat, on files in a temporary
directory (removed at the end).  Prints, per observer, the median,
minimum and maximum microseconds of CPU (user + system) per line.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import tempfile

from twisted.logger import Logger, LogPublisher, textFileLogObserver
from twisted.python.logfile import LogFile

from pop3gw.events import literal
from pop3gw.textlog import TurnLogObserver


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run(kind: str, directory: str, lines: int, perTurn: int) -> float:
    """
    Log C{lines} lines through C{kind}'s observer.

    @return: microseconds of CPU per line.
    """
    logFile = LogFile("bench.log", directory, rotateLength=10**9)
    scheduled: list = []
    if kind == "twisted":
        observer = textFileLogObserver(logFile)
    else:
        observer = TurnLogObserver(logFile, scheduled.append)
    log = Logger(namespace="pop3gw.smtp.SubmissionServer", observer=LogPublisher(observer))
    start = cpu()
    for i in range(lines):
        user = f'"u{i % 8}@example.org"'
        log.info(
            literal(f"login: service=submission rhost=127.0.0.1 user={user} tls=no"),
            service="submission", rhost="127.0.0.1", user=user,
        )
        if (i + 1) % perTurn == 0:
            while scheduled:
                scheduled.pop()()
    while scheduled:
        scheduled.pop()()
    spent = cpu() - start
    logFile.close()
    os.unlink(os.path.join(directory, "bench.log"))
    return spent / lines * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--per-turn", type=int, default=1, help="lines logged per turn of the event loop")
    options = parser.parse_args()
    directory = tempfile.mkdtemp(prefix="pop3gw-loglines-")
    try:
        figures: dict = {"twisted": [], "per-turn": []}
        for _ in range(options.repeats):
            for kind in figures:
                figures[kind].append(run(kind, directory, options.lines, options.per_turn))
    finally:
        shutil.rmtree(directory)
    for kind, values in figures.items():
        print(
            f"{kind:10s} {statistics.median(values):6.2f} us CPU/line "
            f"[{min(values):.2f}..{max(values):.2f}] ({options.lines} lines x {options.repeats}, "
            f"{options.per_turn} per turn)"
        )


if __name__ == "__main__":
    main()
