"""Every way an app builds its schema and finds its database."""

from __future__ import annotations

import pytest

from conftest import BASE_REVISIONS, ISOLATION_SUITE, Project

MODELS = '''
from pathlib import Path
import os

from sqlalchemy import ForeignKey, String, event
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class Author(Base):
    __tablename__ = "author"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50){extra})


class Book(Base):
    __tablename__ = "book"
    id: Mapped[int] = mapped_column(primary_key=True)
    author_id: Mapped[int] = mapped_column(ForeignKey("author.id"))


@event.listens_for(Base.metadata, "after_create")
def count(target, connection, **kw):
    if type(connection).__name__ == "MockConnection":
        return  # the plugin rendering the DDL for its fingerprint, not creating tables
    with Path(os.environ["PGT_MIGRATIONS_LOG"]).open("a") as f:
        f.write("0001\\n")
'''

METADATA_SUITE = '''
import pytest
from sqlalchemy import text


@pytest.mark.parametrize("i", range(3))
async def test_tables_exist_and_start_empty(pg_session, i):
    assert (await pg_session.execute(text("select count(*) from author"))).scalar() == 0
    await pg_session.execute(text("insert into author (name) values ('a')"))
    await pg_session.commit()
'''


def use_package(project: Project, name: str, **modules: str) -> None:
    package = project.pytester.path / name
    package.mkdir(exist_ok=True)
    (package / "__init__.py").write_text("")
    for module, source in modules.items():
        (package / f"{module}.py").write_text(source)


def set_ini(project: Project, **options: str) -> None:
    lines = [f"pgtemplate_{k} = {v}" for k, v in options.items()]
    project.pytester.makeini("\n".join([
        "[pytest]", f"pgtemplate_prefix = {project.prefix}", "asyncio_mode = auto",
        "asyncio_default_fixture_loop_scope = function", *lines,
    ]))


def test_metadata_create_all_builds_once_and_model_changes_rebuild(project: Project) -> None:
    (project.pytester.path / "alembic.ini").unlink()
    use_package(project, "app", models=MODELS.format(extra=""))
    set_ini(project, metadata="app.models:Base.metadata")
    project.pytester.makepyfile(test_inner=METADATA_SUITE)
    project.run("-n", "2").assert_outcomes(passed=3)
    project.run("-p", "no:xdist").assert_outcomes(passed=3)
    assert project.migrations_run() == 1
    use_package(project, "app", models=MODELS.format(extra=", unique=True"))
    project.run("-p", "no:xdist").assert_outcomes(passed=3)
    assert project.migrations_run() == 2


DB_FUNCS = '''
import os
from pathlib import Path

import psycopg
import asyncpg


async def migrate(url):
    with Path(os.environ["PGT_MIGRATIONS_LOG"]).open("a") as f:
        f.write("0001\\n")
    conn = await asyncpg.connect(url.set(drivername="postgresql").render_as_string(False))
    await conn.execute("CREATE TABLE color (id serial PRIMARY KEY, name text UNIQUE)")
    await conn.close()


def seed(url):
    assert url.drivername == "postgresql+psycopg"
    with psycopg.connect(url.set(drivername="postgresql").render_as_string(False)) as conn:
        conn.execute("INSERT INTO color (name) VALUES ('red'), ('green'){more}")
'''

SEED_SUITE = '''
import pytest
from sqlalchemy import text


@pytest.mark.parametrize("i", range(4))
def test_seed_rows_survive_every_reset(pg_sync_session, i):
    names = pg_sync_session.execute(text("select string_agg(name, ',' order by id) from color")).scalar()
    assert names == "red,green{more_names}"
    pg_sync_session.execute(text("delete from color"))
    pg_sync_session.execute(text("insert into color (name) values ('blue')"))
    pg_sync_session.commit()
'''


def test_callable_migrator_and_seed_hook(project: Project) -> None:
    (project.pytester.path / "alembic.ini").unlink()
    use_package(project, "app", db=DB_FUNCS.format(more=""))
    set_ini(project, migrate="app.db:migrate", seed="app.db:seed")
    project.pytester.makepyfile(test_inner=SEED_SUITE.format(more_names=""))
    project.run("-n", "2").assert_outcomes(passed=4)
    project.run("-p", "no:xdist").assert_outcomes(passed=4)
    assert project.migrations_run() == 1
    # Changing the seed rebuilds the template.
    use_package(project, "app", db=DB_FUNCS.format(more=", ('teal')"))
    project.pytester.makepyfile(test_inner=SEED_SUITE.format(more_names=",teal"))
    project.run("-n", "2").assert_outcomes(passed=4)
    assert project.migrations_run() == 2


SEED_HOOK = '''
import asyncpg


async def pytest_pgtemplate_seed(url, sync_url, config, database):
    assert (url.drivername, sync_url.drivername, database) == (
        "postgresql+asyncpg", "postgresql+psycopg", "default")
    conn = await asyncpg.connect(url.set(drivername="postgresql").render_as_string(False))
    await conn.execute("INSERT INTO color (name) VALUES {rows}")
    await conn.close()
'''


def use_seed_hook(project: Project, rows: str) -> None:
    """The callable migrator's project, seeded by the hook in its conftest instead."""
    (project.pytester.path / "alembic.ini").unlink(missing_ok=True)
    use_package(project, "app", db=DB_FUNCS.format(more=""))
    set_ini(project, migrate="app.db:migrate")
    project.pytester.makeconftest(SEED_HOOK.format(rows=rows))
    project.pytester.makepyfile(test_inner=SEED_SUITE.format(more_names=""))


def test_seed_hook_rows_survive_resets_and_editing_the_hook_rebuilds(project: Project) -> None:
    use_seed_hook(project, "('red'), ('green')")
    result = project.run("-n", "2")
    result.assert_outcomes(passed=4)
    result.stdout.fnmatch_lines(["*built by app.db:migrate(url), then seed pytest_pgtemplate_seed(conftest)"])
    project.run("-p", "no:xdist").assert_outcomes(passed=4)
    assert project.migrations_run() == 1
    # Editing the hook's module (the hook, or data it reads from there) rebuilds the template.
    project.pytester.makeconftest(SEED_HOOK.format(rows="('red'), ('green'), ('teal')"))
    project.pytester.makepyfile(test_inner=SEED_SUITE.format(more_names=",teal"))
    project.run("-n", "2").assert_outcomes(passed=4)
    assert project.migrations_run() == 2


def test_a_failing_seed_hook_is_reported_once_and_nothing_is_published(project: Project) -> None:
    use_seed_hook(project, "('red'), ('red')")
    result = project.run("-n", "2")
    assert result.ret != 0
    # In the errors section (the short summary repeats each, as wide as the terminal allows):
    full = [line for line in result.outlines if line.startswith(
        "pytest-pgtemplate: pytest_pgtemplate_seed(conftest) failed while building the template: "
        "UniqueViolationError: duplicate key value")]
    pointers = [line for line in result.outlines if line.startswith(
        "pytest-pgtemplate: the template could not be built; the process of this run that tried first "
        "reported why")]
    assert (len(full), len(pointers)) == (1, 1), result.outlines
    assert not [n for n in project.databases() if "_tpl_" in n]


def test_the_header_survives_user_code_that_raises(project: Project) -> None:
    (project.pytester.path / "alembic.ini").unlink()
    use_package(project, "app", models="""
from sqlalchemy import Column, Integer, MetaData, Table
from sqlalchemy.types import NullType

metadata = MetaData()
Table("thing", metadata, Column("id", Integer, primary_key=True), Column("x", NullType()))
""")
    set_ini(project, metadata="app.models:metadata")
    project.pytester.makepyfile(test_db="def test_db(pg_url):\n    pass\n\ndef test_plain():\n    pass\n")
    result = project.run("-p", "no:xdist")
    result.stdout.fnmatch_lines(["pgtemplate: template not checked (cannot render the DDL of "
                                 "app.models:metadata for PostgreSQL (CompileError: *"])
    result.assert_outcomes(errors=1)  # no INTERNALERROR; the session stops: no database can be built
    result.stdout.fnmatch_lines(["pytest-pgtemplate: cannot render the DDL of app.models:metadata for "
                                 "PostgreSQL (CompileError: *); fix the models, or build the template "
                                 "another way than --pgt-metadata / *"])


def test_bad_import_paths_name_the_setting(project: Project) -> None:
    (project.pytester.path / "alembic.ini").unlink()
    set_ini(project, metadata="app.nowhere:Base.metadata")
    project.pytester.makepyfile(test_db="def test_db(pg_url):\n    pass\n")
    result = project.run("-p", "no:xdist")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines([
        "*pytest-pgtemplate: cannot import module 'app.nowhere' (from --pgt-metadata / "
        "PGTEMPLATE_METADATA / pgtemplate_metadata): ModuleNotFoundError: No module named 'app'. "
        "Fix the import path, or make the module importable*"
    ])
    use_package(project, "app", db="x = 1\n")
    set_ini(project, migrate="app.db:missing")
    result = project.run("-p", "no:xdist")
    result.stdout.fnmatch_lines([
        "*pytest-pgtemplate: 'app.db' has no attribute 'missing' (from --pgt-migrate / "
        "PGTEMPLATE_MIGRATE / pgtemplate_migrate); fix the import path.*"
    ])


APP_ENGINE = '''
import os
from sqlalchemy import create_engine

engine = create_engine(os.environ["DATABASE_URL"])   # at import time, like many apps
'''

APP_SETTINGS = '''
DB_NAME = "the developer's own database"
'''

CONFTEST = '''
import pytest
from sqlalchemy import text

import app.settings
from app.engine import engine   # the conftest imports the app: the engine is built right here


def pytest_pgtemplate_worker_url(url, config):
    app.settings.DB_NAME = url.database


@pytest.fixture(scope="session")
def app_ready():
    # Session fixtures of apps often connect at once (create_all, a health check...):
    # the worker database must exist already.
    with engine.connect() as conn:
        return conn.execute(text("select count(*) from country")).scalar()
'''

ENV_SUITE = '''
import os
from pathlib import Path

import pytest
from sqlalchemy import text

from app.engine import engine
import app.settings

OUT = Path(__file__).parent / "seen"
OUT.mkdir(exist_ok=True)


@pytest.mark.parametrize("i", range(4))
def test_app_engine_uses_the_worker_database(app_ready, i):
    assert app_ready == 3
    with engine.begin() as conn:
        db = conn.execute(text("select current_database()")).scalar()
        assert conn.execute(text("select count(*) from customer")).scalar() == 0
        conn.execute(text("insert into customer (name) values ('via the app')"))
    assert app.settings.DB_NAME == db
    (OUT / os.environ.get("PYTEST_XDIST_WORKER", "main")).write_text(db)
'''


def test_env_var_and_hook_point_the_app_at_each_workers_database(
    project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_package(project, "app", engine=APP_ENGINE, settings=APP_SETTINGS)
    project.pytester.makeconftest(CONFTEST)
    set_ini(project, env="DATABASE_URL")
    project.pytester.makepyfile(test_env=ENV_SUITE)
    monkeypatch.setenv("DATABASE_URL", "postgresql+psycopg://dev@db.example/dev")  # scheme is kept
    project.run("-n", "2").assert_outcomes(passed=4)
    seen = {p.read_text() for p in (project.pytester.path / "seen").iterdir()}
    assert len(seen) == 2
    assert all(name.startswith(f"{project.prefix}_w_") for name in seen)
    project.run("-p", "no:xdist").assert_outcomes(passed=4)


def test_env_setting_names_the_url_scheme_when_the_variable_is_unset(
    project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)  # a clean CI machine
    use_package(project, "app", engine=APP_ENGINE, settings=APP_SETTINGS)
    project.pytester.makeconftest(CONFTEST)
    set_ini(project, env="DATABASE_URL=postgresql+psycopg")  # the app's engine is a sync one
    project.pytester.makepyfile(test_env=ENV_SUITE)
    project.run("-n", "2").assert_outcomes(passed=4)


def test_clone_reset_of_an_app_integrated_database_falls_back_to_truncate_with_a_warning(
    project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql+psycopg://dev@db.example/dev")
    use_package(project, "app", engine=APP_ENGINE, settings=APP_SETTINGS)
    project.pytester.makeconftest(CONFTEST)
    set_ini(project, env="DATABASE_URL", reset="clone")
    project.pytester.makepyfile(test_env=ENV_SUITE)  # each test: the app sees 0 rows, adds one
    result = project.run("-p", "no:xdist")
    result.assert_outcomes(passed=4)
    assert result.stdout.str().count("reset=clone cannot reach the app for database 'default'") == 1
    result.stdout.fnmatch_lines(["*through the environment variable DATABASE_URL, fixed when it started*"])


HEADS = {
    "0003": ('op.execute("CREATE TABLE branch_a (id int)")', "0002"),
    "0004": ('op.execute("CREATE TABLE branch_b (id int)")', "0002"),
}


def test_alembic_with_two_heads_upgrades_both(project: Project) -> None:
    for rev, (body, down) in HEADS.items():
        project.add_revision(rev, down, body)
    project.pytester.makepyfile(test_heads='''
from sqlalchemy import text

def test_both_branches(pg_sync_session):
    assert pg_sync_session.execute(text("select count(*) from branch_a, branch_b")).scalar() == 0
''')
    project.run("-p", "no:xdist").assert_outcomes(passed=1)


def test_extensions_created_by_migrations_work_in_clones(project: Project) -> None:
    project.add_revision("0003", "0002", """
    op.execute("CREATE EXTENSION IF NOT EXISTS citext")
    op.execute("CREATE TABLE tag (name citext PRIMARY KEY)")
    """)
    project.pytester.makepyfile(test_ext='''
import pytest
from sqlalchemy import text

@pytest.mark.parametrize("i", range(2))
def test_citext(pg_sync_session, i):
    pg_sync_session.execute(text("insert into tag values ('Hello')"))
    assert pg_sync_session.execute(text("select count(*) from tag where name = 'HELLO'")).scalar() == 1
    pg_sync_session.commit()
''', test_inner=ISOLATION_SUITE)
    project.run("-n", "2").assert_outcomes(passed=13)


def test_x_arguments_reach_env_py(project: Project) -> None:
    env_py = project.pytester.path / "migrations" / "env.py"
    env_py.write_text(env_py.read_text().replace(
        "config = context.config",
        "config = context.config\nassert context.get_x_argument(as_dictionary=True) == "
        "{'tenant': 'acme', 'mode': 'test'}"))
    project.pytester.makepyfile(test_inner=ISOLATION_SUITE)
    project.run("-p", "no:xdist", "--pgt-alembic-x", "tenant=acme, mode=test").assert_outcomes(passed=11)


def add_revisions_with_a_leftover_in_their_downgrade(project: Project) -> None:
    project.add_revision("0001", None, BASE_REVISIONS[0][1], """
        op.execute("DROP TABLE orders")
        op.execute("DROP TYPE status")
        op.execute("DROP TABLE customer")""")
    project.add_revision("0002", "0001", BASE_REVISIONS[1][1], """
        op.execute("DROP SCHEMA billing CASCADE")
        op.execute("ALTER TABLE customer DROP COLUMN country")
        op.execute("DROP TABLE country")""")
    # 0003's downgrade leaves a column behind that no upgrade creates.
    project.add_revision("0003", "0002", 'op.execute("CREATE TABLE IF NOT EXISTS note (id int)")',
                         'op.execute("ALTER TABLE note ADD COLUMN leftover int")')


def test_check_downgrade_also_runs_when_a_seed_follows_the_migrations(project: Project) -> None:
    project.pytester.makepyfile(test_inner=ISOLATION_SUITE)
    project.pytester.makeconftest("def pytest_pgtemplate_seed(sync_url):\n    pass\n")
    add_revisions_with_a_leftover_in_their_downgrade(project)
    result = project.run("-p", "no:xdist", "--pgt-check-downgrade")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["  + column public.note.leftover integer"])


def test_check_downgrade_catches_a_broken_downgrade_once_per_fingerprint(project: Project) -> None:
    project.pytester.makepyfile(test_inner=ISOLATION_SUITE)
    add_revisions_with_a_leftover_in_their_downgrade(project)
    result = project.run("-p", "no:xdist", "--pgt-check-downgrade")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines([
        "*pytest-pgtemplate: --pgt-check-downgrade: after downgrade base and upgrade heads the schema "
        "differs from a plain upgrade (- only before, + only after):",
        "  + column public.note.leftover integer",
        "Fix the downgrade() of the revisions that create or change these objects.*",
    ])
    assert project.databases() == []  # neither the scratch database nor a template is left
    # A downgrade that raises is named by revision.
    path = project.pytester.path / "migrations" / "versions" / "0003_rev.py"
    path.write_text(path.read_text().replace(
        'op.execute("ALTER TABLE note ADD COLUMN leftover int")', "raise ValueError('cannot go back')"))
    result = project.run("-p", "no:xdist", "--pgt-check-downgrade")
    result.stdout.fnmatch_lines([
        "*pytest-pgtemplate: --pgt-check-downgrade: migration failed in revision 0003 "
        "(migrations/versions/0003_rev.py, line *): ValueError: cannot go back*",
    ])
    # Fixed: the check passes, and is not repeated while the fingerprint holds.
    path.write_text(path.read_text().replace(
        "raise ValueError('cannot go back')", 'op.execute("DROP TABLE note")'))
    before = project.log.read_text().count("0003")
    project.run("-p", "no:xdist", "--pgt-check-downgrade").assert_outcomes(passed=11)
    assert project.log.read_text().count("0003") == before + 3  # check: up, up again; then template
    project.run("-p", "no:xdist", "--pgt-check-downgrade").assert_outcomes(passed=11)
    assert project.log.read_text().count("0003") == before + 3
