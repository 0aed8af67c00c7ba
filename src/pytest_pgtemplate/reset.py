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

import asyncpg

from . import errors
from .errors import PgTemplateError

SCHEMA = "_pgtemplate"

INSTALL_SQL = """
CREATE SCHEMA _pgtemplate;
COMMENT ON SCHEMA _pgtemplate IS 'pytest-pgtemplate reset tracking (test databases only)';
CREATE UNLOGGED TABLE _pgtemplate.dirty (relid oid PRIMARY KEY);
CREATE TABLE _pgtemplate.tracked (
    relid oid PRIMARY KEY, relkind "char" NOT NULL, level integer NOT NULL DEFAULT 0,
    snapshot name, cols text);
CREATE UNLOGGED TABLE _pgtemplate.ddl (tag text NOT NULL, object text);
CREATE TABLE _pgtemplate.seqs (
    seqrelid oid PRIMARY KEY, last_value bigint NOT NULL, is_called boolean NOT NULL, snap bigint);

CREATE FUNCTION _pgtemplate.mark_dirty() RETURNS trigger LANGUAGE plpgsql AS $fn$
BEGIN
    INSERT INTO _pgtemplate.dirty VALUES (TG_RELID) ON CONFLICT DO NOTHING;
    RETURN NULL;
END $fn$;

INSERT INTO _pgtemplate.tracked (relid, relkind)
SELECT c.oid, c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition
  AND n.nspname NOT IN ('pg_catalog', 'information_schema', '_pgtemplate')
  AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp%'
  AND NOT EXISTS (SELECT FROM pg_depend d WHERE d.classid = 'pg_class'::regclass
                  AND d.objid = c.oid AND d.deptype = 'e');

DO $do$
DECLARE r record; has_rows boolean; columns text;
BEGIN
    FOR r IN SELECT relid, relkind FROM _pgtemplate.tracked LOOP
        EXECUTE format('CREATE TRIGGER _pgtemplate_dirty AFTER INSERT OR UPDATE OR DELETE OR '
                       'TRUNCATE ON %s FOR EACH STATEMENT EXECUTE FUNCTION _pgtemplate.mark_dirty()',
                       r.relid::regclass);
        EXECUTE format('SELECT EXISTS (SELECT FROM %s %s)',
                       CASE WHEN r.relkind = 'p' THEN '' ELSE 'ONLY' END, r.relid::regclass)
            INTO has_rows;
        CONTINUE WHEN NOT has_rows;
        SELECT string_agg(quote_ident(attname), ', ' ORDER BY attnum) INTO columns
        FROM pg_attribute WHERE attrelid = r.relid AND attnum > 0 AND NOT attisdropped
          AND attgenerated = '';
        EXECUTE format('CREATE TABLE _pgtemplate.%I AS SELECT %s FROM %s %s', 's' || r.relid,
                       columns, CASE WHEN r.relkind = 'p' THEN '' ELSE 'ONLY' END,
                       r.relid::regclass);
        UPDATE _pgtemplate.tracked SET snapshot = 's' || r.relid, cols = columns
        WHERE relid = r.relid;
    END LOOP;
END $do$;

DO $do$
DECLARE r record; lv bigint; called boolean;
BEGIN
    FOR r IN SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE c.relkind = 'S'
               AND n.nspname NOT IN ('pg_catalog', 'information_schema', '_pgtemplate') LOOP
        EXECUTE format('SELECT last_value, is_called FROM %s', r.oid::regclass) INTO lv, called;
        INSERT INTO _pgtemplate.seqs VALUES (r.oid, lv, called, CASE WHEN called THEN lv END);
    END LOOP;
END $do$;

CREATE FUNCTION _pgtemplate.reset(replica boolean, wait_ms integer) RETURNS integer[]
LANGUAGE plpgsql AS $fn$
DECLARE
    dirty oid[];
    targets oid[];
    r record;
    n_seq integer := 0;
    n_term integer;
    user_triggers name[];
    tg name;
BEGIN
    PERFORM set_config('lock_timeout', wait_ms || 'ms', true);
    PERFORM set_config('pgtemplate.resetting', 'on', true);  -- our own DDL is not the test's
    -- A session the test left inside a transaction would hold locks (and its rows
    -- are uncommitted anyway): terminate it rather than wait on it.
    SELECT count(pg_terminate_backend(pid)) INTO n_term FROM pg_stat_activity
    WHERE datname = current_database() AND pid <> pg_backend_pid()
      AND backend_type = 'client backend'
      AND state IN ('active', 'idle in transaction', 'idle in transaction (aborted)');
    SELECT coalesce(array_agg(relid), '{}') INTO dirty FROM _pgtemplate.dirty;
    IF cardinality(dirty) > 0 THEN
        IF replica THEN
            -- Triggers (ours included) and FK checks off: each table on its own.
            PERFORM set_config('session_replication_role', 'replica', true);
            targets := dirty;
            FOR r IN SELECT relid, relkind FROM _pgtemplate.tracked WHERE relid = ANY (dirty) LOOP
                EXECUTE format('DELETE FROM %s %s',
                               CASE WHEN r.relkind = 'p' THEN '' ELSE 'ONLY' END, r.relid::regclass);
            END LOOP;
        ELSE
            -- FK checks on: every table referencing an emptied one must go too.
            WITH RECURSIVE closure(relid) AS (
                SELECT unnest(dirty)
                UNION
                SELECT c.conrelid FROM pg_constraint c JOIN closure ON c.confrelid = closure.relid
                WHERE c.contype = 'f')
            SELECT array_agg(relid) INTO targets FROM closure;
            EXECUTE 'TRUNCATE ' || (SELECT string_agg(t::regclass::text, ', ') FROM unnest(targets) t);
        END IF;
        FOR r IN SELECT relid, snapshot, cols FROM _pgtemplate.tracked
                 WHERE relid = ANY (targets) AND snapshot IS NOT NULL ORDER BY level LOOP
            -- Without replica mode, the table's own triggers would fire on re-insertion
            -- (e.g. an audit trigger writing elsewhere): switch them off meanwhile.
            user_triggers := CASE WHEN replica THEN '{}' ELSE ARRAY(
                SELECT tgname FROM pg_trigger WHERE tgrelid = r.relid AND NOT tgisinternal
                AND tgenabled = 'O' AND tgname <> '_pgtemplate_dirty') END;
            FOREACH tg IN ARRAY user_triggers LOOP
                EXECUTE format('ALTER TABLE %s DISABLE TRIGGER %I', r.relid::regclass, tg);
            END LOOP;
            EXECUTE format('INSERT INTO %s (%s) OVERRIDING SYSTEM VALUE SELECT %s FROM _pgtemplate.%I',
                           r.relid::regclass, r.cols, r.cols, r.snapshot);
            FOREACH tg IN ARRAY user_triggers LOOP
                EXECUTE format('ALTER TABLE %s ENABLE TRIGGER %I', r.relid::regclass, tg);
            END LOOP;
        END LOOP;
        DELETE FROM _pgtemplate.dirty;
    END IF;
    FOR r IN SELECT seqrelid, last_value, is_called FROM _pgtemplate.seqs
             WHERE pg_sequence_last_value(seqrelid) IS DISTINCT FROM snap LOOP
        PERFORM setval(r.seqrelid, r.last_value, r.is_called);
        n_seq := n_seq + 1;
    END LOOP;
    RETURN ARRAY[cardinality(dirty), n_seq, n_term, (SELECT count(*) FROM _pgtemplate.ddl)::integer];
END $fn$;
"""


# Event triggers (superuser only) note schema changes a test makes: a truncate reset
# cannot undo those, so the worker database is then re-created from the template.
DDL_SQL = """
CREATE FUNCTION _pgtemplate.note_ddl() RETURNS event_trigger LANGUAGE plpgsql AS $fn$
BEGIN
    IF current_setting('pgtemplate.resetting', true) = 'on' THEN RETURN; END IF;
    INSERT INTO _pgtemplate.ddl
    SELECT c.command_tag, c.object_identity FROM pg_event_trigger_ddl_commands() c
    WHERE coalesce(c.schema_name, '') NOT LIKE 'pg\\_temp%' AND NOT c.in_extension;
END $fn$;
CREATE FUNCTION _pgtemplate.note_drop() RETURNS event_trigger LANGUAGE plpgsql AS $fn$
BEGIN
    IF current_setting('pgtemplate.resetting', true) = 'on' THEN RETURN; END IF;
    INSERT INTO _pgtemplate.ddl
    SELECT 'DROP ' || o.object_type, o.object_identity FROM pg_event_trigger_dropped_objects() o
    WHERE o.original AND NOT o.is_temporary;
END $fn$;
CREATE EVENT TRIGGER _pgtemplate_ddl ON ddl_command_end EXECUTE FUNCTION _pgtemplate.note_ddl();
CREATE EVENT TRIGGER _pgtemplate_drop ON sql_drop EXECUTE FUNCTION _pgtemplate.note_drop();
"""


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
    sequences: int = 0
    terminated: int = 0


class TruncateReset:
    """Runs ``_pgtemplate.reset()`` on a dedicated connection to one worker database."""

    def __init__(self, conn: asyncpg.Connection, database: str, timeout: float) -> None:
        self.conn = conn
        self.database = database
        self.timeout_ms = max(1, int(timeout * 1000))
        self.replica: bool | None = None
        self.stats = ResetStats()

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
        if self.replica is None:
            self.replica = await self._can_use_replica()
        try:
            tables, sequences, terminated, ddl = await self.conn.fetchval(
                "SELECT _pgtemplate.reset($1, $2)", self.replica, self.timeout_ms
            )
        except asyncpg.PostgresError as exc:
            raise await self._failure(exc) from exc
        self.stats.seconds.append(time.perf_counter() - start)
        self.stats.tables += tables
        self.stats.sequences += sequences
        self.stats.terminated += terminated
        if ddl:
            changes = await self.conn.fetchval(
                "SELECT string_agg(DISTINCT tag || coalesce(' ' || object, ''), ', ') FROM _pgtemplate.ddl"
            )
            return str(changes)
        return None

    async def _failure(self, exc: asyncpg.PostgresError) -> PgTemplateError:
        if errors.sqlstate(exc) == errors.LOCK_NOT_AVAILABLE:
            rows = await self.conn.fetch(
                "SELECT pid, application_name, state, left(query, 200) AS query "
                "FROM pg_stat_activity WHERE datname = current_database() "
                "AND pid <> pg_backend_pid() AND backend_type = 'client backend'"
            )
            who = "; ".join(
                f"pid {r['pid']} ({r['application_name'] or 'no application_name'}, {r['state']}): "
                f"{r['query']!r}"
                for r in rows
            ) or "a session that has since gone"
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
