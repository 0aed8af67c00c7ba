"""Database names, identifier quoting, and the marker that says "this database is ours".

Every database name that reaches SQL goes through ``ident()`` (via ``sql()``);
nothing else in the package formats names into SQL text.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from dataclasses import asdict, dataclass
from typing import LiteralString

from .errors import ConfigError

MAX_IDENT_BYTES = 63
MARKER_TAG = "pytest-pgtemplate"
FORMAT_VERSION = 5

TEMPLATE = "template"
BUILDING = "building"
WORKER = "worker"
CLONE = "clone"  # a per-test clone (reset="clone")
KEPT = "kept"  # a worker database kept by --pgt-keep: the automatic sweep spares it
SPARE = "spare"  # a worker database reset at the end of its run, for the next run to take


def ident(name: str) -> str:
    """Quote ``name`` as a PostgreSQL identifier; refuse names PostgreSQL would truncate."""
    if not name or "\x00" in name:
        raise ConfigError(f"pytest-pgtemplate: {name!r} is not a valid database name")
    if len(name.encode()) > MAX_IDENT_BYTES:
        raise ConfigError(
            f"pytest-pgtemplate: database name {name!r} is longer than {MAX_IDENT_BYTES} bytes "
            "and PostgreSQL would silently truncate it; shorten --pgt-prefix / PGTEMPLATE_PREFIX "
            "/ pgtemplate_prefix.",
            setting="prefix",
        )
    return '"' + name.replace('"', '""') + '"'


def sql(template: LiteralString, *names: str) -> str:
    """Fill the ``{}`` slots of a constant SQL template with quoted identifiers."""
    return template.format(*(ident(n) for n in names))


def template_name(prefix: str, fingerprint: str) -> str:
    return _checked(f"{prefix}_tpl_{fingerprint[:20]}")


def build_name(prefix: str, fingerprint: str, nonce: str) -> str:
    return _checked(f"{prefix}_bld_{fingerprint[:12]}_{nonce[:8]}")


def worker_name(prefix: str, run_id: str, worker: str, database: str = "") -> str:
    """Known before the server is reached (no fingerprint in it): ``pgtemplate_env`` sets
    the URL before test modules are imported.  ``database``: an extra database's name."""
    return _checked(f"{prefix}_w_{_owner(run_id, worker, database)}")


def spare_name(prefix: str, fingerprint: str, nonce: str) -> str:
    return _checked(f"{prefix}_s_{fingerprint[:12]}_{nonce[:8]}")


def clone_name(prefix: str, run_id: str, worker: str, n: int, database: str = "") -> str:
    owner = _owner(run_id, worker, database)
    name = f"{prefix}_c_{owner}_{n}"
    if len(name) > MAX_IDENT_BYTES:  # a long prefix and database name, many clones: shorten
        digest = hashlib.sha256(owner.encode()).hexdigest()[:16]
        name = f"{prefix}_c_{digest}_{n}"
    return _checked(name)


def _owner(run_id: str, worker: str, database: str) -> str:
    safe_worker = "".join(c for c in worker.lower() if c.isalnum())[:8] or "main"
    return f"{run_id[:12]}_{safe_worker}" + (f"_{database}" if database else "")


def _checked(name: str) -> str:
    ident(name)  # raises if PostgreSQL would truncate it
    return name


def template_build(name: str, oid: int) -> str:
    """One build of a template: a rebuilt template, same name, has another oid."""
    return f"{name}@{oid}"


def spare_source(build: str, *, durable: bool) -> str:
    """What a spare holds (``Marker.source``): a template build, and its durability."""
    return build + ("/durable" if durable else "")


def source_build(source: str) -> str:
    """The template build of a spare's ``source``."""
    return source.split("/")[0]


def source_template(source: str) -> str:
    """The template's name in a spare's ``source``."""
    return source.split("@")[0]


@dataclass(frozen=True, slots=True)
class Marker:
    """What ``COMMENT ON DATABASE`` says about a database we created."""

    kind: str
    fingerprint: str
    run: str
    host: str
    pid: int
    created: float
    format: int = FORMAT_VERSION
    prefix: str = ""
    database: str = ""  # of a template: which of the project's databases it serves
    project: str = ""  # of a template: the project (its rootdir's name) that built it
    source: str = ""  # of a spare: the template it holds the state of (see ``Admin.source``)
    settings: str = ""  # of a spare: its database settings as created (see ``TruncateReset.not_renewed``)

    @classmethod
    def new(cls, kind: str, fingerprint: str, run: str, prefix: str, database: str = "",
            project: str = "", source: str = "", settings: str = "") -> Marker:
        return cls(kind, fingerprint, run, socket.gethostname(), os.getpid(), time.time(),
                   prefix=prefix, database=database, project=project, source=source, settings=settings)

    def text(self) -> str:
        return f"{MARKER_TAG} {json.dumps(asdict(self), sort_keys=True)}"

    @classmethod
    def parse(cls, comment: str | None) -> Marker | None:
        """The marker in ``comment``, or None when the database is not ours."""
        if not comment or not comment.startswith(MARKER_TAG + " "):
            return None
        try:
            data = json.loads(comment[len(MARKER_TAG) + 1 :])
            return cls(**data)
        except (ValueError, TypeError):
            return None


# Every database's fixtures, under the default database's names (see fixtures.py).
FIXTURE_BASES = ("_pgt_database", "pg_url", "pg_sync_url", "pg_engine", "_pgt_async_bind",
                 "pg_sessionmaker", "pg_session", "pg_sync_engine", "pg_sync_session")


def fixture_name(base: str, database: str, default: str = "default") -> str:
    """``pg_session`` of database ``analytics`` is ``pg_analytics_session``."""
    if database == default:
        return base
    head = "_pgt_" if base.startswith("_pgt_") else "pg_"
    return f"{head}{database}_{base[len(head):]}"
