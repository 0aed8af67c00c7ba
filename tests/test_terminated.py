"""A session-scoped fixture holding a transaction open across tests: the reset ends it,
and the plugin says so once, naming the session, and in the reports of the tests it breaks."""

from __future__ import annotations

from conftest import Project

SUITE = '''
import os

import psycopg
import pytest
from sqlalchemy import text


@pytest.fixture(scope="session")
def app_conn():
    conn = psycopg.connect(os.environ["APP_URL"], application_name="scratch-app-session")
    conn.execute("insert into customer (name) values ('held')")  # a transaction stays open
    yield conn
    conn.close()


def test_first(app_conn, pg_sync_session):
    assert app_conn.execute("select count(*) from customer").fetchone()[0] == 1


def test_second(app_conn, pg_sync_session):
    assert app_conn.execute("select count(*) from customer").fetchone()[0] == 1


def test_third(app_conn, pg_sync_session):
    assert app_conn.execute("select 1").fetchone()[0] == 1
'''


def test_a_session_scoped_transaction_ended_by_the_reset_is_named_once(project: Project) -> None:
    project.pytester.makepyfile(test_inner=SUITE)
    result = project.run("-p", "no:xdist", "-W", "always", "--pgt-env", "APP_URL=postgresql")
    result.assert_outcomes(passed=1, failed=2)
    text = result.stdout.str()
    note = ("the reset after test_inner.py::test_first ended a session left inside a transaction in "
            f"{project.prefix}_w_")
    assert text.count(f"PgTemplateWarning: pytest-pgtemplate: {note}") == 1
    result.stdout.fnmatch_lines([
        f"*{note}*: pid * (scratch-app-session, its transaction open for * s): "
        "'select count(*) from customer'. A transaction still open when a test ends is "
        "rolled back this way; if it belongs to a session- or module-scoped fixture*make that fixture "
        "function-scoped, or close its session after each test; rows it writes for later tests belong in the "
        "template (pgtemplate_seed or the pytest_pgtemplate_seed hook).*"])
    # Both tests the ended session broke carry the explanation in their report.
    assert text.count(f"earlier, {note}") == 2
