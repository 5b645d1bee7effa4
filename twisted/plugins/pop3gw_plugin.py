"""
The C{twistd pop3gw} plugin: a thin L{IServiceMaker} that names
L{pop3gw.service}.
"""

from twisted.application.service import ServiceMaker

pop3gw = ServiceMaker(
    "pop3gw",
    "pop3gw.service",
    "POP3 maildrop server and SMTP submission gateway",
    "pop3gw",
)
