"""Alembic env.py variants the migrator must handle."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
import pytest
from sqlalchemy.engine import URL, make_url

from conftest import SERVER_URL, Project

# The Alembic cookbook's connection sharing: use config.attributes["connection"] when a
# caller provides one, else build an engine from the URL.
CONNECTION_ENV_PY = '''
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
    raise AssertionError("the plugin passes a connection; the URL path must not run")


connectable = config.attributes.get("connection", None)
if connectable is None:
    asyncio.run(run_async_migrations())
else:
    do_run_migrations(connectable)
'''

SYNC_ENV_PY = '''
import logging.config
from alembic import context
from sqlalchemy import engine_from_config, pool

config = context.config
logging.config.dictConfig({"version": 1, "disable_existing_loggers": True})

engine = engine_from_config(config.get_section(config.config_ini_section), prefix="sqlalchemy.",
                            poolclass=pool.NullPool)
assert engine.dialect.driver == "psycopg", engine.dialect.driver
with engine.connect() as connection:
    context.configure(connection=connection)
    with context.begin_transaction():
        context.run_migrations()
'''

OWN_DATABASE_ENV_PY = '''
from alembic import context
from sqlalchemy import create_engine, pool

engine = create_engine("postgresql+psycopg://postgres@127.0.0.1:5432/postgres", poolclass=pool.NullPool)
with engine.connect() as connection:
    context.configure(connection=connection, version_table="scratch_pgt_never_written")
    # Migrating "postgres" would be wrong: only pretend to, so nothing is written there.
'''

SUITE = '''
import logging
from sqlalchemy import text

def test_schema(pg_sync_session):
    assert pg_sync_session.execute(text("select count(*) from country")).scalar() == 3

def test_logging_still_works(caplog):
    logging.getLogger("app").warning("hello")
    assert "hello" in caplog.text
'''


@pytest.mark.parametrize("env_py", [CONNECTION_ENV_PY, SYNC_ENV_PY], ids=["connection", "sync"])
def test_env_py_variants_migrate_the_template(project: Project, env_py: str) -> None:
    (project.pytester.path / "migrations" / "env.py").write_text(env_py)
    if env_py is SYNC_ENV_PY:
        project.pytester.makefile(".ini", alembic="[alembic]\nscript_location = migrations\n"
                                  "sqlalchemy.url = postgresql+psycopg://u@127.0.0.1/placeholder\n")
    project.pytester.makepyfile(test_inner=SUITE)
    project.run("-n", "2").assert_outcomes(passed=2)
    assert project.migrations_run() == 1


def test_env_py_that_connects_to_another_database_is_refused(project: Project) -> None:
    (project.pytester.path / "migrations" / "env.py").write_text(OWN_DATABASE_ENV_PY)
    project.pytester.makepyfile(test_inner=SUITE)
    result = project.run("-p", "no:xdist")
    result.assert_outcomes(errors=1)  # the session stops at the first setup failure
    result.stdout.fnmatch_lines([
        "*pytest-pgtemplate: refused a connection to database postgres on 127.0.0.1:5432 while building "
        "the template*so postgres was not touched.*"])
    assert project.databases() == []


# Offline mode: Alembic prints SQL and connects nowhere, so nothing is migrated.
OFFLINE_ENV_PY = """
from alembic import context

context.configure(url="postgresql://nowhere/none", literal_binds=True, as_sql=True)
with context.begin_transaction():
    context.run_migrations()
"""


def test_env_py_that_migrates_nothing_is_caught(project: Project) -> None:
    (project.pytester.path / "migrations" / "env.py").write_text(OFFLINE_ENV_PY)
    project.pytester.makepyfile(test_inner=SUITE)
    result = project.run("-p", "no:xdist")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines([
        "*pytest-pgtemplate: Alembic ran but did not migrate database *_bld_* (no "
        "alembic_version table there): env.py probably connects to a database of its own (and migrated "
        "that one: check it), e.g. a URL your app's settings read at import time. Make env.py use "
        "config.get_main_option('sqlalchemy.url') "
        "or config.attributes[[]'connection'[]], or read the environment variable when env.py runs and "
        "name it in pgtemplate_env (while migrating it points at the database being built).*"
    ])
    assert project.databases() == []


# The URL comes from the app's own settings (an environment variable), not from alembic.ini.
APP_SETTINGS_ENV_PY = '''
import os
from alembic import context
from sqlalchemy import create_engine, pool
from sqlalchemy.engine import make_url

url = make_url(os.environ["APP_DB_URL"]).set(drivername="postgresql+psycopg")
engine = create_engine(url, poolclass=pool.NullPool)
with engine.connect() as connection:
    context.configure(connection=connection)
    with context.begin_transaction():
        context.run_migrations()
    connection.commit()
'''

REVERSIBLE = (
    'op.execute("CREATE TABLE customer (id serial PRIMARY KEY, name text NOT NULL UNIQUE)")',
    'op.execute("DROP TABLE customer")',
)


def use_app_settings_env_py(project: Project) -> None:
    (project.pytester.path / "migrations" / "env.py").write_text(APP_SETTINGS_ENV_PY)
    for path in (project.pytester.path / "migrations" / "versions").iterdir():
        path.unlink()
    project.add_revision("0001", None, *REVERSIBLE)
    project.pytester.makepyfile(test_inner="""
        from sqlalchemy import text

        def test_schema(pg_sync_session):
            assert pg_sync_session.execute(text("select count(*) from customer")).scalar() == 0
    """)


def test_check_downgrade_runs_env_py_that_reads_the_apps_variable_on_the_scratch_database(
    project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_app_settings_env_py(project)
    monkeypatch.setenv("PGTEMPLATE_ENV", "APP_DB_URL")
    project.run("-p", "no:xdist", "--pgt-check-downgrade").assert_outcomes(passed=1)
    assert project.migrations_run() == 3  # check: up, up again; then the template


@contextmanager
def developer_database(project: Project) -> Iterator[URL]:
    """A database of the developer's own (scratch), holding a row that must survive."""
    scratch = f"scratch_{project.prefix}"
    with psycopg.connect(SERVER_URL, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {scratch}")
    url = make_url(SERVER_URL).set(database=scratch)
    try:
        with psycopg.connect(url.render_as_string(False), autocommit=True) as conn:
            conn.execute("CREATE TABLE precious (v text); INSERT INTO precious VALUES ('keep me')")
        yield url
    finally:
        with psycopg.connect(SERVER_URL, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {scratch} WITH (FORCE)")


def tables_of(url: URL) -> list[str]:
    with psycopg.connect(url.render_as_string(False), autocommit=True) as conn:
        assert conn.execute("SELECT v FROM precious").fetchall() == [("keep me",)]
        return [r[0] for r in conn.execute(
            "SELECT relname FROM pg_class WHERE relkind = 'r' AND relnamespace = 'public'::regnamespace "
            "ORDER BY 1").fetchall()]


def test_env_py_reading_a_variable_that_names_the_developers_database_never_migrates_it(
    project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_app_settings_env_py(project)  # env.py: the URL in APP_DB_URL; no pgtemplate_env
    with developer_database(project) as url:
        monkeypatch.setenv("APP_DB_URL", url.render_as_string(False))
        result = project.run("-p", "no:xdist", "--pgt-check-downgrade")
        result.assert_outcomes(passed=1)
        result.stderr.fnmatch_lines(["*env.py reads APP_DB_URL, which names another database: it points "
                                     "at the database being built while migrating. If your app reads "
                                     "APP_DB_URL during the tests too, set pgtemplate_env = APP_DB_URL so "
                                     "they use the worker database."])
        assert tables_of(url) == ["precious"]  # untouched: no alembic_version, no customer


def test_check_downgrade_never_downgrades_a_database_env_py_found_by_itself(project: Project) -> None:
    use_app_settings_env_py(project)
    with developer_database(project) as url:
        env_py = project.pytester.path / "migrations" / "env.py"  # the URL written in env.py itself
        env_py.write_text(env_py.read_text().replace(
            'os.environ["APP_DB_URL"]', repr(url.render_as_string(False))))
        result = project.run("-p", "no:xdist", "--pgt-check-downgrade")
        result.assert_outcomes(errors=1)
        result.stdout.fnmatch_lines([f"*refused a connection to database {url.database} on 127.0.0.1:5432*"])
        # Refused before env.py could upgrade it, let alone downgrade it.
        assert tables_of(url) == ["precious"]
        assert project.migrations_run() == 0
        assert project.databases() == []


def test_alembic_ini_given_by_setting_with_relative_script_location(project: Project) -> None:
    db_dir = project.pytester.path / "db"
    db_dir.mkdir()
    (project.pytester.path / "alembic.ini").rename(db_dir / "alembic.ini")
    (project.pytester.path / "migrations").rename(db_dir / "migrations")
    project.pytester.makepyfile(test_inner=SUITE)
    project.run("-p", "no:xdist", "--pgt-alembic-ini", "db/alembic.ini").assert_outcomes(passed=2)
