"""
End-to-end: what an installation shows an operator: C{twistd pop3gw
--version}, and a service start that logs no plugin-cache warning once
C{twistd --help} has run after installing (as the README says).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

from twisted.trial.unittest import SynchronousTestCase

import twisted.plugins
from pop3gw import __version__
from tests.e2e import Pop3gwProcess, twistdCommand
from twisted import copyright

CACHE_WARNING = "Unable to write to plugin cache"

#: Runs twistd (arguments as for twistd) where the plugin caches cannot be
#: written, as for the service's user under ProtectSystem=strict: every
#: write of a dropin.cache fails with EACCES.
READ_ONLY_PLUGINS = """
import errno, sys
from twisted.python.filepath import FilePath
_setContent = FilePath.setContent
def setContent(self, content, ext=b".new"):
    if self.basename() == "dropin.cache":
        raise PermissionError(errno.EACCES, "Permission denied", self.path)
    return _setContent(self, content, ext)
FilePath.setContent = setContent
from twisted.scripts.twistd import run
sys.argv[0] = "twistd"
run()
"""


class ReadOnlyPluginsProcess(Pop3gwProcess):
    """
    C{twistd -n pop3gw} unable to write Twisted's plugin caches.
    """

    def command(self) -> list:
        return [sys.executable, "-c", READ_ONLY_PLUGINS] + super().command()[len(twistdCommand()):]


class VersionTests(SynchronousTestCase):
    def test_twistdPluginVersion(self) -> None:
        """
        The installed C{twistd pop3gw --version} prints pop3gw's version
        (and Twisted's) and exits 0.
        """
        cwd = tempfile.mkdtemp(prefix="pop3gw-version-")
        self.addCleanup(__import__("shutil").rmtree, cwd, True)
        result = subprocess.run(twistdCommand() + ["pop3gw", "--version"], capture_output=True, timeout=60, cwd=cwd,
                                stdin=subprocess.DEVNULL)
        self.assertEqual((result.returncode, result.stdout.decode()),
                         (0, f"pop3gw {__version__} (Twisted {copyright.version})\n"), result.stderr)


class PluginCacheTests(SynchronousTestCase):
    def test_noWarningAfterHelp(self) -> None:
        """
        With the plugin file newer than Twisted's plugin cache (as after an
        install or upgrade), a server that cannot write the cache logs
        "Unable to write to plugin cache" at start; once C{twistd --help}
        has run (by a user who can write it), it logs nothing of the sort.
        """
        plugin = next((os.path.join(d, "pop3gw_plugin.py") for d in twisted.plugins.__path__
                       if os.path.exists(os.path.join(d, "pop3gw_plugin.py"))), None)
        self.assertIsNotNone(plugin)
        cache = os.path.join(os.path.dirname(plugin), "dropin.cache")
        if not os.access(os.path.dirname(plugin), os.W_OK):
            self.skipTest(f"{os.path.dirname(plugin)} is not writable here")
        # An install leaves the plugin newer than the cache.
        if os.path.exists(cache):
            stamp = os.stat(plugin).st_mtime - 1
            os.utime(cache, (stamp, stamp))

        before = ReadOnlyPluginsProcess(self).start()
        self.assertIn(CACHE_WARNING, before.log())
        before.stop()

        cwd = tempfile.mkdtemp(prefix="pop3gw-help-")
        self.addCleanup(__import__("shutil").rmtree, cwd, True)
        helped = subprocess.run(twistdCommand() + ["--help"], capture_output=True, timeout=60, cwd=cwd,
                                stdin=subprocess.DEVNULL)
        self.assertEqual(helped.returncode, 0, helped.stderr)

        after = ReadOnlyPluginsProcess(self).start()
        self.assertNotIn(CACHE_WARNING, after.log())
