"""The ``clone`` reset: every test gets a database in the template's state, of its own.

Clones are prepared ahead, in the background (on a private loop of their own, which a
daemon thread runs between calls) and with an admin connection of their own, so a test
usually waits milliseconds rather than a whole CREATE DATABASE.  A used clone is brought
back in the background too: reset (see ``reset.py``) and put back in the pool when the
reset can vouch for it (no schema change: the event triggers, a superuser's, see every
DDL; no large object; the database's settings as created), else dropped and replaced by
a new clone, after any clone still to be made (a DROP DATABASE forces a checkpoint: on a
durable server it would hold up the next test's clone).  So on a durable server the pool
keeps ahead of the tests: a CREATE DATABASE takes hundreds of milliseconds, a reset one
or two.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools

import asyncpg
from sqlalchemy.engine import URL

from .admin import Admin
from .db import CONNECTION_LOST, LoopThread, connect
from .errors import PgTemplateError
from .naming import CLONE, Marker, clone_name
from .reset import TruncateReset

POOL_SIZE = 2
MAX_PENDING_DROPS = 4  # used clones waiting to be dropped, at most, before drops go first


class ClonePool:
    """Ready clones of one template for one process; ``take()`` blocks until one is ready."""

    def __init__(self, loop: LoopThread, url: URL, *, template: str, fingerprint: str, prefix: str,
                 run_id: str, worker: str, strategy: str | None, database: str = "",
                 throwaway: bool = False, reset_timeout: float = 10.0, recycle: bool = True) -> None:
        self._loop = loop
        self._url = url
        self._template = template
        self._marker = Marker.new(CLONE, fingerprint, run_id, prefix)
        self._names = (clone_name(prefix, run_id, worker, n, database) for n in itertools.count())
        self._strategy = strategy
        self._throwaway = throwaway
        self._admin: Admin | None = None
        # Queues bind to a loop on first use only: that is the private loop.
        self._ready: asyncio.Queue[str] = asyncio.Queue()
        # (priority, order, action, name): creates first, then drops, then stop.
        self._work: asyncio.PriorityQueue[tuple[int, int, str, str]] = asyncio.PriorityQueue()
        self._order = itertools.count()
        self._drops = 0  # drops queued, not yet done
        self._worker_task: asyncio.Task[None] | None = None
        self._failure: BaseException | None = None
        self._reset_timeout = reset_timeout
        self._resetters: dict[str, TruncateReset] = {}  # a connection to each clone brought back
        self._settings: str | None = None  # a fresh clone's database settings
        # Known after the first used clone's reset (unless recycling is off: every clone new).
        self._recyclable: bool | None = None if recycle else False
        self._coming = 0  # creates and recycles queued or under way: clones on their way
        self.created = 0
        self.recycled = 0

    async def _start(self) -> None:
        self._admin = await Admin.open(self._url)
        for _ in range(POOL_SIZE):
            self._queue("create", next(self._names))
        self._worker_task = asyncio.get_running_loop().create_task(self._serve())

    async def _serve(self) -> None:
        # One admin connection does the work in order: creates and drops never overlap.
        assert self._admin is not None
        while True:
            _, _, action, name = await self._work.get()
            if action == "stop":
                return
            try:
                if action == "create":
                    await self._admin.create(name, self._marker, self._template, self._strategy,
                                             throwaway=self._throwaway)
                    if self._settings is None:
                        self._settings = await self._admin.settings(name)
                    self.created += 1
                    self._ready.put_nowait(name)
                elif action == "recycle":
                    if await self._recycle(name):
                        self.recycled += 1
                        self._ready.put_nowait(name)
                    else:
                        self._queue("drop", name)
                        self._queue("create", next(self._names))
                else:
                    self._drops -= 1
                    await self._admin.drop_ours(name)
            except Exception as exc:  # surfaced to the next take()
                self._failure = exc
                self._ready.put_nowait("")
            finally:
                if action in ("create", "recycle"):
                    self._coming -= 1

    async def _recycle(self, name: str) -> bool:
        """Reset a used clone; True if it is now as a fresh one would be."""
        resetter = self._resetters.get(name)
        try:
            if resetter is None:
                resetter = TruncateReset(await connect(self._url, name), name, self._reset_timeout)
                self._resetters[name] = resetter
            if self._recyclable is None:
                self._recyclable = await resetter.sees_schema_changes()
            if self._recyclable and self._settings is not None:
                # A fresh clone has no sessions: the used one's (engines of the test, its own
                # connections, idle or not) go, so none of them outlives its test.
                await resetter.conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()")
                if await resetter.renew(self._settings):
                    return True
        except (PgTemplateError, asyncpg.PostgresError, *CONNECTION_LOST):
            pass
        if (gone := self._resetters.pop(name, None)) is not None:
            await gone.conn.close(timeout=5)
        return False

    def _queue(self, action: str, name: str) -> None:
        priority = {"recycle": 0, "create": 0, "drop": 1, "stop": 2}[action]
        if action in ("create", "recycle"):
            self._coming += 1
        if action == "drop":
            self._drops += 1
            if self._drops > MAX_PENDING_DROPS:  # tests outrun the clones: bound the disk used
                priority = -1
        self._work.put_nowait((priority, next(self._order), action, name))

    async def _queue_soon(self, action: str, name: str) -> None:
        self._queue(action, name)

    async def _take(self) -> str:
        if self._admin is None:
            await self._start()
        if self._recyclable is False or (self._ready.empty() and not self._coming):
            self._queue("create", next(self._names))  # keep the pool full
        name = await self._ready.get()
        if not name and self._failure is not None:
            raise self._failure
        return name

    def take(self) -> str:
        """A clone's name, in the template's state (waits for the background work if none
        is ready yet)."""
        return self._loop.run(self._take())

    def release(self, name: str) -> None:
        """Bring a used clone back (or drop it) in the background."""
        self._loop.run(self._queue_soon("drop" if self._recyclable is False else "recycle", name))

    def close(self) -> None:
        """Finish pending work, drop every clone still around, and stop the pool's loop."""
        try:
            if self._admin is not None:
                self._loop.run(self._close(), timeout=120)
        finally:
            self._loop.close()

    async def _close(self) -> None:
        assert self._admin is not None
        # Creates not started yet are moot; drops still matter, and so do used clones.
        queued = [self._work.get_nowait() for _ in range(self._work.qsize())]
        for item in queued:
            if item[2] == "drop":
                self._work.put_nowait(item)
            elif item[2] == "recycle":
                self._queue("drop", item[3])
        self._queue("stop", "")
        if self._worker_task is not None:
            await self._worker_task
        for resetter in self._resetters.values():
            with contextlib.suppress(Exception):  # the drops below end it anyway
                await resetter.conn.close(timeout=5)
        self._resetters.clear()
        while not self._ready.empty():
            name = self._ready.get_nowait()
            if name:
                await self._admin.drop_ours(name)
        await self._admin.close()
