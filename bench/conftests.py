"""The conftest.py of each contender: what a user of that approach would write.

Every conftest provides ``db_session`` (an AsyncSession on a migrated database) to the same
generated tests.  The server and the database name prefix come from the environment
(``BENCH_SERVER_URL``, ``BENCH_DB_PREFIX``), set by the runner.
"""

from __future__ import annotations

COMMON = '''\
"""Contender: {title}.  Written by pytest-pgtemplate's bench/."""

import os
import uuid
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest
from alembic import command
from alembic.config import Config
from psycopg import sql
from sqlalchemy import insert, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

from app.models import Base, Country, Currency
from app.reference import COUNTRIES, CURRENCIES

SERVER = make_url(os.environ["BENCH_SERVER_URL"])
PREFIX = os.environ["BENCH_DB_PREFIX"]


def admin(statement: sql.Composable) -> None:
    """One statement on the maintenance database, outside a transaction."""
    dsn = SERVER.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(statement)


def drop_database(name: str) -> None:
    admin(sql.SQL("DROP DATABASE IF EXISTS {{}} WITH (FORCE)").format(sql.Identifier(name)))


def create_database(name: str) -> URL:
    drop_database(name)
    admin(sql.SQL("CREATE DATABASE {{}}").format(sql.Identifier(name)))
    return SERVER.set(drivername="postgresql+asyncpg", database=name)


def migrate(url: URL) -> None:
    """alembic upgrade head, in a thread of its own: env.py calls asyncio.run()."""
    config = Config(os.path.join(os.path.dirname(__file__), "alembic.ini"))
    rendered = url.render_as_string(hide_password=False)
    config.set_main_option("sqlalchemy.url", rendered.replace("%", "%%"))
    with ThreadPoolExecutor(1) as pool:
        pool.submit(command.upgrade, config, "head").result()
'''

SESSION_DATABASE = '''

@pytest.fixture(scope="session")
def database_url():
    """One database, migrated once for the whole session."""
    name = PREFIX + "_{suffix}"
    url = create_database(name)
    migrate(url)
    yield url
    drop_database(name)


@pytest.fixture(scope="session")
async def engine(database_url):
    engine = create_async_engine(database_url)
    yield engine
    await engine.dispose()
'''

CLASSIC = '''
TRUNCATE_ALL = text(
    "TRUNCATE " + ", ".join(t.name for t in Base.metadata.sorted_tables) + " RESTART IDENTITY CASCADE"
)


@pytest.fixture
async def db_session(engine):
    """Commit freely; afterwards every table is emptied and the reference rows put back."""
    async with AsyncSession(engine, expire_on_commit=False) as session:
        yield session
    async with engine.begin() as conn:
        await conn.execute(TRUNCATE_ALL)
        await conn.execute(insert(Country), [{"code": c, "name": n} for c, n in COUNTRIES])
        await conn.execute(insert(Currency), [{"code": c, "name": n} for c, n in CURRENCIES])
'''

ROLLBACK = '''

@pytest.fixture
async def db_session(engine):
    """SQLAlchemy's "joining a session into an external transaction" recipe."""
    async with engine.connect() as conn:
        outer = await conn.begin()
        session = AsyncSession(bind=conn, join_transaction_mode="create_savepoint",
                               expire_on_commit=False)
        try:
            yield session
        finally:
            await session.close()
            await outer.rollback()
'''

PYTEST_POSTGRESQL = '''
from pytest_postgresql import factories


def load_schema(host, port, user, dbname, password=None, **_options):
    """pytest-postgresql's load hook: runs once, into the template it clones for each test."""
    migrate(URL.create("postgresql+asyncpg", username=user, password=password, host=host,
                       port=int(port), database=dbname))


postgresql_server = factories.postgresql_noproc(
    host=SERVER.host, port=SERVER.port or 5432, user=SERVER.username, password=SERVER.password,
    dbname=PREFIX + "_ppg", load=[load_schema],
)
postgresql_db = factories.postgresql("postgresql_server")


@pytest.fixture
async def db_session(postgresql_db):
    info = postgresql_db.info
    url = URL.create("postgresql+asyncpg", username=info.user, password=info.password or None,
                     host=info.host, port=info.port, database=info.dbname)
    engine = create_async_engine(url)
    try:
        async with AsyncSession(engine, expire_on_commit=False) as session:
            yield session
    finally:
        await engine.dispose()
'''

MIGRATE_PER_TEST = '''

@pytest.fixture
def database_url():
    """A new database per test, migrated from scratch, dropped afterwards."""
    name = f"{PREFIX}_mpt_{uuid.uuid4().hex[:12]}"
    url = create_database(name)
    try:
        migrate(url)
        yield url
    finally:
        drop_database(name)


@pytest.fixture
async def db_session(database_url):
    engine = create_async_engine(database_url)
    try:
        async with AsyncSession(engine, expire_on_commit=False) as session:
            yield session
    finally:
        await engine.dispose()
'''

OURS = '''\
"""Contender: pytest-pgtemplate.  Its fixtures do all the work; the suite's fixture is an alias."""

import pytest


@pytest.fixture
def db_session(pg_session):
    return pg_session
'''


def conftest(kind: str) -> str:
    """The conftest.py text of one contender kind."""
    if kind == "ours":
        return OURS
    parts = {
        "classic": ("session database, TRUNCATE all tables after each test",
                    SESSION_DATABASE.format(suffix="classic") + CLASSIC),
        "rollback": ("session database, SQLAlchemy external-transaction rollback",
                     SESSION_DATABASE.format(suffix="rollback") + ROLLBACK),
        "pytest-postgresql": ("pytest-postgresql, noproc server, template clone per test",
                              PYTEST_POSTGRESQL),
        "migrate-per-test": ("a new database migrated for every test", MIGRATE_PER_TEST),
    }
    title, body = parts[kind]
    return COMMON.format(title=title) + body
