"""Hooks the plugin calls; implement them in a conftest.py."""

from __future__ import annotations

import pytest
from sqlalchemy.engine import URL


@pytest.hookspec(historic=False)
def pytest_pgtemplate_worker_url(url: URL, config: pytest.Config) -> None:
    """Called once per test process, before test modules are imported, with the URL
    (``postgresql+asyncpg``) of the database this process's tests will use.

    For apps that read host, port, user and database name from separate variables or a
    settings object: point them at ``url`` here.  The database itself is created when the
    first test runs; from then on every test gets it back in the template's state.
    """
