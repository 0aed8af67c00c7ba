"""Fixtures under the event-loop and pytest-asyncio configurations users actually have."""

from __future__ import annotations

import pytest

from conftest import Project

STRICT_SUITE = '''
import pytest
import pytest_asyncio
from sqlalchemy import text


@pytest_asyncio.fixture
async def customer_id(pg_sessionmaker):
    async with pg_sessionmaker() as session:
        cid = (await session.execute(text(
            "insert into customer (name) values ('fixture') returning id"))).scalar()
        await session.commit()
    return cid


@pytest.mark.asyncio
@pytest.mark.parametrize("i", range(3))
async def test_strict_mode(pg_session, customer_id, i):
    assert customer_id == 1
    assert (await pg_session.execute(text("select count(*) from customer"))).scalar() == 1


@pytest.mark.asyncio
async def test_engine_and_url(pg_engine, pg_url):
    assert pg_url.drivername == "postgresql+asyncpg"
    async with pg_engine.connect() as conn:
        assert (await conn.execute(text("select current_database()"))).scalar() == pg_url.database
'''


def test_fixtures_work_in_strict_mode(project: Project) -> None:
    project.pytester.makeini(f"""
        [pytest]
        pgtemplate_prefix = {project.prefix}
        asyncio_mode = strict
        asyncio_default_fixture_loop_scope = function
    """)
    project.pytester.makepyfile(test_strict=STRICT_SUITE)
    project.run("-n", "2").assert_outcomes(passed=4)
    project.run("-p", "no:xdist").assert_outcomes(passed=4)


SESSION_LOOP_SUITE = '''
import pytest
from sqlalchemy import text

ENGINES = []


BACKENDS = []


@pytest.mark.parametrize("i", range(5))
async def test_session_loop(pg_engine, pg_session, i):
    ENGINES.append(pg_engine)
    BACKENDS.append((await pg_session.execute(text("select pg_backend_pid()"))).scalar())
    if i >= 2:
        assert BACKENDS[-1] == BACKENDS[-2]  # the same warm connection
    assert (await pg_session.execute(text("select count(*) from customer"))).scalar() == 0
    await pg_session.execute(text("insert into customer (name) values ('x')"))
    await pg_session.commit()


def test_pooled_connections_stay_warm_on_a_long_lived_loop():
    # After the first test the loop is known to be long-lived: the pool keeps its
    # connection, so later tests reuse it instead of connecting again.
    assert len({id(e) for e in ENGINES}) == 1
    assert ENGINES[-1].pool.checkedin() == 1
'''


def test_session_scoped_event_loop_reuses_pooled_connections_and_closes_them(
    project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    project.pytester.makeini(f"""
        [pytest]
        pgtemplate_prefix = {project.prefix}
        asyncio_mode = auto
        asyncio_default_fixture_loop_scope = session
        asyncio_default_test_loop_scope = session
    """)
    project.pytester.makepyfile(test_loop=SESSION_LOOP_SUITE)
    monkeypatch.setenv("PYTHONWARNINGS", "always::ResourceWarning")
    result = project.run("-p", "no:xdist")
    result.assert_outcomes(passed=6)
    # The warm connections were closed on their loop before it closed.
    assert "unclosed" not in result.stderr.str()


FUNCTION_LOOP_SUITE = """
import os
import time

import pytest
from sqlalchemy import text

PIDS = []


@pytest.mark.parametrize("i", range(4))
async def test_function_loop(pg_session, i):
    PIDS.append((await pg_session.execute(text("select pg_backend_pid()"))).scalar())
    await pg_session.execute(text("insert into customer (name) values ('x')"))
    await pg_session.commit()


def test_each_loop_connected_anew_and_every_connection_is_gone(pg_sync_session):
    if os.environ.get("EXPECT_RELAY"):
        # The first test's connection went to the server; from the second on, tests on loops
        # of their own get one server session through the relay, idle between them.
        assert len(set(PIDS)) == 2 and len(set(PIDS[1:])) == 1, PIDS
        gone, kept = PIDS[:1], PIDS[1:2]
    else:
        assert len(set(PIDS)) == 4
        gone, kept = PIDS, []
    # Closed without waiting for the server: the backends end shortly after.
    for _ in range(50):
        alive = pg_sync_session.execute(
            text("select count(*) from pg_stat_activity where pid = any(:pids)"), {"pids": gone}
        ).scalar()
        if alive == 0:
            break
        time.sleep(0.05)
    assert alive == 0
    states = pg_sync_session.execute(
        text("select state from pg_stat_activity where pid = any(:pids)"), {"pids": kept}).scalars().all()
    assert states == ["idle"] * len(kept)
"""


@pytest.mark.parametrize("relay", [True, False], ids=["relay", "no-relay"])
def test_function_scoped_loops_close_their_connections_without_leaks_or_warnings(
    project: Project, monkeypatch: pytest.MonkeyPatch, relay: bool
) -> None:
    project.pytester.makepyfile(test_loop=FUNCTION_LOOP_SUITE)
    monkeypatch.setenv("PYTHONWARNINGS", "always::ResourceWarning")
    if relay:
        monkeypatch.setenv("EXPECT_RELAY", "1")
    result = project.run("-p", "no:xdist", "-W", "error::pytest.PytestUnraisableExceptionWarning",
                         "--pgt-profile", *([] if relay else ["--pgt-no-relay"]))
    result.assert_outcomes(passed=5)
    assert "unclosed" not in result.stderr.str() + result.stdout.str()
    assert ("; 3 of them given the server session of an earlier test" in result.stdout.str()) is relay


def test_a_test_loop_scope_other_than_the_fixtures_is_named_before_the_test(project: Project) -> None:
    project.pytester.makeini(f"""
        [pytest]
        pgtemplate_prefix = {project.prefix}
        asyncio_mode = auto
        asyncio_default_fixture_loop_scope = function
        asyncio_default_test_loop_scope = session
    """)
    project.pytester.makepyfile(test_loop=SESSION_LOOP_SUITE)
    result = project.run("-p", "no:xdist")
    result.assert_outcomes(failed=1, errors=5)  # the last test checks what the others did
    result.stdout.fnmatch_lines([
        "*pytest-pgtemplate: this test runs on a session-scoped event loop but the plugin's async "
        "fixtures run on function-scoped loops (asyncio_default_fixture_loop_scope), and an asyncpg "
        "connection belongs to one loop. Set asyncio_default_fixture_loop_scope = session in your pytest "
        "configuration (the same scope as the tests')."])


LEAK_SUITE = '''
from sqlalchemy import create_engine, text

LEAKED = []


def test_leaks_an_open_transaction(pg_sync_url):
    engine = create_engine(pg_sync_url)
    conn = engine.connect()
    conn.execute(text("insert into customer (name) values ('leaked')"))
    conn.execute(text("lock table country in access exclusive mode"))
    LEAKED.append(conn)  # never committed, never closed


def test_next_test_is_clean_and_not_blocked(pg_sync_session):
    assert pg_sync_session.execute(text("select count(*) from customer")).scalar() == 0
    assert pg_sync_session.execute(text("select count(*) from country")).scalar() == 3
'''


def test_leaked_transaction_is_terminated_not_waited_on(project: Project) -> None:
    project.pytester.makepyfile(test_leak=LEAK_SUITE)
    result = project.run("-p", "no:xdist", "--pgt-reset-timeout", "3")
    result.assert_outcomes(passed=2)
    assert result.duration < 20


def test_failing_test_report_names_its_database(project: Project) -> None:
    project.pytester.makepyfile(test_fail="def test_fail(pg_url):\n    assert False\n")
    result = project.run("-p", "no:xdist")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*pytest-pgtemplate*", f"worker database: {project.prefix}_w_*_main"])


MARKER_SUITE = '''
import pytest
from sqlalchemy import text


@pytest.mark.pgtemplate(reset="none")
def test_a(pg_sync_session):
    pg_sync_session.execute(text("insert into customer (name) values ('kept')"))
    pg_sync_session.commit()


def test_b(pg_sync_session):
    assert pg_sync_session.execute(text("select count(*) from customer")).scalar() == 1


def test_c(pg_sync_session):
    assert pg_sync_session.execute(text("select count(*) from customer")).scalar() == 0


@pytest.mark.pgtemplate(reset="sometimes")
def test_bad_marker(pg_sync_session):
    pass


@pytest.mark.pgtemplate(rest="clone")
def test_misspelt_marker(pg_sync_session):
    pass
'''


def test_marker_overrides_reset_for_one_test_and_is_validated(project: Project) -> None:
    project.pytester.makepyfile(test_marker=MARKER_SUITE)
    result = project.run("-p", "no:xdist")
    result.assert_outcomes(passed=3, errors=2)
    result.stdout.fnmatch_lines([
        "*pytest-pgtemplate: @pytest.mark.pgtemplate(reset='sometimes'): expected one of truncate, "
        "rollback, clone, none*"
    ])
    result.stdout.fnmatch_lines([
        "*pytest-pgtemplate: bad marker @pytest.mark.pgtemplate(rest='clone'): it takes one keyword, "
        "reset; use @pytest.mark.pgtemplate(reset=\"clone\") (or truncate, rollback, none)*"
    ])


def test_header_shows_settings_with_their_source(project: Project) -> None:
    project.pytester.makepyfile(test_x="def test_x():\n    pass\n")
    result = project.run("-p", "no:xdist", "--pgt-reset", "none", "--pgt-durable")
    result.stdout.fnmatch_lines([
        "pgtemplate: server postgres@127.0.0.1:5432/postgres (PGTEMPLATE_URL); "
        f"reset=none (--pgt-reset), prefix={project.prefix} (pgtemplate_prefix), durable=True (--pgt-durable)"
    ])


ANYIO_SUITE = '''
import asyncio

import pytest
from sqlalchemy import text

pytestmark = pytest.mark.anyio
LOOPS, BACKENDS = [], []


@pytest.fixture(scope="module")
def anyio_backend():
    return "asyncio"


@pytest.fixture(scope="module")
async def long_lived_loop(anyio_backend):
    yield  # an async module fixture: anyio keeps one loop for the module's tests


@pytest.mark.parametrize("i", range(4))
async def test_anyio(long_lived_loop, pg_session, pg_engine, i):
    LOOPS.append(asyncio.get_running_loop())
    BACKENDS.append((await pg_session.execute(text("select pg_backend_pid()"))).scalar())
    assert len(set(LOOPS)) == 1
    if i >= 2:  # our fixtures ran on anyio's loop too: the warm connection was kept for it
        assert BACKENDS[-1] == BACKENDS[-2]
    assert (await pg_session.execute(text("select count(*) from customer"))).scalar() == 0
    await pg_session.execute(text("insert into customer (name) values ('x')"))
    await pg_session.commit()
'''


def test_async_fixtures_run_on_anyios_loop_beside_strict_pytest_asyncio_or_alone(project: Project) -> None:
    project.pytester.makeini(f"""
        [pytest]
        pgtemplate_prefix = {project.prefix}
        asyncio_default_fixture_loop_scope = function
    """)
    project.pytester.makepyfile(test_anyio=ANYIO_SUITE)
    # "-p anyio" registers anyio before pytest-asyncio: the order in which pytest-asyncio's
    # fixture hook would otherwise take our fixtures onto its own loop.
    for plugins in ([], ["-p", "anyio"], ["-p", "no:asyncio", "-W", "ignore::pytest.PytestConfigWarning"]):
        project.run("-p", "no:xdist", *plugins).assert_outcomes(passed=4)
    project.run("-n", "2", "--dist", "loadfile").assert_outcomes(passed=4)  # the module on one worker


def test_a_users_own_pg_session_is_used_under_anyio_too(project: Project) -> None:
    project.pytester.makeconftest('''
        import pytest

        @pytest.fixture
        async def pg_session(pg_sessionmaker):   # the project's own, overriding the plugin's
            async with pg_sessionmaker() as session:
                session.info["mine"] = True
                yield session

        @pytest.fixture
        def anyio_backend():
            return "asyncio"
    ''')
    project.pytester.makepyfile(test_mine='''
        import pytest

        @pytest.mark.anyio
        async def test_anyio(pg_session):
            assert pg_session.info.get("mine")
    ''')
    project.run("-p", "no:xdist", "-p", "anyio").assert_outcomes(passed=1)


ENV_PLUGIN = '''
import os

import pytest


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config, parser, args):
    # As pytest-env does with its `env` setting: the developer's database, from the config.
    os.environ["APP_URL"] = "postgresql://postgres@127.0.0.1:5432/scratch_not_the_worker"
'''

ORDER_CONFTEST = '''
import os

import psycopg
import pytest

# An engine-like handle built when the conftest is imported, from the environment.
APP_URL = os.environ["APP_URL"]


@pytest.fixture(autouse=True)
def app_rows():
    yield
    # Teardown of the app's own autouse fixture (in the rootdir's conftest): the reset of
    # the worker database has not happened yet, so the test's row is still there.
    with psycopg.connect(APP_URL) as conn:
        assert conn.execute("select count(*) from customer").fetchone()[0] == 1
'''

ORDER_SUITE = '''
import psycopg

import conftest


def test_writes_through_the_app():
    with psycopg.connect(conftest.APP_URL) as conn:
        name = conn.execute("select current_database()").fetchone()[0]
        assert name.startswith("PREFIX_w_"), name
        conn.execute("insert into customer (name) values ('x')")


def test_again_clean():
    test_writes_through_the_app()
'''


def test_pgtemplate_env_wins_over_an_env_plugin_and_resets_after_the_apps_fixtures(project: Project) -> None:
    """A plugin that sets variables from the configuration (pytest-env style, a ``tryfirst``
    hook, registered before ours) does not win over ``pgtemplate_env``; and the reset comes
    after the teardown of the rootdir conftest's autouse fixtures (pytest 8 orders autouse
    fixtures of one directory by registration: the plugin registers its own first)."""
    project.pytester.makepyfile(envplug=ENV_PLUGIN)
    # The app's layout: its pytest.ini and conftest.py in tests/, pytest run from above.
    tests = project.pytester.mkdir("tests")
    (tests / "pytest.ini").write_text(f"[pytest]\npgtemplate_prefix = {project.prefix}\n"
                                      "pgtemplate_alembic_ini = ../alembic.ini\n")
    (tests / "conftest.py").write_text(ORDER_CONFTEST)
    (tests / "routes").mkdir()
    (tests / "routes" / "test_order.py").write_text(ORDER_SUITE.replace("PREFIX", project.prefix))
    result = project.run("-p", "envplug", "-p", "no:xdist", "--pgt-env", "APP_URL=postgresql", "tests")
    result.assert_outcomes(passed=2)
