"""App integration: environment variables that point the app at our database.

Apps often build their engine at import time from ``DATABASE_URL``, or from separate
parts (``POSTGRES_SERVER``, ``POSTGRES_DB``...).  ``pgtemplate_env`` names them: entries
separated by commas or lines, each

- ``NAME``: the URL, in the scheme the variable already had (``postgresql://``,
  ``postgres://``...), else the one the project writes for it (a dotenv file's
  ``NAME=postgresql+psycopg2://...``, the rootdir alembic.ini's ``sqlalchemy.url``), else
  ``postgresql+asyncpg``;
- ``NAME=SCHEME``: the URL in that scheme (``DATABASE_URL=postgresql+psycopg2``);
- ``NAME=TEMPLATE``: text with ``{host}``, ``{port}``, ``{user}``, ``{password}``,
  ``{database}`` filled in (``POSTGRES_DB={database}``); a password the URL lacks (trust
  auth) is the empty string.

The plugin sets them to the worker database before test modules are imported, and to the
database being built while migrating (for env.py files that read them).
"""

from __future__ import annotations

import os
import re
import string
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.engine import URL

DEFAULT_SCHEME = "postgresql+asyncpg"
PARTS = ("host", "port", "user", "password", "database")
_SCHEME = re.compile(r"postgres(ql)?(\+\w+)?")


@dataclass(frozen=True, slots=True)
class EnvEntry:
    """One variable: its name and what it gets (a URL scheme, or a template of parts)."""

    name: str
    scheme: str | None = None
    template: str | None = None

    def value(self, url: URL, existing: str | None, rootdir: Path | None = None) -> str:
        if self.template is not None:
            parts = {"host": url.host or "", "port": "" if url.port is None else str(url.port),
                     "user": url.username or "", "password": url.password or "",
                     "database": url.database or ""}
            return self.template.format_map(parts)
        scheme = self.scheme
        if scheme is None and not (existing and "://" in existing) and rootdir is not None:
            scheme = project_scheme(self.name, rootdir)
        return app_url(url, existing, scheme)

    def spec(self) -> str:
        extra = self.template if self.template is not None else self.scheme
        return self.name if extra is None else f"{self.name}={extra}"


def parse_env(spec: str) -> list[EnvEntry]:
    """``pgtemplate_env``'s entries; ValueError names what is wrong."""
    entries: list[EnvEntry] = []
    for raw in re.split(r"[,\n]", spec):
        name, eq, rest = (part.strip() for part in raw.strip().partition("="))
        if not name and not eq:
            continue
        if not name.isidentifier() or not name.isascii():
            raise ValueError(f"{name!r} is not an environment variable name")
        if name in (e.name for e in entries):
            raise ValueError(f"{name} is named twice")
        if not rest:
            entries.append(EnvEntry(name))
        elif _SCHEME.fullmatch(rest):
            entries.append(EnvEntry(name, scheme=rest))
        elif "{" in rest:
            _check_template(name, rest)
            entries.append(EnvEntry(name, template=rest))
        else:
            raise ValueError(
                f"{name}={rest}: after '=' give a PostgreSQL URL scheme (e.g. postgresql+psycopg2, "
                "without ://) or a template of " + ", ".join("{" + p + "}" for p in PARTS))
    return entries


def _check_template(name: str, template: str) -> None:
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:
        raise ValueError(f"{name}={template}: {exc}") from None
    unknown = [f for f in fields if f not in PARTS]
    if unknown or not fields:
        problem = f"unknown field {{{unknown[0]}}}" if unknown else "no field"
        raise ValueError(f"{name}={template}: {problem}; use " + ", ".join("{" + p + "}" for p in PARTS))


def env_names(spec: str | None) -> list[str]:
    """The variable names of a (valid) ``pgtemplate_env`` value."""
    return [] if spec is None else [entry.name for entry in parse_env(spec)]


def app_url(url: URL, existing: str | None, scheme: str | None = None) -> str:
    """``url`` as a string in ``scheme``, else the scheme of ``existing`` (the variable's
    current value), else ``postgresql+asyncpg``."""
    if scheme is None:
        scheme = existing.split("://", 1)[0] if existing and "://" in existing else DEFAULT_SCHEME
    return url.set(drivername=scheme).render_as_string(hide_password=False)


# Dotenv files a project keeps in its rootdir, the committed examples included.
DOTENV_FILES = (".env", ".env.test", ".env.testing", ".env.local", ".env.example", ".env.sample",
                ".env.template", ".env.dist", "example.env", "sample.env")


def project_scheme(name: str, rootdir: Path) -> str | None:
    """The URL scheme the project itself writes for variable ``name``: in a dotenv file of
    the rootdir (``NAME=postgresql+psycopg2://...``), else in the rootdir alembic.ini's
    ``sqlalchemy.url``; None when neither names a PostgreSQL scheme.  (A sync app whose
    variable is unset in CI would otherwise get the async default and fail deep in
    SQLAlchemy.)"""
    assignment = re.compile(
        rf"""^[ \t]*(?:export[ \t]+)?{re.escape(name)}[ \t]*[=:][ \t]*["']?({_SCHEME.pattern})://""",
        re.MULTILINE)
    for filename in DOTENV_FILES:
        if match := assignment.search(_read(rootdir / filename)):
            return match.group(1)
    ini_url = re.compile(rf"^[ \t]*sqlalchemy\.url[ \t]*=[ \t]*({_SCHEME.pattern})://", re.MULTILINE)
    if match := ini_url.search(_read(rootdir / "alembic.ini")):
        return match.group(1)
    return None


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace") if path.is_file() else ""
    except OSError:
        return ""


def driver_mismatch(exc: BaseException | None) -> str | None:
    """For a test that failed because the app's engine got a driver of the wrong kind (an
    async engine with a sync driver, or the reverse): which kind it needs."""
    seen = 0
    while exc is not None and seen < 10:
        text = f"{type(exc).__name__}: {exc}"
        if type(exc).__name__ == "MissingGreenlet" or "greenlet_spawn has not been called" in text:
            return "sync"
        if "requires an async driver" in text:
            return "async"
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return None


def point_env(spec: str, url: URL, rootdir: Path | None = None) -> None:
    """Set every variable ``spec`` names to ``url`` (or its parts)."""
    for entry in parse_env(spec):
        os.environ[entry.name] = entry.value(url, os.environ.get(entry.name), rootdir)


@contextmanager
def temporary_env(specs: Iterable[str | None], url: URL) -> Iterator[None]:
    """While migrating: each variable points at the database being built; restored after."""
    present = [spec for spec in specs if spec is not None]
    before = {name: os.environ.get(name) for spec in present for name in env_names(spec)}
    for spec in present:
        point_env(spec, url)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
