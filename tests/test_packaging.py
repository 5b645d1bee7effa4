"""
Packaging: a plain (non-editable) C{pip install .} ships every module.
"""

from __future__ import annotations

import configparser
import os

from twisted.trial.unittest import SynchronousTestCase

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class PackagesTests(SynchronousTestCase):
    def test_everyPackageListed(self) -> None:
        """
        Every package under C{pop3gw/} (a directory with C{__init__.py})
        is named in setup.cfg's C{packages}, so an installed server does
        not fail to import a subpackage that a source checkout has.
        """
        parser = configparser.ConfigParser()
        parser.read(os.path.join(ROOT, "setup.cfg"))
        listed = {p.strip() for p in parser["options"]["packages"].replace("\n", ",").split(",") if p.strip()}
        found = set()
        for directory, dirs, files in os.walk(os.path.join(ROOT, "pop3gw")):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            if "__init__.py" in files:
                found.add(os.path.relpath(directory, ROOT).replace(os.sep, "."))
        self.assertIn("pop3gw.relay", found)
        self.assertEqual(found - listed, set())
