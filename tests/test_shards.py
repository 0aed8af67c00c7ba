"""CI shards that share nothing but the PostgreSQL server.

Each simulated shard is a pytest run (``-n 2``) in a UTS + PID namespace of its own, with
its own host name, its own TMPDIR (so the plugin's file lock does not join them) and its
own copy of the project: only the server-side advisory lock can coordinate them, and pids
repeat from one shard to the next, so nothing may take a pid or a host name for liveness.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from fnmatch import fnmatch
from pathlib import Path

import psycopg
import pytest
from sqlalchemy.engine import make_url

from conftest import SERVER_URL, Project
from pytest_pgtemplate.naming import Marker


def _why_no_namespaces() -> str | None:
    unshare = shutil.which("unshare")
    if unshare is None:
        return "unshare (util-linux) is not installed"
    probe = subprocess.run([unshare, "--uts", "--pid", "--fork", "--mount-proc", "true"],
                           capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        return f"cannot create UTS + PID namespaces (needs root): {probe.stderr.strip()}"
    return None


NO_NAMESPACES = _why_no_namespaces()
pytestmark = pytest.mark.skipif(NO_NAMESPACES is not None,
                                reason=f"shards are simulated with unshare: {NO_NAMESPACES}")

# The one migration that counts: it records the host that ran it in the ledger database, then
# holds the build until a process of every shard is about to wait for it (it holds two shared
# advisory locks: "this run is alive" and "this template is in use", taken just before the
# build lock is tried), and a little longer, so all of them are waiting on the build at once.
LEDGER_REVISION = """
    import socket, time
    import psycopg
    with psycopg.connect(os.environ["PGT_LEDGER_URL"], autocommit=True) as ledger:
        ledger.execute("INSERT INTO migrations (host) VALUES (%s)", (socket.gethostname(),))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            hosts = ledger.execute(
                "SELECT count(DISTINCT host) FROM (SELECT split_part(a.application_name, ' ', 2) AS host "
                "FROM pg_locks l JOIN pg_stat_activity a USING (pid) WHERE l.locktype = 'advisory' "
                "AND l.mode = 'ShareLock' AND l.granted AND a.application_name LIKE %s "
                "GROUP BY a.pid, a.application_name HAVING count(*) >= 2) AS waiting",
                (os.environ["PGT_SHARD_APPS"],)).fetchone()[0]
            if hosts >= int(os.environ["PGT_SHARDS"]):
                break
            time.sleep(0.1)
    time.sleep(4)  # past the plugin's 3 s before it says whom it waits for
"""

PART_SUITE = '''
import os, socket
from pathlib import Path

import pytest
from sqlalchemy import text


@pytest.mark.parametrize("i", range(3))
async def test_writes_start_from_the_template(pg_session, i):
    db = (await pg_session.execute(text("select current_database()"))).scalar()
    assert (await pg_session.execute(text("select count(*) from customer"))).scalar() == 0
    await pg_session.execute(text("insert into customer (name) values ('ann')"))
    await pg_session.commit()
    Path(os.environ["PGT_SEEN"], f"{socket.gethostname()} {Path(__file__).stem} {i}").write_text(db)
'''

HOLD_SUITE = '''
import os, time
from pathlib import Path

import pytest


@pytest.mark.parametrize("i", range(2))
def test_hold(pg_url, i):
    Path(os.environ["PGT_STARTED"], os.environ["PYTEST_XDIST_WORKER"]).touch()
    release, deadline = Path(os.environ["PGT_RELEASE"]), time.monotonic() + 90
    while not release.exists():
        assert time.monotonic() < deadline, "never released"
        time.sleep(0.1)
'''

PARTS = ("test_part0.py", "test_part1.py", "test_part2.py")


@pytest.fixture
def ledger(project: Project) -> Iterator[str]:
    """A scratch database the migration writes to: who migrated, across every shard."""
    name = f"scratch_{project.prefix}_ledger"
    with psycopg.connect(SERVER_URL, autocommit=True) as conn:
        conn.execute(psycopg.sql.SQL("CREATE DATABASE {}").format(psycopg.sql.Identifier(name)))
    url = make_url(SERVER_URL).set(database=name).render_as_string(hide_password=False)
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("CREATE TABLE migrations (host text NOT NULL, at timestamptz DEFAULT now())")
        yield url
    finally:
        with psycopg.connect(SERVER_URL, autocommit=True) as conn:
            conn.execute(psycopg.sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                psycopg.sql.Identifier(name)))


def migrated_on(ledger_url: str) -> list[str]:
    with psycopg.connect(ledger_url) as conn:
        return [r[0] for r in conn.execute("SELECT host FROM migrations ORDER BY at")]


def markers(prefix: str) -> dict[str, Marker]:
    """The plugin's databases of ``prefix``, with the marker each carries."""
    with psycopg.connect(SERVER_URL) as conn:
        rows = conn.execute("SELECT datname, shobj_description(oid, 'pg_database') FROM pg_database "
                            "WHERE datname LIKE %s", (prefix + "\\_%",)).fetchall()
    return {name: marker for name, comment in rows if (marker := Marker.parse(comment)) is not None}


def sessions_of(host: str) -> int:
    """The server's sessions opened by the plugin on ``host`` (its application_name says)."""
    with psycopg.connect(SERVER_URL) as conn:
        row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE %s",
                           (f"pytest-pgtemplate {host} %",)).fetchone()
    assert row is not None
    return int(row[0])


class Shards:
    """Starts shards of one project: each in its namespaces, with its own checkout and TMPDIR."""

    def __init__(self, project: Project, base: Path, env: dict[str, str]) -> None:
        self.project = project
        self.base = base
        self.env = env

    def host(self, name: str) -> str:
        return f"{self.project.prefix}-{name}"  # unique on the server; at most 20 characters

    @contextlib.contextmanager
    def run(self, name: str, *args: str, **env: str) -> Iterator[subprocess.Popen[str]]:
        """``pytest args`` as shard ``name``; the whole namespace is SIGKILLed on exit."""
        home = self.base / name
        checkout = home / "app"  # one directory name on every machine, as CI checkouts have
        shutil.copytree(self.project.pytester.path, checkout,
                        ignore=shutil.ignore_patterns("migrations.log", "__pycache__"))
        (home / "tmp").mkdir()
        command = [
            "unshare", "--uts", "--pid", "--fork", "--mount-proc", "sh", "-c",
            'hostname "$1" && shift && exec "$@"', "sh", self.host(name),
            sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args,
        ]
        proc = subprocess.Popen(command, cwd=checkout, env={**self.env, **env, "TMPDIR": str(home / "tmp")},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        try:
            yield proc
        finally:
            kill(proc)


def kill(proc: subprocess.Popen[str]) -> None:
    """SIGKILL the shard's process group: its namespace's first process dies, and the
    kernel kills every process left in the namespace with it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def finish(proc: subprocess.Popen[str]) -> str:
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    return out


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.fixture
def shards(project: Project, ledger: str, tmp_path: Path) -> Shards:
    project.add_revision("0003", "0002", LEDGER_REVISION)
    for part in PARTS:
        project.pytester.makepyfile(**{part.removesuffix(".py"): PART_SUITE})
    project.pytester.makepyfile(test_hold=HOLD_SUITE)
    for d in ("seen", "started-doomed", "started-live"):
        (tmp_path / d).mkdir()
    env = {**os.environ, "PGT_LEDGER_URL": ledger, "PGT_SHARDS": str(len(PARTS)),
           "PGT_SHARD_APPS": f"pytest-pgtemplate {project.prefix}-%", "PGT_SEEN": str(tmp_path / "seen"),
           "PGT_RELEASE": str(tmp_path / "release")}
    return Shards(project, tmp_path / "machines", env)


def test_shards_sharing_only_the_server_migrate_once_and_a_killed_shard_is_swept_later(
    shards: Shards, project: Project, ledger: str, tmp_path: Path
) -> None:
    names = [f"s{n}" for n in range(len(PARTS))]
    with contextlib.ExitStack() as stack:
        procs = [stack.enter_context(shards.run(name, "-n", "2", part))
                 for name, part in zip(names, PARTS, strict=True)]
        outputs = [finish(proc) for proc in procs]
    for out in outputs:
        assert "3 passed" in out, out
    # Exactly one migration, by one of the shards; every other shard waited for that build
    # on the server's advisory lock (its file lock is its own), and says whose it was.
    (builder,) = migrated_on(ledger)
    assert project.migrations_run() == 1
    template = next(name for name, m in markers(project.prefix).items() if m.kind == "template")
    assert builder in {shards.host(name) for name in names}
    for name, out in zip(names, outputs, strict=True):
        if shards.host(name) == builder:
            continue
        assert re.search(
            rf"waiting for the build of template {template} \(advisory lock held by pid \d+ "
            rf"\(pytest-pgtemplate {builder} pid \d+, ", out), out
    # Each shard ran its part on its own two worker databases.
    seen = {p.name: p.read_text() for p in (tmp_path / "seen").iterdir()}
    assert sorted(seen) == sorted(f"{shards.host(name)} {part.removesuffix('.py')} {i}"
                                  for name, part in zip(names, PARTS, strict=True) for i in range(3))
    assert len(set(seen.values())) == 2 * len(PARTS)

    # A shard killed mid-run (namespace and all) while another shard runs; a later shard's
    # sweep drops the dead one's databases and leaves the live one's alone.
    started = {which: tmp_path / f"started-{which}" for which in ("doomed", "live")}
    with (shards.run("doomed", "-n", "2", "test_hold.py", PGT_STARTED=str(started["doomed"]),
                     PGT_RELEASE=str(tmp_path / "never")) as doomed,
          shards.run("live", "-n", "2", "test_hold.py", PGT_STARTED=str(started["live"])) as live):
        for which, directory in started.items():
            wait_for(lambda d=directory: len(list(d.iterdir())) == 2, f"both workers of the {which} shard")
        owned = markers(project.prefix)
        dead = sorted(n for n, m in owned.items() if m.host == shards.host("doomed"))
        alive = sorted(n for n, m in owned.items() if m.host == shards.host("live"))
        assert [owned[n].kind for n in dead + alive] == ["worker"] * 4
        # The premise: pids repeat across pid namespaces (the first worker of each shard has
        # the same one), so only the server's advisory locks can tell the dead from the live.
        assert {owned[n].pid for n in dead} & {owned[n].pid for n in alive}
        kill(doomed)
        wait_for(lambda: not sessions_of(shards.host("doomed")), "the server to see the doomed shard gone")

        # The list tells them apart by lock, not by pid; a dead one may be gone already (other
        # runs on this shared server sweep too).
        listed = {line.split()[0]: line for line in project.run("--pgt-list").stdout.lines if line}
        for n in alive:
            assert fnmatch(listed[n], f"{n}  worker  *({shards.host('live')} pid *, alive)*"), listed[n]
        for n in set(dead) & set(listed):
            assert fnmatch(listed[n], f"{n}  worker  *({shards.host('doomed')} pid *, dead)*"), listed[n]

        with shards.run("sweeper", "-n", "2", PARTS[0]) as later:
            sweeper = finish(later)
        assert "3 passed" in sweeper
        # (Another run on this shared server may have swept them first: the sweep is the same.)
        swept = [line for line in sweeper.splitlines() if line.startswith("swept ")]
        assert not any(n in line for n in alive for line in swept), swept
        remaining = markers(project.prefix)
        assert not set(dead) & set(remaining)
        assert set(alive) <= set(remaining)

        (tmp_path / "release").touch()
        assert "2 passed" in finish(live)
    assert migrated_on(ledger) == [builder]  # the later shards reused the template

