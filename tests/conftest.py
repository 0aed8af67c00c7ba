"""Shared helpers: a real PostgreSQL server, and throwaway Alembic projects for pytester runs."""

from __future__ import annotations

import os
import textwrap
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from sqlalchemy.engine import make_url

SERVER_URL = os.environ.get("PGTEMPLATE_TEST_URL", "postgresql://postgres@127.0.0.1:5432/postgres")

ENV_PY = '''
import asyncio
from alembic import context
from sqlalchemy.ext.asyncio import async_engine_from_config
from sqlalchemy.pool import NullPool

config = context.config


def do_run_migrations(connection):
    context.configure(connection=connection)
    with context.begin_transaction():
        context.run_migrations()


async def run_async_migrations():
    engine = async_engine_from_config(
        config.get_section(config.config_ini_section), prefix="sqlalchemy.", poolclass=NullPool
    )
    async with engine.connect() as connection:
        await connection.run_sync(do_run_migrations)
    await engine.dispose()


asyncio.run(run_async_migrations())
'''

# Every revision appends its id to migrations.log: the outer test counts migrator runs.
REVISION = '''
import os
from pathlib import Path
from alembic import op

revision = {rev!r}
down_revision = {down!r}
LOG = Path(os.environ["PGT_MIGRATIONS_LOG"])


def upgrade():
    with LOG.open("a") as f:
        f.write(revision + "\\n")
{body}


def downgrade():
{down_body}
'''

BASE_REVISIONS = [
    ("0001", """
    op.execute("CREATE TABLE customer (id serial PRIMARY KEY, name text NOT NULL UNIQUE)")
    op.execute("CREATE TYPE status AS ENUM ('new', 'paid')")
    op.execute("CREATE TABLE orders (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, "
               "customer_id int NOT NULL REFERENCES customer(id), status status NOT NULL DEFAULT 'new')")
    """),
    ("0002", """
    op.execute("CREATE TABLE country (code text PRIMARY KEY, name text NOT NULL)")
    op.execute("INSERT INTO country VALUES ('fr', 'France'), ('de', 'Germany'), ('it', 'Italy')")
    op.execute("ALTER TABLE customer ADD COLUMN country text REFERENCES country(code)")
    op.execute("CREATE SCHEMA billing")
    op.execute("CREATE TABLE billing.invoice (id serial PRIMARY KEY, "
               "order_id bigint REFERENCES orders(id) ON DELETE CASCADE, total numeric NOT NULL)")
    """),
]


def render_revision(rev: str, down: str | None, body: str, down_body: str = "pass") -> str:
    def block(code: str) -> str:
        return textwrap.indent(textwrap.dedent(code).strip("\n"), "    ")

    return REVISION.format(rev=rev, down=down, body=block(body), down_body=block(down_body))


# Each test starts by asserting the template's exact state, then dirties every kind
# of thing a reset must undo: rows in 3 tables and 2 schemas, template rows updated
# and deleted, identity/serial sequences advanced.
ISOLATION_SUITE = '''
import os
from pathlib import Path

import pytest
from sqlalchemy import text

OUT = Path(__file__).parent / "seen"
OUT.mkdir(exist_ok=True)
REFERENCE = "de:Germany,fr:France,it:Italy"


async def state(session):
    query = ("select (select count(*) from customer), (select count(*) from orders), "
             "(select count(*) from billing.invoice), "
             "(select string_agg(code || ':' || name, ',' order by code) from country)")
    return tuple((await session.execute(text(query))).one())


@pytest.mark.parametrize("i", range(6))
async def test_async_writes_are_undone(pg_session, i):
    db = (await pg_session.execute(text("select current_database()"))).scalar()
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    (OUT / f"{worker}-{i}").write_text(db)
    assert await state(pg_session) == (0, 0, 0, REFERENCE)
    cid = (await pg_session.execute(text(
        "insert into customer (name, country) values ('ann', 'fr') returning id"))).scalar()
    oid = (await pg_session.execute(text(
        "insert into orders (customer_id) values (:c) returning id"), {"c": cid})).scalar()
    iid = (await pg_session.execute(text(
        "insert into billing.invoice (order_id, total) values (:o, 9) returning id"), {"o": oid})).scalar()
    assert (cid, oid, iid) == (1, 1, 1)
    await pg_session.execute(text("update country set name = 'X' where code = 'de'"))
    await pg_session.execute(text("delete from country where code = 'it'"))
    await pg_session.commit()


@pytest.mark.parametrize("i", range(4))
def test_sync_writes_are_undone(pg_sync_session, i):
    row = pg_sync_session.execute(text(
        "select (select count(*) from customer), "
        "(select string_agg(code || ':' || name, ',' order by code) from country)")).one()
    assert tuple(row) == (0, REFERENCE)
    cid = pg_sync_session.execute(text(
        "insert into customer (name) values ('bob') returning id")).scalar()
    assert cid == 1
    pg_sync_session.execute(text("truncate country cascade"))
    pg_sync_session.commit()


def test_without_database():
    pass
'''


@dataclass
class Project:
    """A pytester directory with an Alembic project and a unique database name prefix."""

    pytester: pytest.Pytester
    prefix: str

    @property
    def log(self) -> Path:
        return self.pytester.path / "migrations.log"

    def migrations_run(self) -> int:
        if not self.log.exists():
            return 0
        return self.log.read_text().count("0001")

    def add_revision(self, rev: str, down: str | None, body: str, down_body: str = "pass") -> None:
        path = self.pytester.path / "migrations" / "versions" / f"{rev}_rev.py"
        path.write_text(render_revision(rev, down, body, down_body))

    def run(self, *args: str) -> pytest.RunResult:
        return self.pytester.runpytest_subprocess("-p", "no:cacheprovider", *args)

    def databases(self) -> list[str]:
        return databases_like(self.prefix)


def databases_like(prefix: str) -> list[str]:
    with psycopg.connect(SERVER_URL, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT datname FROM pg_database WHERE datname LIKE %s ORDER BY 1", (prefix + "\\_%",)
        ).fetchall()
    return [r[0] for r in rows]


def drop_marked(prefix: str) -> None:
    """Drop what the plugin created under ``prefix`` (marked), and scratch leftovers."""
    with psycopg.connect(SERVER_URL, autocommit=True) as conn:
        templates = {r[0] for r in conn.execute("SELECT datname FROM pg_database WHERE datistemplate")}
        for name in databases_like(prefix):
            try:
                if name in templates:  # (an invalid database, left by an interrupted drop, is none)
                    conn.execute(psycopg.sql.SQL("ALTER DATABASE {} WITH IS_TEMPLATE false").format(
                        psycopg.sql.Identifier(name)))
                conn.execute(psycopg.sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                    psycopg.sql.Identifier(name)))
            except psycopg.errors.InvalidCatalogName:
                pass  # dropped meanwhile: another run's sweep took a dead run's database


@contextmanager
def scratch_role(project: Project, attributes: str) -> Iterator[str]:
    """A role of its own (``attributes``: e.g. "LOGIN CREATEDB"); yields its server URL.
    Afterwards the project's databases (which it may own) and the role are dropped."""
    role = f"scratch_{project.prefix}_role"
    with psycopg.connect(SERVER_URL, autocommit=True) as conn:
        conn.execute(psycopg.sql.SQL("CREATE ROLE {} " + attributes).format(  # type: ignore[arg-type]
            psycopg.sql.Identifier(role)))
    try:
        yield make_url(SERVER_URL).set(username=role).render_as_string(hide_password=False)
    finally:
        try:
            drop_marked(project.prefix)
        finally:
            with psycopg.connect(SERVER_URL, autocommit=True) as conn:
                conn.execute(psycopg.sql.SQL("DROP OWNED BY {}; DROP ROLE {}").format(
                    psycopg.sql.Identifier(role), psycopg.sql.Identifier(role)))


@pytest.fixture
def project(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> Iterator[Project]:
    prefix = "t" + uuid.uuid4().hex[:8]
    for key in list(os.environ):
        if key.startswith("PGTEMPLATE_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("PGTEMPLATE_URL", SERVER_URL)
    # Revisions append to this file: the outer test counts migrator runs.  It lives
    # outside the revision files so two copies of a project share a fingerprint.
    monkeypatch.setenv("PGT_MIGRATIONS_LOG", str(pytester.path / "migrations.log"))
    pytester.makefile(".ini", alembic="[alembic]\nscript_location = migrations\n"
                      "sqlalchemy.url = postgresql+asyncpg://unused@127.0.0.1/unused\n")
    pytester.makeini(f"""
        [pytest]
        pgtemplate_prefix = {prefix}
        asyncio_mode = auto
        asyncio_default_fixture_loop_scope = function
    """)
    versions = pytester.path / "migrations" / "versions"
    versions.mkdir(parents=True)
    (pytester.path / "migrations" / "env.py").write_text(ENV_PY)
    (pytester.path / "migrations" / "script.py.mako").write_text("")
    proj = Project(pytester, prefix)
    down = None
    for rev, body in BASE_REVISIONS:
        proj.add_revision(rev, down, body)
        down = rev
    yield proj
    drop_marked(prefix)
