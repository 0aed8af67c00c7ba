"""App integration: an environment variable that points the app at our database.

Apps often build their engine at import time from ``DATABASE_URL``; the plugin sets
that variable (``pgtemplate_env``) to the worker database's URL before test modules are
imported, and to the template's URL while migrating (for env.py files that read it).
The URL takes the scheme the setting names (``DATABASE_URL=postgresql+psycopg2``), else
the one the variable already had (``postgresql://``, ``postgres://``...), else
``postgresql+asyncpg``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from sqlalchemy.engine import URL

DEFAULT_SCHEME = "postgresql+asyncpg"


def split_env(spec: str) -> tuple[str, str | None]:
    """``pgtemplate_env``'s value: ``NAME`` or ``NAME=SCHEME`` (the URL scheme to use,
    e.g. ``DATABASE_URL=postgresql+psycopg2``)."""
    name, _, scheme = spec.partition("=")
    return name.strip(), scheme.strip() or None


def app_url(url: URL, existing: str | None, scheme: str | None = None) -> str:
    """``url`` as a string in ``scheme``, else the scheme of ``existing`` (the variable's
    current value), else ``postgresql+asyncpg``."""
    if scheme is None:
        scheme = existing.split("://", 1)[0] if existing and "://" in existing else DEFAULT_SCHEME
    return url.set(drivername=scheme).render_as_string(hide_password=False)


def point_env(spec: str, url: URL) -> str:
    """Set the variable ``spec`` names to ``url``; returns the value."""
    name, scheme = split_env(spec)
    value = app_url(url, os.environ.get(name), scheme)
    os.environ[name] = value
    return value


@contextmanager
def temporary_env(specs: Iterable[str | None], url: URL) -> Iterator[None]:
    """While migrating: each variable points at the database being built; restored after."""
    names = [split_env(spec)[0] for spec in specs if spec is not None]
    before = {name: os.environ.get(name) for name in names}
    for spec in specs:
        if spec is not None:
            point_env(spec, url)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
