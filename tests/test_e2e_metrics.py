"""
End-to-end: C{--metrics} on the real C{twistd pop3gw}.
"""

from __future__ import annotations

import poplib
import urllib.error
import urllib.request

from twisted.trial.unittest import SynchronousTestCase

from tests.e2e import Pop3gwProcess

ALICE, ALICE_PW = "alice@example.org", "alice secret"


class MetricsEndToEndTests(SynchronousTestCase):
    def get(self, server, path: str) -> tuple:
        url = f"http://127.0.0.1:{server.ports['metrics']}{path}"
        try:
            with urllib.request.urlopen(url, timeout=30) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def test_scrape(self) -> None:
        """
        After one good and one bad POP3 login, /metrics counts them (and
        one session open while a client is connected); /healthz says ok;
        the certificate's expiry is exported.
        """
        server = Pop3gwProcess(self, args=["--domain", "example.org", "--metrics", "tcp:0:interface=127.0.0.1"],
                               listeners=("pop3", "submission", "metrics")).start()
        server.addUser(ALICE, ALICE_PW)
        pop = poplib.POP3("127.0.0.1", server.ports["pop3"], timeout=30)
        pop.user(ALICE)
        pop.pass_(ALICE_PW)
        pop.quit()
        bad = poplib.POP3("127.0.0.1", server.ports["pop3"], timeout=30)
        bad.user(ALICE)
        self.assertRaises(poplib.error_proto, bad.pass_, "wrong")
        status, body = self.get(server, "/metrics")
        self.assertEqual(status, 200)
        self.assertIn('pop3gw_logins_total{service="pop3"} 1.0\n', body)
        self.assertIn('pop3gw_login_failures_total{service="pop3"} 1.0\n', body)
        self.assertIn('pop3gw_sessions_open{listener="pop3"} 1.0\n', body)
        self.assertRegex(body, r"pop3gw_tls_certificate_expiry_timestamp_seconds \d\.\d+e\+09\n")
        self.assertRegex(body, r"pop3gw_fsync_seconds_count [1-9]")
        bad.quit()
        self.assertEqual(self.get(server, "/healthz"), (200, "ok\n"))
        self.assertEqual(self.get(server, "/nothing")[0], 404)
