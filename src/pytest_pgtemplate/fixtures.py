"""The fixtures: URLs, engines and sessions bound to this process's worker database
(the engines and the event loops they serve: ``engines.py``).

Each database (the default one and every extra one of ``pgtemplate_databases``) gets the
same set of fixtures: ``fixtures_for(name)`` makes them, with the names and parameters
of the extra database (``pg_analytics_session`` needs ``pg_analytics_sessionmaker``...).
The async ones are pytest-asyncio fixtures; a test run by anyio's pytest plugin gets
them run by anyio instead (see ``plugin.pytest_fixture_setup``).
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_asyncio
from sqlalchemy import Engine
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
)
from sqlalchemy.orm import Session

from .appenv import env_names
from .errors import PgTemplateWarning
from .naming import FIXTURE_BASES, fixture_name
from .profile import Clock
from .runtime import WorkerDatabase
from .settings import DEFAULT_DATABASE, RESET_STRATEGIES
from .state import STATE_KEY, PluginState


@dataclass(frozen=True, slots=True)
class Lease:
    """One test's use of one database: which, where, how it is reset, and the key of the
    pooled engines that may serve it."""

    database: str
    db: WorkerDatabase
    strategy: str
    key: tuple[str, int]


def _state(request: pytest.FixtureRequest) -> PluginState:
    return request.config.stash[STATE_KEY]


def marker_reset(marker: pytest.Mark) -> str:
    """The ``reset`` of a ``@pytest.mark.pgtemplate(reset=...)`` marker, validated."""

    def signature(*, reset: str) -> str:
        return reset

    try:
        reset = signature(*marker.args, **marker.kwargs)
    except TypeError:
        given = ", ".join([*map(repr, marker.args), *(f"{k}={v!r}" for k, v in marker.kwargs.items())])
        pytest.fail(
            f"pytest-pgtemplate: bad marker @pytest.mark.pgtemplate({given}): it takes one keyword, "
            "reset; use @pytest.mark.pgtemplate(reset=\"clone\") (or truncate, rollback, none)",
            pytrace=False,
        )
    if reset not in RESET_STRATEGIES:
        pytest.fail(
            f"pytest-pgtemplate: @pytest.mark.pgtemplate(reset={reset!r}): expected one of "
            + ", ".join(RESET_STRATEGIES), pytrace=False,
        )
    return reset


def _strategy(request: pytest.FixtureRequest, default: str) -> str:
    """This test's reset strategy: its marker's, else the database's setting."""
    marker = request.node.get_closest_marker("pgtemplate")
    if marker is None:
        return default
    return marker_reset(marker)


def _report_terminated(state: PluginState, nodeid: str, database: str, who: str) -> None:
    """A reset ended sessions left inside a transaction: say so once per process, and keep
    it for the reports of later failing tests (they may fail because of it)."""
    note = (f"the reset after {nodeid} ended a session left inside a transaction in {database}: "
            f"{who}. A transaction still open when a test ends is rolled back this way; if it belongs "
            "to a session- or module-scoped fixture (an app session or connection kept across tests), "
            "the tests after it that use it fail (AdminShutdown, PendingRollbackError...): make that "
            "fixture function-scoped, or close its session after each test; rows it writes for later "
            "tests belong in the template (pgtemplate_seed or the pytest_pgtemplate_seed hook).")
    state.terminations.append(note)
    if "terminated" not in state.warned:
        state.warned.add("terminated")
        warnings.warn(PgTemplateWarning(f"pytest-pgtemplate: {note}"), stacklevel=1)


def _database_fixture(database: str) -> Callable[[pytest.FixtureRequest], Iterator[Lease]]:
    def fixture(request: pytest.FixtureRequest) -> Iterator[Lease]:
        """The database for one test, reset (or dropped, for a clone) after it."""
        state = _state(request)
        runtime = state.call(request, lambda: state.runtime(request.config, database))
        strategy = _strategy(request, runtime.settings.reset)
        if strategy == "clone" and runtime.app_found:
            strategy = "truncate"
            if database not in state.warned:
                state.warned.add(database)
                warnings.warn(PgTemplateWarning(
                    f"pytest-pgtemplate: reset=clone cannot reach the app for database {database!r}: "
                    "the app found its worker database through "
                    + (f"the environment variable {env_names(runtime.settings.env)[0]}"
                       if runtime.settings.env else "the pytest_pgtemplate_worker_url hook")
                    + ", fixed when it started, so a clone would go unused; such tests are reset "
                    "with truncate instead (a schema change still re-creates the worker database, "
                    "where the plugin's role may create event triggers, e.g. as a superuser)."),
                    stacklevel=1)
        db = state.call(request, lambda: runtime.begin_test(strategy))
        yield Lease(database, db, strategy, runtime.engine_key(db))
        state.call(request, lambda: runtime.end_test(strategy, db))
        if runtime.terminated:
            _report_terminated(state, request.node.nodeid, db.name, runtime.terminated)
            runtime.terminated = ""

    return fixture


def _url(_pgt_database: Lease) -> URL:
    """URL (postgresql+asyncpg) of this worker's database."""
    return _pgt_database.db.url


def _sync_url(_pgt_database: Lease) -> URL:
    """URL (postgresql+psycopg) of this worker's database."""
    return _pgt_database.db.sync_url


async def _engine(request: pytest.FixtureRequest, _pgt_database: Lease) -> AsyncIterator[AsyncEngine]:
    """AsyncEngine bound to this worker's database (do not dispose it)."""
    state = _state(request)
    engines = state.engines_for(_pgt_database.database)
    mismatch = _loop_scope_mismatch(request)
    if mismatch:
        pytest.fail(mismatch, pytrace=False)
    engine = state.call(request, lambda: engines.acquire(_pgt_database.db, _pgt_database.key))
    await engines.close_at_loop_shutdown()
    yield engine
    await engines.release()


def _loop_scope_mismatch(request: pytest.FixtureRequest) -> str | None:
    """pytest-asyncio (0.26+) runs this test on a loop of another scope than our async
    fixtures: connections made on one loop would be closed on the other (errors at every
    teardown).  Say so before the test runs."""
    if "anyio_backend" in request.fixturenames:
        return None
    try:
        fixture_scope = str(request.config.getini("asyncio_default_fixture_loop_scope") or "function")
        test_scope = str(request.config.getini("asyncio_default_test_loop_scope") or "function")
    except ValueError:  # an older pytest-asyncio: no test loop scope to differ
        return None
    marker = request.node.get_closest_marker("asyncio")
    if marker is not None and marker.kwargs.get("loop_scope"):
        test_scope = str(marker.kwargs["loop_scope"])
    if test_scope == fixture_scope:
        return None
    return (f"pytest-pgtemplate: this test runs on a {test_scope}-scoped event loop but the plugin's "
            f"async fixtures run on {fixture_scope}-scoped loops (asyncio_default_fixture_loop_scope), "
            "and an asyncpg connection belongs to one loop. Set asyncio_default_fixture_loop_scope = "
            f"{test_scope} in your pytest configuration (the same scope as the tests').")


async def _async_bind(
    pg_engine: AsyncEngine, _pgt_database: Lease
) -> AsyncIterator[AsyncEngine | AsyncConnection]:
    """What sessions bind to: the engine, or (``rollback``) one connection inside an outer
    transaction that is rolled back after the test."""
    if _pgt_database.strategy != "rollback":
        yield pg_engine
        return
    async with pg_engine.connect() as conn:
        outer = await conn.begin()
        yield conn
        try:
            if outer.is_active:
                await outer.rollback()
        except Exception:
            # The test broke the connection (e.g. sessions used concurrently on it): it
            # must not go back to the pool for the next test.
            await conn.invalidate()
            raise


def _sessionmaker(_pgt_async_bind: AsyncEngine | AsyncConnection) -> async_sessionmaker[AsyncSession]:
    """async_sessionmaker bound to this test's database (expire_on_commit=False).  Under
    ``rollback`` its sessions share the test's outer transaction: commit() releases a
    savepoint, and everything is rolled back after the test."""
    return async_sessionmaker(
        _pgt_async_bind, expire_on_commit=False, join_transaction_mode="create_savepoint"
    )


async def _session(pg_sessionmaker: async_sessionmaker[AsyncSession]) -> AsyncIterator[AsyncSession]:
    """An AsyncSession for one test; it may commit.  Closed (rolled back) after the test."""
    async with pg_sessionmaker() as session:
        yield session


def _sync_engine(request: pytest.FixtureRequest, _pgt_database: Lease) -> Engine:
    """Engine (psycopg 3) bound to this worker's database (do not dispose it)."""
    state = _state(request)
    engines = state.engines_for(_pgt_database.database)
    return state.call(request, lambda: engines.sync_for(_pgt_database.db, _pgt_database.key))


def _sync_session(pg_sync_engine: Engine, _pgt_database: Lease) -> Iterator[Session]:
    """A Session for one test; it may commit.  Closed (rolled back) after the test; under
    ``rollback`` it runs inside an outer transaction rolled back after the test."""
    if _pgt_database.strategy != "rollback":
        with Session(pg_sync_engine, expire_on_commit=False) as session:
            yield session
        return
    with pg_sync_engine.connect() as conn:
        outer = conn.begin()
        with Session(bind=conn, expire_on_commit=False,
                     join_transaction_mode="create_savepoint") as session:
            yield session
        if outer.is_active:
            outer.rollback()


# Each fixture under its default name: its function, and whether it is async.
_FIXTURES: dict[str, tuple[Callable[..., Any], bool]] = {
    "pg_url": (_url, False),
    "pg_sync_url": (_sync_url, False),
    "pg_engine": (_engine, True),
    "_pgt_async_bind": (_async_bind, True),
    "pg_sessionmaker": (_sessionmaker, False),
    "pg_session": (_session, True),
    "pg_sync_engine": (_sync_engine, False),
    "pg_sync_session": (_sync_session, False),
}


def fixtures_for(database: str) -> dict[str, Any]:
    """Every fixture of one database, by name, ready to be found in a plugin namespace."""
    name = fixture_name("_pgt_database", database)
    made: dict[str, Any] = {
        name: pytest.fixture(name=name)(_renamed(_database_fixture(database), name, database)),
    }
    for base, (func, is_async) in _FIXTURES.items():
        name = fixture_name(base, database)
        renamed = _renamed(func, name, database)
        if is_async:
            # For anyio's tests: an unmarked twin (see plugin.pytest_fixture_setup).
            renamed.pgtemplate_anyio_twin = _renamed(func, name, database)  # type: ignore[attr-defined]
            made[name] = pytest_asyncio.fixture(name=name)(renamed)
        else:
            made[name] = pytest.fixture(name=name)(renamed)
    return made


def _renamed(func: Callable[..., Any], name: str, database: str) -> Callable[..., Any]:
    """A new function calling ``func``, whose fixture parameters carry the names they have
    for ``database`` (``pg_engine`` -> ``pg_analytics_engine``).  Always a fresh object, so
    markings that pytest-asyncio puts on one do not reach another.  Its setup and teardown
    count as the plugin's time in --pgt-profile."""
    signature = inspect.signature(func)
    back = {fixture_name(p, database): p for p in signature.parameters if p in FIXTURE_BASES}

    def args(kwargs: dict[str, object]) -> dict[str, object]:
        return {back.get(k, k): v for k, v in kwargs.items()}

    wrapper: Callable[..., Any]
    if inspect.isasyncgenfunction(func):
        async def async_wrapper(**kwargs: object) -> AsyncIterator[object]:
            agen = func(**args(kwargs))
            with Clock("setup"):
                value = await agen.__anext__()
            yield value
            with Clock("teardown"):
                async for value in agen:
                    yield value
        wrapper = async_wrapper
    elif inspect.isgeneratorfunction(func):
        def gen_wrapper(**kwargs: object) -> Iterator[object]:
            gen = func(**args(kwargs))
            with Clock("setup"):
                value = next(gen)
            yield value
            with Clock("teardown"):
                yield from gen
        wrapper = gen_wrapper
    else:
        def plain_wrapper(**kwargs: object) -> object:
            with Clock("setup"):
                return func(**args(kwargs))
        wrapper = plain_wrapper
    wrapper.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[p.replace(name=fixture_name(p.name, database)) if p.name in back.values() else p
                    for p in signature.parameters.values()])
    wrapper.__name__ = wrapper.__qualname__ = name
    wrapper.__doc__ = func.__doc__
    return wrapper


def _app_session_databases(request: pytest.FixtureRequest) -> None:
    """With pgtemplate_env: the worker databases exist before any session fixture of the
    app (set up before function-scoped ones) connects through the environment variable."""
    state = _state(request)
    for database in state.app_databases:
        runtime = state.call(request, functools.partial(state.runtime, request.config, database))
        state.call(request, runtime.database)


def _app_databases(request: pytest.FixtureRequest) -> None:
    """With pgtemplate_env (or the worker-URL hook), the app reaches the database on its
    own: every test gets it set up and reset, not only those asking for a fixture."""
    for database in _state(request).app_databases:
        request.getfixturevalue(fixture_name("_pgt_database", database))


def common_fixtures() -> dict[str, Any]:
    """The fixtures shared by all databases (the autouse ones of app integration)."""
    # Names no database's fixtures can take (those start with "_pgt_" or "pg_").
    session_name, test_name = "_pgtemplate_app_session_databases", "_pgtemplate_app_databases"
    return {
        session_name: pytest.fixture(scope="session", autouse=True, name=session_name)(
            _renamed(_app_session_databases, session_name, DEFAULT_DATABASE)),
        test_name: pytest.fixture(autouse=True, name=test_name)(
            _renamed(_app_databases, test_name, DEFAULT_DATABASE)),
    }
