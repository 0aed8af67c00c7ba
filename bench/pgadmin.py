"""The bench's own server work: create and drop its databases, describe the server.

Every database the bench creates (itself or through a contender) starts with the run's
prefix (``scratch_<hex>``); ``drop_prefixed`` removes exactly those, templates included.
"""

from __future__ import annotations

import psycopg
from psycopg import sql
from sqlalchemy.engine import URL


def conninfo(url: URL, database: str | None = None) -> str:
    """A libpq URL for ``database`` (default: the URL's) on the server of ``url``."""
    target = url.set(drivername="postgresql", database=database or url.database)
    return target.render_as_string(hide_password=False)


def _execute(url: URL, statement: sql.Composed) -> None:
    with psycopg.connect(conninfo(url), autocommit=True) as conn:
        conn.execute(statement)


def create_database(url: URL, name: str, template: str | None = None) -> None:
    statement = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
    if template is not None:
        statement = statement + sql.SQL(" TEMPLATE {}").format(sql.Identifier(template))
    _execute(url, statement)


def drop_database(url: URL, name: str) -> None:
    _execute(url, sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def drop_prefixed(url: URL, prefix: str) -> list[str]:
    """Drop every database whose name starts with ``prefix`` (templates are unmarked first)."""
    with psycopg.connect(conninfo(url), autocommit=True) as conn:
        rows = conn.execute(
            "SELECT datname, datistemplate FROM pg_database WHERE left(datname, %s) = %s ORDER BY 1",
            (len(prefix), prefix),
        ).fetchall()
        for name, is_template in rows:
            if is_template:
                conn.execute(sql.SQL("ALTER DATABASE {} IS_TEMPLATE false").format(sql.Identifier(name)))
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
    return [name for name, _ in rows]


def describe_server(url: URL) -> str:
    """``PostgreSQL 15.20 at user@host:port, fsync on`` for the report."""
    with psycopg.connect(conninfo(url), autocommit=True) as conn:
        version = conn.execute("SHOW server_version").fetchone()
        fsync = conn.execute("SHOW fsync").fetchone()
    assert version is not None
    assert fsync is not None
    where = f"{url.username or ''}@{url.host or 'localhost'}:{url.port or 5432}"
    return f"PostgreSQL {version[0]} at {where}, fsync {fsync[0]}"
