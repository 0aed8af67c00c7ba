"""The relay (``relay.py``) driven directly: server sessions kept between connections,
reset in between, and never handed on unless they ended idle."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import asyncpg
import pytest
from sqlalchemy.engine import make_url

from conftest import SERVER_URL
from pytest_pgtemplate.relay import Relay, relayable

SERVER = make_url(SERVER_URL)


@pytest.fixture
def relay() -> Iterator[Relay]:
    relay = Relay(SERVER)
    relay.start()
    yield relay
    relay.close()


async def through(relay: Relay, **kwargs: object) -> asyncpg.Connection:
    """A connection made as the plugin's engine makes one: to the relay's socket."""
    options: dict[str, object] = {"user": SERVER.username, "database": SERVER.database, **kwargs}
    return await asyncpg.connect(host=relay.url.query["host"], port=SERVER.port or 5432, **options)


async def used_once(relay: Relay) -> int:
    """Connect through the relay and say goodbye; the server session's pid, once it is
    back in the pool."""
    conn = await through(relay)
    pid = conn.get_server_pid()
    await conn.close()
    relay.settle()
    return pid


async def backends(pids: list[int]) -> dict[int, str]:
    """The state of those backends still on the server."""
    conn = await asyncpg.connect(SERVER_URL)
    try:
        rows = await conn.fetch("SELECT pid, state FROM pg_stat_activity WHERE pid = any($1)", pids)
        return {r["pid"]: r["state"] for r in rows}
    finally:
        await conn.close()


async def gone(pid: int) -> bool:
    for _ in range(100):
        if pid not in await backends([pid]):
            return True
        await asyncio.sleep(0.05)
    return False


@pytest.mark.asyncio
async def test_a_session_that_ended_idle_is_handed_on_reset_as_if_new(relay: Relay) -> None:
    conn = await through(relay)
    await conn.execute("SET TimeZone = 'Asia/Tokyo'; CREATE TEMP TABLE leftover (x int); "
                       "SELECT pg_advisory_lock(424242); PREPARE p AS SELECT 1")
    # What asyncpg sends to introspect an enum or other custom type: not a custom setting.
    await conn.fetch("SELECT current_setting('jit') AS cur, set_config('jit', 'off', false) AS new")
    pid = conn.get_server_pid()
    await conn.close()
    relay.settle()
    conn = await through(relay)
    try:
        assert conn.get_server_pid() == pid  # the same server session...
        assert await conn.fetchval("SHOW TimeZone") != "Asia/Tokyo"  # ...as if new
        assert await conn.fetchval("SELECT to_regclass('pg_temp.leftover') IS NULL")
        assert await conn.fetchval(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = 424242") == 0
        assert await conn.fetchval("SELECT count(*) FROM pg_prepared_statements WHERE name = 'p'") == 0
    finally:
        await conn.close()
    assert relay.opened == 1  # the probe's session served both
    assert relay.reused == 2


@pytest.mark.asyncio
async def test_a_session_left_inside_a_transaction_is_not_handed_on(relay: Relay) -> None:
    conn = await through(relay)
    await conn.execute("BEGIN; SELECT 1")
    pid = conn.get_server_pid()
    conn.terminate()  # gone without a goodbye, its transaction open
    relay.settle()
    conn = await through(relay)
    try:
        assert conn.get_server_pid() != pid
    finally:
        await conn.close()
    assert await gone(pid)  # the abandoned session ends (rolled back); it does not linger


@pytest.mark.asyncio
async def test_a_pooled_session_the_server_ended_is_replaced(relay: Relay) -> None:
    pid = await used_once(relay)
    admin = await asyncpg.connect(SERVER_URL)
    try:
        await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
    finally:
        await admin.close()
    assert await gone(pid)
    await asyncio.sleep(0.1)  # the relay reads the server's goodbye
    conn = await through(relay)
    try:
        assert conn.get_server_pid() != pid
        assert await conn.fetchval("SELECT 1") == 1
    finally:
        await conn.close()


@pytest.mark.asyncio
async def test_cancel_requests_reach_the_server_and_refusals_reach_the_client(relay: Relay) -> None:
    conn = await through(relay)
    start = time.monotonic()
    try:
        with pytest.raises(asyncio.TimeoutError):
            await conn.execute("SELECT pg_sleep(30)", timeout=0.3)  # asyncpg cancels it
        assert await conn.fetchval("SELECT 2") == 2  # and the session goes on
    finally:
        await conn.close()
    assert time.monotonic() - start < 10
    with pytest.raises(asyncpg.InvalidCatalogNameError):  # the server's own error, relayed
        await through(relay, database="scratch_no_such_database_here")


@pytest.mark.asyncio
async def test_clear_ends_the_pooled_sessions_before_returning(relay: Relay) -> None:
    pid = await used_once(relay)
    assert await backends([pid]) == {pid: "idle"}  # kept for the next connection
    relay.clear()
    assert await backends([pid]) == {}  # gone at once: the database may be renamed or dropped now


@pytest.mark.asyncio
async def test_a_session_that_set_a_custom_setting_is_not_handed_on(relay: Relay) -> None:
    """After RESET ALL a custom setting stays defined ('' where a new session has NULL):
    such a session is closed, not handed to the next test."""
    for statement in ("SET app.tenant = 'a'", "SELECT set_config('app.tenant', 'a', false)",
                      "BEGIN; SET LOCAL app.tenant = 'a'; COMMIT"):
        conn = await through(relay)
        await conn.execute(statement)
        pid = conn.get_server_pid()
        await conn.close()
        relay.settle()
        conn = await through(relay)
        try:
            assert conn.get_server_pid() != pid, statement
            assert await conn.fetchval("SELECT current_setting('app.tenant', true)") is None
        finally:
            await conn.close()
        relay.settle()


@pytest.mark.asyncio
async def test_idle_sessions_kept_are_few_whatever_a_test_held_at_once(relay: Relay) -> None:
    conns = [await through(relay) for _ in range(5)]
    pids = [c.get_server_pid() for c in conns]
    for conn in conns:
        await conn.close()
    relay.settle()
    assert sorted((await backends(pids)).values()) == ["idle", "idle"]  # the rest ended


def test_what_the_relay_does_not_take() -> None:
    assert relayable(SERVER)
    assert relayable(SERVER.set(host="localhost"))
    assert relayable(SERVER._replace(host=None).set(query={"host": "/var/run/postgresql"}))
    assert not relayable(SERVER.set(host="db.example.com"))  # plain text must not leave the machine
    assert not relayable(SERVER.set(host="10.1.2.3"))
    assert not relayable(SERVER._replace(host=None))  # asyncpg's own search of defaults: not guessed
    assert not relayable(SERVER.set(query={"ssl": "require"}))
    assert not relayable(SERVER._replace(host=None).set(query={"host": "/a,/b"}))
    # Nothing listens there: start() says so (the engine then connects directly).
    with pytest.raises((OSError, asyncpg.exceptions.ConnectionDoesNotExistError)):
        Relay(SERVER.set(port=1)).start()
