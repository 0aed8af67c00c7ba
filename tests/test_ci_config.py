"""The CI workflow and tox.ini cannot drift: the workflow runs exactly tox's envs, each on the
Python its name says, and meets every supported Python and PostgreSQL major."""

from __future__ import annotations

import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from pytest_pgtemplate.admin import MIN_SERVER_MAJOR

ROOT = Path(__file__).parent.parent
NEWEST_SERVER_MAJOR = 18


def workflow() -> dict[Any, Any]:
    loaded = yaml.safe_load((ROOT / ".github" / "workflows" / "ci.yml").read_text())
    assert isinstance(loaded, dict)
    return loaded


def tox_envs() -> list[str]:
    done = subprocess.run([sys.executable, "-m", "tox", "l", "--no-desc", "-q"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def matrix_rows() -> list[dict[str, str]]:
    """Every (job, matrix row) of the workflow, flattened: toxenv, and python/postgres when set."""
    rows = []
    for job in workflow()["jobs"].values():
        matrix = job["strategy"]["matrix"]
        assert "${{ matrix.toxenv }}" in job["steps"][-1]["run"]  # the step really runs the env
        for row in matrix.get("include", []):
            rows.append({k: str(v) for k, v in row.items()})
        rows += [{"toxenv": env} for env in matrix.get("toxenv", [])]
    return rows


def test_the_workflow_runs_exactly_the_tox_envs() -> None:
    named = [row["toxenv"] for row in matrix_rows()]
    assert len(named) == len(set(named)), named
    assert set(named) == set(tox_envs())


def test_each_env_runs_on_the_python_its_name_says() -> None:
    for row in matrix_rows():
        if match := re.match(r"py3(\d+)", row["toxenv"]):
            assert row["python"] == f"3.{match.group(1)}", row


def test_every_supported_python_and_postgresql_major_is_met() -> None:
    rows = matrix_rows()
    classifiers = metadata.metadata("pytest-pgtemplate").get_all("Classifier") or []
    pythons = {c.rsplit(" ", 1)[1] for c in classifiers
               if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)}
    assert {row["python"] for row in rows if "python" in row} == pythons
    assert {row["toxenv"] for row in rows if re.fullmatch(r"py3\d+", row["toxenv"])} == {
        "py" + p.replace(".", "") for p in pythons}  # each Python's full suite, newest deps
    assert {int(row["postgres"]) for row in rows if "postgres" in row} == set(
        range(MIN_SERVER_MAJOR, NEWEST_SERVER_MAJOR + 1))


def test_the_service_is_the_server_the_tests_use() -> None:
    job = workflow()["jobs"]["test"]
    assert job["services"]["postgres"]["image"] == "postgres:${{ matrix.postgres }}"
    assert job["services"]["postgres"]["env"] == {"POSTGRES_HOST_AUTH_METHOD": "trust"}
    assert job["env"]["PGTEMPLATE_TEST_URL"] == "postgresql://postgres@127.0.0.1:5432/postgres"
    assert workflow()[True] == {"push": None, "pull_request": None}  # YAML 1.1 reads `on:` as true
