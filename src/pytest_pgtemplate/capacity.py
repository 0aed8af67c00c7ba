"""Out of connections (SQLSTATE 53300): one error that names the limit, the count and the fix.

PostgreSQL refuses a connection with 53300 for three limits: the server's
``max_connections`` (less the slots reserved for superusers), a role's ``CONNECTION
LIMIT`` and a database's.  The refusal reaches us from many places (the admin
connection, the migration's engine, the reset connection, a test's engine); wherever
it comes from, ``explain()`` turns it into one ``PgTemplateError`` built from what the
admin connection, which is already open, reads in ``pg_stat_activity``, ``pg_roles``
and ``pg_database``.  Which limit was hit is decided from those counts, not from the
server's wording.

Why an error and not a wait: a run's processes hold their connections for the whole
run (admin, reset, warm engines), and so do the other runs on the server, so a slot
rarely frees up within any wait worth having; and when the limit is smaller than what
one run needs, its own workers would wait for each other until the timeout.  Failing at
once, with the numbers, says which budget to raise.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import asyncpg

from . import errors
from .errors import PgTemplateError
from .naming import ident

# What one pytest process (one xdist worker, or the only process) keeps open per database
# while its tests run: the admin connection (maintenance database: DDL, advisory locks),
# the reset connection (worker database) and the test's engine connection (one pooled
# connection per test, shared by its sessions).  More: +1 for a test using both the async
# and the sync fixtures, +1 for the clone pool's admin connection under reset=clone.  A build
# needs 2 (admin, the migrator's engine: no reset connection yet); the xdist controller
# opens 1 briefly, for the report header, before its workers start.
PER_PROCESS = 3


@dataclass(frozen=True, slots=True)
class Usage:
    """Connection counts and limits, as seen from one open connection."""

    max_connections: int
    reserved: int  # slots only superusers (or pg_use_reserved_connections) may take
    in_use: int  # client connections on the whole server
    role: str
    superuser: bool  # exempt from role and database CONNECTION LIMITs, may use reserved slots
    role_limit: int  # -1: none
    role_in_use: int
    full: tuple[tuple[str, int, int], ...]  # databases at their CONNECTION LIMIT: name, limit, in use


async def usage(conn: asyncpg.Connection) -> Usage:
    row = await conn.fetchrow(
        "SELECT current_setting('max_connections')::int AS max_connections, "
        "current_setting('superuser_reserved_connections')::int "
        "+ coalesce(current_setting('reserved_connections', true)::int, 0) AS reserved, "
        # Other roles' sessions show no backend_type to an unprivileged reader: a hidden row
        # with a user and a database is such a session (server processes lack one or both;
        # another role's parallel workers would be miscounted, an approximation we accept).
        "(SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' OR "
        "(backend_type IS NULL AND usesysid IS NOT NULL AND datid IS NOT NULL)) AS in_use, "
        "r.rolname, r.rolsuper, r.rolconnlimit, "
        "(SELECT count(*) FROM pg_stat_activity a WHERE a.usesysid = r.oid "
        "AND a.backend_type = 'client backend') AS role_in_use "
        "FROM pg_roles r WHERE r.rolname = current_user"
    )
    full = await conn.fetch(
        "SELECT d.datname, d.datconnlimit, count(a.pid) AS n FROM pg_database d "
        "LEFT JOIN pg_stat_activity a ON a.datid = d.oid WHERE d.datconnlimit >= 0 "
        "GROUP BY d.datname, d.datconnlimit HAVING count(a.pid) >= d.datconnlimit ORDER BY 1"
    )
    assert row is not None
    return Usage(row["max_connections"], row["reserved"], row["in_use"], row["rolname"],
                 row["rolsuper"], row["rolconnlimit"], row["role_in_use"],
                 tuple((r["datname"], r["datconnlimit"], r["n"]) for r in full))


def refused(exc: BaseException) -> bool:
    """The server refused a connection for lack of slots, somewhere in ``exc``'s chain."""
    return errors.find(exc, errors.TOO_MANY_CONNECTIONS) is not None


async def explain(conn: asyncpg.Connection | None, server: str, exc: BaseException, *, workers: int = 0,
                  brief: Callable[[], bool] = lambda: False) -> PgTemplateError | None:
    """``exc`` as the out-of-connections error, with the counts ``conn`` (the admin
    connection) reads; None if ``exc`` is not about connection slots.

    psycopg reports a refused connection without its SQLSTATE: a failed psycopg connect
    counts only when a limit is found reached.  ``workers``: the run's xdist workers, if
    known, to say what it needs.  ``brief()``, asked only for such an error:
    name the limit without the advice (this run's first report gave it)."""
    sure = refused(exc)
    if not sure and not _failed_psycopg_connect(exc):
        return None
    seen: Usage | None = None
    if conn is not None and not conn.is_closed():
        try:
            seen = await usage(conn)
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError):
            seen = None
    if not sure and (seen is None or _verdict(seen) is None):
        return None
    return PgTemplateError(message(server, seen, exc, workers=workers, brief=brief()), setting="url")


def _failed_psycopg_connect(exc: BaseException) -> bool:
    psycopg = sys.modules.get("psycopg")  # not imported: no psycopg connection was tried
    if psycopg is None:
        return False
    failure = errors.find_instance(exc, psycopg.OperationalError)
    return failure is not None and errors.sqlstate(failure) is None


def message(server: str, seen: Usage | None, exc: BaseException, *, workers: int = 0,
            brief: bool = False) -> str:
    """The one message for a refusal (``seen``: the counts, when a connection could read them)."""
    head = f"pytest-pgtemplate: out of connections to {server}: "
    verdict = None if seen is None else _verdict(seen)
    if verdict is None:
        now = "" if seen is None else f"; now {_counts(seen)}"
        what = (f"the server refused a connection ({errors.find(exc, errors.TOO_MANY_CONNECTIONS) or exc}; "
                f"SQLSTATE 53300{now}): max_connections, the role's CONNECTION LIMIT or the "
                "database's was reached")
        fix = "Raise the limit that was reached"
    else:
        what, fix = verdict
    if brief:
        return f"{head}{what} (this run's first report of it says what to change)."
    return (f"{head}{what}. {_budget(workers)} {fix}, run fewer workers (-n) or CI jobs at once, or point "
            "--pgt-url / PGTEMPLATE_URL / pgtemplate_url at a server or role with room.")


def _counts(u: Usage) -> str:
    limit = f" of its CONNECTION LIMIT {u.role_limit}" if u.role_limit >= 0 else ""
    return (f"{u.in_use} of max_connections={u.max_connections} in use, role {u.role} has "
            f"{u.role_in_use}{limit} open")


def _verdict(u: Usage) -> tuple[str, str] | None:
    """The limit the counts show reached, and how to raise it; None if none is."""
    server = f"{u.in_use} of max_connections={u.max_connections} in use"
    if not u.superuser and 0 <= u.role_limit <= u.role_in_use:
        return (f"role {u.role} has {u.role_in_use} connections open, its CONNECTION LIMIT is "
                f"{u.role_limit} (server: {server})",
                f"Raise it (ALTER ROLE {ident(u.role)} CONNECTION LIMIT n)")
    if not u.superuser and u.full:
        name, limit, n = u.full[0]
        return (f"database {name} has {n} connections open, its CONNECTION LIMIT is {limit} "
                f"(server: {server})",
                f"Raise it (ALTER DATABASE {ident(name)} CONNECTION LIMIT n)")
    if u.in_use >= u.max_connections - (0 if u.superuser else u.reserved):
        reserved = "" if u.superuser else (
            f", the last {u.reserved} reserved for superusers (superuser_reserved_connections)")
        return (f"{server}{reserved}",
                "Raise max_connections on the server (postgresql.conf or ALTER SYSTEM; needs a restart)")
    return None


def _budget(workers: int) -> str:
    total = f", so -n {workers} needs {workers * PER_PROCESS}" if workers else ""
    return (f"Each pytest process of a run keeps {PER_PROCESS} connections open per database (admin, "
            f"reset, the test's engine){total}, plus other runs' on the same server.")
