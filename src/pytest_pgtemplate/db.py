"""Connections: private event loops for the plugin's DB work, and connecting with clear errors.

Everything the plugin itself does on the server (admin DDL, advisory locks, resets)
runs on a private asyncio loop.  asyncpg connections belong to the loop that opened
them, and tests run on loops pytest-asyncio creates and closes at will; keeping our
connections on our own loop makes them independent of the user's loop scopes, and
lets sync pytest hooks and fixtures call us.  A worker database's loop is run by the
calling thread during each call (``InlineLoop``: no hand-off between threads on the
reset after every test); the clone pool's, which works in the background between
calls, runs on a daemon thread (``LoopThread``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import threading
from collections.abc import Coroutine, Iterator
from typing import Any, Protocol, TypeVar

import asyncpg
from sqlalchemy.engine import URL, make_url

from . import capacity, errors
from .errors import PgTemplateError

T = TypeVar("T")

CONNECT_TIMEOUT = 5.0
# Every statement of ours is bounded: a server that stops answering cannot hang a run.
COMMAND_TIMEOUT = 300.0
APPLICATION_NAME = f"pytest-pgtemplate {socket.gethostname()[:20]} pid {os.getpid()}"


def _reason(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return f"no answer within {CONNECT_TIMEOUT:g} s"
    return str(exc) or type(exc).__name__


def lost(url: URL, exc: BaseException) -> PgTemplateError:
    """The message for a connection that died or stopped answering mid-run."""
    return PgTemplateError(
        f"pytest-pgtemplate: lost the connection to PostgreSQL at {where(url)} "
        f"({type(exc).__name__}: {_reason(exc)}); is the server still running? Check it, or "
        "--pgt-url / PGTEMPLATE_URL / pgtemplate_url.",
        setting="url",
    )


TERMINATE = b"X\x00\x00\x00\x04"  # the protocol's Terminate message: no log line on the server

CONNECTION_LOST = (asyncpg.InterfaceError, asyncpg.exceptions.ConnectionDoesNotExistError,
                   asyncpg.exceptions.AdminShutdownError, asyncpg.exceptions.CrashShutdownError,
                   OSError, asyncio.TimeoutError)


class Loop(Protocol):
    """A private loop: ``run()`` blocks until a coroutine is done on it."""

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T: ...

    def close(self) -> None: ...


class InlineLoop:
    """A private asyncio loop that the calling thread runs for the length of each ``run()``.

    About 0.2 ms cheaper a call than ``LoopThread``'s hand-off between threads, paid on
    every reset.  Nothing runs on it between calls, so it suits connections used only
    through ``run()`` (no background work).  Called where another loop is running in the
    calling thread (say, an async fixture of the user's asking for one of ours), it is
    run by a helper thread meanwhile.
    """

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._lock = threading.Lock()  # one runner at a time

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is None:
            return self._drive(coro, timeout)
        if running is self._loop:
            coro.close()
            raise RuntimeError("pytest-pgtemplate: InlineLoop.run() called from its own loop")
        outcome: list[tuple[bool, Any]] = []

        def helper() -> None:
            try:
                outcome.append((True, self._drive(coro, timeout)))
            except BaseException as exc:  # handed to the caller as it is
                outcome.append((False, exc))

        thread = threading.Thread(target=helper, name="pytest-pgtemplate-db", daemon=True)
        thread.start()
        thread.join()
        ok, value = outcome[0]
        if not ok:
            raise value
        return value  # type: ignore[no-any-return]

    def _drive(self, coro: Coroutine[Any, Any, T], timeout: float | None) -> T:
        with self._lock:
            bounded = coro if timeout is None else asyncio.wait_for(coro, timeout)
            task = self._loop.create_task(_caught_up(bounded))
            with _ctrl_c_cancels(task) as interrupted:
                try:
                    result = self._loop.run_until_complete(task)
                except asyncio.CancelledError:
                    if interrupted:
                        raise KeyboardInterrupt from None
                    raise
                except BaseException:
                    if not task.done():  # stop the work instead of leaving it pending
                        task.cancel()
                        with contextlib.suppress(BaseException):
                            self._loop.run_until_complete(asyncio.wait([task], timeout=1))
                    raise
            if interrupted:  # the work finished regardless: the interrupt still counts
                raise KeyboardInterrupt
            return result

    def close(self) -> None:
        with self._lock:
            if self._loop.is_closed():
                return
            with contextlib.suppress(Exception):  # let closed transports finish their callbacks
                self._loop.run_until_complete(asyncio.sleep(0))
            self._loop.close()


@contextlib.contextmanager
def _ctrl_c_cancels(task: asyncio.Task[Any]) -> Iterator[list[int]]:
    """While the main thread runs ``task``: a first Ctrl-C cancels the task (it stops at an
    ``await``; ``_drive`` then raises KeyboardInterrupt) instead of raising wherever the
    interpreter is.  Raised inside asyncpg's protocol code (which receives data in C), a
    KeyboardInterrupt can leave the connection's buffers half-updated, and the next read
    crashed the process (a segmentation fault, seen in an adoption trial).  A second
    Ctrl-C raises at once.  The list counts the interrupts."""
    count: list[int] = []
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield count
        return

    def on_sigint(signum: int, frame: object) -> None:
        count.append(signum)
        if len(count) > 1 or task.done():
            raise KeyboardInterrupt
        task.cancel()
        task.get_loop().call_soon_threadsafe(lambda: None)  # wake the loop's selector

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield count
    finally:
        signal.signal(signal.SIGINT, previous)


async def _caught_up(coro: Coroutine[Any, Any, T]) -> T:
    """``coro``, after the loop has handled what arrived while nobody ran it, as a loop
    running all along would have: a server that said goodbye meanwhile (a shutdown, a
    terminated backend) leaves its connections marked closed, so using one says so
    ("connection is closed") instead of failing mid-statement.  A few passes: the data,
    then the end of the stream, then the transport's closing callbacks."""
    for _ in range(4):
        await asyncio.sleep(0)
    return await coro


class LoopThread:
    """A private asyncio loop on a daemon thread; ``run()`` blocks until a coroutine is done.
    Work scheduled on it goes on between calls (the clone pool's)."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="pytest-pgtemplate-db", daemon=True
        )
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout)
        except BaseException:
            future.cancel()  # e.g. Ctrl-C: stop the work instead of leaving it pending
            raise

    def close(self) -> None:
        if self._loop.is_closed():
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        if not self._thread.is_alive():
            self._loop.close()


def parse_url(raw: str, source: str) -> URL:
    """Parse a server URL the user gave; any PostgreSQL driver spelling is accepted."""
    try:
        url = make_url(raw)
    except Exception as exc:  # sqlalchemy raises ArgumentError and ValueError subclasses
        raise errors.ConfigError(
            f"pytest-pgtemplate: cannot parse the server URL {raw!r} (from {source}): {exc}. "
            "Expected e.g. postgresql://user:password@127.0.0.1:5432/postgres; "
            "set --pgt-url / PGTEMPLATE_URL / pgtemplate_url.",
            setting="url",
        ) from exc
    if url.get_backend_name() not in ("postgresql", "postgres"):
        raise errors.ConfigError(
            f"pytest-pgtemplate: the server URL {url.render_as_string()!r} (from {source}) is not a "
            "PostgreSQL URL; set --pgt-url / PGTEMPLATE_URL / pgtemplate_url to postgresql://...",
            setting="url",
        )
    return url.set(drivername="postgresql", database=url.database or "postgres")


def with_driver(url: URL, driver: str, database: str) -> URL:
    """The URL of ``database`` on the same server, for SQLAlchemy with ``driver``."""
    return url.set(drivername=f"postgresql+{driver}", database=database)


def where(url: URL) -> str:
    """``user@host:port/db`` with no password, for messages."""
    host = url.host or url.query.get("host") or "localhost"
    return f"{url.username or ''}@{host}:{url.port or 5432}/{url.database}"


async def connect(url: URL, database: str | None = None) -> asyncpg.Connection:
    """Open an asyncpg connection to ``database`` (default: the URL's), mapping failures to
    messages that name the server and the setting to change."""
    target = url.set(database=database or url.database, drivername="postgresql")
    dsn = target.render_as_string(hide_password=False)
    try:
        return await asyncpg.connect(
            dsn,
            timeout=CONNECT_TIMEOUT,
            command_timeout=COMMAND_TIMEOUT,
            server_settings={"application_name": APPLICATION_NAME},
        )
    except (OSError, asyncio.TimeoutError) as exc:
        raise PgTemplateError(
            f"pytest-pgtemplate: cannot reach PostgreSQL at {where(target)} "
            f"({_reason(exc)}). "
            "Start the server, or point --pgt-url / PGTEMPLATE_URL / pgtemplate_url at a running one.",
            setting="url",
        ) from exc
    except asyncpg.PostgresError as exc:
        raise _connect_error(target, exc) from exc


async def database_settings(conn: asyncpg.Connection, name: str) -> str:
    """The settings ``ALTER DATABASE name SET`` (and ``ALTER ROLE ... IN DATABASE``) gave it:
    no event trigger sees those, so a database meant to be as fresh compares them."""
    return str(await conn.fetchval(
        "SELECT coalesce(string_agg(s.setrole::text || '=' || array_to_string(s.setconfig, ','), ';' "
        "ORDER BY s.setrole), '') FROM pg_db_role_setting s JOIN pg_database d ON d.oid = s.setdatabase "
        "WHERE d.datname = $1", name))


def _connect_error(target: URL, exc: asyncpg.PostgresError) -> PgTemplateError:
    code = errors.sqlstate(exc)
    if code == errors.TOO_MANY_CONNECTIONS:  # with no connection to read the counts from
        return PgTemplateError(capacity.message(where(target), None, exc), setting="url")
    if code in (errors.INVALID_PASSWORD, errors.INVALID_AUTHORIZATION):
        what = f"authentication failed for user {target.username!r}"
        fix = "fix the user/password in"
    elif code == errors.INVALID_CATALOG_NAME:
        what = f"database {target.database!r} does not exist"
        fix = "name an existing maintenance database (e.g. /postgres) in"
    else:
        what = f"connection refused by the server: {exc}"
        fix = "check"
    return PgTemplateError(
        f"pytest-pgtemplate: cannot connect to {where(target)}: {what}; "
        f"{fix} --pgt-url / PGTEMPLATE_URL / pgtemplate_url.",
        setting="url",
    )
