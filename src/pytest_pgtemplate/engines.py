"""The process's engines for one database, and the event loops they may serve.

asyncpg connections belong to the loop that opened them, and pytest-asyncio gives each
test its own loop unless told otherwise.  ``pg_engine`` is one pooled AsyncEngine per
process (its dialect initialised once).  After a test on a loop not seen before, its
pool is disposed on that loop, so no connection outlives the loop; when a second test
runs on the same loop (a session- or module-scoped loop), the loop is long-lived and the
pool's warm connections are kept for every later test on it.  Within one test, every
session reuses one pooled connection.  When tests keep coming on loops of their own
(function scope, pytest-asyncio's default), the engine connects through the relay
(``relay.py``): each test's connection is new, its server session an earlier test's.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import AsyncGenerator

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from . import profile
from .db import TERMINATE
from .errors import PgTemplateError
from .relay import Relay, relayable
from .runtime import WorkerDatabase


class Engines:
    """The process's engines for the current worker database (see module docstring)."""

    def __init__(self, *, relay: bool = True) -> None:
        self.key: tuple[str, int] | None = None
        self._async: AsyncEngine | None = None
        self._last_loop: weakref.ref[asyncio.AbstractEventLoop] | None = None
        self._keep_warm = False
        self._sync: Engine | None = None
        # Long-lived loops' closers: async generators the loop closes at its shutdown
        # (shutdown_asyncgens), disposing that loop's engine there, on that loop.
        self._closers: list[tuple[AsyncEngine, AsyncGenerator[None, None]]] = []
        self._connections: list[object] = []  # the DBAPI connections the async engine opened
        self._relay: Relay | None = None  # started once tests are seen on loops of their own
        self._relay_failed = not relay  # off, or it could not reach the server
        self._relayed = False  # the async engine connects through the relay

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
        if (self._async is not None and previous is not loop and not self._keep_warm
                and self._relay is None and not self._relay_failed):
            # A second test, on a loop of its own again: from now on through the relay.
            self._start_relay(db)
        relayed = self._relay is not None
        if self._async is None or (previous is not loop and self._keep_warm) or relayed != self._relayed:
            # New, or the long-lived loop was replaced (e.g. per-module loops): that loop's
            # engine is its closer's to dispose, at that loop's shutdown.
            url = db.url if self._relay is None else self._relay.url.set(database=db.url.database)
            self._async, self._relayed = create_async_engine(url), relayed
            self._connections = []  # a replaced engine's are its closer's
            event.listen(self._async.sync_engine, "connect", self._opened)
        self._keep_warm = previous is loop
        self._last_loop = weakref.ref(loop)
        return self._async

    def _start_relay(self, db: WorkerDatabase) -> None:
        """The relay for this server, if it can reach it (else connections stay direct)."""
        if not relayable(db.url):
            self._relay_failed = True
            return
        relay = Relay(db.url)
        try:
            relay.start()
        except Exception:  # any reason at all: direct connections work as before
            self._relay_failed = True
            return
        self._relay = relay

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
        if self._relay is not None:
            # Their server sessions back in the relay's pool before the reset looks for
            # sessions left inside a transaction.
            self._relay.settle()

    def _opened(self, dbapi_connection: object, _record: object) -> None:
        self._connections.append(dbapi_connection)
        if profile.ACTIVE is not None:
            profile.ACTIVE.connections += 1

    def _check(self, key: tuple[str, int]) -> None:
        # Another database (a clone), or the worker database was re-created: the
        # connections we pool lead to the old one.
        if key != self.key:
            self._forget()
            self.key = key

    def _forget(self) -> None:
        """Forget every engine without awaiting: the loop may be closed already, and the
        worker database is dropped WITH (FORCE) right after.  The relay's pooled server
        sessions end (and are waited for: the database may be renamed next)."""
        if self._async is not None:
            self._async.sync_engine.dispose(close=False)
        if self._sync is not None:
            self._sync.dispose()
        self._async, self._sync, self._last_loop, self._keep_warm = None, None, None, False
        self._closers.clear()  # a loop still open runs them when these are collected
        self._connections = []
        if self._relay is not None:
            self._relay.clear()

    def close(self) -> None:
        """At the end: ``_forget``, and the relay stops."""
        try:
            self._forget()
        finally:
            if self._relay is not None:
                if profile.ACTIVE is not None:
                    profile.ACTIVE.reused += self._relay.reused
                self._relay.close()
                self._relay = None


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
