"""Apps whose env.py takes the database from the app's own settings object: the build only
ever writes to the database being built, and the settings can be fed by parts."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from sqlalchemy.engine import URL

from conftest import Project
from test_alembic import REVERSIBLE, SYNC_ENV_PY, developer_database, tables_of

# The app's settings: separate parts, read once at import time (pydantic-settings style),
# with a password that must be a string.
APP_SETTINGS = '''
import os


class Settings:
    def __init__(self):
        self.host = os.environ.get("APP_DB_HOST", "127.0.0.1")
        self.port = int(os.environ.get("APP_DB_PORT", "5432"))
        self.user = os.environ.get("APP_DB_USER", "postgres")
        self.password = os.environ["APP_DB_PASSWORD"]
        self.name = os.environ["APP_DB_NAME"]

    @property
    def url(self):
        return f"postgresql+psycopg://{self.user}:{self.password}@{self.host}:{self.port}/{self.name}"


settings = Settings()
'''

SETTINGS_ENV_PY = '''
from alembic import context
from sqlalchemy import create_engine, pool

from app_settings import settings

engine = create_engine(settings.url, poolclass=pool.NullPool)
with engine.connect() as connection:
    context.configure(connection=connection)
    with context.begin_transaction():
        context.run_migrations()
    connection.commit()
'''

SUITE = '''
import os
from pathlib import Path

from sqlalchemy import create_engine, text

import app_settings


def test_the_app_uses_the_worker_database():
    engine = create_engine(app_settings.settings.url)
    with engine.begin() as conn:
        assert conn.execute(text("select count(*) from customer")).scalar() == 0
        conn.execute(text("insert into customer (name) values ('x')"))
        name = conn.execute(text("select current_database()")).scalar()
    engine.dispose()
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    (Path(__file__).parent / f"seen-{worker}").write_text(name)


def test_again(pg_sync_session):
    assert pg_sync_session.execute(text("select count(*) from customer")).scalar() == 0
'''


@contextmanager
def app_on_developer_database(project: Project, monkeypatch: pytest.MonkeyPatch) -> Iterator[URL]:
    """The app's settings name the developer's own database, as their shell would."""
    with developer_database(project) as url:
        monkeypatch.setenv("APP_DB_NAME", str(url.database))
        monkeypatch.setenv("APP_DB_PASSWORD", "")
        yield url


def settings_project(project: Project) -> None:
    path = project.pytester.path
    (path / "migrations" / "env.py").write_text(SETTINGS_ENV_PY)
    for revision in (path / "migrations" / "versions").iterdir():
        revision.unlink()
    project.add_revision("0001", None, *REVERSIBLE)
    (path / "app_settings.py").write_text(APP_SETTINGS)
    project.pytester.makeconftest("import app_settings  # the app, imported at the top\n")
    project.pytester.makepyfile(test_inner=SUITE)


def test_a_build_never_connects_to_the_database_the_apps_settings_name(
    project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings_project(project)
    with app_on_developer_database(project, monkeypatch) as url:
        result = project.run("-p", "no:xdist", "-k", "test_again")  # the plugin's fixture
        result.assert_outcomes(errors=1)
        result.stdout.fnmatch_lines([
            f"*pytest-pgtemplate: refused a connection to database {url.database} on 127.0.0.1:5432 "
            "while building the template: building with alembic upgrade heads (*) may only write to "
            f"the database being built ({project.prefix}_bld_*), so {url.database} was not touched. "
            "The URL came from somewhere the plugin does not set, e.g. your app's settings object*"
            "name the variables your settings read in pgtemplate_env*"])
        assert tables_of(url) == ["precious"]  # no alembic_version, no customer
    assert project.migrations_run() == 0
    assert project.databases() == []


@pytest.mark.parametrize("xdist", [["-n", "2"], ["-p", "no:xdist"]], ids=["n2", "single"])
def test_settings_parts_from_pgtemplate_env_point_the_app_and_its_env_py_at_our_databases(
    project: Project, monkeypatch: pytest.MonkeyPatch, xdist: list[str]
) -> None:
    settings_project(project)
    # Multi-line, as in an ini file; the password is '' under trust auth.
    monkeypatch.setenv("PGTEMPLATE_ENV", "APP_DB_HOST={host}, APP_DB_PORT={port}\n"
                       "APP_DB_USER={user},APP_DB_PASSWORD={password}, APP_DB_NAME={database}")
    with developer_database(project) as url:
        monkeypatch.setenv("APP_DB_NAME", str(url.database))
        monkeypatch.setenv("APP_DB_PASSWORD", "secret-of-the-developer")
        result = project.run(*xdist)
        result.assert_outcomes(passed=2)
        # env.py read the settings cached with the worker database: sent to the one being built.
        result.stderr.fnmatch_lines([
            f"*while building, connections to {project.prefix}_w_* (this process's worker database, which "
            "the app's settings name) were sent to the database being built, as intended"])
        assert tables_of(url) == ["precious"]
    seen = [p.read_text() for p in project.pytester.path.glob("seen-*")]
    assert seen
    assert all(name.startswith(f"{project.prefix}_w_") for name in seen)
    assert project.migrations_run() == 1


def test_a_bad_env_template_names_the_setting_and_the_fields(project: Project) -> None:
    project.pytester.makepyfile(test_inner="def test_x(): pass")
    result = project.run("-p", "no:xdist", "--pgt-env", "APP_DB_NAME={name}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([
        "*invalid value 'APP_DB_NAME={name}' for env (from --pgt-env): APP_DB_NAME={name}: unknown field "
        "{name}; use {host}, {port}, {user}, {password}, {database}. Set --pgt-env / PGTEMPLATE_ENV / "
        "pgtemplate_env to a valid value."])


APP_ENGINE_CONFTEST = '''
import app_settings
from sqlalchemy import create_engine

engine = create_engine(app_settings.settings.url)  # the app's engine, made at import time
'''

HOOK_TOO_LATE = APP_ENGINE_CONFTEST + '''

def pytest_pgtemplate_worker_url(url, config, database):
    s = app_settings.settings
    s.host, s.port, s.name, s.user, s.password = url.host, url.port, url.database, url.username, ""
'''

# Two tests that use the plugin's fixture and, through the app's engine, another database.
APP_ENGINE_SUITE = '''
from sqlalchemy import text

from conftest import engine


def test_one(pg_sync_session):
    with engine.begin() as conn:
        conn.execute(text("{statement}"))


def test_two(pg_sync_session):
    with engine.begin() as conn:
        conn.execute(text("{statement}"))
'''


def test_tests_never_reach_a_database_the_plugin_did_not_create(
    project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings_project(project)
    project.pytester.makeconftest(HOOK_TOO_LATE)
    project.pytester.makepyfile(test_inner=APP_ENGINE_SUITE.format(statement="delete from precious"))
    with app_on_developer_database(project, monkeypatch) as url:
        result = project.run("-p", "no:xdist")
        result.assert_outcomes(failed=2)
        result.stdout.fnmatch_lines([
            f"*pytest-pgtemplate: refused a connection to database {url.database} on 127.0.0.1:5432 from "
            f"a test: this run's tests use its own databases ({project.prefix}_w_* here), and "
            f"{url.database} was not created by pytest-pgtemplate, so it was not touched.*"
            "Name the variables your settings read in pgtemplate_env*",
            # The second test is told in one line (the story is above).
            f"*pytest-pgtemplate: refused a connection to database {url.database} on 127.0.0.1:5432 from "
            "a test, as before (the first refusal in this process says why and what to set)."])
        assert tables_of(url) == ["precious"]  # and its row is still there


def test_a_test_reaching_another_database_beside_the_fixtures_is_named_once(
    project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings_project(project)
    (project.pytester.path / "migrations" / "env.py").write_text(SYNC_ENV_PY)  # the ini's URL
    project.pytester.makefile(".ini", alembic="[alembic]\nscript_location = migrations\n"
                              "sqlalchemy.url = postgresql+psycopg://u@127.0.0.1/placeholder\n")
    project.pytester.makeconftest(APP_ENGINE_CONFTEST)
    project.pytester.makepyfile(test_inner=APP_ENGINE_SUITE.format(statement="select count(*) from precious"))
    with app_on_developer_database(project, monkeypatch) as url:
        result = project.run("-p", "no:xdist")
        result.assert_outcomes(passed=2)
        text = result.stdout.str()
        warning = (f"pytest-pgtemplate: a test connected to database {url.database} on 127.0.0.1:5432, "
                   "which pytest-pgtemplate did not create, while this run's tests use "
                   f"{project.prefix}_w_")
        assert text.count(warning) == 1
        result.stdout.fnmatch_lines(["*if that is your app's own database, its tests and their cleanup ran "
                                     "there. Name the variables your settings read in pgtemplate_env*"])


def test_a_run_whose_tests_used_only_another_database_says_so(
    project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    """E.g. pytest run from a directory whose configuration lacks the plugin's settings."""
    settings_project(project)
    project.pytester.makeconftest(APP_ENGINE_CONFTEST)
    project.pytester.makepyfile(test_inner='''
        from sqlalchemy import text
        from conftest import engine

        def test_through_the_apps_engine():
            with engine.connect() as conn:
                conn.execute(text("select count(*) from precious"))
    ''')
    with app_on_developer_database(project, monkeypatch) as url:
        result = project.run("-n", "2")
        result.assert_outcomes(passed=1)
        result.stdout.fnmatch_lines([
            f"no test used the plugin's databases, but tests connected to {url.database} on 127.0.0.1:5432: "
            "if they were meant to run on this run's databases, point the app at them (pgtemplate_env) in "
            f"the configuration pytest found from here ({project.pytester.path}/tox.ini), or run pytest "
            "where that file is"])



# A sync app whose engine is built at import time from DATABASE_URL.
SYNC_APP_SUITE = '''
import os

from sqlalchemy import create_engine, text

engine = create_engine(os.environ["DATABASE_URL"])


def test_the_sync_app_reaches_its_database():
    with engine.begin() as conn:
        assert conn.execute(text("select count(*) from customer")).scalar() == 0
'''


def test_an_unset_variable_gets_the_scheme_the_projects_dotenv_writes_else_a_failure_says_which(
    project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    project.pytester.makepyfile(test_inner=SYNC_APP_SUITE)
    run = ("-p", "no:xdist", "--pgt-env", "DATABASE_URL")
    # No hint in the project: the async default, and a sync engine fails deep in SQLAlchemy;
    # the report says which variable holds what, and the fix.
    result = project.run(*run)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([
        "*MissingGreenlet*",
        "*pytest-pgtemplate*",
        "the app's engine is sync, but DATABASE_URL (pgtemplate_env) holds a postgresql+asyncpg:// URL, "
        "a driver of the other kind. Name the scheme it needs: pgtemplate_env = "
        "DATABASE_URL=postgresql+psycopg2 (or DATABASE_URL=postgresql+psycopg for psycopg 3).",
    ])
    # The project's committed example names its driver: that scheme is used.
    (project.pytester.path / ".env.example").write_text(
        "# copy to .env\nexport DATABASE_URL='postgresql+psycopg://me:secret@localhost/app'\n")
    project.run(*run).assert_outcomes(passed=1)
