"""
End-to-end: C{twistd -n pop3gw --workers 2}, the supervisor and its two
worker processes on loopback.  Which worker served a connection shows in
its log lines (C{(worker N)}); the kernel hands each connection to either
worker, so a test opens connections until each worker has had one.
"""

from __future__ import annotations

import contextlib
import os
import poplib
import re
import shutil
import signal
import smtplib
import socket
import stat
import tempfile
import time
import urllib.request
from typing import Callable, Iterator, Optional

from twisted.trial.unittest import SynchronousTestCase

from tests.e2e import Pop3gwProcess
from tests.test_e2e_submission import Sink, message

ALICE, ALICE_PW = "alice@example.org", "alice secret"
BOB, BOB_PW = "bob@example.org", "bob secret"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][:1] != "Z"
    except OSError:
        return False


def _quietClose(client) -> None:
    try:
        client.close()
    except OSError:
        pass


class WorkersEndToEndTests(SynchronousTestCase):
    def startServer(self, *args: str) -> Pop3gwProcess:
        server = Pop3gwProcess(self, args=["--workers", "2", "--domain", "example.org", *args]).start()
        self.waitReady(server)
        return server

    def waitReady(self, server: Pop3gwProcess, after: int = 0, numbers=(1, 2)) -> dict:
        """
        Wait until workers C{numbers} logged that they serve, after log
        line C{after}; return number -> pid.
        """
        pids: dict = {}
        deadline = time.monotonic() + 60
        while sorted(pids) != sorted(numbers) and time.monotonic() < deadline:
            for line in server.output[after:]:
                m = re.search(r"ready: serving \d+ listeners \(pid (\d+)\) \(worker (\d)\)", line)
                if m:
                    pids[int(m.group(2))] = int(m.group(1))
            time.sleep(0.05)
        self.assertEqual(sorted(pids), sorted(numbers), server.log())
        return pids

    def workerOf(self, server: Pop3gwProcess, pattern: str, after: int) -> list:
        """
        The worker numbers of the log lines after line C{after} matching
        C{pattern}.
        """
        rx = re.compile(pattern + r".*\(worker (\d)\)$")
        return [int(m.group(1)) for m in (rx.search(line.rstrip("\n")) for line in server.output[after:]) if m]

    @contextlib.contextmanager
    def onlyWorker(self, pids: dict, number: int) -> Iterator[None]:
        """
        Let only worker C{number} take connections while the block runs:
        every other worker is stopped (SIGSTOP) and continued after.  The
        workers share the listening sockets, and the kernel hands a new
        connection to whichever waiting process accepts first: on an idle
        server that may be the same one for many connections in a row.
        """
        others = [pid for n, pid in pids.items() if n != number]
        for pid in others:
            os.kill(pid, signal.SIGSTOP)
        try:
            yield
        finally:
            for pid in others:
                os.kill(pid, signal.SIGCONT)

    def assertInUseThrough(self, server: Pop3gwProcess, pids: dict, number: int, user: str, password: str) -> None:
        """
        A login of C{user} through worker C{number} gets C{-ERR [IN-USE]}.
        """
        with self.onlyWorker(pids, number):
            client = poplib.POP3("127.0.0.1", server.ports["pop3"], timeout=30)
            try:
                client.user(user)
                with self.assertRaises(poplib.error_proto) as caught:
                    client.pass_(password)
                self.assertEqual(caught.exception.args[0], b"-ERR [IN-USE] Mailbox is locked by another session.")
            finally:
                _quietClose(client)

    def loginThroughEach(
        self, server: Pop3gwProcess, pids: dict, user: str, password: str, check: Optional[Callable[[poplib.POP3], object]] = None
    ) -> list:
        """
        Log C{user} in through each worker in turn (C{check} looks at each
        session before its QUIT), and check from the log that both served.

        @return: the workers' numbers, as their login lines reached the log.
        """
        mark = len(server.output)
        for number in sorted(pids):
            with self.onlyWorker(pids, number):
                client = self.login(server, user, password)
                if check is not None:
                    check(client)
                client.quit()
        workers = self.waitForLines(server, len(pids), rf'login: service=pop3 .*user="{re.escape(user)}"', mark)
        # The workers' lines reach the log in either order.
        self.assertEqual(sorted(workers), sorted(pids), server.log())
        return workers

    def login(self, server: Pop3gwProcess, user: str, password: str) -> poplib.POP3:
        client = poplib.POP3("127.0.0.1", server.ports["pop3"], timeout=30)
        self.addCleanup(_quietClose, client)
        client.user(user)
        client.pass_(password)
        return client

    def waitForLines(self, server: Pop3gwProcess, count: int, pattern: str, after: int) -> list:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            found = self.workerOf(server, pattern, after)
            if len(found) >= count:
                return found
            time.sleep(0.02)
        raise AssertionError(f"no {count} lines {pattern!r}:\n{server.log()}")

    def test_inUseFromAnotherWorker(self) -> None:
        """
        While one worker holds a POP3 session on a maildrop, a login to the
        same maildrop through the other worker gets C{-ERR [IN-USE]} (the
        maildrop lock is a C{flock}, held across processes).
        """
        server = self.startServer()
        pids = self.waitReady(server)
        server.addUser(ALICE, ALICE_PW)
        mark = len(server.output)
        holder = self.login(server, ALICE, ALICE_PW)
        [holding] = self.waitForLines(server, 1, r'login: service=pop3 .*user="alice@example.org"', mark)
        self.assertInUseThrough(server, pids, 3 - holding, ALICE, ALICE_PW)
        others = self.waitForLines(server, 1, r'maildrop in use: service=pop3 .*user="alice@example.org"', mark)
        self.assertEqual(others, [3 - holding], server.log())
        self.assertEqual(holder.stat()[0], 0)
        holder.quit()

    def test_cliUserOnEveryWorker(self) -> None:
        """
        A user added with C{pop3gw user add} while the server runs logs in
        through every worker.
        """
        server = self.startServer()
        pids = self.waitReady(server)
        server.addUser(BOB, BOB_PW)
        self.loginThroughEach(server, pids, BOB, BOB_PW)

    def test_crashedWorkerReplacedNothingLost(self) -> None:
        """
        A worker killed with SIGKILL is replaced by a new process under the
        same number; every message acknowledged with C{250} before and after
        is fetched, and the new worker serves logins.
        """
        server = self.startServer()
        server.addUser(ALICE, ALICE_PW)
        pids = self.waitReady(server)
        sent = []

        def submit(count: int) -> None:
            for _ in range(count):
                client = smtplib.SMTP("127.0.0.1", server.ports["submission"], timeout=30)
                self.addCleanup(_quietClose, client)
                client.login(ALICE, ALICE_PW)
                msg = message(to=ALICE, subject=f"note {len(sent)}")
                self.assertEqual(client.sendmail(ALICE, [ALICE], msg), {})
                sent.append(msg)
                client.quit()

        submit(4)
        mark = len(server.output)
        os.kill(pids[1], signal.SIGKILL)
        server.waitForLog(rf"worker 1 \(pid {pids[1]}\) ended \(signal 9\); restarting it in 0 s")
        replaced = self.waitReady(server, mark, (1,))[1]
        self.assertNotEqual(replaced, pids[1])
        self.assertFalse(_alive(pids[1]))
        self.assertTrue(_alive(replaced))
        submit(4)
        self.loginThroughEach(server, {**pids, 1: replaced}, ALICE, ALICE_PW)
        client = self.login(server, ALICE, ALICE_PW)
        count = client.stat()[0]
        subjects = sorted(
            re.search(rb"^Subject: (.*)$", b"\n".join(client.retr(i)[1]), re.M).group(1) for i in range(1, count + 1)
        )
        client.quit()
        self.assertEqual(subjects, sorted(b"note %d" % i for i in range(8)))

    def test_killedWorkersBacklogServed(self) -> None:
        """
        Connections waiting for a worker that is killed (here stopped with
        SIGSTOP while they come, then killed with SIGKILL) are all served,
        and so is every later one.
        """
        server = self.startServer()
        server.addUser(ALICE, ALICE_PW)
        pids = self.waitReady(server)
        os.kill(pids[1], signal.SIGSTOP)
        waiting = []
        for _ in range(20):
            client = socket.create_connection(("127.0.0.1", server.ports["pop3"]), timeout=30)
            self.addCleanup(_quietClose, client)
            waiting.append(client)
        os.kill(pids[1], signal.SIGKILL)
        for client in waiting:
            self.assertTrue(client.makefile("rb").readline().startswith(b"+OK "))
            client.sendall(b"QUIT\r\n")
        mark = len(server.output)
        for _ in range(20):
            self.login(server, ALICE, ALICE_PW).quit()
        served = self.waitForLines(server, 20, r'login: service=pop3 .*user="alice@example.org"', mark)
        self.assertEqual(len(served), 20)

    def test_stopLosesNoAcknowledgedMessage(self) -> None:
        """
        SIGTERM to the supervisor while eight submissions' ends of data are
        in flight: each client gets C{250}, C{451} (its end of data came
        after the stop had begun) or loses its connection (it then sends
        again), never another reply; once the server has
        stopped, the maildrop holds every message acknowledged with C{250}
        (a commit finished while stopping has its reply sent before the
        connection closes) and nothing else: a client that got no C{250}
        sends its message again, so a message stored without its C{250}
        would be a duplicate.
        """
        server = self.startServer()
        server.addUser(ALICE, ALICE_PW)
        clients = []
        for i in range(8):
            client = smtplib.SMTP("127.0.0.1", server.ports["submission"], timeout=30)
            self.addCleanup(_quietClose, client)
            client.login(ALICE, ALICE_PW)
            self.assertEqual(client.docmd("MAIL", f"FROM:<{ALICE}>")[0], 250)
            self.assertEqual(client.docmd("RCPT", f"TO:<{ALICE}>")[0], 250)
            self.assertEqual(client.docmd("DATA")[0], 354)
            client.send(message(to=ALICE, subject=f"stop {i}", body=b"hello\r\n"))
            clients.append(client)
        for client in clients:
            client.send(b".\r\n")
        server.signal(signal.SIGTERM)
        acknowledged = []
        for i, client in enumerate(clients):
            try:
                code = client.getreply()[0]
            except smtplib.SMTPServerDisconnected:
                continue
            self.assertIn(code, (250, 451))
            if code == 250:
                acknowledged.append(b"stop %d" % i)
        assert server.proc is not None
        server.proc.wait(timeout=60)
        stored = []
        for sub in ("new", "cur"):
            folder = os.path.join(server.maildir(ALICE), sub)
            if not os.path.isdir(folder):
                # Nothing was stored: a maildrop is made by its first
                # delivery.
                continue
            for name in os.listdir(folder):
                with open(os.path.join(folder, name), "rb") as f:
                    stored.append(re.search(rb"^Subject: (.*?)\r?$", f.read(), re.M).group(1))
        self.assertEqual(sorted(stored), sorted(acknowledged))

    def test_queuedMailRelayedByTheSupervisor(self) -> None:
        """
        Mail for another domain, queued by a worker, is relayed once by the
        supervisor (which runs the outbound queue).
        """
        sink = Sink(self)
        server = self.startServer("--relay-host", f"127.0.0.1:{sink.port}")
        server.addUser(ALICE, ALICE_PW)
        for i in range(3):
            client = smtplib.SMTP("127.0.0.1", server.ports["submission"], timeout=30)
            self.addCleanup(_quietClose, client)
            client.login(ALICE, ALICE_PW)
            client.sendmail(ALICE, ["carol@remote.example"], message(to="carol@remote.example", subject=f"out {i}"))
            client.quit()
        sink.waitFor(lambda: len(sink.received) == 3)
        for _ in range(20):
            if server.log().count("relay: ") >= 6:
                break
            time.sleep(0.1)
        queued = [line for line in server.output if "queue: queued " in line]
        self.assertEqual(len(queued), 3, server.log())
        self.assertFalse([line for line in queued if "(worker" in line], queued)
        time.sleep(0.5)
        self.assertEqual(sink.attempts, 3)

    def test_workersIgnoreTheWorkingDirectory(self) -> None:
        """
        Workers run the same C{pop3gw} as the supervisor even when the
        working directory holds another C{pop3gw} package (a source tree
        of another version).
        """
        cwd = tempfile.mkdtemp(prefix="pop3gw-e2e-cwd-")
        self.addCleanup(shutil.rmtree, cwd, True)
        os.mkdir(os.path.join(cwd, "pop3gw"))
        with open(os.path.join(cwd, "pop3gw", "__init__.py"), "w") as f:
            f.write("raise ImportError('not this one')\n")
        server = Pop3gwProcess(self, args=["--workers", "2"], cwd=cwd).start()
        self.waitReady(server)
        self.assertNotIn("not this one", server.log())

    def test_unixListenerKept(self) -> None:
        """
        A Unix socket listener keeps the mode the supervisor gave it (0660)
        once the workers adopt it, and its file when one worker stops and
        is replaced; it serves through every worker until the supervisor
        stops, which removes it.
        """
        where = tempfile.mkdtemp(prefix="pop3gw-e2e-sock-")
        self.addCleanup(shutil.rmtree, where, True)
        path = os.path.join(where, "lmtp")
        server = Pop3gwProcess(self, args=["--workers", "2", "--lmtp", f"unix:{path}"], listeners=("pop3", "submission", "lmtp")).start()
        pids = self.waitReady(server)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o660)
        mark = len(server.output)
        os.kill(pids[1], signal.SIGTERM)
        server.waitForLog(rf"worker 1 \(pid {pids[1]}\) ended \(exit status 0\); restarting it in 1 s")
        self.waitReady(server, mark, (1,))
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o660)
        for _ in range(10):
            with socket.socket(socket.AF_UNIX) as client:
                client.settimeout(30)
                client.connect(path)
                self.assertTrue(client.recv(1024).startswith(b"220 "))
        server.signal(signal.SIGTERM)
        assert server.proc is not None
        server.proc.wait(timeout=60)
        self.assertFalse(os.path.exists(path))
        self.assertNotIn("Traceback", server.log())

    def test_everyProcessSignalled(self) -> None:
        """
        SIGTERM to the supervisor and to every worker at once (as systemd's
        default KillMode sends it) stops them all, no worker is started
        again, and none is left behind; a worker stopped alone by an
        operator's SIGTERM is replaced.
        """
        server = self.startServer()
        pids = self.waitReady(server)
        mark = len(server.output)
        os.kill(pids[2], signal.SIGTERM)
        server.waitForLog(rf"worker 2 \(pid {pids[2]}\) ended \(exit status 0\); restarting it in 1 s")
        pids.update(self.waitReady(server, mark, (2,)))
        mark = len(server.output)
        for pid in (server.proc.pid, *pids.values()):  # type: ignore[union-attr]
            os.kill(pid, signal.SIGTERM)
        assert server.proc is not None
        self.assertEqual(server.proc.wait(timeout=60), -signal.SIGTERM)
        self.assertEqual([line for line in server.output[mark:] if " started (pid " in line], [])
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in pids.values()) and time.monotonic() < deadline:
            time.sleep(0.05)
        self.assertEqual([p for p in pids.values() if _alive(p)], [])

    def test_metricsSummed(self) -> None:
        """
        With C{--metrics}, the supervisor's C{/metrics} shows the logins
        and open sessions of every worker, summed.
        """
        server = Pop3gwProcess(
            self,
            args=["--workers", "2", "--domain", "example.org", "--metrics", "tcp:0:interface=127.0.0.1"],
            listeners=("pop3", "submission", "metrics"),
        ).start()
        pids = self.waitReady(server)
        server.addUser(BOB, BOB_PW)
        workers = self.loginThroughEach(server, pids, BOB, BOB_PW)
        holder = self.login(server, BOB, BOB_PW)
        expected = [f'pop3gw_logins_total{{service="pop3"}} {len(workers) + 1}.0', 'pop3gw_sessions_open{listener="pop3"} 1.0']
        body = ""
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            with urllib.request.urlopen(f"http://127.0.0.1:{server.ports['metrics']}/metrics", timeout=30) as response:
                body = response.read().decode()
            if all(line in body.splitlines() for line in expected):
                break
            time.sleep(0.2)
        self.assertEqual([line for line in expected if line not in body.splitlines()], [], body)
        holder.quit()

    def test_signalsReachEveryWorker(self) -> None:
        """
        SIGHUP to the supervisor reloads in every worker; SIGTERM stops the
        supervisor and every worker, leaving no process behind.
        """
        server = self.startServer()
        pids = self.waitReady(server)
        mark = len(server.output)
        server.signal(signal.SIGHUP)
        self.assertEqual(sorted(self.waitForLines(server, 2, r"SIGHUP: reloading users and TLS certificate", mark)), [1, 2])
        server.signal(signal.SIGTERM)
        assert server.proc is not None
        # twistd ends with the signal that stopped it, after a clean shutdown.
        self.assertEqual(server.proc.wait(timeout=60), -signal.SIGTERM)
        self.assertIn("Server Shut Down.", server.log())
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in pids.values()) and time.monotonic() < deadline:
            time.sleep(0.05)
        self.assertEqual([p for p in pids.values() if _alive(p)], [])
