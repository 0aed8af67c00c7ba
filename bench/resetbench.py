"""Reset micro-benchmark: the latency of one reset, measured directly (no pytest).

For each schema size, a scratch database is migrated with the generated project's Alembic
chain ("plain"), and cloned into a second one where pytest-pgtemplate's reset tracking is
installed (``reset.install``).  Each iteration writes one row into each of k tables (FK
order, in one round trip), then times the reset alone:

- ``ours``: ``TruncateReset.reset()`` as the plugin runs it (superuser: replica mode);
- ``ours, no replica``: the same with replica mode off (what a non-superuser gets);
- ``DELETE written``: an FK-ordered DELETE of exactly the written tables plus ``setval``
  of their sequences, one round trip (knows what was written: a lower bound by hand);
- ``TRUNCATE all``: ``TRUNCATE <every table> RESTART IDENTITY CASCADE`` and the reference
  rows re-inserted, one round trip (the classic setup).

The methods take turns, and after every reset the database must be back to its starting
state (row counts of every table, every sequence): a method that leaves anything behind is
reported, not hidden.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pgadmin
from schema import COUNTRIES, CURRENCIES, Schema
from sqlalchemy.engine import URL

from pytest_pgtemplate.reset import TruncateReset, install

METHODS = ("ours", "ours-no-replica", "delete", "truncate-all")
METHOD_LABELS = {
    "ours": "pytest-pgtemplate reset",
    "ours-no-replica": "pytest-pgtemplate reset, no replica privilege",
    "delete": "FK-ordered DELETE of written tables + setval",
    "truncate-all": "TRUNCATE all tables + reference rows",
}
WARMUP = 3

MIGRATE = """
import sys
from alembic import command
from alembic.config import Config
config = Config(sys.argv[1])
config.set_main_option("sqlalchemy.url", sys.argv[2].replace("%", "%%"))
command.upgrade(config, "head")
"""


@dataclass(frozen=True, slots=True)
class Cell:
    tables: int
    written: int
    method: str
    samples: tuple[float, ...]  # seconds
    clean: bool  # the database was back to its starting state afterwards


@dataclass(frozen=True, slots=True)
class Step:
    table: str
    sql: str
    touches: tuple[str, ...]  # tables written, the trigger's included


def ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def migrate(project: Path, url: URL, timeout: float) -> None:
    """alembic upgrade head in a subprocess (each project has its own ``app`` package)."""
    rendered = url.set(drivername="postgresql+asyncpg").render_as_string(hide_password=False)
    subprocess.run([sys.executable, "-c", MIGRATE, str(project / "alembic.ini"), rendered],
                   cwd=project, check=True, timeout=timeout, capture_output=True)


def measure(schema: Schema, project: Path, url: URL, prefix: str, *, written: tuple[int, ...],
            iterations: dict[str, int], timeout: float) -> list[Cell]:
    """Every method for one schema size and each count of tables written."""
    plain, tracked = f"{prefix}_rs{schema.tables}", f"{prefix}_rs{schema.tables}_pgt"
    pgadmin.create_database(url, plain)
    try:
        migrate(project, url.set(database=plain), timeout)
        pgadmin.create_database(url, tracked, template=plain)
        return asyncio.run(_measure(schema, url, plain, tracked, written, iterations))
    finally:
        pgadmin.drop_database(url, tracked)
        pgadmin.drop_database(url, plain)


Reset = Callable[[], Awaitable[object]]


async def _measure(schema: Schema, url: URL, plain: str, tracked: str, written: tuple[int, ...],
                   iterations: dict[str, int]) -> list[Cell]:
    conns = [await asyncpg.connect(pgadmin.conninfo(url, db)) for db in (tracked, tracked, plain)]
    writer_t, reset_conn, writer_p = conns
    try:
        await install(reset_conn)
        resetter = TruncateReset(reset_conn, tracked, timeout=5.0)
        await resetter.reset()  # probes the privilege to use replica mode, as the plugin does
        replica = bool(resetter.replica)
        truncate_all = _truncate_all_sql(schema)
        cells = []
        for k in written:
            steps = plan(schema, k)
            resets: dict[str, tuple[asyncpg.Connection, Reset]] = {
                "ours": (writer_t, _ours(resetter, replica=replica)),
                "ours-no-replica": (writer_t, _ours(resetter, replica=False)),
                "delete": (writer_p, _script(writer_p, _delete_sql(steps))),
                "truncate-all": (writer_p, _script(writer_p, truncate_all)),
            }
            actual = len({t for s in steps for t in s.touches})
            cells += await _interleaved(schema, actual, "; ".join(s.sql for s in steps), resets,
                                        iterations)
        return cells
    finally:
        for conn in conns:
            await conn.close()


async def _interleaved(schema: Schema, written: int, inserts: str,
                       resets: dict[str, tuple[asyncpg.Connection, Reset]],
                       iterations: dict[str, int]) -> list[Cell]:
    """Methods take turns (a slow one every few rounds), so a burst of load from elsewhere
    on the machine hits them alike.  After every reset the state is compared with the
    starting one (outside the timed part)."""
    before = {id(writer): await state(writer, schema) for writer, _ in resets.values()}
    wanted = {m: WARMUP + iterations[m] for m in resets}
    rounds = max(wanted.values())
    runs = dict.fromkeys(resets, 0)
    samples: dict[str, list[float]] = {m: [] for m in resets}
    dirty = dict.fromkeys(resets, 0)
    for i in range(rounds):
        for method, (writer, reset) in resets.items():
            if runs[method] >= wanted[method] or i % max(1, rounds // wanted[method]):
                continue
            await writer.execute(inserts)
            start = time.perf_counter()
            await reset()
            elapsed = time.perf_counter() - start
            runs[method] += 1
            if runs[method] > WARMUP:
                samples[method].append(elapsed)
            if await state(writer, schema) != before[id(writer)]:
                dirty[method] += 1
    return [Cell(schema.tables, written, m, tuple(samples[m]), dirty[m] == 0) for m in resets]


def _ours(resetter: TruncateReset, *, replica: bool) -> Reset:
    async def reset() -> None:
        resetter.replica = replica
        await resetter.reset()

    return reset


def _script(conn: asyncpg.Connection, sql: str) -> Reset:
    async def reset() -> object:
        return await conn.execute(sql)

    return reset


async def state(conn: asyncpg.Connection, schema: Schema) -> tuple[object, ...]:
    """Row count of every table and every sequence's last value, in one query."""
    counts = ", ".join(f"(SELECT count(*) FROM {ident(t)})" for t in schema.table_names)
    row = await conn.fetchrow(f"SELECT {counts}")
    seqs = await conn.fetch(
        "SELECT c.relname, pg_sequence_last_value(c.oid) FROM pg_class c "
        "WHERE c.relkind = 'S' AND c.relnamespace = 'public'::regnamespace ORDER BY 1"
    )
    assert row is not None
    return tuple(row) + tuple((r[0], r[1]) for r in seqs)


def plan(schema: Schema, written: int) -> list[Step]:
    """Inserts in FK order, one row per table, touching at most ``written`` tables."""
    steps: list[Step] = []
    touched: set[str] = set()
    for step in _all_steps(schema):
        if len(touched | set(step.touches)) > written:
            break
        steps.append(step)
        touched |= set(step.touches)
    return steps


def _all_steps(schema: Schema) -> list[Step]:
    steps = []
    for group in schema.groups:
        def parent(role: str, table_of: Callable[[str], str] = group.table) -> str:
            return f"currval(pg_get_serial_sequence({literal(table_of(role))}, 'id'))"

        values = {
            "account": ("name, email, country_code", "'bench', 'bench@example.com', 'FR'"),
            "order": ("account_id, total_cents", f"{parent('account')}, 100"),
            "line": ("order_id, currency_id, sku, quantity, unit_cents",
                     f"{parent('order')}, 1, 'SKU', 1, 100"),
            "payment": ("order_id, currency_id, amount_cents, method", f"{parent('order')}, 1, 100, 'card'"),
        }
        for role in group.roles:
            table = group.table(role)
            columns, row = values[role]
            touches = (table, "audit_log") if role == "order" else (table,)
            steps.append(Step(table, f"INSERT INTO {ident(table)} ({columns}) VALUES ({row})", touches))
    return steps


def _delete_sql(steps: list[Step]) -> str:
    tables = list(dict.fromkeys(t for s in reversed(steps) for t in reversed(s.touches)))
    deletes = [f"DELETE FROM {ident(t)}" for t in tables]
    setvals = [f"SELECT setval(pg_get_serial_sequence({literal(t)}, 'id'), 1, false)" for t in tables]
    return "; ".join(deletes + setvals)


def _truncate_all_sql(schema: Schema) -> str:
    tables = ", ".join(ident(t) for t in schema.table_names)
    countries = ", ".join(f"({literal(c)}, {literal(n)})" for c, n in COUNTRIES)
    currencies = ", ".join(f"({literal(c)}, {literal(n)})" for c, n in CURRENCIES)
    return (
        f"TRUNCATE {tables} RESTART IDENTITY CASCADE; "
        f"INSERT INTO countries (code, name) VALUES {countries}; "
        f"INSERT INTO currencies (code, name) VALUES {currencies}"
    )
