"""Hooks the plugin calls; implement them in a conftest.py."""

from __future__ import annotations

import pytest
from sqlalchemy.engine import URL


@pytest.hookspec(historic=False)
def pytest_pgtemplate_worker_url(url: URL, config: pytest.Config, database: str) -> bool | None:
    """Called once per test process and database, once conftest.py files are loaded and
    before test modules are imported, with the URL (``postgresql+asyncpg``) of the database
    this process's tests will use.

    For apps that read host, port, user and database name from separate variables or a
    settings object: point them at ``url`` here.  ``database`` is ``"default"``, or the
    name of an extra database (``pgtemplate_databases``).  Return True for a database you
    pointed the app at (for the default database, returning nothing counts too; return
    False to say you did not): every test then gets that database set up and reset, whether
    it asks for a fixture or not.  The database itself is created when the first test runs.
    """


@pytest.hookspec(historic=False)
def pytest_pgtemplate_seed(url: URL, sync_url: URL, config: pytest.Config, database: str) -> object:
    """Load reference data into a template after its migrations ran (``def`` or
    ``async def``): ``url`` is the template's ``postgresql+asyncpg`` URL, ``sync_url`` its
    ``postgresql+psycopg`` one, ``database`` says which database (``"default"`` or an extra
    one's name).  The rows survive every reset.  Each implementation's source text is part
    of the template's fingerprint: editing it rebuilds the template (data it reads from
    other files does not: use ``--pgt-rebuild`` after changing those).

    Runs once per template build, in a thread of its own without an event loop.
    """
