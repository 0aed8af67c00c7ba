"""Unsupported Python and library releases are refused at startup in one sentence each.

The releases themselves cannot all be installed here (no Python 3.9; an old SQLAlchemy is
installed for real, once, in test_wheel.py): the check is driven with the versions it would
find.
"""

from __future__ import annotations

import ast
import re
from importlib import metadata
from pathlib import Path

import pytest

from pytest_pgtemplate import supported
from pytest_pgtemplate.supported import FLOORS, message, problems, release

ROOT = Path(__file__).parent.parent
NEWEST = {"pytest": "9.2.0", "pytest-asyncio": "1.5.0", "pytest-xdist": "3.8.0", "SQLAlchemy": "2.1.9",
          "asyncpg": "0.32.0", "alembic": "1.20.1", "filelock": "3.20.0", "psycopg": "3.3.9"}
OLDEST = {"pytest": "8.0.0", "pytest-asyncio": "0.23.0", "pytest-xdist": "3.5.0", "SQLAlchemy": "2.0.0",
          "asyncpg": "0.29.0", "alembic": "1.13.0", "filelock": "3.12.0", "psycopg": "3.1.0"}


def test_versions_are_compared_by_their_numeric_release() -> None:
    assert release("2.0.0b4") == (2, 0, 0)
    assert release("1.4.52") == (1, 4, 52)
    assert release("0.23.8") < release("0.24")
    assert release("8.0.0rc1") >= release("8.0")
    assert release("unknown") == ()


@pytest.mark.parametrize("found", [NEWEST, OLDEST], ids=["newest", "oldest"])
def test_supported_releases_pass(found: dict[str, str]) -> None:
    assert problems((3, 10, 0), found.get) == []


def test_each_release_too_old_is_named_with_the_upgrade_that_fixes_it() -> None:
    old = {**NEWEST, "SQLAlchemy": "1.4.52", "pytest-asyncio": "0.21.1", "pytest": "7.4.4"}
    found = problems((3, 12, 1), old.get)
    assert found == [
        "pytest 7.4.4 is too old: pip install -U 'pytest>=8.0'",
        "pytest-asyncio 0.21.1 is too old: pip install -U 'pytest-asyncio>=0.23'",
        "SQLAlchemy 1.4.52 is too old: pip install -U 'SQLAlchemy>=2.0'",
    ]
    assert message(found[2:]) == (
        "pytest-pgtemplate cannot run here: SQLAlchemy 1.4.52 is too old: pip install -U 'SQLAlchemy>=2.0'.")


def test_a_python_too_old_is_named() -> None:
    assert problems((3, 9, 18), NEWEST.get) == [
        "Python 3.9.18 is too old: pytest-pgtemplate needs Python 3.10 or newer"]


def test_a_missing_requirement_is_named_but_a_missing_extra_is_not() -> None:
    without = {k: v for k, v in NEWEST.items() if k not in ("asyncpg", "psycopg")}
    assert problems((3, 11, 0), without.get) == ["asyncpg is not installed: pip install 'asyncpg>=0.29'"]
    assert problems((3, 11, 0), {**NEWEST, "psycopg": "3.0.18"}.get) == [
        "psycopg 3.0.18 is too old: pip install -U 'psycopg>=3.1'"]


def test_the_floors_are_the_packages_requirements() -> None:
    declared = {}
    for requirement in metadata.requires("pytest-pgtemplate") or []:
        spec, _, marker = requirement.partition(";")
        if marker and marker.strip() != 'extra == "sync"':
            continue  # the embedded and test extras are not checked at startup
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)(?:\[[a-z,]+\])?>=([0-9.]+)", spec.strip())
        assert match, requirement
        declared[match.group(1).lower()] = match.group(2)
    assert {f.dist.lower(): f.version for f in FLOORS} == declared
    assert metadata.metadata("pytest-pgtemplate")["Requires-Python"] == ">=" + ".".join(
        map(str, supported.MIN_PYTHON))


def test_this_environment_is_supported() -> None:
    # the check the plugin ran at import, on what is installed here
    assert problems() == []


def test_the_check_can_speak_on_the_pythons_it_refuses() -> None:
    # The modules imported before the check (the package, its errors module, the check
    # itself) must parse on an old Python, or it would die of a SyntaxError instead.
    package = ROOT / "src" / "pytest_pgtemplate"
    for name in ("__init__.py", "errors.py", "supported.py"):
        ast.parse((package / name).read_text(), feature_version=(3, 8))
    plugin = (package / "plugin.py").read_text()
    before_check = plugin[:plugin.index("if _unsupported := supported.problems()")]
    imported = re.findall(r"^(?:from|import) (\S+)", before_check, re.MULTILINE)
    assert imported == ["__future__", "contextlib", "json", "os", "sys", "time", "uuid", "collections.abc",
                        "typing", "pytest", "."]
