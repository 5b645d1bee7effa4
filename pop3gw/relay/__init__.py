# -*- test-case-name: tests.test_relay_service -*-
"""
Relaying the outbound queue (L{pop3gw.queue}) to smarthosts and MX hosts.
"""

from pop3gw.relay.service import RelayService

__all__ = ["RelayService"]
