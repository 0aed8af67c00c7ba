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
The usual path is ``_pgtemplate.clear()``, generated at install time from the catalog:
one static DELETE per table, children first, and the template's rows re-inserted
parents first, FK checks on (the session caches the plans: no SQL is built or planned
per test, and no privilege is needed).  Tables it cannot handle that way (a DELETE or
INSERT trigger or rule of the user's, row-level security, a cycle of foreign keys) take
the general path: with the privilege to set ``session_replication_role`` (superusers),
deletes with triggers and FK checks off; otherwise the tables and every table
referencing them are truncated together, their triggers disabled meanwhile.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.resources import files

import asyncpg

from . import errors
from .db import CONNECTION_LOST, database_settings
from .errors import PgTemplateError
from .naming import ident

INSTALL_SQL = (files(__package__) / "sql" / "install.sql").read_text()
# Event triggers (superuser only) note schema changes a test makes: a truncate reset
# cannot undo those, so the worker database is then re-created from the template.
DDL_SQL = (files(__package__) / "sql" / "ddl.sql").read_text()


async def install(conn: asyncpg.Connection) -> int:
    """Install reset tracking into a freshly migrated database; returns the tracked tables."""
    async with conn.transaction():
        await conn.execute(INSTALL_SQL)
        edges = [(int(r["child"]), int(r["parent"]), str(r["action"]))
                 for r in await conn.fetch(_EDGES_SQL)]
        levels = fk_levels([(child, parent) for child, parent, _ in edges if child != parent])
        await conn.executemany(
            "UPDATE _pgtemplate.tracked SET level = $2 WHERE relid = $1", list(levels.items())
        )
        tables = await _tables(conn)
        general = general_tables(tables, edges)
        await conn.executemany("INSERT INTO _pgtemplate.general VALUES ($1, $2)", list(general.items()))
        await conn.execute(clear_function(tables, edges, set(general)))
        await _install_ddl_detection(conn)  # last: it would take our own DDL for the test's
        return int(await conn.fetchval("SELECT count(*) FROM _pgtemplate.tracked"))


@dataclass(frozen=True, slots=True)
class Table:
    """A tracked table, as the generated reset sees it."""

    relid: int
    name: str  # schema-qualified, quoted
    partitioned: bool
    level: int  # FK depth: parents before children
    snapshot: str | None  # the table holding its template rows, if it has any
    cols: str | None
    why: str | None = None  # why it needs the general path (the user's triggers, rules, ...)
    # The user's statement-level DELETE / UPDATE triggers, or rules: an FK action reaching
    # this table from a table the reset empties fires them.  (Row-level ones do not fire: by
    # then no row of this table references the emptied one; see ``general_tables``.)
    on_delete: bool = False
    on_update: bool = False


async def _tables(conn: asyncpg.Connection) -> list[Table]:
    return [Table(int(r["relid"]), r["name"], r["partitioned"], r["level"], r["snapshot"], r["cols"],
                  r["why"], r["on_delete"], r["on_update"]) for r in await conn.fetch(_TABLES_SQL)]


# Triggers and rules of the user's that would fire on the reset's own DELETE (or INSERT of
# template rows); a partition's count for its root, through which it is reset.
_TABLES_SQL = """
WITH trig AS (
    SELECT coalesce(pg_partition_root(tgrelid)::oid, tgrelid) AS relid,
           bool_or(tgtype & 8 <> 0) AS on_delete, bool_or(tgtype & 4 <> 0) AS on_insert,
           bool_or(tgtype & 9 = 8) AS stmt_delete, bool_or(tgtype & 17 = 16) AS stmt_update
    FROM pg_trigger
    WHERE NOT tgisinternal AND tgenabled IN ('O', 'A') AND tgname <> '_pgtemplate_dirty'
    GROUP BY 1
    UNION ALL
    SELECT coalesce(pg_partition_root(ev_class)::oid, ev_class),
           bool_or(ev_type = '4'), bool_or(ev_type = '3'), bool_or(ev_type = '4'), bool_or(ev_type = '2')
    FROM pg_rewrite WHERE rulename <> '_RETURN' GROUP BY 1
)
SELECT t.relid, t.relkind = 'p' AS partitioned, t.level, t.snapshot, t.cols,
       format('%I.%I', n.nspname, c.relname) AS name,
       CASE WHEN bool_or(trig.on_delete) THEN 'a DELETE trigger or rule'
            WHEN t.snapshot IS NOT NULL AND bool_or(trig.on_insert)
                THEN 'an INSERT trigger or rule, and rows in the template'
            WHEN c.relrowsecurity THEN 'row-level security' END AS why,
       coalesce(bool_or(trig.stmt_delete), false) AS on_delete,
       coalesce(bool_or(trig.stmt_update), false) AS on_update
FROM _pgtemplate.tracked t JOIN pg_class c ON c.oid = t.relid JOIN pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN trig ON trig.relid = t.relid
GROUP BY t.relid, t.relkind, t.level, t.snapshot, t.cols, n.nspname, c.relname, c.relrowsecurity
ORDER BY t.relid
"""

# Foreign keys between tracked tables, as (child, parent, ON DELETE action: a NO ACTION,
# r RESTRICT, c CASCADE, n SET NULL, d SET DEFAULT), partitions counted as their roots.
_EDGES_SQL = """
SELECT DISTINCT coalesce(pg_partition_root(conrelid)::oid, conrelid) AS child,
       coalesce(pg_partition_root(confrelid)::oid, confrelid) AS parent, confdeltype::text AS action
FROM pg_constraint
WHERE contype = 'f' AND conparentid = 0
  AND coalesce(pg_partition_root(conrelid)::oid, conrelid) IN (SELECT relid FROM _pgtemplate.tracked)
  AND coalesce(pg_partition_root(confrelid)::oid, confrelid) IN (SELECT relid FROM _pgtemplate.tracked)
"""


def general_tables(tables: list[Table], edges: list[tuple[int, int, str]]) -> dict[int, str]:
    """The tables the generated statements cannot reset, and why: those with a ``why`` of
    their own, those on a cycle of foreign keys (no order deletes them with FK checks on),
    self-references ON DELETE RESTRICT (checked row by row, so one DELETE of all rows can
    fail), and tables whose rows' deletion fires the user's triggers elsewhere: an ON DELETE
    CASCADE / SET NULL / SET DEFAULT runs a DELETE or UPDATE on the referencing table, and
    its statement triggers (and rules) act even when no row matches.

    No row matches, ever: a referencing table is deleted from first when it is a target,
    and otherwise holds no rows that reference a target (it is unwritten, so empty or as in
    the template, and then a target itself if its template rows reference one).  So its
    row-level triggers do not fire, and the action goes no further down."""
    general = {t.relid: t.why for t in tables if t.why}
    parents = _parents(edges)
    for rel in _in_cycles(parents):
        general.setdefault(rel, "a cycle of foreign keys")
    by_id = {t.relid: t for t in tables}
    for child, parent, action in edges:
        if child == parent and action == "r":
            general.setdefault(child, "a self-reference ON DELETE RESTRICT")
        elif (action == "c" and by_id[child].on_delete) or (action in "nd" and by_id[child].on_update):
            why = f"its ON DELETE action on {by_id[child].name} fires the user's statement triggers or rules"
            general.setdefault(parent, why)
    return general


def clear_function(tables: list[Table], edges: list[tuple[int, int, str]], general: set[int]) -> str:
    """``CREATE FUNCTION _pgtemplate.clear(dirty oid[]) RETURNS oid[]``: empty the tables a
    test wrote, and put the template's rows back, in static statements.

    Targets: the dirty tables, plus every table holding template rows that references one
    (through tables holding template rows): its rows would block the DELETE, so they go
    and come back too.  Returns the targets, or NULL (having done nothing) when a target
    is one of ``general``, which the general path resets.
    """
    by_id = {t.relid: t for t in tables}
    parents = _parents(edges)
    # A user's column named like one of our variables must not clash with it.
    lines = ["#variable_conflict use_column", "DECLARE targets oid[] := dirty;", "BEGIN"]
    parents_first = sorted(tables, key=lambda t: (t.level, t.relid))
    # Names and columns are quoted by the server (format %I, quote_ident); oids are ints.
    for table in parents_first:
        reach = _referenced(table.relid, parents, lambda rel: by_id[rel].snapshot is not None)
        if table.snapshot is not None and reach:
            add = f"targets := targets || {table.relid}::oid"
            lines.append(f"    IF dirty && {_oids(reach)} THEN {add}; END IF;")
    if general:
        lines.append(f"    IF targets && {_oids(general)} THEN RETURN NULL; END IF;")
    for table in reversed(parents_first):
        delete = f"DELETE FROM {'' if table.partitioned else 'ONLY '}{table.name}"  # noqa: S608
        lines.append(f"    IF {table.relid}::oid = ANY (targets) THEN {delete}; END IF;")
    for table in parents_first:
        if table.snapshot is not None:
            insert = (f"INSERT INTO {table.name} ({table.cols}) OVERRIDING SYSTEM VALUE "  # noqa: S608
                      f"SELECT {table.cols} FROM _pgtemplate.{ident(table.snapshot)}")
            lines.append(f"    IF {table.relid}::oid = ANY (targets) THEN {insert}; END IF;")
    lines += ["    RETURN targets;", "END"]
    body = "\n".join(lines)
    tag = "$clear$"
    while tag in body:
        tag = tag[:-1] + "_$"
    return (f"CREATE OR REPLACE FUNCTION _pgtemplate.clear(dirty oid[]) RETURNS oid[] LANGUAGE plpgsql "
            f"AS {tag}\n{body}\n{tag}")


def _parents(edges: list[tuple[int, int, str]]) -> dict[int, set[int]]:
    """Each table's referenced tables (self-references aside)."""
    parents: dict[int, set[int]] = defaultdict(set)
    for child, parent, _ in edges:
        if child != parent:
            parents[child].add(parent)
    return parents


def _oids(relids: set[int]) -> str:
    return "'{" + ",".join(str(r) for r in sorted(relids)) + "}'::oid[]"


def _referenced(start: int, parents: dict[int, set[int]], onward: Callable[[int], bool]) -> set[int]:
    """Tables ``start`` references, and those they reference while ``onward`` holds for them."""
    seen: set[int] = set()
    todo = list(parents.get(start, ()))
    while todo:
        rel = todo.pop()
        if rel in seen or rel == start:
            continue
        seen.add(rel)
        if onward(rel):
            todo += parents.get(rel, ())
    return seen


def _in_cycles(parents: dict[int, set[int]]) -> set[int]:
    """Tables on a cycle of foreign keys (self-references aside)."""
    return {rel for rel, above in parents.items()
            if any(rel in _referenced(p, parents, lambda _: True) for p in above)}


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
    general: int = 0  # resets that took the general path


class TruncateReset:
    """Runs ``_pgtemplate.reset()`` on a dedicated connection to one worker database."""

    def __init__(self, conn: asyncpg.Connection, database: str, timeout: float) -> None:
        self.conn = conn
        self.database = database
        self.timeout_ms = max(1, int(timeout * 1000))
        self.replica: bool | None = None
        self.stats = ResetStats()
        self.terminated = ""  # who the last reset that terminated sessions terminated
        self.general_tables = ""  # which tables take the general path, and why (once seen)

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
            tables, _sequences, terminated, ddl, general = await self.conn.fetchval(
                "SELECT _pgtemplate.reset($1, $2)", self.replica, self.timeout_ms,
                timeout=max(30.0, self.timeout_ms / 1000 * 6),
            )
        except CONNECTION_LOST as exc:  # first: a connection that died mid-statement is a PostgresError too
            raise PgTemplateError(
                f"pytest-pgtemplate: lost the connection to {self.database} during its reset "
                f"({type(exc).__name__}: {exc}); is the server still running? Check it, or "
                "--pgt-url / PGTEMPLATE_URL / pgtemplate_url.", setting="url",
            ) from exc
        except asyncpg.PostgresError as exc:
            raise await self._failure(exc) from exc
        self.stats.seconds.append(time.perf_counter() - start)
        self.stats.tables += tables
        self.stats.terminated += terminated
        self.stats.general += general
        if general and not self.general_tables:
            self.general_tables = str(await self.conn.fetchval(
                "SELECT string_agg(format('%s (%s)', relid::regclass, why), ', ' "
                "ORDER BY relid::regclass::text) FROM _pgtemplate.general"))
        if terminated:
            self.terminated = str(await self.conn.fetchval(
                "SELECT current_setting('pgtemplate.terminated', true)"))
        if ddl:
            changes = await self.conn.fetchval(
                "SELECT string_agg(DISTINCT tag || coalesce(' ' || object, ''), ', ') FROM _pgtemplate.ddl"
            )
            return str(changes)
        return None

    async def renew(self, settings: str) -> bool:
        """Reset, then True if the database may serve as a fresh clone again."""
        return await self.not_renewed(settings) is None

    async def not_renewed(self, settings: str) -> str | None:
        """Reset; then None if the database is as a fresh clone of its template would be,
        so it may serve again (a later test, a later run), else why not.  That needs no
        schema change, schema changes to be seen at all (the event triggers, a superuser's),
        no large object (no reset covers them) and the database's settings as created."""
        if (changes := await self.reset()) is not None:
            return f"its schema was changed ({changes})"
        if not await self.sees_schema_changes():
            return "schema changes cannot be seen (the event triggers need a superuser)"
        if await self.conn.fetchval("SELECT EXISTS (SELECT FROM pg_largeobject_metadata)"):
            return "it holds large objects, which no reset removes"
        if await database_settings(self.conn, self.database) != settings:
            return "its settings were changed (ALTER DATABASE ... SET)"
        return None

    async def sees_schema_changes(self) -> bool:
        """Whether the event triggers that note a test's DDL are there (a superuser's)."""
        return bool(await self.conn.fetchval(
            "SELECT count(*) = 2 FROM pg_event_trigger WHERE evtname IN ('_pgtemplate_ddl', "
            "'_pgtemplate_drop') AND evtenabled IN ('O', 'A')"))

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
