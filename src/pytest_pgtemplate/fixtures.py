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
        self.generation = -1
        self._async: AsyncEngine | None = None
        self._last_loop: weakref.ref[asyncio.AbstractEventLoop] | None = None
        self._keep_warm = False
        self._sync: Engine | None = None

    def sync_for(self, db: WorkerDatabase, generation: int) -> Engine:
        self._check(generation)
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

    def acquire(self, db: WorkerDatabase, generation: int) -> AsyncEngine:
        """The engine for a test about to run on the current loop."""
        self._check(generation)
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

    def _check(self, generation: int) -> None:
        # The worker database was re-created: connections to the old one are gone.
        if generation != self.generation:
            self.close()
            self.generation = generation

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


def _reset_strategy(request: pytest.FixtureRequest, default: str) -> str:
    marker = request.node.get_closest_marker("pgtemplate")
    if marker is None:
        return default
    from .plugin import marker_reset

    return marker_reset(marker)


@pytest.fixture
def _pgt_database(request: pytest.FixtureRequest) -> Iterator[WorkerDatabase]:
    """The worker database for one test; reset after it (the strategy: marker, else --pgt-reset)."""
    state = _state(request)
    runtime: Runtime = state.runtime(request.config)
    strategy = _reset_strategy(request, state.settings.reset)
    db = state.call(request, runtime.database)
    yield db
    state.call(request, lambda: runtime.reset(strategy))


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
    yield engines.acquire(_pgt_database, state.runtime(request.config).generation)
    await engines.release()


@pytest.fixture
def pg_sessionmaker(pg_engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """async_sessionmaker bound to pg_engine (expire_on_commit=False)."""
    return async_sessionmaker(pg_engine, expire_on_commit=False)


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
    runtime = state.runtime(request.config)
    return state.call(
        request, lambda: state.engines.sync_for(_pgt_database, runtime.generation)
    )


@pytest.fixture
def pg_sync_session(pg_sync_engine: Engine) -> Iterator[Session]:
    """A Session for one test; it may commit.  Closed (rolled back) after the test."""
    with Session(pg_sync_engine, expire_on_commit=False) as session:
        yield session
