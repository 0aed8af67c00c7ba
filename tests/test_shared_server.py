"""Many runs on one server: one build per fingerprint, crash safety, sweeping, commands."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from conftest import ISOLATION_SUITE, SERVER_URL, Project, databases_like, drop_marked

SLOW_SUITE = '''
import os, time
from pathlib import Path

import pytest


@pytest.mark.parametrize("i", range(2))
def test_slow(pg_url, i):
    Path(os.environ["PGT_STARTED"], os.environ.get("PYTEST_XDIST_WORKER", "main")).touch()
    time.sleep(float(os.environ.get("PGT_SLEEP", "60")))
'''


@contextlib.contextmanager
def background(cwd: Path, *args: str, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[str]]:
    """A pytest run in its own process group, killed (group and all) on exit."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args], cwd=cwd,
        env=env or dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def copy_project(project: Project, name: str) -> Path:
    target = project.pytester.path.parent / f"{project.pytester.path.name}-{name}"
    shutil.copytree(project.pytester.path, target)
    return target


def test_concurrent_runs_with_the_same_migrations_build_once(project: Project) -> None:
    project.pytester.makepyfile(test_inner=ISOLATION_SUITE)
    other = copy_project(project, "other")
    with background(project.pytester.path, "-n", "2") as a, background(other, "-n", "2") as b:
        out_a, _ = a.communicate(timeout=180)
        out_b, _ = b.communicate(timeout=180)
    assert a.returncode == 0, out_a
    assert b.returncode == 0, out_b
    assert "11 passed" in out_a
    assert "11 passed" in out_b
    assert project.migrations_run() == 1
    assert len([db for db in project.databases() if "_tpl_" in db]) == 1


def test_concurrent_runs_with_different_migrations_get_their_own_templates(project: Project) -> None:
    project.pytester.makepyfile(test_inner=ISOLATION_SUITE)
    branch = copy_project(project, "branch")
    (branch / "migrations" / "versions" / "0003_rev.py").write_text(
        (project.pytester.path / "migrations" / "versions" / "0002_rev.py").read_text()
        .replace("revision = '0002'", "revision = '0003'")
        .replace("down_revision = '0001'", "down_revision = '0002'")
        .replace('op.execute("CREATE TABLE country', 'op.execute("CREATE TABLE country2')
        .replace("INSERT INTO country VALUES", "INSERT INTO country2 VALUES")
        .replace('ALTER TABLE customer ADD COLUMN country text', 'ALTER TABLE customer ADD COLUMN c2 text')
        .replace("CREATE SCHEMA billing", "CREATE SCHEMA billing2")
        .replace("billing.invoice", "billing2.invoice")
    )
    with background(project.pytester.path, "-n", "2") as a, background(branch, "-n", "2") as b:
        out_a, _ = a.communicate(timeout=180)
        out_b, _ = b.communicate(timeout=180)
    assert a.returncode == 0, out_a
    assert b.returncode == 0, out_b
    assert project.migrations_run() == 2
    assert len([db for db in project.databases() if "_tpl_" in db]) == 2


SLOW_MIGRATION = """
    import time
    time.sleep(60)
"""


def test_a_build_killed_midway_is_never_taken_for_complete(project: Project, tmp_path: Path) -> None:
    project.add_revision("0003", "0002", SLOW_MIGRATION)
    project.pytester.makepyfile(test_inner=ISOLATION_SUITE)
    with background(project.pytester.path, "-n", "2"):
        wait_for(lambda: "0003" in (project.log.read_text() if project.log.exists() else ""),
                 "the slow migration to start")
    # Killed while migrating: a half-built database remains, but no template.
    leftovers = project.databases()
    assert [db for db in leftovers if "_bld_" in db] != []
    assert [db for db in leftovers if "_tpl_" in db] == []

    project.add_revision("0003", "0002", "pass")
    project.run("-n", "2").assert_outcomes(passed=11)  # its sweep drops the leftover
    after = project.databases()
    assert [db for db in after if "_bld_" in db] == []
    assert len([db for db in after if "_tpl_" in db]) == 1


def create_database(name: str, comment: str | None = None) -> None:
    with psycopg.connect(SERVER_URL, autocommit=True) as conn:
        conn.execute(psycopg.sql.SQL("CREATE DATABASE {}").format(psycopg.sql.Identifier(name)))
        if comment is not None:
            conn.execute(psycopg.sql.SQL("COMMENT ON DATABASE {} IS {}").format(
                psycopg.sql.Identifier(name), psycopg.sql.Literal(comment)))


def drop_database(name: str) -> None:
    with psycopg.connect(SERVER_URL, autocommit=True) as conn:
        conn.execute(psycopg.sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
            psycopg.sql.Identifier(name)))


def test_sweep_drops_dead_runs_databases_only(project: Project, tmp_path: Path) -> None:
    project.pytester.makepyfile(test_slow=SLOW_SUITE, test_inner=ISOLATION_SUITE)
    env = dict(os.environ)
    unmarked = f"{project.prefix}_w_unmarked"
    unrelated = f"scratch_{project.prefix}_unrelated"
    create_database(unmarked)
    create_database(unrelated, "pytest-pgtemplate but not really")
    try:
        dead_started, live_started = tmp_path / "dead", tmp_path / "live"
        dead_started.mkdir()
        live_started.mkdir()
        # A run killed mid-suite leaves its two worker databases behind.
        with background(project.pytester.path, "-n", "2", "-k", "slow",
                        env={**env, "PGT_STARTED": str(dead_started)}):
            wait_for(lambda: len(list(dead_started.iterdir())) == 2, "the doomed run's workers")
        dead = [db for db in project.databases() if "_w_" in db and db != unmarked]
        assert len(dead) == 2
        # A live run, mid-suite, while the next run sweeps.
        with background(project.pytester.path, "-p", "no:xdist", "-k", "slow and 0",
                        env={**env, "PGT_STARTED": str(live_started), "PGT_SLEEP": "20"}) as live:
            wait_for(lambda: len(list(live_started.iterdir())) == 1, "the live run's test")
            live_dbs = set(project.databases()) - set(dead) - {unmarked}
            live_dbs = {db for db in live_dbs if "_w_" in db}
            assert len(live_dbs) == 1
            sweeper = project.run("-p", "no:xdist", "-k", "inner")
            sweeper.assert_outcomes(passed=11)
            remaining = set(project.databases())
            assert not remaining & set(dead)
            assert live_dbs <= remaining
            assert unmarked in remaining
            assert unrelated in databases_like("scratch")
            out, _ = live.communicate(timeout=60)
            assert live.returncode == 0, out
    finally:
        drop_database(unmarked)
        drop_database(unrelated)


def test_list_and_gc_commands(project: Project) -> None:
    project.pytester.makepyfile(test_inner=ISOLATION_SUITE)
    project.run("-p", "no:xdist", "--pgt-keep").assert_outcomes(passed=11)
    listing = project.run("--pgt-list")
    assert listing.ret == 0
    listing.stdout.fnmatch_lines([
        f"{project.prefix}_tpl_*  template  fingerprint *  run * (* pid *, unused)  age * s  * MB",
        f"{project.prefix}_w_*_main  kept  fingerprint *  run * (* pid *, dead)  age * s  * MB",
    ])
    # Another project on the same server (another prefix) keeps a database of its own.
    other = project.prefix[:-1] + "z"
    try:
        project.run("-p", "no:xdist", "--pgt-keep", "--pgt-prefix", other).assert_outcomes(passed=11)
        gc = project.run("--pgt-gc", "--pgt-keep-templates", "1")
        assert gc.ret == 0
        gc.stdout.fnmatch_lines([f"dropped {project.prefix}_w_*_main"])
        assert [db for db in project.databases() if "_w_" in db] == []
        assert len([db for db in project.databases() if "_tpl_" in db]) == 1
        # gc leaves the other prefix's kept database and template alone.
        assert sorted(db.split("_")[1] for db in databases_like(other)) == ["tpl", "w"]
    finally:
        drop_marked(other)


def test_old_templates_beyond_the_newest_n_are_pruned_within_the_project(project: Project) -> None:
    project.pytester.makepyfile(test_inner=ISOLATION_SUITE)
    before: list[str] = []
    for n in range(3, 6):
        before = [db for db in project.databases() if "_tpl_" in db]
        project.add_revision(f"{n:04d}", f"{n - 1:04d}", f'op.execute("CREATE TABLE t{n} (id int)")')
        result = project.run("-p", "no:xdist", "--pgt-keep-templates", "2")
        result.assert_outcomes(passed=11)
    ours = [db for db in project.databases() if "_tpl_" in db]
    assert len(ours) == 2
    (gone,) = set(before) - set(ours)
    result.stdout.fnmatch_lines([
        f"pruned 1 unused template(s) of this project beyond the newest 2 (--pgt-keep-templates): {gone}"])
    # Another project sharing the prefix (and the server) prunes its own templates only.
    other = copy_project(project, "elsewhere")
    (other / "migrations" / "versions" / "0006_rev.py").write_text(
        (other / "migrations" / "versions" / "0005_rev.py").read_text()
        .replace("'0005'", "'0006'").replace("'0004'", "'0005'").replace("t5 (", "t6 ("))
    run = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:xdist",
                          "--pgt-keep-templates", "1"], cwd=other, capture_output=True, text=True,
                         timeout=120)
    assert "11 passed" in run.stdout, run.stdout + run.stderr
    assert set(ours) < set(db for db in project.databases() if "_tpl_" in db)


def test_waiting_for_another_runs_build_says_who_and_gives_up_in_time(project: Project) -> None:
    project.add_revision("0003", "0002", SLOW_MIGRATION.replace("60", "20"))
    project.pytester.makepyfile(test_inner=ISOLATION_SUITE)
    other = copy_project(project, "waiter")
    with background(project.pytester.path, "-p", "no:xdist") as builder:
        wait_for(lambda: "0003" in (project.log.read_text() if project.log.exists() else ""),
                 "the slow migration to start")
        start = time.monotonic()
        waiter = subprocess.run(
            [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:xdist",
             "--pgt-timeout", "5"], cwd=other, capture_output=True, text=True, timeout=60,
        )
        assert time.monotonic() - start < 15
        builder.kill()
    assert "waiting for another process of this machine building template" in waiter.stderr
    assert "(file lock held by pid" in waiter.stderr
    assert (
        "pytest-pgtemplate: gave up after 5 s waiting for another process of this machine building "
        f"template {project.prefix}_tpl_"
    ) in waiter.stdout
    assert "Raise --pgt-timeout / PGTEMPLATE_TIMEOUT / pgtemplate_timeout" in waiter.stdout


@pytest.mark.asyncio
async def test_advisory_lock_wait_names_the_holder_and_is_bounded() -> None:
    from pytest_pgtemplate.admin import Admin
    from pytest_pgtemplate.db import parse_url
    from pytest_pgtemplate.errors import PgTemplateError

    url = parse_url(SERVER_URL, "test")
    holder, waiter = await Admin.open(url), await Admin.open(url)
    notes: list[str] = []
    try:
        await holder.lock("scratch-lock-test", 1, "nothing")
        with pytest.raises(PgTemplateError, match=(
            r"^pytest-pgtemplate: gave up after 6 s waiting for the build of template x "
            r"\(advisory lock held by pid \d+ \(pytest-pgtemplate \S+ pid \d+, [^)]+\)\)\. "
            r"Wait for it to finish or stop it, or raise --pgt-timeout / PGTEMPLATE_TIMEOUT / "
            r"pgtemplate_timeout\.$"
        )):
            await waiter.lock("scratch-lock-test", 6, "the build of template x", notes.append)
        assert len(notes) == 1
        assert notes[0].startswith("waiting for the build of template x (advisory lock held by pid ")
    finally:
        await holder.close()
        await waiter.close()


def test_gc_with_keep_templates_0_drops_every_unused_template_of_the_prefix(project: Project) -> None:
    project.pytester.makepyfile(test_inner=ISOLATION_SUITE)
    project.run("-p", "no:xdist").assert_outcomes(passed=11)
    (template,) = [db for db in project.databases() if "_tpl_" in db]
    gc = project.run("--pgt-gc", "--pgt-keep-templates", "0")
    assert gc.ret == 0
    gc.stdout.fnmatch_lines([f"dropped {template}"])
    assert project.databases() == []


@pytest.mark.asyncio
async def test_the_list_calls_a_run_alive_by_its_shared_lock_not_by_a_sweeper_holding_it() -> None:
    from pytest_pgtemplate.admin import Admin, run_lock
    from pytest_pgtemplate.db import parse_url
    from pytest_pgtemplate.naming import WORKER, Marker
    from pytest_pgtemplate.sweep import describe

    url = parse_url(SERVER_URL, "test")
    prefix = "scratch_" + os.urandom(3).hex()
    owner, sweeper, lister = await Admin.open(url), await Admin.open(url), await Admin.open(url)
    name = f"{prefix}_w_x"
    try:
        await owner.create(name, Marker.new(WORKER, "f" * 20, "run" + prefix, prefix))

        async def state() -> str:
            (line,) = [line for line in await describe(lister) if line.startswith(name + " ")]
            return line.split(", ")[-1].split(")")[0]

        assert await state() == "dead"
        assert await sweeper.unused(run_lock("run" + prefix))  # a sweeper about to drop it
        assert await state() == "dead"
        await sweeper.unlock(run_lock("run" + prefix))
        await owner.hold_shared(run_lock("run" + prefix))
        assert await state() == "alive"
    finally:
        await sweeper.drop_ours(name)
        for admin in (owner, sweeper, lister):
            await admin.close()
