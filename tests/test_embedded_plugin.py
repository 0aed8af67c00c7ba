"""The embedded server through the plugin: zero config, warm reuse, never orphaned."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import ISOLATION_SUITE, Project


@pytest.fixture
def embedded_dir(project: Project, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """No URL: the plugin starts its own server, in a cache dir of this test's own."""
    monkeypatch.delenv("PGTEMPLATE_URL")
    path = shared_dir() / f"pgt-test-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("PGTEMPLATE_EMBEDDED_DIR", str(path))
    yield path
    assert postgres_processes(path) == []
    shutil.rmtree(path, ignore_errors=True)


def shared_dir() -> Path:
    """A directory every user can reach (pytest's tmp_path is private to us)."""
    return Path("/dev/shm" if os.access("/dev/shm", os.W_OK) else "/tmp")


def postgres_processes(marker: Path) -> list[int]:
    """Pids of processes whose command line mentions ``marker`` (our cluster's directory)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(marker) in cmdline and "postgres" in cmdline and "pytest" not in cmdline:
            found.append(int(proc.name))
    return found


def test_zero_config_runs_with_and_without_xdist_and_reuses_the_template(
    project: Project, embedded_dir: Path
) -> None:
    project.pytester.makepyfile(test_inner=ISOLATION_SUITE)
    first = project.run("-n", "2")
    first.assert_outcomes(passed=11)
    first.stdout.fnmatch_lines(["server: embedded PostgreSQL * (cold), started in * s*"])
    second = project.run("-p", "no:xdist")
    second.assert_outcomes(passed=11)
    second.stdout.fnmatch_lines(["server: embedded PostgreSQL * (warm), started in * s*",
                                 "template *: reused"])
    assert project.migrations_run() == 1
    project.run("-n", "2", "--pgt-rebuild").assert_outcomes(passed=11)
    assert project.migrations_run() == 2


def test_bad_bin_dir_is_a_clear_error(project: Project, embedded_dir: Path, tmp_path: Path) -> None:
    project.pytester.makepyfile(test_db="def test_db(pg_url):\n    pass\n")
    result = project.run("-n", "2", "--pgt-pg-bin", str(tmp_path / "nowhere"))
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines([
        f"*pytest-pgtemplate: --pgt-pg-bin: {tmp_path}/nowhere does not contain the PostgreSQL server "
        "programs initdb and postgres (missing: initdb, postgres); set --pgt-pg-bin / PGTEMPLATE_PG_BIN / "
        "pgtemplate_pg_bin to the directory that holds them*"
    ])


SLOW_SUITE = '''
import time

def test_slow(pg_url):
    time.sleep(60)
'''


def test_sigkill_of_the_controller_leaves_no_postgres_behind(project: Project, embedded_dir: Path) -> None:
    project.pytester.makepyfile(test_slow=SLOW_SUITE)
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-n", "2", "-p", "no:cacheprovider"],
        cwd=project.pytester.path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not postgres_processes(embedded_dir) or (not list(embedded_dir.rglob("pgt*_w_*")) and False):
            assert time.monotonic() < deadline, "the embedded server never started"
            time.sleep(0.2)
        time.sleep(2)  # let the workers connect and start the slow test
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 15
        while postgres_processes(embedded_dir) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert postgres_processes(embedded_dir) == []
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the orphaned xdist workers, if any


def nobody_python() -> tuple[list[str], dict[str, str]]:
    """A command that runs this venv's packages as the user nobody, or skip.

    A venv's python usually links to an interpreter under /root (mode 0700); the
    system python of the same version can use the venv's site-packages instead.
    """
    if os.geteuid() != 0 or shutil.which("runuser") is None:
        pytest.skip("needs root to switch to an unprivileged user")
    system = shutil.which(f"python{sys.version_info.major}.{sys.version_info.minor}", path="/usr/bin")
    if system is None:
        pytest.skip("no system python of this version")
    import pytest_pgtemplate

    paths = [str(Path(pytest_pgtemplate.__file__).parent.parent), sysconfig.get_paths()["purelib"],
             sysconfig.get_paths()["platlib"]]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PGTEMPLATE_", "PYTEST_"))}
    env["TMPDIR"] = str(shared_dir())  # pytester points the temp dirs into our private tree
    env["PYTHONPATH"] = os.pathsep.join(paths)
    command = ["runuser", "-u", "nobody", "--", system]
    check = subprocess.run([*command, "-c", "import pytest_pgtemplate.plugin, asyncpg"], env=env,
                           capture_output=True)
    if check.returncode != 0:
        pytest.skip("this venv is not readable by the user nobody")
    return command, env


def run_as_nobody(project: Project, embedded_dir: Path) -> subprocess.CompletedProcess[str]:
    """``pytest -n 2`` on a copy of the project, as the user nobody, on an embedded server of
    its own; checks that no server outlives the run and cleans up (or skips, see above)."""
    command, env = nobody_python()
    shared = shared_dir() / f"pgt-proj-{uuid.uuid4().hex[:8]}"
    shutil.copytree(project.pytester.path, shared)
    env["PGT_MIGRATIONS_LOG"] = str(shared / "migrations.log")
    env["PGTEMPLATE_EMBEDDED_DIR"] = str(embedded_dir) + "-nobody"
    try:
        subprocess.run(["chown", "-R", "nobody", str(shared)], check=True)
        result = subprocess.run(
            [*command, "-m", "pytest", "-n", "2", "-p", "no:cacheprovider"],
            cwd=shared, env=env, capture_output=True, text=True, timeout=300,
        )
        assert postgres_processes(Path(env["PGTEMPLATE_EMBEDDED_DIR"])) == []
        return result
    finally:
        shutil.rmtree(shared, ignore_errors=True)
        shutil.rmtree(env["PGTEMPLATE_EMBEDDED_DIR"], ignore_errors=True)


def test_runs_as_a_normal_user(project: Project, embedded_dir: Path) -> None:
    project.pytester.makepyfile(test_inner=ISOLATION_SUITE)
    result = run_as_nobody(project, embedded_dir)
    assert "11 passed" in result.stdout, result.stdout + result.stderr
    assert "server: embedded PostgreSQL" in result.stdout


def test_xdist_without_any_migrator_starts_no_server(project: Project, embedded_dir: Path) -> None:
    (project.pytester.path / "alembic.ini").unlink()
    project.pytester.makepyfile(test_plain="def test_plain():\n    pass\n")
    project.run("-n", "2").assert_outcomes(passed=1)
    assert not embedded_dir.exists()


def test_a_single_process_whose_selected_tests_need_no_database_starts_no_server(
    project: Project, embedded_dir: Path
) -> None:
    project.pytester.makepyfile(test_inner=ISOLATION_SUITE)
    result = project.run("-p", "no:xdist", "-k", "without_database")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["pgtemplate: template checked when a test first needs it"])
    assert not embedded_dir.exists()


LOSES_SERVER = '''
import os, time
from pathlib import Path

import pytest


@pytest.mark.parametrize("i", range(3))
def test_uses_db(pg_sync_session, i):
    Path(os.environ["PGT_STARTED"]).touch()
    time.sleep(1.5)
'''


def test_losing_the_server_mid_run_is_one_clear_error_not_a_crash(
    project: Project, tmp_path: Path
) -> None:
    from pytest_pgtemplate.embedded import start

    server = start(None, "test", cache_root=shared_dir() / f"pgt-test-{uuid.uuid4().hex[:8]}")
    started = tmp_path / "started"
    project.pytester.makepyfile(test_lose=LOSES_SERVER)
    env = {**os.environ, "PGT_STARTED": str(started), "PGTEMPLATE_URL": server.url}
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pytest", "-p", "no:xdist", "-p", "no:cacheprovider"],
            cwd=project.pytester.path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True,
        )
        deadline = time.monotonic() + 60
        while not started.exists():
            assert time.monotonic() < deadline
            time.sleep(0.1)
        server.stop()
        out, _ = proc.communicate(timeout=120)
    finally:
        server.stop()
        shutil.rmtree(server.data_dir.parent.parent, ignore_errors=True)
    assert "INTERNALERROR" not in out
    assert "lost the connection to" in out, out
    assert "is the server still running?" in out
    assert proc.returncode == pytest.ExitCode.INTERRUPTED, out  # the session stops at once
    reported = [line for line in out.splitlines()
                if "lost the connection to" in line and not line.startswith("ERROR ")]
    assert len(reported) == 1, out  # once (the short summary may repeat it)


def test_wrong_password_names_the_user_and_the_setting(project: Project) -> None:
    import asyncio

    import asyncpg

    from pytest_pgtemplate.embedded import start

    server = start(None, "test", cache_root=shared_dir() / f"pgt-test-{uuid.uuid4().hex[:8]}")
    try:
        hba = server.data_dir / "pg_hba.conf"
        hba.write_text("host all pwuser 127.0.0.1/32 scram-sha-256\n" + hba.read_text())

        async def prepare() -> None:
            conn = await asyncpg.connect(server.url)
            await conn.execute("CREATE ROLE pwuser LOGIN CREATEDB PASSWORD 'right-pw'")
            await conn.execute("SELECT pg_reload_conf()")
            await conn.close()

        asyncio.run(prepare())
        project.pytester.makepyfile(test_db="def test_db(pg_url):\n    pass\n")
        result = project.run("-p", "no:xdist", "--pgt-url",
                             f"postgresql://pwuser:s3cr3t-pw@127.0.0.1:{server.port}/postgres")
        result.assert_outcomes(errors=1)
        result.stdout.fnmatch_lines([
            f"*pytest-pgtemplate: cannot connect to pwuser@127.0.0.1:{server.port}/postgres: "
            "authentication failed for user 'pwuser'; fix the user/password in --pgt-url / "
            "PGTEMPLATE_URL / pgtemplate_url.*"
        ])
        assert "s3cr3t" not in result.stdout.str()  # the password is never printed
    finally:
        server.stop()
        shutil.rmtree(server.data_dir.parent.parent, ignore_errors=True)
