"""Reset: bring a worker database back to its template's state after a test.

Tracking is installed once, in the template, after migrating, so every clone has it:
- a statement-level trigger on every user table (every schema, extension-owned tables
  excluded) records the table in ``_pgtemplate.dirty`` the first time a statement
  writes it (no row-level cost, exact: no statistics that lag);
- a snapshot copy of every table that holds rows in the template (data migrations,
  ``alembic_version``) and of every sequence's state;
- ``_pgtemplate.reset()``, which in ONE round trip and one transaction terminates
  sessions the test leaked (open transactions), empties the dirty tables, puts the
  template's rows back and restores changed sequences.

So a reset's cost grows with the tables a test wrote, not with the tables that exist.
With the privilege to set ``session_replication_role`` (superusers), deletes run with
triggers and FK checks off, table by table; otherwise the dirty tables and every table
referencing them are truncated together and the snapshot rows re-inserted parents first.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from importlib.resources import files

import asyncpg

from . import errors
from .db import CONNECTION_LOST
from .errors import PgTemplateError

INSTALL_SQL = (files(__package__) / "sql" / "install.sql").read_text()
# Event triggers (superuser only) note schema changes a test makes: a truncate reset
# cannot undo those, so the worker database is then re-created from the template.
DDL_SQL = (files(__package__) / "sql" / "ddl.sql").read_text()


async def install(conn: asyncpg.Connection) -> int:
    """Install reset tracking into a freshly migrated database; returns the tracked tables."""
    async with conn.transaction():
        await conn.execute(INSTALL_SQL)
        await _install_ddl_detection(conn)
        edges = await conn.fetch(
            "SELECT conrelid, confrelid FROM pg_constraint WHERE contype = 'f' "
            "AND conrelid <> confrelid AND conrelid IN (SELECT relid FROM _pgtemplate.tracked)"
        )
        levels = fk_levels([(int(e["conrelid"]), int(e["confrelid"])) for e in edges])
        await conn.executemany(
            "UPDATE _pgtemplate.tracked SET level = $2 WHERE relid = $1", list(levels.items())
        )
        return int(await conn.fetchval("SELECT count(*) FROM _pgtemplate.tracked"))


async def _install_ddl_detection(conn: asyncpg.Connection) -> None:
    try:
        async with conn.transaction():  # a savepoint: its failure leaves the rest installed
            await conn.execute(DDL_SQL)
    except asyncpg.PostgresError as exc:
        if errors.sqlstate(exc) != errors.INSUFFICIENT_PRIVILEGE:
            raise


def fk_levels(edges: list[tuple[int, int]]) -> dict[int, int]:
    """Depth of each referencing table below the tables it references (parents first).

    Cycles are cut where found; re-inserting rows into a cycle then relies on the
    constraints being deferrable, as it would in the application itself.
    """
    parents: dict[int, set[int]] = defaultdict(set)
    for child, parent in edges:
        parents[child].add(parent)
    levels: dict[int, int] = {}

    def level(rel: int, seen: frozenset[int]) -> int:
        if rel in levels:
            return levels[rel]
        above = [level(p, seen | {rel}) + 1 for p in parents.get(rel, ()) if p not in seen]
        levels[rel] = max(above, default=0)
        return levels[rel]

    for rel in list(parents):
        level(rel, frozenset())
    return levels


@dataclass(slots=True)
class ResetStats:
    """Durations (seconds) of each reset, and what they did."""

    seconds: list[float] = field(default_factory=list)
    tables: int = 0
    terminated: int = 0


class TruncateReset:
    """Runs ``_pgtemplate.reset()`` on a dedicated connection to one worker database."""

    def __init__(self, conn: asyncpg.Connection, database: str, timeout: float) -> None:
        self.conn = conn
        self.database = database
        self.timeout_ms = max(1, int(timeout * 1000))
        self.replica: bool | None = None
        self.stats = ResetStats()
        self.terminated = ""  # who the last reset that terminated sessions terminated

    async def _can_use_replica(self) -> bool:
        try:
            await self.conn.execute("SET session_replication_role = replica")
            await self.conn.execute("RESET session_replication_role")
            return True
        except asyncpg.PostgresError as exc:
            if errors.sqlstate(exc) == errors.INSUFFICIENT_PRIVILEGE:
                return False
            raise

    async def reset(self) -> str | None:
        """Restore the template's state.  Returns None, or a description of the schema
        changes (DDL) the test made, which no truncate can undo: the caller then re-creates
        the worker database.  A blocked or failed reset raises PgTemplateError naming the
        cause (the caller re-creates the database then too)."""
        start = time.perf_counter()
        try:
            if self.replica is None:
                self.replica = await self._can_use_replica()
            tables, _sequences, terminated, ddl = await self.conn.fetchval(
                "SELECT _pgtemplate.reset($1, $2)", self.replica, self.timeout_ms,
                timeout=max(30.0, self.timeout_ms / 1000 * 6),
            )
        except asyncpg.PostgresError as exc:
            raise await self._failure(exc) from exc
        except CONNECTION_LOST as exc:
            raise PgTemplateError(
                f"pytest-pgtemplate: lost the connection to {self.database} during its reset "
                f"({type(exc).__name__}: {exc}); is the server still running? Check it, or "
                "--pgt-url / PGTEMPLATE_URL / pgtemplate_url.", setting="url",
            ) from exc
        self.stats.seconds.append(time.perf_counter() - start)
        self.stats.tables += tables
        self.stats.terminated += terminated
        if terminated:
            self.terminated = str(await self.conn.fetchval(
                "SELECT current_setting('pgtemplate.terminated', true)"))
        if ddl:
            changes = await self.conn.fetchval(
                "SELECT string_agg(DISTINCT tag || coalesce(' ' || object, ''), ', ') FROM _pgtemplate.ddl"
            )
            return str(changes)
        return None

    async def _failure(self, exc: asyncpg.PostgresError) -> PgTemplateError:
        if errors.sqlstate(exc) == errors.LOCK_NOT_AVAILABLE:
            # The blockers hold locks on relations of this database.  Of another role's
            # sessions, a role without pg_read_all_stats sees neither state nor query.
            rows = await self.conn.fetch(
                "SELECT a.pid, a.usename, a.application_name, a.state, left(a.query, 200) AS query, "
                "current_user AS me FROM pg_stat_activity a WHERE a.pid <> pg_backend_pid() "
                "AND a.pid IN (SELECT l.pid FROM pg_locks l JOIN pg_database d ON d.oid = l.database "
                "WHERE d.datname = current_database() AND l.locktype = 'relation' AND l.granted) "
                "ORDER BY a.pid"
            )
            who = "; ".join(_describe_session(r) for r in rows) or "a session that has since gone"
            return PgTemplateError(
                f"pytest-pgtemplate: reset of {self.database} was blocked for more than "
                f"{self.timeout_ms / 1000:g} s by {who}. Close that connection before the test "
                "ends, or raise --pgt-reset-timeout / PGTEMPLATE_RESET_TIMEOUT / "
                "pgtemplate_reset_timeout.",
                setting="reset_timeout",
            )
        return PgTemplateError(
            f"pytest-pgtemplate: reset of {self.database} failed: {type(exc).__name__}: {exc}. "
            "If the test changed the schema (DDL), the truncate reset cannot undo that; "
            "the worker database is re-created from the template."
        )


def _describe_session(row: asyncpg.Record) -> str:
    """``pid 123 (app, user bob, idle in transaction): 'SELECT ...'`` for an error message."""
    app = row["application_name"] or "no application_name"
    if row["state"] is None:  # another role's session, details hidden from ours
        return (f"pid {row['pid']} ({app}, user {row['usename']}; its state and query are hidden from "
                f"role {row['me']}: GRANT pg_read_all_stats TO {row['me']} to see them)")
    return f"pid {row['pid']} ({app}, user {row['usename']}, {row['state']}): {row['query']!r}"
