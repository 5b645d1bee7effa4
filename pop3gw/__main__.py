"""
C{python -m pop3gw}: the C{pop3gw} command.
"""

from pop3gw.cli import run

run()
