"""pytest glue: what the plugin keeps per pytest process, and the terminal it reports to."""

from __future__ import annotations

import contextlib
import functools
import os
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

import pytest
from sqlalchemy.engine import URL

from . import profile
from .db import LoopThread, parse_url
from .engines import Engines
from .errors import PgTemplateError
from .report import Summary, worker_payload
from .runtime import Runtime
from .settings import DEFAULT_DATABASE, Settings

if TYPE_CHECKING:
    from .embedded import EmbeddedServer
    from .migrate import Migrator


# pytest captures fd 2 during tests, and xdist workers' stdout is not the terminal:
# keep the terminal's stderr, as it was when the plugin loaded, for progress notes.
try:
    _TERMINAL_FD: int | None = os.dup(2)
except OSError:
    _TERMINAL_FD = None


def notify_terminal(message: str) -> None:
    """A progress note on the terminal, past pytest's capture and xdist's workers."""
    line = f"pytest-pgtemplate [pid {os.getpid()}]: {message}\n".encode()
    if _TERMINAL_FD is not None:
        with contextlib.suppress(OSError):
            os.write(_TERMINAL_FD, line)


T = TypeVar("T")


class PluginState:
    """What the plugin keeps per pytest process (in ``config.stash``).

    The server is the URL the user gave, else an embedded cluster: started lazily by
    a single process, or by the xdist controller before its workers start (they get its
    URL, or the error that prevented it, through their environment, then ``workerinput``).
    """

    def __init__(self, settings: Settings, *, run_id: str, worker: str,
                 workerinput: dict[str, object] | None) -> None:
        self.settings = settings
        self.run_id = run_id
        self.worker = worker
        self.server: str | None = settings.url
        self.server_source = settings.source("url")
        self.embedded: EmbeddedServer | None = None
        self.embedded_error: str | None = None
        self.server_description: str | None = None
        self.clone_strategy: str | None = None
        if settings.url is None and workerinput is not None:
            self.server = _opt_str(workerinput.get("pgtemplate_url"))
            self.embedded_error = _opt_str(workerinput.get("pgtemplate_error"))
            self.server_description = _opt_str(workerinput.get("pgtemplate_server"))
            self.server_source = "embedded server of the xdist controller"
            self.clone_strategy = "file_copy"
        self.engines: dict[str, Engines] = {}
        self.started = time.perf_counter()
        # Databases every test gets, asked for or not (see pgtemplate_env).
        self.warned: set[str] = set()  # warnings given once per process
        self.terminations: list[str] = []  # sessions resets ended, for later failing tests
        self._runtimes: dict[str, Runtime] = {}
        self.seed_hook: Callable[[str], tuple[Migrator, ...]] = lambda database: ()
        self.summary = Summary()

    def controller_info(self) -> dict[str, object]:
        """What an xdist worker needs to know of the controller's server."""
        info = {
            "pgtemplate_url": self.server if self.embedded else None,
            "pgtemplate_error": self.embedded_error,
            "pgtemplate_server": self.server_description,
        }
        return {key: value for key, value in info.items() if value is not None}

    def start_embedded(self) -> None:
        """Start the embedded server if no URL is configured (once; errors are kept)."""
        if self.server is not None or self.embedded_error is not None:
            return
        from .embedded import start

        try:
            self.embedded = start(self.settings.pg_bin, self.settings.source("pg_bin"),
                                  cache_root=self.settings.embedded_dir, needs=self.needed_extensions())
        except PgTemplateError as exc:
            self.embedded_error = str(exc)
            return
        self.server = self.embedded.url
        self.server_source = "embedded server"
        self.server_description = self.embedded.describe()
        self.clone_strategy = "file_copy"  # fsync is off there: copying files is fastest

    def needed_extensions(self) -> frozenset[str]:
        """The extensions every database's migrations (and seeds) create: the embedded
        server's binaries must have them.  A database whose migrator cannot be set up adds
        none (its first test reports why)."""
        from .extensions import required
        from .migrators import make_migrator

        found: set[str] = set()
        for database in self.settings.database_names:
            try:
                migrator = make_migrator(self.settings.for_database(database), self.seed_hook(database))
                found |= required(migrator.inputs())
            except PgTemplateError:
                continue
        return frozenset(found)

    def server_url(self) -> URL:
        """The server's URL, the embedded server started first if that is the one."""
        self.start_embedded()
        if self.embedded_error is not None:
            raise PgTemplateError(self.embedded_error)
        assert self.server is not None
        return parse_url(self.server, self.server_source)

    def runtime(self, config: pytest.Config, database: str = DEFAULT_DATABASE) -> Runtime:
        """The runtime of one database (the default one, or an extra one), made on first use."""
        runtime = self._runtimes.get(database)
        if runtime is None:
            runtime = Runtime(self.settings.for_database(database), self.server_url(), run_id=self.run_id,
                              worker=self.worker, clone_strategy=self.clone_strategy,
                              notify=notify_terminal,
                              seeds=functools.partial(self.seed_hook, database))
            self._runtimes[database] = runtime
        return runtime

    def guard_mode(self) -> str | None:
        """How tests' connections to other databases are met (see ``guard.TestsGuard``)."""
        from .guard import REFUSE, WARN

        if self.app_databases:  # the app connects by itself: only ever to our databases
            return REFUSE
        return WARN if any(r.used for r in self._runtimes.values()) else None

    def planned_name(self) -> str:
        """This process's worker database (the default one's), for messages."""
        from .naming import worker_name

        return worker_name(self.settings.prefix, self.run_id, self.worker, "")

    @property
    def app_databases(self) -> list[str]:
        """Databases the app reaches by itself (pgtemplate_env, the worker-URL hook): every
        test gets them set up and reset, asked for or not."""
        return [name for name, runtime in self._runtimes.items() if runtime.app_found]

    def engines_for(self, database: str) -> Engines:
        if database not in self.engines:
            self.engines[database] = Engines(relay=not self.settings.no_relay)
        return self.engines[database]

    def call(self, request: pytest.FixtureRequest, func: Callable[[], T]) -> T:
        """Run ``func``; a PgTemplateError fails the test with our message alone (the
        driver's traceback stays chained, shown with --tb=long)."""
        try:
            return func()
        except PgTemplateError as exc:
            if exc.setting == "url" or self._nothing_works():
                # No database could be set up: later tests would fail the same way.
                request.session.shouldstop = "pytest-pgtemplate could not set up the database"
            if request.config.option.tbstyle == "long":
                raise
            raise pytest.fail.Exception(str(exc), pytrace=False) from None

    def _nothing_works(self) -> bool:
        """Every declared database failed (or the server did not start): stop the session.
        One database failing leaves the tests of the others running."""
        if self.embedded_error is not None:
            return True
        runtimes = [self._runtimes.get(name) for name in self.settings.database_names]
        return all(r is not None and r.failed for r in runtimes)

    def explain(self, exc: BaseException) -> PgTemplateError | None:
        """A test's error as the out-of-connections error, if it is one (``Runtime.explain``)."""
        return next((e for r in self._runtimes.values() if r.used and (e := r.explain(exc))), None)

    def current_databases(self) -> list[str]:
        return [r.current_name for r in self._runtimes.values() if r.current_name is not None]

    def finish(self) -> list[str]:
        """Tear down; returns the URLs of kept databases."""
        for engines in self.engines.values():
            engines.close()
        kept_urls: list[str] = []
        if any(runtime.used for runtime in self._runtimes.values()):
            self.summary.processes += 1  # once per process, whatever its databases
        else:
            from .guard import foreign_databases

            self.summary.foreign.extend(foreign_databases())
        if profile.ACTIVE is not None:
            self.summary.merge({"profile": profile.ACTIVE.to_dict()})
        for runtime in self._runtimes.values():
            self.summary.merge(worker_payload(runtime))
            kept, problems = runtime.close()
            if runtime.spared is not None:
                self.summary.spared.append(runtime.spared)
            if runtime.not_spared is not None:
                self.summary.not_spared.append(runtime.not_spared)
            for problem in problems:
                notify_terminal(f"cleanup of {runtime.current_name or 'the worker database'} incomplete: "
                                f"{problem} (the next run's sweep drops what is left)")
            if kept is not None:
                kept_urls.append(kept.url.set(drivername="postgresql").render_as_string(hide_password=True))
        return kept_urls


def run_once(coro: Coroutine[Any, Any, T]) -> T:
    loop = LoopThread()
    try:
        return loop.run(coro)
    finally:
        loop.close()


def has_migrator(settings: Settings) -> bool:
    return any((settings.metadata, settings.migrate, settings.alembic_ini, settings.env,
                settings.databases)) or (settings.rootdir / "alembic.ini").is_file()


def _opt_str(value: object) -> str | None:
    return None if value is None else str(value)


STATE_KEY = pytest.StashKey[PluginState]()
