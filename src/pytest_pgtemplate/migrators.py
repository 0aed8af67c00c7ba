"""Choosing the migrator, and the ones that are not Alembic: ``create_all`` from a
MetaData, a user callable, and a seed step that runs after any of them.

Import paths look like ``pkg.module:attr.sub``.  User callables take one argument, the
template database's URL (``postgresql+asyncpg`` for ``async def``, ``postgresql+psycopg``
otherwise), and run in a fresh thread without an event loop.
"""

from __future__ import annotations

import asyncio
import configparser
import importlib
import inspect
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import MetaData, create_mock_engine
from sqlalchemy.engine import URL, Dialect
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool
from sqlalchemy.sql.elements import ClauseElement

from . import extensions
from .errors import ConfigError, PgTemplateError
from .fingerprint import tree_inputs
from .migrate import AlembicMigrator, Migrator, Progress, find_alembic_ini, run_in_fresh_thread
from .settings import OPTIONS_BY_NAME, Settings


def make_migrator(settings: Settings, seeds: tuple[Migrator, ...] = ()) -> Migrator:
    """The migrator the settings ask for: a callable, a MetaData, else Alembic; then the
    seed of the settings and ``seeds`` (the seed hook's implementations)."""
    migrator: Migrator
    builder = ("migrate" if settings.migrate is not None
               else "metadata" if settings.metadata is not None else None)
    if settings.check_downgrade and builder is not None:
        raise ConfigError(
            "pytest-pgtemplate: --pgt-check-downgrade runs Alembic's downgrade, but the template is "
            f"built with pgtemplate_{builder}, which the plugin cannot undo; unset one of "
            f"{OPTIONS_BY_NAME['check_downgrade'].names()} or pgtemplate_{builder}.",
            setting="check_downgrade",
        )
    if settings.migrate is not None:
        migrator = CallableMigrator(settings.migrate, settings.rootdir, "migrate",
                                    alembic_ini=settings.alembic_ini)
    elif settings.metadata is not None:
        migrator = MetadataMigrator(settings.metadata, settings.rootdir)
    else:
        ini = find_alembic_ini(settings.alembic_ini, settings.source("alembic_ini"), settings.rootdir)
        migrator = AlembicMigrator(ini, tuple(settings.alembic_x), settings.check_downgrade,
                                   settings.rootdir)
    if settings.seed is not None:
        seeds = (CallableMigrator(settings.seed, settings.rootdir, "seed"), *seeds)
    files = declared_files(settings.fingerprint_files, settings.rootdir)
    return Seeded(migrator, seeds, files) if seeds or files else migrator


def declared_files(patterns: tuple[str, ...], rootdir: Path) -> tuple[tuple[str, Path], ...]:
    """The files of ``pgtemplate_fingerprint_files`` (label, path); a pattern matching none
    is an error (a typo would otherwise leave a stale template unnoticed)."""
    found: list[Path] = []
    for pattern in patterns:
        matches = sorted(p for p in rootdir.glob(pattern) if p.is_file()) if pattern else []
        if not matches:
            raise ConfigError(
                f"pytest-pgtemplate: {pattern!r} (from {OPTIONS_BY_NAME['fingerprint_files'].names()}) "
                f"matches no file under {rootdir}; fix the glob (relative to the rootdir).",
                setting="fingerprint_files")
        found += [m for m in matches if m not in found]
    return tuple((m.relative_to(rootdir).as_posix(), m) for m in found)


def load_object(path: str, rootdir: Path, setting: str) -> object:
    """Import ``pkg.module:attr.sub``; a failure names the setting to fix."""
    names = OPTIONS_BY_NAME[setting].names()
    module_name, _, attrs = path.partition(":")
    if not module_name or not attrs:
        raise ConfigError(
            f"pytest-pgtemplate: {path!r} is not an import path like 'pkg.module:attribute'; "
            f"fix {names}.", setting=setting,
        )
    if str(rootdir) not in sys.path:
        sys.path.insert(0, str(rootdir))  # as `python -m pytest` would from the rootdir
    try:
        obj: object = importlib.import_module(module_name)
    except Exception as exc:
        raise ConfigError(
            f"pytest-pgtemplate: cannot import module {module_name!r} (from {names}): "
            f"{type(exc).__name__}: {exc}. Fix the import path, or make the module importable "
            "(e.g. pythonpath in your pytest configuration).", setting=setting,
        ) from exc
    for attr in attrs.split("."):
        if not hasattr(obj, attr):
            raise ConfigError(
                f"pytest-pgtemplate: {module_name!r} has no attribute {attrs!r} (from {names}); "
                "fix the import path.", setting=setting,
            )
        obj = getattr(obj, attr)
    return obj


def _module_source(obj: object) -> bytes:
    """The bytes of the file defining ``obj``: any change there changes the fingerprint."""
    try:
        return Path(inspect.getfile(obj)).read_bytes()  # type: ignore[arg-type]
    except (TypeError, OSError):
        return repr(obj).encode()


@dataclass(frozen=True, slots=True)
class MetadataMigrator:
    """``MetaData.create_all`` on the template; its DDL is the fingerprint input."""

    path: str
    rootdir: Path
    kind: str = "metadata"

    def _metadata(self) -> MetaData:
        obj = load_object(self.path, self.rootdir, "metadata")
        if not isinstance(obj, MetaData):
            raise ConfigError(
                f"pytest-pgtemplate: {self.path!r} is a {type(obj).__name__}, not a sqlalchemy "
                f"MetaData (e.g. 'app.models:Base.metadata'); fix "
                f"{OPTIONS_BY_NAME['metadata'].names()}.", setting="metadata",
            )
        return obj

    def inputs(self) -> list[tuple[str, bytes]]:
        statements: list[str] = []
        dialects: list[Dialect] = []

        def record(sql: ClauseElement, *args: object, **kwargs: object) -> None:
            statements.append(str(sql.compile(dialect=dialects[0])))

        engine = create_mock_engine(URL.create("postgresql+asyncpg"), record)
        dialects.append(engine.dialect)
        metadata = self._metadata()
        try:
            metadata.create_all(engine, checkfirst=False)
        except Exception as exc:
            raise ConfigError(
                f"pytest-pgtemplate: cannot render the DDL of {self.path} for PostgreSQL "
                f"({type(exc).__name__}: {exc}); fix the models, or build the template another way "
                f"than {OPTIONS_BY_NAME['metadata'].names()}.", setting="metadata",
            ) from exc
        return [("metadata-ddl", "\n".join(statements).encode()), ("migrator", self.kind.encode())]

    def describe(self) -> str:
        return f"{self.path}.create_all()"

    def migrate(self, url: URL, progress: Progress | None = None) -> None:
        metadata = self._metadata()

        async def create() -> None:
            engine = create_async_engine(url.set(drivername="postgresql+asyncpg"), poolclass=NullPool)
            try:
                async with engine.begin() as conn:
                    await conn.run_sync(metadata.create_all)
            finally:
                await engine.dispose()

        _run_user_code(lambda: asyncio.run(create()), f"create_all of {self.path}")


@dataclass(frozen=True, slots=True)
class CallableMigrator:
    """A user function ``func(url)``, sync or async (``pgtemplate_migrate`` / ``pgtemplate_seed``).

    Its module's source feeds the fingerprint; a migrate function that runs Alembic is
    fingerprinted by the migrations too: those of the alembic.ini the settings name, the
    rootdir's, any ``*.ini`` its module names that has an ``[alembic]`` section, and every
    Alembic script directory of the project (``env.py`` beside ``versions/``, as
    Flask-Migrate keeps them, with an alembic.ini that names no ``script_location``).
    Taking too many only rebuilds more often; missing one would reuse a stale template.
    """

    path: str
    rootdir: Path
    setting: str
    alembic_ini: Path | None = None
    kind: str = "callable"

    def _func(self) -> Callable[[URL], object]:
        func = load_object(self.path, self.rootdir, self.setting)
        if not callable(func):
            raise ConfigError(
                f"pytest-pgtemplate: {self.path!r} is not callable; fix "
                f"{OPTIONS_BY_NAME[self.setting].names()}.", setting=self.setting,
            )
        return func

    def inputs(self) -> list[tuple[str, bytes]]:
        func = self._func()
        source = _module_source(func)
        found = [(f"{self.setting}:{self.path}", source),
                 ("migrator", f"{self.kind}:{self.setting}".encode())]
        if self.setting == "migrate":
            covered: set[Path] = set()
            for ini in self._alembic_inis(func, source):
                label = _relative(ini, self.rootdir)
                alembic = AlembicMigrator(ini, rootdir=self.rootdir)
                covered.add(alembic.script_dir().resolve())
                found += [(f"alembic-of-migrate:{label}:{name}", data)
                          for name, data in alembic.inputs() if name != "migrator"]
            for directory in script_dirs(self.rootdir):
                if directory not in covered:
                    label = f"scripts-of-migrate:{_relative(directory, self.rootdir)}"
                    found += tree_inputs(directory, label)
        return found


    def _alembic_inis(self, func: object, source: bytes) -> list[Path]:
        """alembic.ini files the function may run: named by the settings, in the rootdir,
        or written in its module (relative to the module, the rootdir or absolute)."""
        try:
            module_dir = Path(inspect.getfile(func)).parent  # type: ignore[arg-type]
        except TypeError:
            module_dir = self.rootdir
        candidates = [p for p in (self.alembic_ini, self.rootdir / "alembic.ini") if p is not None]
        for literal in re.findall(rb"""["']([^"'\n]*\.ini)["']""", source):
            name = Path(literal.decode(errors="replace"))
            candidates += [name] if name.is_absolute() else [module_dir / name, self.rootdir / name]
        found: list[Path] = []
        for ini in candidates:
            if ini.is_file() and ini.resolve() not in found and _is_alembic_ini(ini):
                found.append(ini.resolve())
        return found

    def describe(self) -> str:
        return f"{self.path}(url)"

    def migrate(self, url: URL, progress: Progress | None = None) -> None:
        func = self._func()
        if inspect.iscoroutinefunction(func):
            target = url.set(drivername="postgresql+asyncpg")
            _run_user_code(lambda: asyncio.run(func(target)), self.path)
        else:
            target = url.set(drivername="postgresql+psycopg")
            _run_user_code(lambda: func(target), self.path)


def _run_user_code(call: Callable[[], object], what: str) -> None:
    try:
        run_in_fresh_thread(call)
    except PgTemplateError:
        raise
    except Exception as exc:
        raise PgTemplateError(
            f"pytest-pgtemplate: {what} failed while building the template: "
            f"{type(exc).__name__}: {str(exc).rstrip('.')}. The template was not published"
            + (extensions.hint(exc) or "; fix it and run again.")
        ) from exc


def fingerprint_caveat(inputs: list[tuple[str, bytes]]) -> str:
    """What a person must know about a fingerprint from ``inputs``: a ``pgtemplate_migrate``
    function of which only the module's source counts (no Alembic migrations found, no
    files declared) keeps its template while the migrations it runs change."""
    labels = [label for label, _ in inputs]
    if ("migrator", b"callable:migrate") not in inputs or any(
            label.startswith(("alembic-of-migrate:", "scripts-of-migrate:", "file:")) for label in labels):
        return ""
    function = next(label.split(":", 1)[1] for label in labels if label.startswith("migrate:"))
    return (f"its fingerprint covers only the source of {function}'s module (no Alembic migrations "
            "found in the project): if it reads other files (migrations, SQL, data), a change to them "
            "is not seen; name them in pgtemplate_fingerprint_files, or rebuild with --pgt-rebuild")


# Not searched for migrations: virtualenvs (a pyvenv.cfg), caches, dependencies, builds.
_NOT_THE_PROJECT = frozenset({"node_modules", "site-packages", "__pycache__", "build", "dist"})
SCRIPT_DIR_DEPTH = 4


def script_dirs(rootdir: Path, depth: int = SCRIPT_DIR_DEPTH) -> list[Path]:
    """Alembic script directories below ``rootdir`` (an ``env.py`` beside a ``versions/``),
    at most ``depth`` levels down, resolved, sorted."""
    found: list[Path] = []

    def walk(directory: Path, level: int) -> None:
        try:
            children = sorted(p for p in directory.iterdir() if p.is_dir())
        except OSError:
            return
        if (directory / "env.py").is_file() and (directory / "versions").is_dir():
            found.append(directory.resolve())
        if level >= depth:
            return
        for child in children:
            if (child.name.startswith(".") or child.name in _NOT_THE_PROJECT
                    or (child / "pyvenv.cfg").is_file()):
                continue
            walk(child, level + 1)

    walk(rootdir, 0)
    return found


def _is_alembic_ini(path: Path) -> bool:
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read(path)
    except (configparser.Error, UnicodeDecodeError):
        return False
    return parser.has_option("alembic", "script_location")


def _relative(path: Path, rootdir: Path) -> str:
    """A label that does not depend on where the project lives."""
    try:
        return path.relative_to(rootdir.resolve()).as_posix()
    except ValueError:
        return path.name


@dataclass(frozen=True, slots=True)
class Seeded:
    """A migrator followed by seed steps; all feed the fingerprint, and so do the declared
    files (``pgtemplate_fingerprint_files``)."""

    base: Migrator
    seeds: tuple[Migrator, ...]
    files: tuple[tuple[str, Path], ...] = ()  # label (relative to the rootdir), path

    @property
    def kind(self) -> str:
        return self.base.kind

    def inputs(self) -> list[tuple[str, bytes]]:
        found = self.base.inputs()
        for seed in self.seeds:
            found += seed.inputs()
        found += [(f"file:{label}", path.read_bytes()) for label, path in self.files]
        return found

    def describe(self) -> str:
        if not self.seeds:
            return self.base.describe()
        return f"{self.base.describe()}, then seed " + ", ".join(s.describe() for s in self.seeds)

    def migrate(self, url: URL, progress: Progress | None = None) -> None:
        self.base.migrate(url, progress)
        for seed in self.seeds:
            seed.migrate(url)


@dataclass(frozen=True, slots=True)
class HookSeed:
    """The ``pytest_pgtemplate_seed`` hook's implementations for one database, called one
    after the other (in pluggy's order: the last registered first), each awaited before the
    next when it is a coroutine.  Their modules' source (data constants included) and the
    database's name feed the fingerprint."""

    implementations: tuple[tuple[Callable[..., object], tuple[str, ...]], ...]  # function, argnames
    database: str
    extra: Mapping[str, object]  # what else the hook passes (config)
    kind: str = "seed-hook"

    def inputs(self) -> list[tuple[str, bytes]]:
        found = [(f"seed-hook:{f.__module__}.{f.__qualname__}", _module_source(f))
                 for f, _ in self.implementations]
        return [*found, ("seed-hook-database", self.database.encode())]

    def describe(self) -> str:
        return "pytest_pgtemplate_seed(" + ", ".join(f.__module__ for f, _ in self.implementations) + ")"

    def migrate(self, url: URL, progress: Progress | None = None) -> None:
        given = {"url": url.set(drivername="postgresql+asyncpg"),
                 "sync_url": url.set(drivername="postgresql+psycopg"),
                 "database": self.database, **self.extra}

        def call() -> None:
            for func, argnames in self.implementations:
                result = func(**{name: given[name] for name in argnames if name in given})
                if inspect.iscoroutine(result):
                    asyncio.run(result)

        _run_user_code(call, self.describe())
