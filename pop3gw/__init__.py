# -*- test-case-name: tests -*-
"""
pop3gw: a POP3 maildrop server and SMTP submission gateway for small sites.
"""

__version__ = "0.2.0.dev0"
