"""The fixtures: URLs, engines and sessions bound to this process's worker database.

Event loops: asyncpg connections belong to the loop that opened them, and
pytest-asyncio gives each test its own loop unless told otherwise.  ``pg_engine`` is
one pooled AsyncEngine per process (its dialect initialised once).  After a test on a
loop not seen before, its pool is disposed on that loop, so no connection outlives
the loop; when a second test runs on the same loop (a session- or module-scoped
loop), the loop is long-lived and the pool's warm connections are kept for every
later test on it.  Within one test, every session reuses one pooled connection.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING

import pytest
import pytest_asyncio
from sqlalchemy import Engine, create_engine
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import Session

from .errors import PgTemplateError
from .runtime import Runtime, WorkerDatabase

if TYPE_CHECKING:
    from .plugin import PluginState


class Engines:
    """The process's engines for the current worker database (see module docstring)."""

    def __init__(self) -> None:
        self.key: tuple[str, int] | None = None
        self._async: AsyncEngine | None = None
        self._last_loop: weakref.ref[asyncio.AbstractEventLoop] | None = None
        self._keep_warm = False
        self._sync: Engine | None = None

    def sync_for(self, db: WorkerDatabase, key: tuple[str, int]) -> Engine:
        self._check(key)
        if self._sync is None:
            try:
                import psycopg  # noqa: F401
            except ImportError as exc:
                raise PgTemplateError(
                    "pytest-pgtemplate: the sync fixtures (pg_sync_*) need psycopg 3; "
                    "pip install 'pytest-pgtemplate[sync]'."
                ) from exc
            self._sync = create_engine(db.sync_url)
        return self._sync

    def acquire(self, db: WorkerDatabase, key: tuple[str, int]) -> AsyncEngine:
        """The engine for a test about to run on the current loop."""
        self._check(key)
        loop = asyncio.get_running_loop()
        previous = self._last_loop() if self._last_loop is not None else None
        if self._async is None:
            self._async = create_async_engine(db.url)
        elif previous is not loop and self._keep_warm:
            # The long-lived loop was replaced (e.g. per-module loops): its connections
            # cannot be used here, and that loop may be closed: just let them go.
            self._async.sync_engine.dispose(close=False)
        self._keep_warm = previous is loop
        self._last_loop = weakref.ref(loop)
        return self._async

    async def release(self) -> None:
        """After the test, on its loop: close the connections unless the loop is long-lived."""
        if self._async is not None and not self._keep_warm:
            await self._async.dispose()

    def _check(self, key: tuple[str, int]) -> None:
        # Another database (a clone), or the worker database was re-created: the
        # connections we pool lead to the old one.
        if key != self.key:
            self.close()
            self.key = key

    def close(self) -> None:
        """Forget every engine without awaiting: the loop may be closed already, and the
        worker database is dropped WITH (FORCE) right after."""
        if self._async is not None:
            self._async.sync_engine.dispose(close=False)
        if self._sync is not None:
            self._sync.dispose()
        self._async, self._sync, self._last_loop, self._keep_warm = None, None, None, False


def _state(request: pytest.FixtureRequest) -> PluginState:
    from .plugin import STATE_KEY

    return request.config.stash[STATE_KEY]


def _key(request: pytest.FixtureRequest, db: WorkerDatabase) -> tuple[str, int]:
    return db.name, _state(request).runtime(request.config).generation


@pytest.fixture
def _pgt_strategy(request: pytest.FixtureRequest) -> str:
    """This test's reset strategy: its marker's, else --pgt-reset."""
    marker = request.node.get_closest_marker("pgtemplate")
    if marker is None:
        return _state(request).settings.reset
    from .plugin import marker_reset

    return marker_reset(marker)


@pytest.fixture
def _pgt_database(request: pytest.FixtureRequest, _pgt_strategy: str) -> Iterator[WorkerDatabase]:
    """The database for one test, reset (or dropped, for a clone) after it."""
    state = _state(request)
    runtime: Runtime = state.runtime(request.config)
    db = state.call(request, lambda: runtime.begin_test(_pgt_strategy))
    yield db
    state.call(request, lambda: runtime.end_test(_pgt_strategy, db))


@pytest.fixture(scope="session", autouse=True)
def _pgt_app_session_database(request: pytest.FixtureRequest) -> None:
    """With pgtemplate_env: the worker database exists before any session fixture of the
    app (set up before function-scoped ones) connects through the environment variable."""
    state = _state(request)
    if state.app_integration:
        runtime = state.runtime(request.config)
        state.call(request, runtime.database)


@pytest.fixture(autouse=True)
def _pgt_app_database(request: pytest.FixtureRequest) -> None:
    """With pgtemplate_env (or the worker-URL hook), the app reaches the database on its
    own: every test gets it set up and reset, not only those asking for a fixture."""
    if _state(request).app_integration:
        request.getfixturevalue("_pgt_database")


@pytest.fixture
def pg_url(_pgt_database: WorkerDatabase) -> URL:
    """URL (postgresql+asyncpg) of this worker's database."""
    return _pgt_database.url


@pytest.fixture
def pg_sync_url(_pgt_database: WorkerDatabase) -> URL:
    """URL (postgresql+psycopg) of this worker's database."""
    return _pgt_database.sync_url


@pytest_asyncio.fixture
async def pg_engine(
    request: pytest.FixtureRequest, _pgt_database: WorkerDatabase
) -> AsyncIterator[AsyncEngine]:
    """AsyncEngine bound to this worker's database (do not dispose it)."""
    state = _state(request)
    engines = state.engines
    yield engines.acquire(_pgt_database, _key(request, _pgt_database))
    await engines.release()


@pytest_asyncio.fixture
async def _pgt_async_bind(
    pg_engine: AsyncEngine, _pgt_strategy: str
) -> AsyncIterator[AsyncEngine | AsyncConnection]:
    """What sessions bind to: the engine, or (``rollback``) one connection inside an outer
    transaction that is rolled back after the test."""
    if _pgt_strategy != "rollback":
        yield pg_engine
        return
    async with pg_engine.connect() as conn:
        outer = await conn.begin()
        yield conn
        if outer.is_active:
            await outer.rollback()


@pytest.fixture
def pg_sessionmaker(
    _pgt_async_bind: AsyncEngine | AsyncConnection,
) -> async_sessionmaker[AsyncSession]:
    """async_sessionmaker bound to this test's database (expire_on_commit=False).  Under
    ``rollback`` its sessions share the test's outer transaction: commit() releases a
    savepoint, and everything is rolled back after the test."""
    return async_sessionmaker(
        _pgt_async_bind, expire_on_commit=False, join_transaction_mode="create_savepoint"
    )


@pytest_asyncio.fixture
async def pg_session(
    pg_sessionmaker: async_sessionmaker[AsyncSession],
) -> AsyncIterator[AsyncSession]:
    """An AsyncSession for one test; it may commit.  Closed (rolled back) after the test."""
    async with pg_sessionmaker() as session:
        yield session


@pytest.fixture
def pg_sync_engine(request: pytest.FixtureRequest, _pgt_database: WorkerDatabase) -> Engine:
    """Engine (psycopg 3) bound to this worker's database (do not dispose it)."""
    state = _state(request)
    key = _key(request, _pgt_database)
    return state.call(request, lambda: state.engines.sync_for(_pgt_database, key))


@pytest.fixture
def pg_sync_session(pg_sync_engine: Engine, _pgt_strategy: str) -> Iterator[Session]:
    """A Session for one test; it may commit.  Closed (rolled back) after the test; under
    ``rollback`` it runs inside an outer transaction rolled back after the test."""
    if _pgt_strategy != "rollback":
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
