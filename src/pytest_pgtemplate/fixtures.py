"""The fixtures: URLs, engines and sessions bound to this process's worker database.

Event loops: asyncpg connections belong to the loop that opened them, and
pytest-asyncio gives each test its own loop unless told otherwise.  ``pg_engine``
therefore hands out, for a loop it has not seen before, one shared NullPool engine
(no connection outlives a test, works on any loop); once a loop is seen in a second
test it is long-lived (a session/module-scoped loop), and that loop gets a pooled
engine whose warm connections are reused by every later test on it.
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
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from .errors import PgTemplateError
from .runtime import Runtime, WorkerDatabase

if TYPE_CHECKING:
    from .plugin import PluginState


class Engines:
    """Engines for the current worker database, per event loop (see module docstring)."""

    def __init__(self) -> None:
        self.generation = -1
        self._shared: AsyncEngine | None = None
        self._seen: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()
        self._pooled: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, AsyncEngine] = (
            weakref.WeakKeyDictionary()
        )
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
            self._sync = create_engine(db.sync_url, pool_pre_ping=True)
        return self._sync

    def async_for(self, db: WorkerDatabase, generation: int) -> AsyncEngine:
        self._check(generation)
        loop = asyncio.get_running_loop()
        engine = self._pooled.get(loop)
        if engine is not None:
            return engine
        if loop in self._seen:
            engine = create_async_engine(db.url, pool_pre_ping=True)
            self._pooled[loop] = engine
            return engine
        self._seen.add(loop)
        if self._shared is None:
            self._shared = create_async_engine(db.url, poolclass=NullPool)
        return self._shared

    def _check(self, generation: int) -> None:
        # The worker database was re-created: connections to the old one are gone.
        if generation != self.generation:
            self.close()
            self.generation = generation

    def close(self) -> None:
        """Forget every engine without awaiting: their loops may be closed already, and
        the worker database is dropped WITH (FORCE) right after."""
        for engine in [self._shared, *self._pooled.values()]:
            if engine is not None:
                engine.sync_engine.dispose(close=False)
        if self._sync is not None:
            self._sync.dispose()
        self._shared, self._sync = None, None
        self._pooled = weakref.WeakKeyDictionary()
        self._seen = weakref.WeakSet()


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


@pytest.fixture
def pg_url(_pgt_database: WorkerDatabase) -> URL:
    """URL (postgresql+asyncpg) of this worker's database."""
    return _pgt_database.url


@pytest.fixture
def pg_sync_url(_pgt_database: WorkerDatabase) -> URL:
    """URL (postgresql+psycopg) of this worker's database."""
    return _pgt_database.sync_url


@pytest_asyncio.fixture
async def pg_engine(request: pytest.FixtureRequest, _pgt_database: WorkerDatabase) -> AsyncEngine:
    """AsyncEngine bound to this worker's database (do not dispose it)."""
    state = _state(request)
    return state.engines.async_for(_pgt_database, state.runtime(request.config).generation)


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
