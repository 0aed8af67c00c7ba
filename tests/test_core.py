"""The core path, end to end: inner pytest runs (pytester) against the real server."""

from __future__ import annotations

import psycopg
import pytest
from sqlalchemy.engine import make_url

from conftest import ISOLATION_SUITE, SERVER_URL, Project, databases_like, scratch_role


def seen_databases(project: Project) -> set[str]:
    return {p.read_text() for p in (project.pytester.path / "seen").iterdir()}


@pytest.mark.parametrize("xdist", [["-n", "2"], ["-p", "no:xdist"]], ids=["n2", "no-xdist"])
def test_isolation_suite_passes_and_migrates_once(project: Project, xdist: list[str]) -> None:
    project.pytester.makepyfile(test_inner=ISOLATION_SUITE)
    result = project.run(*xdist)
    result.assert_outcomes(passed=11)
    result.stdout.fnmatch_lines([
        "template *_tpl_*: built in * s (by *)",
        "worker databases: * cloned, * ms each on average",
        "resets (truncate): 10, p50 * ms, p95 * ms, max * ms",
        "database overhead: * s (template * s with waits, clones * s, resets * s) = *% of * process(es) "
        "x * s",
    ])
    assert project.migrations_run() == 1
    expected_workers = 2 if xdist[0] == "-n" else 1
    assert len(seen_databases(project)) == expected_workers
    # Every worker database is dropped at the end; only the template stays.
    assert [db for db in project.databases() if "_w_" in db] == []
    assert len([db for db in project.databases() if "_tpl_" in db]) == 1


def test_second_run_reuses_template_and_changed_migration_rebuilds(project: Project) -> None:
    project.pytester.makepyfile(test_inner=ISOLATION_SUITE)
    project.run("-n", "2").assert_outcomes(passed=11)
    second = project.run("-n", "2")
    second.assert_outcomes(passed=11)
    assert project.migrations_run() == 1
    second.stdout.fnmatch_lines(["template *_tpl_*: reused"])

    project.add_revision("0003", "0002", 'op.execute("CREATE TABLE extra (id int)")')
    project.run("-n", "2").assert_outcomes(passed=11)
    assert project.migrations_run() == 2
    assert len([db for db in project.databases() if "_tpl_" in db]) == 2


def test_rebuild_flag_migrates_once_per_run_even_with_workers(project: Project) -> None:
    project.pytester.makepyfile(test_inner=ISOLATION_SUITE)
    project.run("-n", "2").assert_outcomes(passed=11)
    project.run("-n", "2", "--pgt-rebuild").assert_outcomes(passed=11)
    assert project.migrations_run() == 2


def test_keep_leaves_worker_database_and_prints_url(project: Project) -> None:
    project.pytester.makepyfile(test_inner=ISOLATION_SUITE)
    result = project.run("-p", "no:xdist", "--pgt-keep")
    result.assert_outcomes(passed=11)
    kept = [db for db in project.databases() if "_w_" in db]
    assert len(kept) == 1
    result.stdout.fnmatch_lines([f"kept worker database: postgresql://*/{kept[0]}"])


def test_unmarked_database_with_our_name_is_never_touched(project: Project) -> None:
    import psycopg

    from conftest import SERVER_URL

    project.pytester.makepyfile(test_inner=ISOLATION_SUITE)
    project.run("-p", "no:xdist").assert_outcomes(passed=11)
    [template] = [db for db in project.databases() if "_tpl_" in db]
    with psycopg.connect(SERVER_URL, autocommit=True) as conn:
        conn.execute(psycopg.sql.SQL("ALTER DATABASE {} WITH IS_TEMPLATE false").format(
            psycopg.sql.Identifier(template)))
        conn.execute(psycopg.sql.SQL("DROP DATABASE {}").format(psycopg.sql.Identifier(template)))
        conn.execute(psycopg.sql.SQL("CREATE DATABASE {}").format(psycopg.sql.Identifier(template)))
    result = project.run("-p", "no:xdist")
    result.stdout.fnmatch_lines([
        f"*database {template} exists on *but was not created by pytest-pgtemplate (no marker), so it "
        "is left alone. Drop it yourself, or choose another --pgt-prefix / PGTEMPLATE_PREFIX / "
        "pgtemplate_prefix.*"
    ])
    assert template in databases_like(project.prefix)
    assert result.ret != 0


BROKEN = """
    op.execute("CREATE TABLE half_done (id int)")
    raise RuntimeError("boom in 0003")
"""


@pytest.mark.parametrize("xdist", [["-n", "2"], ["-p", "no:xdist"]], ids=["n2", "no-xdist"])
def test_broken_migration_is_reported_once_and_retried_next_run(
    project: Project, xdist: list[str]
) -> None:
    project.add_revision("0003", "0002", BROKEN)
    project.pytester.makepyfile(test_inner=ISOLATION_SUITE)
    result = project.run(*xdist)
    assert result.ret != 0
    result.stdout.fnmatch_lines([
        "*pytest-pgtemplate: migration failed in revision 0003 (migrations/versions/0003_rev.py, line 15): "
        "RuntimeError: boom in 0003. The template was not published; fix the migration and run again*"
    ])
    assert project.log.read_text().count("0003") == 1  # one attempt for the whole run
    assert project.databases() == []  # no half-built template, no worker database

    project.add_revision("0003", "0002", 'op.execute("CREATE TABLE fixed (id int)")')
    project.run(*xdist).assert_outcomes(passed=11)
    assert project.log.read_text().count("0003") == 2


@pytest.mark.parametrize("xdist", [["-n", "2"], ["-p", "no:xdist"]], ids=["n2", "no-xdist"])
def test_a_revision_that_cannot_be_imported_is_reported_once_naming_its_file(
    project: Project, xdist: list[str]
) -> None:
    """Alembic imports every revision before env.py runs: a syntax error (or a missing
    import) there is the migration's error too, said once, not a traceback per test."""
    path = project.pytester.path / "migrations" / "versions" / "0003_rev.py"
    path.write_text("revision = '0003'\ndown_revision = '0002'\n\ndef upgrade(:\n    pass\n")
    project.pytester.makepyfile(test_inner=ISOLATION_SUITE)
    result = project.run(*xdist)
    assert result.ret != 0
    full = [line for line in result.outlines if line.startswith(
        "pytest-pgtemplate: migration failed in revision 0003 (migrations/versions/0003_rev.py, line 4): "
        "SyntaxError: ")]
    # Once; under -n 2 with the oldest pytest-xdist the controller keeps handing out tests after
    # the worker asked to stop, and each such test repeats the message (as for any failed build).
    assert len(full) == 1 if xdist[0] == "-p" else len(full) >= 1, result.outlines
    assert "Traceback" not in result.stdout.str()
    assert len(result.outlines) < 300  # a traceback per test was ~85 lines each
    assert project.databases() == []


def test_no_server_contact_when_no_test_uses_a_database(project: Project) -> None:
    project.pytester.makepyfile(test_plain="def test_plain():\n    assert True\n")
    result = project.run("-n", "2", "--pgt-url", "postgresql://nobody@127.0.0.1:1/postgres")
    result.assert_outcomes(passed=1)


def test_unreachable_server_fails_fast_naming_the_setting(project: Project) -> None:
    project.pytester.makepyfile(test_db="def test_db(pg_url):\n    pass\n")
    result = project.run("-p", "no:xdist", "--pgt-url", "postgresql://me@127.0.0.1:1/postgres")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines([
        "*pytest-pgtemplate: cannot reach PostgreSQL at me@127.0.0.1:1/postgres (*). Start the server, "
        "or point --pgt-url / PGTEMPLATE_URL / pgtemplate_url at a running one.*"
    ])
    assert "Traceback" not in result.stdout.str()


def test_missing_alembic_ini_names_the_setting(project: Project) -> None:
    (project.pytester.path / "alembic.ini").unlink()
    project.pytester.makepyfile(test_db="def test_db(pg_url):\n    pass\n")
    result = project.run("-p", "no:xdist")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines([
        "*pytest-pgtemplate: no way to build the template: no alembic.ini in the rootdir (*). "
        "Set --pgt-alembic-ini / PGTEMPLATE_ALEMBIC_INI / pgtemplate_alembic_ini to your alembic.ini.*"
    ])


def test_bad_option_value_is_a_usage_error(project: Project) -> None:
    project.pytester.makepyfile(test_db="def test_db(pg_url):\n    pass\n")
    result = project.run("-p", "no:xdist", "--pgt-prefix", "Bad-Prefix")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([
        "*invalid database name prefix 'Bad-Prefix' (from --pgt-prefix): use 1-16 lowercase ASCII "
        "letters, digits or '_', starting with a letter. Set --pgt-prefix / PGTEMPLATE_PREFIX / "
        "pgtemplate_prefix.*"
    ])


def test_reset_none_keeps_rows_between_tests(project: Project) -> None:
    project.pytester.makepyfile(test_inner='''
from sqlalchemy import text

def test_a(pg_sync_session):
    pg_sync_session.execute(text("insert into customer (name) values ('kept')"))
    pg_sync_session.commit()

def test_b(pg_sync_session):
    assert pg_sync_session.execute(text("select count(*) from customer")).scalar() == 1
''')
    project.run("-p", "no:xdist", "--pgt-reset", "none").assert_outcomes(passed=2)


def test_a_long_build_shows_progress_once_and_waiters_say_what_they_wait_for(project: Project) -> None:
    project.add_revision("0003", "0002", "import time\ntime.sleep(6.5)")
    project.pytester.makepyfile(test_inner=ISOLATION_SUITE)
    result = project.run("-n", "2")
    result.assert_outcomes(passed=11)
    progress = [line for line in result.errlines if "s elapsed" in line]
    assert len(progress) == 1, result.errlines
    assert "with alembic upgrade heads (" in progress[0]
    assert "s elapsed, revision 3/3 (0002 -> 0003" in progress[0]
    result.stderr.fnmatch_lines(["pytest-pgtemplate [[]pid *[]]: waiting for *building template *"])


def test_help_works_even_with_a_bad_setting(project: Project, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGTEMPLATE_RESET", "bogus")
    result = project.run("--help")
    assert result.ret == 0
    result.stdout.fnmatch_lines(["*--pgt-reset*"])
    result = project.run("-p", "no:xdist")  # a real run still refuses it
    result.stderr.fnmatch_lines(["*invalid value 'bogus' for reset (from PGTEMPLATE_RESET)*"])


def test_role_without_createdb_gets_a_clear_error(project: Project) -> None:
    with scratch_role(project, "LOGIN NOCREATEDB") as url:
        role = make_url(url).username
        project.pytester.makepyfile(test_db="def test_db(pg_url):\n    pass\n")
        result = project.run("-p", "no:xdist", "--pgt-url", url)
        result.assert_outcomes(errors=1)
        result.stdout.fnmatch_lines([
            f"*pytest-pgtemplate: cannot create database '{project.prefix}_bld_*' on {role}@127.0.0.1:5432/"
            f"postgres: role '{role}' lacks CREATEDB. Run ALTER ROLE ... CREATEDB, or set --pgt-url / "
            "PGTEMPLATE_URL / pgtemplate_url to a role that has it.*"
        ])


BLOCKED_SUITE = """
import threading

import psycopg
from sqlalchemy import text


def test_leaves_a_superuser_session_holding_a_lock(pg_sync_session, pg_sync_url):
    pg_sync_session.execute(text("insert into customer (name) values ('x')"))
    pg_sync_session.commit()
    # Another session, of a role the plugin's role cannot terminate, locks the row the
    # reset must delete, and stays inside its transaction after the test.
    url = pg_sync_url.set(drivername="postgresql", username="postgres")
    blocker = psycopg.connect(url.render_as_string(False), application_name="blocker-app")
    blocker.execute("SELECT name FROM customer FOR UPDATE")
    threading.Timer(4, blocker.close).start()
"""


def test_a_reset_blocked_by_another_session_names_it(project: Project) -> None:
    with scratch_role(project, "LOGIN CREATEDB") as url:
        role = make_url(url).username
        project.pytester.makepyfile(test_blocked=BLOCKED_SUITE)
        result = project.run("-p", "no:xdist", "--pgt-url", url, "--pgt-reset-timeout", "1")
        result.assert_outcomes(passed=1, errors=1)  # the error: at the test's teardown
        result.stdout.fnmatch_lines([
            f"*pytest-pgtemplate: reset of {project.prefix}_w_* was blocked for more than 1 s by pid * "
            f"(blocker-app, user postgres; its state and query are hidden from role {role}: GRANT "
            f"pg_read_all_stats TO {role} to see them). Close that connection before the test ends, or "
            "raise --pgt-reset-timeout / PGTEMPLATE_RESET_TIMEOUT / pgtemplate_reset_timeout.*"
        ])
        # With the right to see other roles' sessions, the message shows what the blocker runs.
        with psycopg.connect(SERVER_URL, autocommit=True) as conn:
            conn.execute(psycopg.sql.SQL("GRANT pg_read_all_stats TO {}").format(
                psycopg.sql.Identifier(role)))
        result = project.run("-p", "no:xdist", "--pgt-url", url, "--pgt-reset-timeout", "1")
        result.stdout.fnmatch_lines([
            "*was blocked for more than 1 s by pid * (blocker-app, user postgres, idle in transaction): "
            "'SELECT name FROM customer FOR UPDATE'. Close that connection*"
        ])


def database_settings(name: str) -> list[str]:
    with psycopg.connect(SERVER_URL, autocommit=True) as conn:
        rows = conn.execute("SELECT unnest(setconfig) FROM pg_db_role_setting s JOIN pg_database d "
                            "ON d.oid = s.setdatabase WHERE d.datname = %s", (name,)).fetchall()
    return [r[0] for r in rows]


@pytest.mark.parametrize(("flag", "expected"), [((), ["synchronous_commit=off"]), (("--pgt-durable",), [])])
def test_worker_databases_commit_without_waiting_for_the_wal_flush_unless_durable(
    project: Project, flag: tuple[str, ...], expected: list[str]
) -> None:
    project.pytester.makepyfile(test_inner='''
        from sqlalchemy import text

        def test_setting(pg_sync_session):
            value = pg_sync_session.execute(text("show synchronous_commit")).scalar()
            (__import__("pathlib").Path(__file__).parent / "seen").write_text(value)
    ''')
    result = project.run("-p", "no:xdist", "--pgt-keep", *flag)
    result.assert_outcomes(passed=1)
    (worker,) = [db for db in project.databases() if "_w_" in db]
    assert database_settings(worker) == expected
    assert (project.pytester.path / "seen").read_text() == ("off" if expected else "on")
