"""The ``clone`` reset: every test gets a fresh clone of the template.

Clones are prepared ahead, in the background, on the plugin's private loop and with
an admin connection of their own, so a test usually waits milliseconds rather than a
whole CREATE DATABASE; used clones are dropped in the background too, after any clone
still to be made (a DROP DATABASE forces a checkpoint: on a durable server it would
hold up the next test's clone).
"""

from __future__ import annotations

import asyncio
import itertools

from sqlalchemy.engine import URL

from .admin import Admin
from .db import LoopThread
from .naming import CLONE, Marker, clone_name

POOL_SIZE = 2
MAX_PENDING_DROPS = 4  # used clones waiting to be dropped, at most, before drops go first


class ClonePool:
    """Ready clones of one template for one process; ``take()`` blocks until one is ready."""

    def __init__(self, loop: LoopThread, url: URL, *, template: str, fingerprint: str, prefix: str,
                 run_id: str, worker: str, strategy: str | None, database: str = "",
                 throwaway: bool = False) -> None:
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
                    self._ready.put_nowait(name)
                else:
                    self._drops -= 1
                    await self._admin.drop_ours(name)
            except Exception as exc:  # surfaced to the next take()
                self._failure = exc
                self._ready.put_nowait("")

    def _queue(self, action: str, name: str) -> None:
        priority = {"create": 0, "drop": 1, "stop": 2}[action]
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
        self._queue("create", next(self._names))  # keep the pool full
        name = await self._ready.get()
        if not name and self._failure is not None:
            raise self._failure
        return name

    def take(self) -> str:
        """A fresh clone's name (waits for the background work if none is ready yet)."""
        return self._loop.run(self._take())

    def release(self, name: str) -> None:
        """Drop a used clone in the background."""
        self._loop.run(self._queue_soon("drop", name))

    def close(self) -> None:
        """Finish pending work and drop every clone still around."""
        if self._admin is not None:
            self._loop.run(self._close(), timeout=120)

    async def _close(self) -> None:
        assert self._admin is not None
        # Creates not started yet are moot; drops still matter.
        queued = [self._work.get_nowait() for _ in range(self._work.qsize())]
        for item in queued:
            if item[2] == "drop":
                self._work.put_nowait(item)
        self._queue("stop", "")
        if self._worker_task is not None:
            await self._worker_task
        while not self._ready.empty():
            name = self._ready.get_nowait()
            if name:
                await self._admin.drop_ours(name)
        await self._admin.close()
