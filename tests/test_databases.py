"""Several databases per app: each its own template, worker databases, reset and fixtures."""

from __future__ import annotations

import textwrap

import pytest

from conftest import Project, render_revision

ANALYTICS_ENV_PY = '''
from alembic import context
from sqlalchemy import create_engine
from sqlalchemy.pool import NullPool

config = context.config
engine = create_engine(config.get_main_option("sqlalchemy.url"), poolclass=NullPool)
with engine.connect() as connection:
    context.configure(connection=connection)
    with context.begin_transaction():
        context.run_migrations()
'''

ANALYTICS_REVISION = """
    op.execute("CREATE TABLE event (id serial PRIMARY KEY, name text NOT NULL UNIQUE)")
    op.execute("INSERT INTO event (name) VALUES ('boot')")
"""

# The app reaches analytics through its own engine, made at import time from the env var.
APP = '''
import os
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

analytics = create_async_engine(os.environ["ANALYTICS_URL"], poolclass=NullPool)
'''

SUITE = '''
import os
from pathlib import Path

import pytest
from sqlalchemy import text

from app import analytics

OUT = Path(__file__).parent / "seen"
OUT.mkdir(exist_ok=True)


async def names(session, query):
    return (await session.execute(text(query))).scalar()


@pytest.mark.parametrize("i", range(4))
async def test_both_databases_start_clean_and_apart(pg_session, pg_analytics_session, pg_analytics_url, i):
    main = await names(pg_session, "select current_database()")
    other = await names(pg_analytics_session, "select current_database()")
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    (OUT / f"{worker}-{i}").write_text(f"{main} {other}")
    assert main != other
    assert other == pg_analytics_url.database == os.environ["ANALYTICS_URL"].rsplit("/", 1)[1]
    # Each has its own schema: its own migrations ran in it, not the other's.
    assert await names(pg_session, "select to_regclass('event') is null")
    assert await names(pg_analytics_session, "select to_regclass('customer') is null")
    assert await names(pg_session, "select count(*) from customer") == 0
    assert await names(pg_analytics_session, "select string_agg(name, ',') from event") == "boot"
    await pg_session.execute(text("insert into customer (name) values ('ann')"))
    await pg_session.commit()
    await pg_analytics_session.execute(text("delete from event"))
    await pg_analytics_session.execute(text("insert into event (name) values ('x')"))
    await pg_analytics_session.commit()


@pytest.mark.parametrize("i", range(3))
async def test_the_app_writes_analytics_through_its_own_engine(i):
    async with analytics.begin() as conn:
        assert (await conn.execute(text("select count(*) from event"))).scalar() == 1
        await conn.execute(text("insert into event (name) values ('by-app')"))


def test_sync_fixtures_of_the_extra_database(pg_analytics_sync_session):
    assert pg_analytics_sync_session.execute(text("select count(*) from event")).scalar() == 1
    pg_analytics_sync_session.execute(text("truncate event"))
    pg_analytics_sync_session.commit()
'''


def add_analytics(project: Project, extra: str = "env=ANALYTICS_URL") -> None:
    root = project.pytester.path / "analytics"
    (root / "migrations" / "versions").mkdir(parents=True)
    (root / "alembic.ini").write_text(
        "[alembic]\nscript_location = %(here)s/migrations\n"
        "sqlalchemy.url = postgresql+psycopg://unused@127.0.0.1/unused\n")
    (root / "migrations" / "env.py").write_text(ANALYTICS_ENV_PY)
    (root / "migrations" / "script.py.mako").write_text("")
    body = render_revision("a001", None, ANALYTICS_REVISION).replace(
        'LOG = Path(os.environ["PGT_MIGRATIONS_LOG"])', 'LOG = Path(os.environ["PGT_MIGRATIONS_LOG"] + ".a")')
    (root / "migrations" / "versions" / "a001_rev.py").write_text(body)
    project.pytester.makeini(textwrap.dedent(f"""
        [pytest]
        pgtemplate_prefix = {project.prefix}
        asyncio_mode = auto
        asyncio_default_fixture_loop_scope = function
        pgtemplate_databases =
            analytics alembic_ini=analytics/alembic.ini {extra}
    """))
    (project.pytester.path / "app.py").write_text(APP)


def test_two_databases_under_xdist_each_built_once_cloned_and_reset(project: Project) -> None:
    add_analytics(project)
    project.pytester.makepyfile(test_inner=SUITE)
    result = project.run("-n", "2")
    result.assert_outcomes(passed=8)
    seen = [p.read_text().split() for p in (project.pytester.path / "seen").iterdir()]
    mains, others = {s[0] for s in seen}, {s[1] for s in seen}
    assert (len(mains), len(others)) == (2, 2)  # one per worker, per database
    assert not mains & others
    assert all(o.endswith("_analytics") for o in others)
    assert project.migrations_run() == 1
    assert (project.pytester.path / "migrations.log.a").read_text().split() == ["a001"]
    # Left: two templates, and a spare per worker for each database.
    assert sorted(n.split("_")[1] for n in project.databases()) == ["s"] * 4 + ["tpl", "tpl"]
    result.stdout.fnmatch_lines([
        f"pgtemplate: template {project.prefix}_tpl_* to be built; built by alembic upgrade heads*",
        f"pgtemplate: template (analytics, reset=truncate) {project.prefix}_tpl_* to be built; "
        "built by alembic upgrade heads (*analytics/alembic.ini)",
    ])
    result.stdout.fnmatch_lines([f"template {project.prefix}_tpl_*: built in *"])
    result.stdout.fnmatch_lines([f"template (analytics) {project.prefix}_tpl_*: built in *"])
    # Single process, warm: nothing migrates again.
    result = project.run("-p", "no:xdist")
    result.assert_outcomes(passed=8)
    result.stdout.fnmatch_lines([f"pgtemplate: template {project.prefix}_tpl_* reused; *",
                                 f"pgtemplate: template (analytics, *) {project.prefix}_tpl_* reused; *"])
    assert project.migrations_run() == 1
    assert len((project.pytester.path / "migrations.log.a").read_text().split()) == 1


def test_an_extra_database_has_its_own_reset_strategy(project: Project) -> None:
    add_analytics(project, extra="reset=clone")
    project.pytester.makepyfile(test_inner='''
        from sqlalchemy import text

        seen = set()


        def test_a(pg_sync_url, pg_analytics_sync_url):
            seen.add(pg_sync_url.database)
            seen.add(pg_analytics_sync_url.database)


        def test_b(pg_sync_url, pg_analytics_sync_url):
            assert pg_sync_url.database in seen           # the worker database, reset
            assert pg_analytics_sync_url.database not in seen   # a fresh clone each test
    ''')
    project.run("-p", "no:xdist").assert_outcomes(passed=2)


def test_a_bad_declaration_names_the_setting(project: Project) -> None:
    add_analytics(project, extra="env=ANALYTICS_URL colour=blue")
    project.pytester.makepyfile(test_inner="def test_x(): pass")
    result = project.run("-p", "no:xdist")
    assert result.ret != 0
    result.stderr.fnmatch_lines([
        "*invalid value*for databases (from pgtemplate_databases)*database 'analytics': 'colour=blue' "
        "is not key=value with a key among alembic_ini, *Set --pgt-databases / PGTEMPLATE_DATABASES "
        "/ pgtemplate_databases*",
    ])


SEEDING_CONFTEST = '''
import psycopg


def pytest_pgtemplate_seed(sync_url, database):
    if database == "default":  # the replica has the same migrations, and no seed
        with psycopg.connect(sync_url.set(drivername="postgresql").render_as_string(False)) as conn:
            conn.execute("INSERT INTO customer (name) VALUES ('seeded')")


def pytest_pgtemplate_worker_url(url, config, database):
    pass  # points the app at the default database only: the replica stays unclaimed
'''


def test_seed_hook_with_env_and_two_databases_of_the_same_migrations(
    project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The env var makes the plugin plan its databases before conftest.py (and its hooks)
    # is loaded; the seed hook must still be used, and only for the database it seeds.
    monkeypatch.setenv("PGTEMPLATE_ENV", "DATABASE_URL")
    project.pytester.makeini(textwrap.dedent(f"""
        [pytest]
        pgtemplate_prefix = {project.prefix}
        pgtemplate_databases = replica alembic_ini=alembic.ini reset=clone
    """))
    project.pytester.makeconftest(SEEDING_CONFTEST)
    project.pytester.makepyfile(test_inner='''
        import pytest
        from sqlalchemy import text

        @pytest.mark.parametrize("i", range(2))
        def test_seeded_default_and_plain_replica(pg_sync_session, pg_replica_sync_session, i):
            count = "select count(*) from customer"
            assert pg_sync_session.execute(text(count)).scalar() == 1
            assert pg_replica_sync_session.execute(text(count)).scalar() == 0
            pg_replica_sync_session.execute(text("insert into customer (name) values ('x')"))
            pg_replica_sync_session.commit()
    ''')
    result = project.run("-p", "no:xdist")
    result.assert_outcomes(passed=2)
    assert "reset=clone cannot reach the app" not in result.stdout.str()  # replica: real clones
    assert len({n for n in project.databases() if "_tpl_" in n}) == 2


def test_a_database_whose_build_fails_leaves_the_others_tests_running(project: Project) -> None:
    add_analytics(project, extra="")
    (project.pytester.path / "analytics" / "migrations" / "versions" / "a001_rev.py").write_text(
        render_revision("a001", None, 'raise RuntimeError("analytics is broken")'))
    project.pytester.makepyfile(test_inner='''
        def test_1_analytics(pg_analytics_url):
            pass

        def test_2_default(pg_sync_url):
            pass

        def test_3_default(pg_sync_url):
            pass
    ''')
    result = project.run("-p", "no:xdist")
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(["*migration failed in revision a001*analytics is broken*"])


def test_each_database_keeps_its_own_templates(project: Project) -> None:
    add_analytics(project, extra="")
    project.pytester.makepyfile(test_inner='''
        def test_both(pg_sync_url, pg_analytics_sync_url):
            pass
    ''')
    args = ("-p", "no:xdist", "--pgt-keep-templates", "1")
    result = project.run(*args)
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["database overhead: * of 1 process(es) x *"])  # 2 databases, 1 process
    # A new default migration: a new default template; the analytics one is kept, not rebuilt.
    project.add_revision("0003", "0002", 'op.execute("CREATE TABLE extra (id int)")')
    project.run(*args).assert_outcomes(passed=1)
    assert (project.pytester.path / "migrations.log.a").read_text().split() == ["a001"]
    assert len([n for n in project.databases() if "_tpl_" in n]) == 2
