"""
pytest glue: each test runs in its own temporary working directory, so the
directories trial's C{mktemp()} makes (relative to the working directory)
are removed with it.
"""

import pytest


@pytest.fixture(autouse=True)
def _isolatedWorkingDirectory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="session", autouse=True)
def _postgresqlCluster():
    """
    Stop the private PostgreSQL cluster (L{tests.pgcluster.shared}) that
    tests may have started, by its PID, at the end of the session.
    """
    from tests import pgcluster

    yield
    pgcluster.stopShared()
