"""Out of connections: one clear error naming the limit, the count and the fix.

A role's CONNECTION LIMIT is set on the shared server (a scratch role); a database's too (a
scratch database); max_connections only on an embedded cluster of the test's own.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import Iterator
from fnmatch import fnmatch
from pathlib import Path

import asyncpg
import psycopg
import pytest
from sqlalchemy.engine import make_url

from conftest import ISOLATION_SUITE, SERVER_URL, Project, scratch_role
from pytest_pgtemplate import capacity, embedded
from pytest_pgtemplate.db import connect, parse_url, where
from pytest_pgtemplate.errors import PgTemplateError

ADVICE = ("Each pytest process of a run keeps 3 connections open per database (admin, reset, the test's "
          "engine)")
DRIVER_FRAMES = ("asyncpg/connect_utils.py", "psycopg/connection.py", "sqlalchemy/")


def role_error(role: str, n: int, workers: str) -> str:
    return (f"pytest-pgtemplate: out of connections to {role}@127.0.0.1:5432/postgres: role {role} has "
            f"{n} connections open, its CONNECTION LIMIT is {n} (server: * of max_connections=* in use). "
            f"{ADVICE}{workers}, plus other runs' on the same server. Raise it (ALTER ROLE \"{role}\" "
            "CONNECTION LIMIT n), run fewer workers (-n) or CI jobs at once, or point --pgt-url / "
            "PGTEMPLATE_URL / pgtemplate_url at a server or role with room.")


def run_as_role_limited_to_2(project: Project, *args: str) -> tuple[pytest.RunResult, str]:
    """The isolation suite, run as a scratch role of CONNECTION LIMIT 2; its result and role."""
    project.pytester.makepyfile(test_inner=ISOLATION_SUITE)
    with scratch_role(project, "LOGIN CREATEDB CONNECTION LIMIT 2") as url:
        project.pytester._monkeypatch.setenv("PGTEMPLATE_URL", url)
        result = project.run(*args)
    role = make_url(url).username
    assert role is not None
    return result, role


def test_a_role_at_its_connection_limit_fails_the_build_with_one_clear_error(project: Project) -> None:
    result, role = run_as_role_limited_to_2(project, "-n", "2")
    out = result.stdout.str()
    # Both workers' admin connections take the role's 2 slots: the migration's is refused.
    result.stdout.fnmatch_lines([role_error(role, 2, ", so -n 2 needs 6")])
    # The other worker quotes it in one line. (The short summary repeats each error; pytest does not
    # shorten its lines on CI, so it is left out of the count.)
    errors = out.split("short test summary info")[0]
    assert errors.count(ADVICE) == 1, out
    result.stdout.fnmatch_lines(["pytest-pgtemplate: the template could not be built; the process of "
                                 "this run that tried first reported why (out of connections to *"])
    assert not any(frame in out for frame in DRIVER_FRAMES), out
    assert "fix the migration" not in out
    result.assert_outcomes(errors=2)


def test_a_test_refused_a_connection_gets_the_story_once_then_the_limit_only(project: Project) -> None:
    result, role = run_as_role_limited_to_2(project, "-p", "no:xdist")
    out = result.stdout.str()
    # Admin and reset connections fill the limit: every test's own engine (async: asyncpg,
    # sync: psycopg, which gives no SQLSTATE) is refused, inside the test.
    result.assert_outcomes(passed=1, failed=10)
    result.stdout.fnmatch_lines([role_error(role, 2, "")])
    brief = (f"pytest-pgtemplate: out of connections to {role}@127.0.0.1:5432/postgres: role {role} has 2 "
             "connections open, its CONNECTION LIMIT is 2 (server: * of max_connections=* in use) (this "
             "run's first report of it says what to change).")
    assert len([line for line in out.splitlines() if fnmatch(line, brief)]) == 9, out
    assert not any(frame in out for frame in DRIVER_FRAMES), out


def test_with_tb_long_the_driver_traceback_is_kept(project: Project) -> None:
    result, _ = run_as_role_limited_to_2(project, "-p", "no:xdist", "-k", "async and 0", "--tb=long")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["E *asyncpg.exceptions.TooManyConnectionsError: too many connections for *"])


@pytest.fixture
def limited_database() -> Iterator[tuple[str, str]]:
    """A scratch role and a scratch database (CONNECTION LIMIT 1) it connects to: their URL and name."""
    suffix = os.urandom(4).hex()
    role, database = f"scratch_{suffix}_role", f"scratch_{suffix}_db"
    sql = psycopg.sql
    with psycopg.connect(SERVER_URL, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
        conn.execute(sql.SQL("CREATE DATABASE {} CONNECTION LIMIT 1").format(sql.Identifier(database)))
    try:
        yield make_url(SERVER_URL).set(username=role, database=database).render_as_string(False), database
    finally:
        with psycopg.connect(SERVER_URL, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(database)))
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


async def refused(url: str) -> asyncpg.PostgresError:
    try:
        conn = await asyncpg.connect(url)
    except asyncpg.PostgresError as exc:
        return exc
    await conn.close()
    raise AssertionError("the connection was not refused")


@pytest.mark.asyncio
async def test_a_database_at_its_connection_limit_is_named_with_its_count_when_it_can_be_read(
    limited_database: tuple[str, str],
) -> None:
    url, database = limited_database
    admin = await asyncpg.connect(url)  # the one slot: later connections are refused
    try:
        exc = await refused(url)
        error = await capacity.explain(admin, "here", exc)
        with pytest.raises(PgTemplateError) as first:  # as if it were the admin connection
            await connect(parse_url(url, "test"))
    finally:
        await admin.close()
    assert error is not None
    assert str(error).startswith(
        f"pytest-pgtemplate: out of connections to here: database {database} has 1 connections open, its "
        f"CONNECTION LIMIT is 1 (server: ")
    assert f'Raise it (ALTER DATABASE "{database}" CONNECTION LIMIT n), run fewer workers' in str(error)
    # With no connection of ours open, there is nothing to read the counts with.
    assert str(first.value).startswith(
        f"pytest-pgtemplate: out of connections to {where(parse_url(url, 'test'))}: the server refused a "
        f'connection (too many connections for database "{database}"; SQLSTATE 53300): max_connections, '
        "the role's CONNECTION LIMIT or the database's was reached. " + ADVICE)
    assert first.value.setting == "url"


@pytest.mark.asyncio
async def test_an_error_that_is_not_about_slots_is_left_alone() -> None:
    admin = await asyncpg.connect(SERVER_URL)
    try:
        with pytest.raises(asyncpg.PostgresError) as info:
            await admin.execute("SELECT 1/0")
        assert await capacity.explain(admin, "here", info.value) is None
    finally:
        await admin.close()


@pytest.fixture
def small_cluster(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """An embedded cluster of our own with max_connections=6 (3 of them for superusers only)."""
    settings = tuple(s for s in embedded._SETTINGS if not s.startswith("max_connections="))
    monkeypatch.setattr(embedded, "_SETTINGS", (*settings, "max_connections=6"))
    shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    base = Path(tempfile.mkdtemp(prefix="pgt-test-", dir=shm))
    base.chmod(0o755)  # the server user must pass through it
    try:
        server = embedded.start(None, "test", cache_root=base / "cache")
    except PgTemplateError as exc:
        shutil.rmtree(base, ignore_errors=True)
        pytest.skip(f"no PostgreSQL binaries for an embedded cluster: {exc}")
    try:
        yield server.url
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.asyncio
async def test_a_full_server_names_max_connections_and_the_reserved_slots(small_cluster: str) -> None:
    superuser = await asyncpg.connect(small_cluster)
    await superuser.execute("CREATE ROLE scratch_capacity LOGIN")
    url = make_url(small_cluster).set(username="scratch_capacity").render_as_string(False)
    held = [await asyncpg.connect(url) for _ in range(2)]  # with the superuser's: 3 of the 6-3 open
    try:
        exc = await refused(url)
        error = await capacity.explain(held[0], "here", exc)
        full = await capacity.explain(superuser, "here", exc)
    finally:
        await asyncio.gather(*(conn.close() for conn in held))
        await superuser.close()
    assert error is not None
    assert full is not None
    assert str(error).startswith(
        "pytest-pgtemplate: out of connections to here: 3 of max_connections=6 in use, the last 3 reserved "
        "for superusers (superuser_reserved_connections). " + ADVICE)
    assert "Raise max_connections on the server (postgresql.conf or ALTER SYSTEM; needs a restart)," in str(
        error)
    # Read by a superuser (no slot is reserved from it), no limit shows as reached: the
    # refusal is still explained, with the counts of the moment.
    assert fnmatch(str(full), (
        "pytest-pgtemplate: out of connections to here: the server refused a connection (*; SQLSTATE 53300; "
        "now 3 of max_connections=6 in use, role postgres has 1 open): max_connections, the role's "
        "CONNECTION LIMIT or the database's was reached. " + ADVICE + "*Raise the limit that was reached, *"))
