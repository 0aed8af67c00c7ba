"""Spares: a run leaves its worker databases, reset, for the next run to take instead of
cloning; never one that may differ from its template."""

from __future__ import annotations

import psycopg
import pytest

from conftest import ISOLATION_SUITE, SERVER_URL, Project, scratch_role

# Writes the app's own session-scoped teardown makes after the last test's reset.
LATE_WRITER = '''
import psycopg
import pytest

URLS = []


@pytest.fixture(autouse=True)
def _remember(pg_sync_url):
    URLS.append(pg_sync_url.set(drivername="postgresql").render_as_string(hide_password=False))


def pytest_sessionfinish(session):
    if URLS:
        with psycopg.connect(URLS[-1], autocommit=True) as conn:
            conn.execute("{sql}")
'''


def spares(project: Project) -> list[str]:
    return [db for db in project.databases() if "_s_" in db]


def mentions_spares(result: pytest.RunResult) -> bool:
    out = result.stdout.str()
    return "spare worker database(s)" in out or "spare(s) of an earlier run" in out


def workers_seen(project: Project) -> set[str]:
    return {p.read_text() for p in (project.pytester.path / "seen").iterdir()}


def test_a_run_leaves_its_worker_databases_as_spares_and_the_next_run_takes_them(project: Project) -> None:
    project.pytester.makepyfile(test_inner=ISOLATION_SUITE)
    first = project.run("-n", "2")
    first.assert_outcomes(passed=11)
    first.stdout.fnmatch_lines([
        "worker databases: 2 cloned, * ms each on average",
        "left 2 spare worker database(s), reset, for the next run to take (--pgt-no-spares drops them "
        "instead; --pgt-gc drops what is left)",
    ])
    left = spares(project)
    assert len(left) == 2
    assert [db for db in project.databases() if "_w_" in db] == []

    second = project.run("-n", "2")
    second.assert_outcomes(passed=11)  # every test starts from the template's state
    second.stdout.fnmatch_lines(
        ["worker databases: 2 spare(s) of an earlier run taken, * ms each on average"])
    assert "cloned" not in second.stdout.str()
    assert project.migrations_run() == 1
    assert all("_w_" in db for db in workers_seen(project))  # taken under the worker's own name
    again = spares(project)
    assert len(again) == 2
    # Renamed on taking, renamed again on leaving. (Not necessarily both old ones: a spare
    # a client is connected to is passed over, and a process that needs its database late may
    # take the spare another process of the same run has just left.)
    assert set(again) != set(left)


def test_writes_after_the_last_reset_do_not_reach_the_next_run(project: Project) -> None:
    project.pytester.makepyfile(test_inner=ISOLATION_SUITE)
    project.pytester.makeconftest(LATE_WRITER.format(
        sql="INSERT INTO customer (name) VALUES ('late'); UPDATE country SET name = 'late'"))
    project.run("-p", "no:xdist").assert_outcomes(passed=11)
    assert len(spares(project)) == 1
    second = project.run("-p", "no:xdist", "-k", "async and 0")
    # Its first test checks: no customer, the reference rows as migrated, and id 1 for the next.
    second.assert_outcomes(passed=1)
    second.stdout.fnmatch_lines(["worker databases: 1 spare(s) of an earlier run taken, *"])


def test_a_spare_changed_while_parked_is_dropped_not_taken(project: Project) -> None:
    """Database settings no event trigger sees: the taker compares them with the spare's own
    as created, drops the spare and clones."""
    project.pytester.makepyfile(test_inner=ISOLATION_SUITE)
    project.run("-p", "no:xdist").assert_outcomes(passed=11)
    [left] = spares(project)
    with psycopg.connect(SERVER_URL, autocommit=True) as conn:
        conn.execute(psycopg.sql.SQL("ALTER DATABASE {} SET work_mem = '8MB'").format(
            psycopg.sql.Identifier(left)))
    result = project.run("-p", "no:xdist", "-k", "async and 0")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["worker databases: 1 cloned, *"])
    assert left not in project.databases()
    assert len(spares(project)) == 1  # this run's own


def test_a_schema_change_after_the_last_reset_leaves_no_spare(project: Project) -> None:
    project.pytester.makepyfile(test_inner=ISOLATION_SUITE)
    project.pytester.makeconftest(LATE_WRITER.format(sql="CREATE TABLE late (id int)"))
    result = project.run("-p", "no:xdist")
    result.assert_outcomes(passed=11)
    assert not mentions_spares(result)
    # Said, with the cause: the next run's clone is no mystery.
    result.stdout.fnmatch_lines(["left no spare for the next run (it clones anew): main's worker "
                                 "database: its schema was changed (CREATE TABLE public.late) after "
                                 "the last test"])
    assert project.databases() == [db for db in project.databases() if "_tpl_" in db]
    project.run("-p", "no:xdist", "-k", "async and 0").stdout.fnmatch_lines(
        ["worker databases: 1 cloned, *"])


def leave_one_then_clone(project: Project, *args: str) -> tuple[str, pytest.RunResult]:
    """A run that leaves one spare, then one with ``args`` that clones instead of taking it."""
    project.pytester.makepyfile(test_inner=ISOLATION_SUITE)
    project.run("-p", "no:xdist").assert_outcomes(passed=11)
    [left] = spares(project)
    result = project.run("-p", "no:xdist", *args)
    result.assert_outcomes(passed=11)
    result.stdout.fnmatch_lines(["worker databases: 1 cloned, *"])
    return left, result


def test_no_spares_neither_takes_nor_leaves_one_and_gc_drops_them(project: Project) -> None:
    left, result = leave_one_then_clone(project, "--pgt-no-spares")
    assert not mentions_spares(result)
    assert spares(project) == [left]
    project.run("--pgt-gc").stdout.fnmatch_lines([f"*{left}*"])
    assert spares(project) == []


def test_a_rebuilt_templates_old_spares_are_not_taken_but_swept(project: Project) -> None:
    old, result = leave_one_then_clone(project, "--pgt-rebuild")
    result.stdout.fnmatch_lines([f"swept 1 leftover database(s) *{old}*"])
    assert len(spares(project)) == 1
    assert spares(project) != [old]


def test_a_role_whose_resets_cannot_see_schema_changes_leaves_no_spare(project: Project) -> None:
    """Without event triggers (superuser only) a test's DDL would go unseen: no spare."""
    project.pytester.makepyfile(test_inner=ISOLATION_SUITE)
    with scratch_role(project, "LOGIN CREATEDB") as url:
        project.pytester._monkeypatch.setenv("PGTEMPLATE_URL", url)
        result = project.run("-p", "no:xdist")
        result.assert_outcomes(passed=11)
        assert not mentions_spares(result)
        assert "left no spare" not in result.stdout.str()  # the role's standing limit: no news
        assert spares(project) == []


@pytest.mark.parametrize("durable", [False, True])
def test_a_spare_keeps_its_durability_and_serves_only_runs_that_want_it(project: Project,
                                                                        durable: bool) -> None:
    flag = ("--pgt-durable",) if durable else ()
    project.pytester.makepyfile(test_inner=ISOLATION_SUITE)
    project.run("-p", "no:xdist", *flag).assert_outcomes(passed=11)
    [left] = spares(project)
    with psycopg.connect(SERVER_URL, autocommit=True) as conn:
        settings = conn.execute(
            "SELECT s.setconfig FROM pg_db_role_setting s JOIN pg_database d ON d.oid = s.setdatabase "
            "WHERE d.datname = %s", (left,)).fetchone()
    assert (settings is None) == durable
    other = () if durable else ("--pgt-durable",)
    project.run("-p", "no:xdist", *other).stdout.fnmatch_lines(["worker databases: 1 cloned, *"])
    project.run("-p", "no:xdist", *flag).stdout.fnmatch_lines(["worker databases: 1 spare(s) *"])
