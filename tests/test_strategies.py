"""Each reset strategy isolates tests: rows, sequences, template rows, commits, leaks, DDL."""

from __future__ import annotations

import re

import pytest

from conftest import Project, scratch_role

SUITE = '''
import pytest
from sqlalchemy import create_engine, text

REFERENCE = "de:Germany,fr:France,it:Italy"
LEAKS = []


async def clean(session):
    row = (await session.execute(text(
        "select (select count(*) from customer), (select count(*) from orders), "
        "(select string_agg(code || ':' || name, ',' order by code) from country), "
        "(select count(*) from information_schema.tables where table_name = 'extra'), "
        "(select count(*) from information_schema.columns where column_name = 'nickname')"))).one()
    assert tuple(row) == (0, 0, REFERENCE, 0, 0)


@pytest.mark.parametrize("i", range(3))
async def test_commits_rows_sequences_and_template_rows(pg_session, i):
    await clean(pg_session)
    cid = (await pg_session.execute(text(
        "insert into customer (name, country) values ('a', 'fr') returning id"))).scalar()
    assert cid == 1
    await pg_session.execute(text("delete from country where code = 'it'"))
    await pg_session.commit()
    await pg_session.execute(text("insert into orders (customer_id) values (1)"))
    await pg_session.commit()


@pytest.mark.parametrize("i", range(2))
async def test_sessionmaker_sessions_see_each_other(pg_sessionmaker, i):
    async with pg_sessionmaker() as one:
        await clean(one)
        await one.execute(text("insert into customer (name) values ('shared')"))
        await one.commit()
    async with pg_sessionmaker() as two:
        assert (await two.execute(text("select count(*) from customer"))).scalar() == 1


@pytest.mark.parametrize("i", range(2))
def test_leaks_an_open_transaction(pg_sync_url, i):
    conn = create_engine(pg_sync_url).connect()
    conn.execute(text("insert into customer (name) values ('leaked')"))
    LEAKS.append(conn)


@pytest.mark.parametrize("i", range(2))
async def test_writes_through_the_engine_directly(pg_engine, i):
    async with pg_engine.begin() as conn:
        assert (await conn.execute(text("select count(*) from customer"))).scalar() == 0
        await conn.execute(text("insert into customer (name) values ('direct')"))


@pytest.mark.parametrize("i", range(2))
async def test_changes_the_schema(pg_session, i):
    await clean(pg_session)
    await pg_session.execute(text("create table extra (id int)"))
    await pg_session.execute(text("alter table customer add column nickname text"))
    await pg_session.commit()


async def test_finally_clean(pg_session):
    await clean(pg_session)
'''


@pytest.mark.parametrize("strategy", ["truncate", "rollback", "clone"])
@pytest.mark.parametrize("xdist", [["-p", "no:xdist"], ["-n", "2"]], ids=["single", "n2"])
def test_every_strategy_isolates_tests(project: Project, strategy: str, xdist: list[str]) -> None:
    project.pytester.makepyfile(test_inner=SUITE)
    result = project.run(*xdist, "--pgt-reset", strategy)
    result.assert_outcomes(passed=12)
    ddl_warning = "*the test changed the schema (*CREATE TABLE*extra*); a truncate reset cannot undo that*"
    if strategy == "truncate":
        result.stdout.fnmatch_lines([ddl_warning])
    else:
        result.stdout.no_fnmatch_line(ddl_warning)
    label = "clone waits" if strategy == "clone" else f"resets ({strategy})"
    result.stdout.fnmatch_lines([f"{label}: *, p50 * ms, p95 * ms, max * ms"])
    if strategy == "clone":
        result.stdout.fnmatch_lines(["clones: * created, * used ones brought back by a reset *"])
    assert [db for db in project.databases() if "_c_" in db or "_w_" in db] == []


def clone_counts(result: pytest.RunResult) -> tuple[int, int]:
    """From the summary: clones created, and used ones brought back by a reset."""
    [line] = [line for line in result.stdout.lines if line.startswith("clones: ")]
    match = re.fullmatch(r"clones: (\d+) created, (\d+) used ones brought back by a reset "
                         r"\(no schema change seen\)", line)
    assert match is not None, line
    return int(match[1]), int(match[2])


def test_used_clones_are_brought_back_by_a_reset_unless_a_change_could_go_unseen(project: Project) -> None:
    """A reset, a millisecond or two, stands in for a CREATE DATABASE, hundreds on a durable
    server: except after a schema change (both DDL tests' clones are replaced), and never
    for a role whose resets cannot see schema changes (no event triggers)."""
    project.pytester.makepyfile(test_inner=SUITE)
    result = project.run("-p", "no:xdist", "--pgt-reset", "clone")
    result.assert_outcomes(passed=12)
    created, recycled = clone_counts(result)
    assert recycled >= 8  # 12 tests: all but the 2 DDL tests' clones (and the last one's, maybe)
    assert created <= 5  # 2 ahead, 2 for the DDL tests' (1 spare made in a race, at most)
    result = project.run("-p", "no:xdist", "--pgt-reset", "clone", "--pgt-no-spares")
    result.assert_outcomes(passed=12)
    created, recycled = clone_counts(result)
    assert (created >= 12, recycled) == (True, 0)
    with scratch_role(project, "LOGIN CREATEDB") as url:
        project.pytester._monkeypatch.setenv("PGTEMPLATE_URL", url)
        result = project.run("-p", "no:xdist", "--pgt-reset", "clone")
        result.assert_outcomes(passed=12)
        created, recycled = clone_counts(result)
        assert (created >= 12, recycled) == (True, 0)


def test_the_summary_names_tables_whose_triggers_slow_the_reset(project: Project) -> None:
    """A DELETE trigger of the app's own must not fire on the reset's DELETE: such a table
    takes the general path, and the summary says which table and why (once, -n 2 merged)."""
    project.add_revision("0003", "0002", """
    op.execute("CREATE TABLE deleted (name text)")
    op.execute("CREATE FUNCTION note_delete() RETURNS trigger LANGUAGE plpgsql AS $$ "
               "BEGIN INSERT INTO deleted VALUES (OLD.name); RETURN OLD; END $$")
    op.execute("CREATE TRIGGER customer_deleted AFTER DELETE ON customer FOR EACH ROW "
               "EXECUTE FUNCTION note_delete()")
    """)
    project.pytester.makepyfile(test_inner='''
        import pytest
        from sqlalchemy import text

        @pytest.mark.parametrize("i", range(4))
        def test_customer(pg_sync_session, i):
            assert pg_sync_session.execute(text("select count(*) from deleted")).scalar() == 0
            assert pg_sync_session.execute(text("select count(*) from customer")).scalar() == 0
            pg_sync_session.execute(text("insert into customer (name) values ('x')"))
            pg_sync_session.commit()

        @pytest.mark.parametrize("i", range(4))
        def test_orders_only(pg_sync_session, i):
            pg_sync_session.execute(text("insert into country values ('es', 'Spain')"))
            pg_sync_session.commit()
    ''')
    result = project.run("-n", "2")
    result.assert_outcomes(passed=8)
    result.stdout.fnmatch_lines([
        "4 of the truncate resets took the slower general path, for tables that one DELETE per table "
        "cannot reset: customer (a DELETE trigger or rule)"
    ])
