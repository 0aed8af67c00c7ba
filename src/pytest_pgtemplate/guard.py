"""While a template is built, every SQLAlchemy connection goes to the database being built.

An ``env.py`` (or a seed) that finds its database by itself, through the app's settings
object say, could otherwise migrate a developer's own database.  While ``only_into()`` is
active, a listener on every engine of the process:

- sends a connection aimed at one of this run's own planned databases (the worker
  database, which does not exist yet: the app's settings point there when
  ``pgtemplate_env`` or the worker-URL hook set them) to the database being built;
- refuses, before connecting, a connection aimed at any other database;
- checks ``current_database()`` once connected, for URLs that name the database in a way
  the driver's arguments do not show (a DSN, ``PGDATABASE``), and refuses a wrong one
  before anything else runs on it.

Process-wide while active: during a build the process does nothing else with SQLAlchemy
(the test that asked for the database waits for it).  Connections made without
SQLAlchemy are not seen; ``require_alembic_ran`` catches an Alembic run gone elsewhere.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from sqlalchemy import event
from sqlalchemy.engine import URL, Dialect, Engine
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.pool import ConnectionPoolEntry, Pool

from .errors import PgTemplateError, PgTemplateWarning

_NAME_KEYS = ("database", "dbname")  # asyncpg, pg8000 / psycopg, psycopg2
_active_lock = threading.Lock()  # held while a build's guard is active


@dataclass(slots=True)
class Guard:
    """What one build allows: ``target`` only; connections to ``redirect`` go to ``target``."""

    target: URL
    redirect: frozenset[str]
    what: str  # who connects, for messages: "building with alembic upgrade heads (...)"
    redirected: list[str] = field(default_factory=list)
    refused: PgTemplateError | None = None

    def do_connect(self, dialect: Dialect, record: ConnectionPoolEntry, cargs: tuple[object, ...],
                   cparams: dict[str, object]) -> None:
        key = _name_key(cparams)
        if key is None:
            return  # named elsewhere (DSN, environment): checked once connected
        name = str(cparams[key])
        if name in self.redirect:
            cparams[key] = self.target.database
            if self.target.host is not None and "host" in cparams:
                cparams["host"], cparams["port"] = self.target.host, self.target.port
            if name not in self.redirected:
                self.redirected.append(name)
        elif name != self.target.database:
            self._refuse(name, cparams.get("host"), cparams.get("port"))

    def on_connect(self, dbapi_connection: DBAPIConnection, record: ConnectionPoolEntry) -> None:
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("SELECT current_database()")
            row = cursor.fetchone()
        finally:
            cursor.close()
        dbapi_connection.rollback()  # leave no transaction open for the dialect's own setup
        name = str(row[0]) if row else "?"
        if name != self.target.database:
            dbapi_connection.close()
            self._refuse(name, None, None)

    def _refuse(self, name: str, host: object, port: object) -> None:
        at = f" on {host}{f':{port}' if port else ''}" if host else ""
        self.refused = PgTemplateError(
            f"pytest-pgtemplate: refused a connection to database {name}{at} while building the "
            f"template: {self.what} may only write to the database being built "
            f"({self.target.database}), so {name} was not touched. The URL came from somewhere "
            "the plugin does not set, e.g. your app's settings object, read before pytest "
            "started. Point the app at this run's database: name the variables your settings "
            "read in pgtemplate_env (a URL, DATABASE_URL, or parts, e.g. "
            "'POSTGRES_DB={database}'; set before conftest.py files are imported), or set the "
            "settings in a pytest_pgtemplate_worker_url hook; connections to the worker "
            "database are sent to the database being built while it is built. Or make env.py "
            "use config.get_main_option('sqlalchemy.url')."
        )
        raise self.refused


def _name_key(cparams: dict[str, object]) -> str | None:
    """The driver argument that names the database, if any."""
    return next((k for k in _NAME_KEYS if k in cparams), None)


REFUSE, WARN = "refuse", "warn"


@dataclass(slots=True)
class TestsGuard:
    """While tests run: SQLAlchemy connections to a database whose name lacks the plugin's
    prefix.  In a process whose app finds its database by itself (``pgtemplate_env``, the
    worker-URL hook) they are refused before connecting: such an app whose engine was built
    before the plugin pointed its settings at the worker database would otherwise run the
    tests, and their cleanup, on a developer's database.  In a process whose tests use the
    plugin's fixtures without that, each such database is named once in a warning (the app
    may still reach its own database; another database may also be meant)."""

    prefix: str
    worker: str  # this process's worker database, for the message
    mode: Callable[[], str | None]  # REFUSE, WARN or None (the plugin is not in use yet)
    warned: set[str] = field(default_factory=set)  # warned of (WARN), or refused once (REFUSE)
    seen: set[str] = field(default_factory=set)  # other databases reached while not in use

    def do_connect(self, dialect: Dialect, record: ConnectionPoolEntry, cargs: tuple[object, ...],
                   cparams: dict[str, object]) -> None:
        key = _name_key(cparams)
        if key is None or dialect.name != "postgresql" or _active_lock.locked():
            return  # a build is under way: its own guard decides
        name = str(cparams[key])
        if name.startswith(f"{self.prefix}_"):
            return
        mode = self.mode()
        host, port = cparams.get("host"), cparams.get("port")
        at = f" on {host}{f':{port}' if port else ''}" if host else ""
        if mode is None:
            self.seen.add(f"{name}{at}")
        if mode is None or (mode == WARN and name in self.warned):
            return
        fix = ("Name the variables your settings read in pgtemplate_env, e.g. 'DATABASE_URL' or "
               "'POSTGRES_SERVER={host}, POSTGRES_PORT={port}, POSTGRES_USER={user}, "
               "POSTGRES_PASSWORD={password}, POSTGRES_DB={database}': they are set before any "
               "conftest.py is imported.")
        if mode == WARN:
            self.warned.add(name)
            warnings.warn(PgTemplateWarning(
                f"pytest-pgtemplate: a test connected to database {name}{at}, which pytest-pgtemplate "
                f"did not create, while this run's tests use {self.worker}: if that is your app's own "
                f"database, its tests and their cleanup ran there. {fix}"), stacklevel=2)
            return
        if name in self.warned:  # the whole story was told once; every test would repeat it
            raise PgTemplateError(
                f"pytest-pgtemplate: refused a connection to database {name}{at} from a test, as "
                "before (the first refusal in this process says why and what to set).")
        self.warned.add(name)
        raise PgTemplateError(
            f"pytest-pgtemplate: refused a connection to database {name}{at} from a test: this run's "
            f"tests use its own databases ({self.worker} here), and {name} was not created by "
            "pytest-pgtemplate, so it was not touched. The app's engine was probably built from its "
            "settings before the plugin pointed them at the worker database (the "
            "pytest_pgtemplate_worker_url hook runs once conftest.py files are imported: too late for "
            f"an engine made while they import the app). {fix}")


_tests_guard: list[TestsGuard] = []  # this process's, once pytest is configured


def guard_tests(prefix: str, worker: str, mode: Callable[[], str | None]) -> None:
    """Start watching tests' connections to databases that are not the plugin's (once)."""
    if not _tests_guard:
        _tests_guard.append(TestsGuard(prefix, worker, mode))
        event.listen(Engine, "do_connect", _tests_guard[0].do_connect)


def foreign_databases() -> list[str]:
    """Databases tests reached while the plugin's were not in use (for the summary)."""
    return sorted(name for guard in _tests_guard for name in guard.seen)


def unguard_tests() -> None:
    while _tests_guard:
        event.remove(Engine, "do_connect", _tests_guard.pop().do_connect)


@contextmanager
def only_into(target: URL, redirect: frozenset[str], what: str) -> Iterator[Guard]:
    """Within the block, SQLAlchemy connects to ``target``'s database only (see module doc).
    If a connection was refused, the block's error is replaced by the refusal."""
    guard = Guard(target, redirect, what)
    with _active_lock:  # one build per process at a time; never nested listeners
        event.listen(Engine, "do_connect", guard.do_connect)
        event.listen(Pool, "connect", guard.on_connect)
        try:
            yield guard
        except BaseException as exc:
            if guard.refused is not None and exc is not guard.refused:
                raise guard.refused from exc  # env.py may have wrapped or reworded it
            raise
        else:
            if guard.refused is not None:  # env.py swallowed the error and went on
                raise guard.refused
        finally:
            event.remove(Engine, "do_connect", guard.do_connect)
            event.remove(Pool, "connect", guard.on_connect)
