"""Migrators: how an empty database gets its schema.  Here: Alembic ``upgrade head``.

A migrator runs in a fresh thread with no event loop, so an async ``env.py`` that
calls ``asyncio.run()`` itself works, and nothing runs on a test's loop.
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import configparser
import logging
import os
import threading
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import asyncpg
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from . import extensions
from .appenv import temporary_env
from .errors import ConfigError, PgTemplateError
from .fingerprint import tree_inputs
from .settings import OPTIONS_BY_NAME

if TYPE_CHECKING:  # Alembic is imported where a migration runs: a warm run needs none of it
    from alembic.config import Config
    from alembic.script import ScriptDirectory

ALEMBIC_SETTING = OPTIONS_BY_NAME["alembic_ini"].names()


@dataclass(slots=True)
class Progress:
    """Where a running migration is, for a person watching a long build."""

    step: str = ""
    done: int = 0
    total: int | None = None
    notes: list[str] = field(default_factory=list)  # for the person watching, once

    def describe(self) -> str:
        if not self.done:
            return ""
        of = f"/{self.total}" if self.total else ""
        return f", revision {self.done}{of} ({self.step})"


class _ProgressHandler(logging.Handler):
    """Alembic logs "Running upgrade a -> b, message" for every revision it applies."""

    def __init__(self, progress: Progress) -> None:
        super().__init__(logging.INFO)
        self.progress = progress

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("Running upgrade"):
            self.progress.done += 1
            self.progress.step = message.removeprefix("Running upgrade ").strip()


class Migrator(Protocol):
    """Gives an empty database its schema; ``inputs()`` feed the fingerprint."""

    @property
    def kind(self) -> str: ...

    def inputs(self) -> list[tuple[str, bytes]]: ...

    def migrate(self, url: URL, progress: Progress | None = None) -> None: ...

    def describe(self) -> str: ...


def run_in_fresh_thread(func: Callable[[], object]) -> None:
    """Run ``func`` in a new thread (no running event loop there) and re-raise its error."""
    failure: list[BaseException] = []

    def target() -> None:
        try:
            func()
        except BaseException as exc:  # re-raised in the caller's thread
            failure.append(exc)

    thread = threading.Thread(target=target, name="pytest-pgtemplate-migrate")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]


def find_alembic_ini(explicit: Path | None, source: str, rootdir: Path) -> Path:
    """The alembic.ini to use; a clear error names the setting when there is none."""
    if explicit is not None:
        if not explicit.is_file():
            raise ConfigError(
                f"pytest-pgtemplate: alembic.ini not found at {explicit} (from {source}); "
                f"set {ALEMBIC_SETTING} to your alembic.ini.",
                setting="alembic_ini",
            )
        return explicit
    candidate = rootdir / "alembic.ini"
    if candidate.is_file():
        return candidate
    raise ConfigError(
        f"pytest-pgtemplate: no way to build the template: no alembic.ini in the rootdir "
        f"({rootdir}). Set {ALEMBIC_SETTING} to your alembic.ini.",
        setting="alembic_ini",
    )


@dataclass(frozen=True, slots=True)
class AlembicMigrator:
    """``alembic upgrade heads`` with the template database's URL (or connection)."""

    ini: Path
    x_arguments: tuple[str, ...] = ()
    check_downgrade: bool = False
    rootdir: Path | None = None  # where `alembic -c <ini>` is likely run from (relative paths)
    kind: str = "alembic"

    def base(self) -> Path:
        """The directory relative paths of the ini (``script_location``, ``version_locations``)
        start from.  Alembic takes them from the current directory; pytest may run from
        anywhere, so: the ini's directory where the migrations are found from there (an ini
        at the project's top), else the rootdir's or the current directory (an ini kept in a
        subdirectory, written for ``alembic -c sub/alembic.ini`` run from the top)."""
        location = self._ini().get("alembic", "script_location", fallback=None)
        bases = [self.ini.parent, *(d for d in (self.rootdir, Path.cwd()) if d is not None)]
        if location is not None and ":" not in location and not Path(location).is_absolute():
            for base in bases:
                if (base / location / "env.py").is_file():
                    return base
        return self.ini.parent

    def _config(self) -> Config:
        from alembic.config import Config

        cfg = Config(str(self.ini), cmd_opts=argparse.Namespace(x=list(self.x_arguments)))
        location = cfg.get_main_option("script_location")
        if location is None:
            raise ConfigError(
                f"pytest-pgtemplate: {self.ini} has no script_location in [alembic]; fix it or "
                f"set {ALEMBIC_SETTING} to the right alembic.ini.",
                setting="alembic_ini",
            )
        if ":" not in location and not Path(location).is_absolute():
            # Alembic resolves relative paths against the cwd; pytest may run from anywhere.
            cfg.set_main_option("script_location", str(self.base() / location))
        return cfg

    def _ini(self) -> configparser.ConfigParser:
        """The ini file as Alembic's ``Config`` reads it (``%(here)s`` its directory)."""
        parser = configparser.ConfigParser({"here": self.ini.absolute().parent.as_posix()})
        try:
            parser.read([self.ini], encoding="locale")
        except configparser.Error as exc:
            raise ConfigError(
                f"pytest-pgtemplate: cannot read {self.ini}: {exc}. Fix it, or set {ALEMBIC_SETTING}.",
                setting="alembic_ini",
            ) from exc
        return parser

    def script_dir(self) -> Path:
        """The migrations' directory.  A plain path (the usual case) is resolved here, as
        ``_config`` has Alembic resolve it, without importing Alembic; a package resource
        (``package:path``) or a missing directory is left to Alembic, and its errors."""
        location = self._ini().get("alembic", "script_location", fallback=None)
        if location is not None and ":" not in location:
            path = Path(location) if Path(location).is_absolute() else self.base() / location
            if (path / "env.py").is_file():
                return path
        return Path(self._script(self._config()).dir)

    def _script(self, cfg: Config) -> ScriptDirectory:
        from alembic.script import ScriptDirectory

        try:
            return ScriptDirectory.from_config(cfg)
        except Exception as exc:
            raise ConfigError(
                f"pytest-pgtemplate: Alembic cannot load the migrations of {self.ini}: "
                f"{str(exc).rstrip('.')}. Fix script_location, or set {ALEMBIC_SETTING}.",
                setting="alembic_ini",
            ) from exc

    def inputs(self) -> list[tuple[str, bytes]]:
        ini = self._ini()  # as written: _config() makes paths absolute

        def portable(value: str) -> str:
            # %(here)s is expanded: the project's location must not change the fingerprint.
            return value.replace(str(self.ini.parent), "%(here)s")

        found = tree_inputs(self.script_dir(), "scripts")
        for extra in (ini.get("alembic", "version_locations", fallback=None) or "").replace(",", " ").split():
            path = Path(extra) if Path(extra).is_absolute() else self.base() / extra
            if path.is_dir():
                found += tree_inputs(path, f"versions:{portable(extra)}")
        options = sorted(
            (k, portable(v)) for k, v in (ini.items("alembic") if ini.has_section("alembic") else [])
            if k not in ("sqlalchemy.url", "here")
        )
        found.append(("alembic-options", repr(options).encode()))
        found.append(("migrator", self.kind.encode()))
        found.append(("alembic-x", repr(self.x_arguments).encode()))
        if self.check_downgrade:  # a template built without the check must not count
            found.append(("check-downgrade", b"1"))
        return found

    def describe(self) -> str:
        return f"alembic upgrade heads ({self.ini})"

    def migrate(self, url: URL, progress: Progress | None = None) -> None:
        from alembic import command

        self._run(url, lambda cfg: command.upgrade(cfg, "heads"), progress or Progress())

    def downgrade_all(self, url: URL) -> None:
        """``alembic downgrade base`` (for --pgt-check-downgrade)."""
        from alembic import command

        self._run(url, lambda cfg: command.downgrade(cfg, "base"), Progress())

    def _run(self, url: URL, action: Callable[[Config], None], progress: Progress) -> None:
        cfg = self._config()
        script = self._script(cfg)
        script_dir = Path(script.dir)
        try:  # loads every revision: one that cannot be imported fails here, before env.py
            progress.total = sum(1 for _ in script.walk_revisions())
        except Exception as exc:
            raise migration_error(exc, script_dir, "while loading the revisions") from exc
        env_py = _parse(script_dir / "env.py")
        wants_connection = _reads_shared_connection(env_py)
        target = _driver_url(cfg, url)
        cfg.set_main_option("sqlalchemy.url", target.render_as_string(False).replace("%", "%%"))
        elsewhere = _variables_naming_other_databases(env_py, url)
        for name in elsewhere:
            progress.notes.append(
                f"env.py reads {name}, which names another database: it points at the database "
                f"being built while migrating. If your app reads {name} during the tests too, set "
                f"pgtemplate_env = {name} so they use the worker database.")

        def body() -> None:
            with (_preserved_logging(), _cwd(self.base()), _watching(progress),
                  temporary_env(elsewhere, url)):
                if wants_connection:
                    asyncio.run(_with_connection(cfg, url, action))
                else:
                    action(cfg)

        try:
            run_in_fresh_thread(body)
        except PgTemplateError:
            raise
        except Exception as exc:
            raise migration_error(exc, script_dir) from exc


async def require_alembic_ran(conn: asyncpg.Connection, database: str) -> None:
    """After ``upgrade heads`` on ``database``: did Alembic migrate it, and not another
    database that env.py found by itself?  (Never downgrade what was not proven ours.)"""
    if not await conn.fetchval(
        "SELECT EXISTS (SELECT FROM pg_class WHERE relname = 'alembic_version' AND relkind = 'r')"
    ):
        raise PgTemplateError(
            f"pytest-pgtemplate: Alembic ran but did not migrate database {database} (no "
            "alembic_version table there): env.py probably connects to a database of its own "
            "(and migrated that one: check it), e.g. a URL your app's settings read at import "
            "time. Make env.py use "
            "config.get_main_option('sqlalchemy.url') or config.attributes['connection'], or "
            "read the environment variable when env.py runs and name it in pgtemplate_env "
            "(while migrating it points at the database being built)."
        )


def _parse(env_py: Path) -> ast.Module | None:
    """env.py's syntax tree; None if it cannot be read (running it reports the problem)."""
    try:
        return ast.parse(env_py.read_bytes())
    except (OSError, SyntaxError, ValueError):
        return None


def _variables_naming_other_databases(env_py: ast.Module | None, url: URL) -> list[str]:
    """Environment variables env.py reads (``os.environ["X"]``, ``os.getenv("X")``,
    ``os.environ.get("X")``) that hold a PostgreSQL URL of another database than ``url``:
    Alembic must not migrate a developer's own database by way of them."""
    if env_py is None:
        return []
    found: list[str] = []
    for name in _environment_reads(env_py):
        value = os.environ.get(name)
        try:
            other = make_url(value) if value else None
        except Exception:  # not a URL: not a database env.py could migrate
            other = None
        if other is None or not other.drivername.startswith(("postgresql", "postgres")):
            continue
        same = (other.host, other.port, other.database) == (url.host, url.port, url.database)
        if not same and name not in found:
            found.append(name)
    return found


def _environment_reads(tree: ast.AST) -> list[str]:
    def is_environ(node: ast.expr) -> bool:
        return (isinstance(node, ast.Attribute) and node.attr == "environ") or (
            isinstance(node, ast.Name) and node.id == "environ")

    def constant(node: ast.expr) -> str | None:
        return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None

    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load) and is_environ(node.value):
            name = constant(node.slice)
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            getenv = (isinstance(func, ast.Attribute) and func.attr == "getenv") or (
                isinstance(func, ast.Name) and func.id == "getenv")
            environ_get = isinstance(func, ast.Attribute) and func.attr == "get" and is_environ(func.value)
            name = constant(node.args[0]) if getenv or environ_get else None
        else:
            name = None
        if name is not None:
            names.append(name)
    return names


def _reads_shared_connection(env_py: ast.Module | None) -> bool:
    """Does env.py look for ``config.attributes["connection"]`` (code, not comments)?"""
    if env_py is None:
        return False
    nodes = list(ast.walk(env_py))
    reads_attributes = any(isinstance(n, ast.Attribute) and n.attr == "attributes" for n in nodes)
    names_connection = any(isinstance(n, ast.Constant) and n.value == "connection" for n in nodes)
    return reads_attributes and names_connection


async def _with_connection(cfg: Config, url: URL, action: Callable[[Config], None]) -> None:
    """The Alembic cookbook's connection sharing: env.py finds our connection in
    ``config.attributes["connection"]``."""
    engine = create_async_engine(url.set(drivername="postgresql+asyncpg"), poolclass=NullPool)

    def run(connection: Connection) -> None:
        cfg.attributes["connection"] = connection
        action(cfg)

    try:
        async with engine.begin() as conn:
            await conn.run_sync(run)
    finally:
        await engine.dispose()


def _driver_url(cfg: Config, url: URL) -> URL:
    """Keep the driver the project's alembic.ini names (e.g. +asyncpg, +psycopg)."""

    configured = cfg.get_main_option("sqlalchemy.url")
    driver = "postgresql+asyncpg"
    if configured:
        try:
            name = make_url(configured).drivername
        except Exception:  # an unparsable placeholder: the env.py must not rely on it
            name = ""
        if name.startswith("postgresql"):
            driver = name
    return url.set(drivername=driver)


def migration_error(exc: BaseException, script_dir: Path,
                    stage: str = "while running env.py") -> PgTemplateError:
    """Name the revision (and file) whose code raised, from the traceback."""
    culprit: Path | None = None
    line: int | None = None
    if isinstance(exc, SyntaxError) and exc.filename and script_dir in Path(exc.filename).parents:
        culprit, line = Path(exc.filename), exc.lineno  # never ran: no frame of it in the traceback
    for frame, lineno in traceback.walk_tb(exc.__traceback__):
        path = Path(frame.f_code.co_filename)
        if path.name != "env.py" and script_dir in path.parents:
            culprit, line = path, lineno
    where = stage
    if culprit is not None:
        revision = _revision_id(culprit)
        at = f", line {line}" if line else ""
        where = f"in revision {revision} ({culprit.relative_to(script_dir.parent)}{at})"
    hint = ""
    if type(exc).__name__ == "MissingGreenlet":
        hint = (" A sync engine got an async driver's URL: if env.py reads the variable of "
                "pgtemplate_env, name the scheme it needs there (e.g. DATABASE_URL=postgresql+psycopg).")
    elif "outside of application context" in str(exc):
        hint = (" This env.py is Flask-Migrate's: it needs the Flask app. Set pgtemplate_migrate to a "
                "function of yours that runs flask_migrate.upgrade() inside app.app_context() with the "
                "app's database URI set to the URL it is given (docs: your-app.md, Flask-Migrate).")
    if extension_hint := extensions.hint(exc):
        return PgTemplateError(
            f"pytest-pgtemplate: migration failed {where}: {type(exc).__name__}: {str(exc).rstrip('.')}. "
            f"The template was not published.{extension_hint}")
    return PgTemplateError(
        f"pytest-pgtemplate: migration failed {where}: {type(exc).__name__}: {str(exc).rstrip('.')}. "
        f"The template was not published; fix the migration and run again.{hint}"
    )


def _revision_id(path: Path) -> str:
    for line in path.read_text(errors="replace").splitlines():
        if line.replace(" ", "").startswith(("revision=", "revision:str=")):
            return line.split("=", 1)[1].strip().strip("'\"")
    return path.stem


@contextmanager
def _watching(progress: Progress) -> Iterator[None]:
    logger = logging.getLogger("alembic.runtime.migration")
    handler = _ProgressHandler(progress)
    logger.addHandler(handler)
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)  # env.py's fileConfig may still raise it; then no steps
    try:
        yield
    finally:
        logger.removeHandler(handler)


@contextmanager
def _cwd(path: Path) -> Iterator[None]:
    # Alembic resolves prepend_sys_path and relative paths in env.py against the
    # cwd, as when the user runs `alembic upgrade head` next to alembic.ini.  The
    # main thread is blocked waiting for us meanwhile.
    old = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


@contextmanager
def _preserved_logging() -> Iterator[None]:
    """env.py usually calls logging.config.fileConfig, which replaces the root handlers
    and disables existing loggers; undo that so pytest's logging keeps working."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    loggers = {
        name: (lg.disabled, lg.level)
        for name, lg in logging.Logger.manager.loggerDict.items()
        if isinstance(lg, logging.Logger)
    }
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        for name, lg in logging.Logger.manager.loggerDict.items():
            if isinstance(lg, logging.Logger):
                lg.disabled, _ = loggers.get(name, (False, lg.level))
                if name in loggers:
                    lg.setLevel(loggers[name][1])
