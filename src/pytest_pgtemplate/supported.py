"""The oldest Python and libraries the plugin runs with, checked before anything imports them.

pip keeps these floors (they are the package's requirements), but an environment can still
hold older releases (``pip install --no-deps``, a pinned lock file, a conda environment).
Without this check such a release fails deep in an import, as a traceback naming no version;
with it, pytest stops at startup with one line per release to upgrade.

Stdlib only, and no syntax newer than Python 3.8: it must be able to speak on the Pythons
it refuses.  The floors equal ``pyproject.toml``'s (a test keeps them equal).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata

MIN_PYTHON = (3, 10)


@dataclass(frozen=True)
class Floor:
    """The oldest ``version`` of distribution ``dist`` we support; ``optional``: only
    checked when installed (an extra)."""

    dist: str
    version: str
    optional: bool = False


FLOORS = (
    Floor("pytest", "8.0"),
    Floor("pytest-asyncio", "0.23"),
    Floor("pytest-xdist", "3.5"),
    Floor("SQLAlchemy", "2.0"),
    Floor("asyncpg", "0.29"),
    Floor("alembic", "1.13"),
    Floor("filelock", "3.12"),
    Floor("psycopg", "3.1", optional=True),
)


def release(version: str) -> tuple[int, ...]:
    """The leading numeric release of ``version``: "2.0.0b4" -> (2, 0, 0), "1.4.52" -> (1, 4, 52)."""
    match = re.match(r"\d+(?:\.\d+)*", version)
    return tuple(int(part) for part in match.group(0).split(".")) if match else ()


def installed(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def problems(python: tuple[int, ...] = tuple(sys.version_info[:3]),
             version_of: Callable[[str], str | None] = installed) -> list[str]:
    """One sentence per unsupported or missing release, naming what was found and the fix;
    empty when everything is supported."""
    found: list[str] = []
    if python[:2] < MIN_PYTHON:
        found.append(f"Python {'.'.join(map(str, python))} is too old: pytest-pgtemplate needs Python "
                     f"{'.'.join(map(str, MIN_PYTHON))} or newer")
    for floor in FLOORS:
        version = version_of(floor.dist)
        if version is None:
            if not floor.optional:
                found.append(f"{floor.dist} is not installed: pip install '{floor.dist}>={floor.version}'")
        elif release(version) < release(floor.version):
            found.append(f"{floor.dist} {version} is too old: pip install -U '{floor.dist}>={floor.version}'")
    return found


def message(found: list[str]) -> str:
    """What pytest shows for ``found`` (from ``problems``), as a usage error."""
    return "pytest-pgtemplate cannot run here: " + "; ".join(found) + "."
