"""App integration: an environment variable that points the app at our database.

Apps often build their engine at import time from ``DATABASE_URL``; the plugin sets
that variable (``pgtemplate_env``) to the worker database's URL before test modules are
imported, and to the template's URL while migrating (for env.py files that read it).
The URL keeps the scheme the variable already had (``postgresql+asyncpg://``,
``postgresql://``, ``postgres://``...), else ``postgresql+asyncpg``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy.engine import URL

DEFAULT_SCHEME = "postgresql+asyncpg"


def app_url(url: URL, existing: str | None) -> str:
    """``url`` as a string in the scheme of ``existing`` (the variable's current value)."""
    scheme = DEFAULT_SCHEME
    if existing and "://" in existing:
        scheme = existing.split("://", 1)[0]
    return url.set(drivername=scheme).render_as_string(hide_password=False)


def point_env(name: str, url: URL) -> str:
    """Set ``name`` to ``url`` (scheme kept); returns the value."""
    value = app_url(url, os.environ.get(name))
    os.environ[name] = value
    return value


@contextmanager
def temporary_env(name: str | None, url: URL) -> Iterator[None]:
    """While migrating: ``name`` points at the database being built; restored after."""
    if name is None:
        yield
        return
    before = os.environ.get(name)
    point_env(name, url)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before
