"""Write a realistic project for a schema: SQLAlchemy 2 async models, an Alembic chain, async tests.

The project (``alembic.ini``, ``migrations/``, ``app/``, ``tests/``, ``pytest.ini``) has no
conftest.py: each contender gets a copy of it plus a conftest of its own that provides the
``db_session`` fixture (an AsyncSession) the tests use.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from schema import COUNTRIES, CURRENCIES, ORDER_STATUSES, Group, Schema

ALEMBIC_INI = """\
[alembic]
script_location = %(here)s/migrations
prepend_sys_path = .
path_separator = os
sqlalchemy.url = postgresql+asyncpg://postgres@127.0.0.1:5432/app

[loggers]
keys = root,sqlalchemy,alembic

[handlers]
keys = console

[formatters]
keys = generic

[logger_root]
level = WARNING
handlers = console
qualname =

[logger_sqlalchemy]
level = WARNING
handlers =
qualname = sqlalchemy.engine

[logger_alembic]
level = WARNING
handlers =
qualname = alembic

[handler_console]
class = StreamHandler
args = (sys.stderr,)
level = NOTSET
formatter = generic

[formatter_generic]
format = %(levelname)-5.5s [%(name)s] %(message)s
"""

ENV_PY = '''\
"""Alembic environment: an async engine from sqlalchemy.url, driven by asyncio.run()."""

import asyncio
from logging.config import fileConfig

from alembic import context
from sqlalchemy import pool
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import async_engine_from_config

from app.models import Base

config = context.config
if config.config_file_name is not None:
    fileConfig(config.config_file_name, disable_existing_loggers=False)
target_metadata = Base.metadata


def run_migrations_offline() -> None:
    context.configure(
        url=config.get_main_option("sqlalchemy.url"),
        target_metadata=target_metadata,
        literal_binds=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def do_run_migrations(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=target_metadata)
    with context.begin_transaction():
        context.run_migrations()


async def run_migrations_online() -> None:
    engine = async_engine_from_config(
        config.get_section(config.config_ini_section, {}),
        prefix="sqlalchemy.",
        poolclass=pool.NullPool,
    )
    async with engine.connect() as connection:
        await connection.run_sync(do_run_migrations)
    await engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    asyncio.run(run_migrations_online())
'''

PYTEST_INI = """\
[pytest]
testpaths = tests
pythonpath = .
asyncio_mode = auto
asyncio_default_fixture_loop_scope = session
asyncio_default_test_loop_scope = session
"""

SUPPORT_PY = '''\
"""Scenarios of the generated tests: each writes a few FK-linked tables, commits, reads back."""

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from app.models import GROUPS, AuditLog, Base, Country, Currency, OrderStatus
from app.reference import COUNTRIES, CURRENCIES


def _count(model: type[Base]):
    return select(func.count()).select_from(model).scalar_subquery()


async def counts(session: AsyncSession, models: list[type[Base]]) -> dict[str, int]:
    row = (await session.execute(select(*(_count(m) for m in models)))).one()
    return {m.__tablename__: n for m, n in zip(models, row, strict=True)}


async def assert_clean(session: AsyncSession, group: int) -> None:
    """The group's tables and the audit log are empty, the reference rows all there."""
    models = [*GROUPS[group].values(), AuditLog, Country, Currency]
    expected = {m.__tablename__: 0 for m in models}
    expected.update(countries=len(COUNTRIES), currencies=len(CURRENCIES))
    found = await counts(session, models)
    assert found == expected, f"not the clean state at the start of the test: {found}"


async def run_scenario(session: AsyncSession, group: int, case: int, *, lines: int,
                       pay: bool = False, cancel: bool = False) -> None:
    m = GROUPS[group]
    written = {name: 0 for name in (*(t.__tablename__ for t in m.values()), "audit_log")}
    account = m["account"](
        name=f"Customer {case}",
        email=f"customer{case}@example.com",
        country_code=COUNTRIES[case % len(COUNTRIES)][0],
    )
    session.add(account)
    await session.flush()
    written[account.__tablename__] += 1
    if "order" in m:
        order = m["order"](account_id=account.id, total_cents=0)
        session.add(order)
        await session.flush()
        written[order.__tablename__] += 1
        written["audit_log"] += 1
        total = 0
        if "line" in m:
            for n in range(lines):
                line = m["line"](order_id=order.id, currency_id=1 + (case + n) % len(CURRENCIES),
                                 sku=f"SKU-{case}-{n}", quantity=1 + n, unit_cents=995 + case)
                session.add(line)
                total += line.quantity * line.unit_cents
                written[line.__tablename__] += 1
        order.total_cents = total
        pay = pay and "payment" in m
        if pay:
            order.status = OrderStatus.paid
            session.add(m["payment"](order_id=order.id, currency_id=1, amount_cents=total, method="card"))
            written[m["payment"].__tablename__] += 1
        await session.flush()
        if total or pay:
            written["audit_log"] += 1  # the UPDATE of total_cents (and status)
        if cancel and "line" in m and lines:
            order.status = OrderStatus.cancelled
            last = (await session.scalars(
                select(m["line"]).where(m["line"].order_id == order.id).order_by(m["line"].id.desc())
            )).first()
            await session.delete(last)
            written[m["line"].__tablename__] -= 1
            written["audit_log"] += 1
    await session.commit()
    await _read_back(session, m, written, account.id)


async def _read_back(session: AsyncSession, m: dict[str, type[Base]], written: dict[str, int],
                     account_id: int) -> None:
    found = await counts(session, [*m.values(), AuditLog])
    assert found == written, f"read back {found}, wrote {written}"
    if "line" in m:
        line, order = m["line"], m["order"]
        stored, computed = (await session.execute(
            select(order.total_cents, func.coalesce(func.sum(line.quantity * line.unit_cents), 0))
            .outerjoin(line, line.order_id == order.id)
            .where(order.account_id == account_id)
            .group_by(order.id)
        )).one()
        assert stored >= computed


async def browse(session: AsyncSession, group: int, case: int) -> None:
    """An account, an order, one line (3 inserts)."""
    await run_scenario(session, group, case, lines=1)


async def checkout(session: AsyncSession, group: int, case: int) -> None:
    """An account, an order, two lines, a payment (5 inserts), the order paid."""
    await run_scenario(session, group, case, lines=2, pay=True)


async def cancel(session: AsyncSession, group: int, case: int) -> None:
    """An account, an order, two lines (4 inserts), then the order cancelled and a line deleted."""
    await run_scenario(session, group, case, lines=2, cancel=True)
'''

SCENARIOS = ("browse", "checkout", "cancel")


@dataclass(frozen=True, slots=True)
class Column:
    """One non-key column of a group table, rendered both as a model attribute and in a migration."""

    name: str
    pytype: str
    satype: str  # without the ``sa.`` prefix
    fk: str | None = None  # "{g}_account.id" is formatted with the group's table prefix
    cascade: bool = False
    unique: bool = False
    index: bool = False
    now: bool = False  # server_default now()
    default: str | None = None  # python and server default, for the enum


ROLE_COLUMNS: dict[str, tuple[Column, ...]] = {
    "account": (
        Column("name", "str", "String(100)"),
        Column("email", "str", "String(200)", unique=True),
        Column("country_code", "str", "String(2)", fk="countries.code"),
        Column("created_at", "datetime", "DateTime(timezone=True)", now=True),
    ),
    "order": (
        Column("account_id", "int", "Integer()", fk="{g}_account.id", cascade=True, index=True),
        Column("status", "OrderStatus", "ORDER_STATUS", default="pending"),
        Column("total_cents", "int", "Integer()"),
        Column("placed_at", "datetime", "DateTime(timezone=True)", now=True),
    ),
    "line": (
        Column("order_id", "int", "Integer()", fk="{g}_order.id", cascade=True, index=True),
        Column("currency_id", "int", "Integer()", fk="currencies.id"),
        Column("sku", "str", "String(40)"),
        Column("quantity", "int", "Integer()"),
        Column("unit_cents", "int", "Integer()"),
    ),
    "payment": (
        Column("order_id", "int", "Integer()", fk="{g}_order.id", cascade=True, index=True),
        Column("currency_id", "int", "Integer()", fk="currencies.id"),
        Column("amount_cents", "int", "Integer()"),
        Column("method", "str", "String(20)"),
        Column("paid_at", "datetime", "DateTime(timezone=True)", now=True),
    ),
}


def write_project(root: Path, schema: Schema, tests: int) -> None:
    """Write the project for ``schema`` with ``tests`` tests into ``root`` (created)."""
    files = {
        "alembic.ini": ALEMBIC_INI,
        "pytest.ini": PYTEST_INI,
        "migrations/env.py": ENV_PY,
        "app/__init__.py": "",
        "app/models.py": models_py(schema),
        "app/reference.py": reference_py(),
        "tests/__init__.py": "",
        "tests/support.py": SUPPORT_PY,
        **migrations(schema),
        **test_modules(schema, tests),
    }
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def reference_py() -> str:
    return (
        '"""Reference rows the data migration inserts (the application relies on them)."""\n\n'
        f"COUNTRIES = {COUNTRIES!r}\n"
        f"CURRENCIES = {CURRENCIES!r}\n"
    )


# -- models ------------------------------------------------------------------------------

MODELS_HEADER = '''\
"""The application's models (SQLAlchemy 2, typed declarative)."""

import enum
from datetime import datetime

from sqlalchemy import BigInteger, CheckConstraint, DateTime, ForeignKey, Integer, String, Text, func
from sqlalchemy.dialects.postgresql import ENUM
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class OrderStatus(enum.Enum):
{statuses}


ORDER_STATUS = ENUM(OrderStatus, name="order_status", create_type=False)


class Country(Base):
    __tablename__ = "countries"
    code: Mapped[str] = mapped_column(String(2), primary_key=True)
    name: Mapped[str] = mapped_column(String(80))


class Currency(Base):
    __tablename__ = "currencies"
    id: Mapped[int] = mapped_column(primary_key=True)
    code: Mapped[str] = mapped_column(String(3), unique=True)
    name: Mapped[str] = mapped_column(String(80))


class AuditLog(Base):
    __tablename__ = "audit_log"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    table_name: Mapped[str] = mapped_column(Text)
    row_id: Mapped[int] = mapped_column(BigInteger)
    action: Mapped[str] = mapped_column(Text)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
'''


def models_py(schema: Schema) -> str:
    statuses = "\n".join(f'    {s} = "{s}"' for s in ORDER_STATUSES)
    parts = [MODELS_HEADER.replace("{statuses}", statuses)]
    for group in schema.groups:
        parts.extend(_model_class(group, role) for role in group.roles)
    entries = []
    for group in schema.groups:
        pairs = ", ".join(f'"{role}": {group.model(role)}' for role in group.roles)
        entries.append(f"    {{{pairs}}},")
    parts.append("\n\nGROUPS: list[dict[str, type[Base]]] = [\n" + "\n".join(entries) + "\n]\n")
    return "".join(parts)


def _model_class(group: Group, role: str) -> str:
    lines = [
        "",
        "",
        f"class {group.model(role)}(Base):",
        f'    __tablename__ = "{group.table(role)}"',
    ]
    if role == "line":
        lines.append(
            f'    __table_args__ = (CheckConstraint("quantity > 0", name="{group.table(role)}_qty"),)'
        )
    lines.append("    id: Mapped[int] = mapped_column(primary_key=True)")
    lines.extend(_model_column(group, col) for col in ROLE_COLUMNS[role])
    return "\n".join(lines) + "\n"


def _model_column(group: Group, col: Column) -> str:
    args = [col.satype]
    if col.fk:
        ondelete = ', ondelete="CASCADE"' if col.cascade else ""
        args.append(f'ForeignKey("{col.fk.format(g=f"g{group.index:02d}")}"{ondelete})')
    if col.unique:
        args.append("unique=True")
    if col.index:
        args.append("index=True")
    if col.now:
        args.append("server_default=func.now()")
    if col.default:
        args.append(f"default=OrderStatus.{col.default}")
    return f"    {col.name}: Mapped[{col.pytype}] = mapped_column({', '.join(args)})"


# -- migrations --------------------------------------------------------------------------

MIGRATION_HEADER = '''\
"""{message}

Revision ID: {revision}
Revises: {down}
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "{revision}"
down_revision = {down_repr}
branch_labels = None
depends_on = None

ORDER_STATUS = postgresql.ENUM({statuses}, name="order_status", create_type=False)
'''

REFERENCE_BODY = '''

def upgrade() -> None:
    ORDER_STATUS.create(op.get_bind())
    op.create_table(
        "countries",
        sa.Column("code", sa.String(2), primary_key=True),
        sa.Column("name", sa.String(80), nullable=False),
    )
    op.create_table(
        "currencies",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("code", sa.String(3), nullable=False, unique=True),
        sa.Column("name", sa.String(80), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("currencies")
    op.drop_table("countries")
    ORDER_STATUS.drop(op.get_bind())
'''

SEED_BODY = '''
# Stubs of the tables as they are at this revision (not the models, which describe head).
countries = sa.table("countries", sa.column("code", sa.String()), sa.column("name", sa.String()))
currencies = sa.table("currencies", sa.column("code", sa.String()), sa.column("name", sa.String()))

COUNTRIES = {countries!r}
CURRENCIES = {currencies!r}


def upgrade() -> None:
    op.bulk_insert(countries, [{{"code": c, "name": n}} for c, n in COUNTRIES])
    op.bulk_insert(currencies, [{{"code": c, "name": n}} for c, n in CURRENCIES])


def downgrade() -> None:
    op.execute(currencies.delete())
    op.execute(countries.delete())
'''

AUDIT_BODY = '''
AUDITED = {audited!r}

AUDIT_FUNCTION = """
CREATE FUNCTION audit_row() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO audit_log (table_name, row_id, action) VALUES (TG_TABLE_NAME, NEW.id, TG_OP);
    RETURN NEW;
END $$
"""


def upgrade() -> None:
    op.create_table(
        "audit_log",
        sa.Column("id", sa.BigInteger(), primary_key=True),
        sa.Column("table_name", sa.Text(), nullable=False),
        sa.Column("row_id", sa.BigInteger(), nullable=False),
        sa.Column("action", sa.Text(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    )
    op.execute(AUDIT_FUNCTION)
    for table in AUDITED:
        op.execute(
            f"CREATE TRIGGER {{table}}_audit AFTER INSERT OR UPDATE ON {{table}} "
            "FOR EACH ROW EXECUTE FUNCTION audit_row()"
        )


def downgrade() -> None:
    for table in AUDITED:
        op.execute(f"DROP TRIGGER {{table}}_audit ON {{table}}")
    op.execute("DROP FUNCTION audit_row()")
    op.drop_table("audit_log")
'''


def migrations(schema: Schema) -> dict[str, str]:
    """The chain: reference tables and enum, the data migration, one revision per group,
    the audit log and its trigger."""
    steps: list[tuple[str, str, str]] = [
        ("reference_tables", "create reference tables and the order_status enum", REFERENCE_BODY),
        ("seed_reference_data", "seed countries and currencies (data migration)",
         SEED_BODY.format(countries=COUNTRIES, currencies=CURRENCIES)),
    ]
    steps.extend(
        (f"create_group_{g.index:02d}", f"create {', '.join(g.tables)}", _group_body(g))
        for g in schema.groups
    )
    audited = [g.table("order") for g in schema.groups if "order" in g.roles]
    steps.append(("audit_log", "audit log filled by a plpgsql trigger on orders",
                  AUDIT_BODY.format(audited=audited)))
    files: dict[str, str] = {}
    for number, (slug, message, body) in enumerate(steps, start=1):
        revision = f"{number:04d}"
        down = None if number == 1 else f"{number - 1:04d}"
        header = MIGRATION_HEADER.format(
            message=message, revision=revision, down=down or "<base>",
            down_repr="None" if down is None else f'"{down}"',
            statuses=", ".join(f'"{s}"' for s in ORDER_STATUSES),
        )
        files[f"migrations/versions/{revision}_{slug}.py"] = header + body
    return files


def _group_body(group: Group) -> str:
    creates = "".join(_create_table(group, role) for role in group.roles)
    drops = "".join(f'    op.drop_table("{group.table(role)}")\n' for role in reversed(group.roles))
    return f"\n\ndef upgrade() -> None:\n{creates}\n\ndef downgrade() -> None:\n{drops}"


def _create_table(group: Group, role: str) -> str:
    table = group.table(role)
    cols = ['        sa.Column("id", sa.Integer(), primary_key=True),']
    for col in ROLE_COLUMNS[role]:
        cols.append(f"        {_migration_column(group, col)},")
    if role == "line":
        cols.append(f'        sa.CheckConstraint("quantity > 0", name="{table}_qty"),')
    indexes = "".join(
        f'    op.create_index("ix_{table}_{c.name}", "{table}", ["{c.name}"])\n'
        for c in ROLE_COLUMNS[role] if c.index
    )
    return f'    op.create_table(\n        "{table}",\n' + "\n".join(cols) + "\n    )\n" + indexes


def _migration_column(group: Group, col: Column) -> str:
    satype = col.satype if col.satype == "ORDER_STATUS" else "sa." + col.satype
    args = [f'"{col.name}"', satype]
    if col.fk:
        ondelete = ', ondelete="CASCADE"' if col.cascade else ""
        args.append(f'sa.ForeignKey("{col.fk.format(g=f"g{group.index:02d}")}"{ondelete})')
    args.append("nullable=False")
    if col.unique:
        args.append("unique=True")
    if col.now:
        args.append("server_default=sa.func.now()")
    if col.default:
        args.append(f'server_default="{col.default}"')
    return f"sa.Column({', '.join(args)})"


# -- tests -------------------------------------------------------------------------------


def node_ids(schema: Schema, cases: range) -> list[str]:
    """pytest node ids of the tests of these cases (as ``test_modules`` names them)."""
    groups = len(schema.groups)
    return [
        f"tests/test_g{case % groups:02d}.py::test_{SCENARIOS[case % len(SCENARIOS)]}_{case:04d}"
        for case in cases
    ]


def test_modules(schema: Schema, tests: int) -> dict[str, str]:
    """``tests`` tests spread round-robin over the groups, one module per group."""
    per_group: dict[int, list[int]] = {g.index: [] for g in schema.groups}
    for case in range(tests):
        per_group[case % len(schema.groups)].append(case)
    return {
        f"tests/test_g{index:02d}.py": _test_module(schema.groups[index], cases)
        for index, cases in per_group.items()
        if cases
    }


def _test_module(group: Group, cases: list[int]) -> str:
    head = (
        f'"""Generated: {len(cases)} tests writing {", ".join(group.tables)} (and audit_log)."""\n\n'
        "from tests.support import assert_clean, browse, cancel, checkout\n\n"
        f"GROUP = {group.index}\n"
    )
    bodies = []
    for case in cases:
        scenario = SCENARIOS[case % len(SCENARIOS)]
        bodies.append(
            f"\n\nasync def test_{scenario}_{case:04d}(db_session):\n"
            "    await assert_clean(db_session, GROUP)\n"
            f"    await {scenario}(db_session, GROUP, {case})\n"
        )
    return head + "".join(bodies)
