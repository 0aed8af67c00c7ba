"""The process's engines for one database, and the event loops they may serve.

asyncpg connections belong to the loop that opened them, and pytest-asyncio gives each
test its own loop unless told otherwise.  ``pg_engine`` is one pooled AsyncEngine per
process (its dialect initialised once).  After a test on a loop not seen before, its
pool is disposed on that loop, so no connection outlives the loop; when a second test
runs on the same loop (a session- or module-scoped loop), the loop is long-lived and the
pool's warm connections are kept for every later test on it.  Within one test, every
session reuses one pooled connection.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import AsyncGenerator

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from . import profile
from .errors import PgTemplateError
from .runtime import WorkerDatabase


class Engines:
    """The process's engines for the current worker database (see module docstring)."""

    def __init__(self) -> None:
        self.key: tuple[str, int] | None = None
        self._async: AsyncEngine | None = None
        self._last_loop: weakref.ref[asyncio.AbstractEventLoop] | None = None
        self._keep_warm = False
        self._sync: Engine | None = None
        # Long-lived loops' closers: async generators the loop closes at its shutdown
        # (shutdown_asyncgens), disposing that loop's engine there, on that loop.
        self._closers: list[tuple[AsyncEngine, AsyncGenerator[None, None]]] = []
        self._connections: list[object] = []  # the DBAPI connections the async engine opened

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
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError as exc:
            raise PgTemplateError(
                "pytest-pgtemplate: the async fixtures (pg_engine, pg_session, ...) need an asyncio "
                "event loop (asyncpg runs on asyncio only); under anyio, use its asyncio backend "
                "(an anyio_backend fixture returning \"asyncio\")."
            ) from exc
        previous = self._last_loop() if self._last_loop is not None else None
        if self._async is None or (previous is not loop and self._keep_warm):
            # New, or the long-lived loop was replaced (e.g. per-module loops): that loop's
            # engine is its closer's to dispose, at that loop's shutdown.
            self._async = create_async_engine(db.url)
            self._connections = []  # a replaced engine's are its closer's
            event.listen(self._async.sync_engine, "connect", self._opened)
        self._keep_warm = previous is loop
        self._last_loop = weakref.ref(loop)
        return self._async

    async def close_at_loop_shutdown(self) -> None:
        """On a long-lived loop (a test's second), once: close its engine's warm connections
        when the loop shuts down, before it is closed (no unclosed-connection warnings)."""
        engine = self._async
        if not self._keep_warm or engine is None or any(e is engine for e, _ in self._closers):
            return

        async def closer() -> AsyncGenerator[None, None]:
            try:
                yield
            finally:
                await engine.dispose()

        agen = closer()
        await agen.__anext__()  # registered with the running loop from here on
        self._closers.append((engine, agen))

    async def release(self) -> None:
        """After the test, on its loop: close the connections unless the loop is long-lived.

        Closing an asyncpg connection waits until the server's backend has exited (about
        5 ms a connection, on every test of a function-scoped loop).  Ours say goodbye
        (the protocol's Terminate message, so the server logs nothing) and close the
        socket without waiting; the pool is dropped with them.
        """
        if self._async is None or self._keep_warm:
            return
        opened, self._connections = self._connections, []
        await self._async.dispose(close=False)
        for connection in opened:
            _close_without_waiting(connection)

    def _opened(self, dbapi_connection: object, _record: object) -> None:
        self._connections.append(dbapi_connection)
        if profile.ACTIVE is not None:
            profile.ACTIVE.connections += 1

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
        self._closers.clear()  # a loop still open runs them when these are collected
        self._connections = []


TERMINATE = b"X\x00\x00\x00\x04"  # the protocol's Terminate message: no log line on the server


def _close_without_waiting(dbapi_connection: object) -> None:
    """Close one asyncpg connection (behind SQLAlchemy's adapter) at once.  One opened on a
    loop already closed (a failed setup, ``asyncio.run`` in a test) is left to its GC."""
    raw = getattr(dbapi_connection, "driver_connection", None)
    try:
        if raw is None:  # not the adapter we know: its own forced close
            getattr(dbapi_connection, "terminate", lambda: None)()
            return
        if raw.is_closed():
            return
        transport = getattr(raw, "_transport", None)  # asyncpg's; absent, the socket just closes
        if transport is not None and not transport.is_closing():
            transport.write(TERMINATE)
        raw.terminate()
    except RuntimeError:  # "Event loop is closed"
        pass
