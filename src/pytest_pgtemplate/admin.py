"""Database-level operations on the maintenance database: create, clone, mark, drop, lock.

``Admin`` owns one autocommit asyncpg connection to the server's maintenance database.
It only ever alters or drops databases whose marker says they are ours.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import asyncpg
from sqlalchemy.engine import URL

from . import errors
from .db import connect, database_settings, where
from .errors import PgTemplateError
from .naming import FORMAT_VERSION, SPARE, Marker, spare_source, sql, template_build

MIN_SERVER_MAJOR = 13
CLONE_RETRY_SECONDS = 15.0
NOTIFY_AFTER = 3.0  # seconds of waiting on a lock before saying who holds it


@dataclass(frozen=True, slots=True)
class DatabaseInfo:
    name: str
    marker: Marker | None
    is_template: bool


@dataclass(frozen=True, slots=True)
class DatabaseRow:
    name: str
    marker: Marker | None
    is_template: bool
    size: int | None
    oid: int = 0


def run_lock(run_id: str) -> str:
    return f"run:{run_id}"


def use_lock(template: str) -> str:
    return f"use:{template}"


def lock_key(name: str) -> int:
    """A stable signed 64-bit advisory-lock key for ``name``."""
    digest = hashlib.blake2b(f"pytest-pgtemplate:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def require_server(major: int, url: URL) -> None:
    """Refuse a server older than what the plugin's SQL needs."""
    if major < MIN_SERVER_MAJOR:
        raise PgTemplateError(
            f"pytest-pgtemplate: the server at {where(url)} runs PostgreSQL {major}; "
            f"PostgreSQL {MIN_SERVER_MAJOR} or newer is required (DROP DATABASE ... WITH "
            "(FORCE)). Point --pgt-url / PGTEMPLATE_URL / pgtemplate_url at a newer server.",
            setting="url",
        )


class Admin:
    """The admin connection: DDL on databases and advisory locks, nothing else."""

    def __init__(self, url: URL, conn: asyncpg.Connection, major: int, role: str) -> None:
        self.url = url
        self.conn = conn
        self.major = major
        self.role = role
        self._held: set[str] = set()  # shared locks this session holds

    @classmethod
    async def open(cls, url: URL) -> Admin:
        conn = await connect(url)
        major = int(await conn.fetchval("SHOW server_version_num")) // 10000
        role = str(await conn.fetchval("SELECT current_user"))
        try:
            require_server(major, url)
        except PgTemplateError:
            await conn.close()
            raise
        return cls(url, conn, major, role)

    async def close(self) -> None:
        await self.conn.close()

    async def info(self, name: str) -> DatabaseInfo | None:
        row = await self.conn.fetchrow(
            "SELECT datistemplate, shobj_description(oid, 'pg_database') AS comment "
            "FROM pg_database WHERE datname = $1",
            name,
        )
        if row is None:
            return None
        return DatabaseInfo(name, Marker.parse(row["comment"]), bool(row["datistemplate"]))

    async def create(self, name: str, marker: Marker, template: str | None = None,
                     strategy: str | None = None, *, throwaway: bool = False) -> None:
        """CREATE DATABASE (optionally from a template), then mark it ours.  ``throwaway``:
        its commits do not wait for the WAL flush (``synchronous_commit = off`` for that
        database only): a test database need not survive a server crash.

        A clone retries while the template is briefly in use by another session
        (SQLSTATE 55006), with bounded backoff.
        """
        if template is None:
            statement = sql("CREATE DATABASE {}", name)
        else:
            statement = sql("CREATE DATABASE {} TEMPLATE {}", name, template)
            if strategy is not None and self.major >= 15:
                statement += " STRATEGY FILE_COPY" if strategy == "file_copy" else " STRATEGY WAL_LOG"
        deadline = time.monotonic() + CLONE_RETRY_SECONDS
        delay = 0.05
        while True:
            try:
                await self.conn.execute(statement)
                break
            except asyncpg.PostgresError as exc:
                code = errors.sqlstate(exc)
                if code == errors.OBJECT_IN_USE and time.monotonic() < deadline:
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 1.0)
                    continue
                raise self._create_error(name, template, exc) from exc
        await self.mark(name, marker)
        if throwaway:
            await self.conn.execute(sql("ALTER DATABASE {} SET synchronous_commit = off", name))

    def _create_error(self, name: str, template: str | None,
                      exc: asyncpg.PostgresError) -> PgTemplateError:
        code = errors.sqlstate(exc)
        if code == errors.INSUFFICIENT_PRIVILEGE:
            return PgTemplateError(
                f"pytest-pgtemplate: cannot create database {name!r} on {where(self.url)}: role "
                f"{self.url.username!r} lacks CREATEDB. Run ALTER ROLE ... CREATEDB, or set "
                "--pgt-url / PGTEMPLATE_URL / pgtemplate_url to a role that has it.",
                setting="url",
            )
        if code == errors.OBJECT_IN_USE:
            return PgTemplateError(
                f"pytest-pgtemplate: cannot clone {template!r} into {name!r}: other sessions kept "
                f"using the template for {CLONE_RETRY_SECONDS:.0f} s ({exc}). Close connections "
                "to the template database.",
            )
        return PgTemplateError(f"pytest-pgtemplate: CREATE DATABASE {name!r} failed: {exc}")

    async def mark(self, name: str, marker: Marker) -> None:
        # COMMENT takes no bind parameters: let the server quote the value.
        statement = await self.conn.fetchval(
            "SELECT format('COMMENT ON DATABASE %I IS %L', $1::text, $2::text)", name, marker.text()
        )
        await self.conn.execute(statement)

    async def terminate(self, name: str) -> None:
        """Close every other session on ``name``."""
        await self.conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = $1 AND pid <> pg_backend_pid()",
            name,
        )

    async def finalize_template(self, building: str, final: str, marker: Marker) -> None:
        """Publish a fully built database as the template ``final``.

        The marker saying kind=template is written last: a crash at any earlier
        step leaves a database a later run recognises as unfinished and rebuilds.
        """
        await self.terminate(building)
        await self.conn.execute(
            sql("ALTER DATABASE {} WITH ALLOW_CONNECTIONS false IS_TEMPLATE true", building)
        )
        await self.terminate(building)
        await self.conn.execute(sql("ALTER DATABASE {} RENAME TO {}", building, final))
        await self.mark(final, marker)

    async def source(self, template: str, *, throwaway: bool) -> str | None:
        """What a spare must hold to stand in for a clone of ``template`` made now: that very
        build of it (a rebuilt template, same name, has another oid) with the same durability
        setting.  None if the template is gone."""
        oid = await self.conn.fetchval("SELECT oid FROM pg_database WHERE datname = $1", template)
        return None if oid is None else spare_source(template_build(template, oid), durable=not throwaway)

    async def settings(self, name: str) -> str:
        return await database_settings(self.conn, name)

    async def park(self, name: str, spare: str, marker: Marker) -> None:
        """Rename worker database ``name`` to ``spare`` and mark it a spare, in one transaction
        (a rename needs every other session gone: the ones left on it are closed first)."""
        await self.terminate(name)
        async with self.conn.transaction():
            await self.conn.execute(sql("ALTER DATABASE {} RENAME TO {}", name, spare))
            await self.mark(spare, marker)

    async def take_spare(self, source: str, prefix: str, name: str, marker: Marker) -> Marker | None:
        """Rename a spare holding ``source`` to ``name`` and mark it with ``marker``; returns
        the spare's marker, or None when there is none to take.  A rename is atomic and fails
        while anyone is connected: of processes racing for one spare, one gets it (the other
        finds it gone), and a spare somebody is still connected to is passed over."""
        rows = await self.conn.fetch(
            "SELECT d.datname, shobj_description(d.oid, 'pg_database') AS comment FROM pg_database d "
            "WHERE starts_with(d.datname, $1) AND NOT d.datistemplate "
            # (An autovacuum worker on it is no user: the rename ends it.)
            "AND NOT EXISTS (SELECT FROM pg_stat_activity a WHERE a.datid = d.oid "
            "AND a.backend_type = 'client backend') ORDER BY d.datname",
            f"{prefix}_s_",
        )
        for row in rows:
            spare = Marker.parse(row["comment"])
            if spare is None or (spare.kind, spare.prefix, spare.source, spare.format) != (
                    SPARE, prefix, source, FORMAT_VERSION):
                continue
            try:
                async with self.conn.transaction():
                    # Another taker renaming it holds its lock: move on rather than queue.
                    await self.conn.execute("SET LOCAL lock_timeout = '2s'")
                    await self.conn.execute(sql("ALTER DATABASE {} RENAME TO {}", row["datname"], name))
                    await self.mark(name, marker)
            except asyncpg.PostgresError:
                # Taken or swept meanwhile (3D000), connected to (55006), locked (55P03), or
                # ``name`` in the way (42P04: the clone that follows says so): a spare is only
                # a shortcut, so the next one, or a clone.
                continue
            return spare
        return None

    async def drop_ours(self, name: str, *, seen: Marker | None = None) -> bool:
        """Drop ``name`` if it exists and carries our marker; never touch anything else.
        With ``seen``, only if the marker is still that one: a decision taken on an earlier
        look (a sweep's) does not hold once the owner has re-marked it (e.g. kept it).

        Returns False if there was nothing of ours to drop.
        """
        info = await self.info(name)
        if info is None or info.marker is None or seen not in (None, info.marker):
            return False
        if info.is_template:
            await self.conn.execute(sql("ALTER DATABASE {} WITH IS_TEMPLATE false", name))
        await self.conn.execute(sql("DROP DATABASE IF EXISTS {} WITH (FORCE)", name))
        return True

    async def lock(self, name: str, timeout: float, what: str,
                   notify: Callable[[str], None] | None = None) -> None:
        """Take the session advisory lock for ``name``, waiting at most ``timeout`` seconds;
        after NOTIFY_AFTER seconds of waiting, ``notify`` is told once who holds it.

        Advisory locks only conflict within one database; this connection is always
        on the maintenance database, so every run on the server sees the same lock.
        """
        key = lock_key(name)
        start = time.monotonic()
        delay = 0.02
        told = notify is None
        while not await self.conn.fetchval("SELECT pg_try_advisory_lock($1)", key):
            waited = time.monotonic() - start
            if waited >= timeout:
                holder = await self.lock_holder(key)
                raise PgTemplateError(
                    f"pytest-pgtemplate: gave up after {timeout:g} s waiting for {what} "
                    f"(advisory lock held by {holder}). Wait for it to finish or stop it, or raise "
                    "--pgt-timeout / PGTEMPLATE_TIMEOUT / pgtemplate_timeout.",
                    setting="timeout",
                )
            if not told and waited >= NOTIFY_AFTER:
                told = True
                assert notify is not None
                notify(f"waiting for {what} (advisory lock held by {await self.lock_holder(key)}), "
                       f"at most {timeout:g} s")
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, 0.5)

    async def unlock(self, name: str) -> None:
        await self.conn.fetchval("SELECT pg_advisory_unlock($1)", lock_key(name))

    async def hold_shared(self, name: str) -> None:
        """Hold a shared advisory lock on ``name`` for as long as this connection lives:
        it says "a live process uses this" (a run, a template) to every sweeper."""
        if name not in self._held:
            await self.conn.fetchval("SELECT pg_advisory_lock_shared($1)", lock_key(name))
            self._held.add(name)

    async def unused(self, name: str) -> bool:
        """True if no live session holds ``name``'s lock; then this session holds it
        exclusively until ``unlock(name)``, so nobody starts using it meanwhile.

        A lock this session holds shared counts as used (PostgreSQL would grant us the
        exclusive lock on top of our own shared one)."""
        if name in self._held:
            return False
        return bool(await self.conn.fetchval("SELECT pg_try_advisory_lock($1)", lock_key(name)))

    async def held_shared(self, name: str) -> bool:
        """True while a live session holds ``name``'s lock shared (a run, a template's user).
        A sweeper holding it exclusively, to drop what it guards, is no sign of life."""
        return bool(await self.conn.fetchval(
            "SELECT EXISTS (SELECT FROM pg_locks WHERE locktype = 'advisory' AND granted "
            "AND mode = 'ShareLock' AND objsubid = 1 AND database = (SELECT oid FROM pg_database "
            "WHERE datname = current_database()) AND ((classid::bigint << 32) | objid::bigint) = $1)",
            lock_key(name),
        ))

    async def databases(self) -> list[DatabaseRow]:
        """Every database on the server with its marker (None: not ours) and size."""
        rows = await self.conn.fetch(
            "SELECT oid, datname, datistemplate, shobj_description(oid, 'pg_database') AS comment, "
            "CASE WHEN has_database_privilege(oid, 'CONNECT') OR datistemplate "
            "THEN pg_database_size(oid) END AS size FROM pg_database ORDER BY datname"
        )
        return [
            DatabaseRow(r["datname"], Marker.parse(r["comment"]), bool(r["datistemplate"]), r["size"],
                        int(r["oid"]))
            for r in rows
        ]

    async def lock_holder(self, key: int) -> str:
        row = await self.conn.fetchrow(
            "SELECT a.pid, a.application_name, a.client_addr::text AS addr, "
            "now() - a.backend_start AS age FROM pg_locks l JOIN pg_stat_activity a USING (pid) "
            "WHERE l.locktype = 'advisory' AND l.granted "
            "AND ((l.classid::bigint << 32) | l.objid::bigint) = $1",
            key,
        )
        if row is None:
            return "a session that has since gone"
        app = row["application_name"] or "no application_name"
        return f"pid {row['pid']} ({app}, {row['addr'] or 'local'})"


__all__ = ["Admin", "DatabaseInfo", "lock_key"]
