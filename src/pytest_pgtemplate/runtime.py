"""Per-process state: the server connection, the template, this process's worker database.

Created (without touching the server) when the first test asks for a database
fixture; everything is then set up on first use and torn down at session end.
Tests of one process run one at a time, so no locking is needed here.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
from sqlalchemy.engine import URL

from . import capacity
from .admin import Admin, run_lock
from .clones import ClonePool
from .db import CONNECTION_LOST, InlineLoop, LoopThread, connect, lost, where, with_driver
from .errors import PgTemplateError, PgTemplateWarning
from .migrate import Migrator
from .migrators import make_migrator
from .naming import KEPT, SPARE, WORKER, Marker, spare_name, worker_name
from .reset import TruncateReset
from .settings import DEFAULT_DATABASE, Settings
from .sweep import sweep
from .template import BuildRequest, Template, ensure, lock_dir, notify_stderr


@dataclass(frozen=True, slots=True)
class WorkerDatabase:
    name: str
    url: URL  # postgresql+asyncpg
    sync_url: URL  # postgresql+psycopg


@dataclass(slots=True)
class Timings:
    template: Template | None = None
    clone_seconds: list[float] = field(default_factory=list)
    spare_seconds: list[float] = field(default_factory=list)  # spares of earlier runs taken
    swept: list[str] = field(default_factory=list)
    pruned: list[str] = field(default_factory=list)


class Runtime:
    """The plugin's state in one pytest process (one xdist worker, or the only process)."""

    def __init__(
        self, settings: Settings, server_url: URL, *, run_id: str, worker: str,
        clone_strategy: str | None = None, notify: Callable[[str], None] = notify_stderr,
        seeds: Callable[[], tuple[Migrator, ...]] = tuple,
    ) -> None:
        self.settings = settings  # of one database: settings.database names it
        self.seeds = seeds  # extra seed steps (the seed hook), asked for at build time
        self.server_url = server_url
        self.run_id = run_id
        self.worker = worker
        self.clone_strategy = clone_strategy
        self.notify = notify
        self.timings = Timings()
        self._loop: InlineLoop | None = None
        self._admin: Admin | None = None
        self._db: WorkerDatabase | None = None
        self._resetter: TruncateReset | None = None
        self._failure: PgTemplateError | None = None
        self._pool: ClonePool | None = None
        self._reset_failures = 0
        self.reset_seconds: dict[str, list[float]] = {}  # per strategy; clone: the wait
        self.generation = 0  # bumped when the worker database is re-created
        self.app_found = False  # the app reaches this database by itself (pgtemplate_env, hook)
        self.terminated = ""  # sessions the last reset ended (left inside a transaction)
        self.general_resets = 0  # truncate resets that took the general path (see reset.py)
        self.general_tables = ""  # the tables that send a reset there, and why
        self.spared: str | None = None  # the spare this process left for the next run
        self.not_spared: str | None = None  # why it left none, when one was to be left
        self._source: str | None = None  # what a spare for this process must hold (Admin.source)
        self._settings = ""  # the worker database's settings as created (see TruncateReset.not_renewed)
        self._takes = 0  # clones handed to tests

    @property
    def loop(self) -> InlineLoop:
        if self._loop is None:
            self._loop = InlineLoop()
        return self._loop

    def database(self) -> WorkerDatabase:
        """This process's worker database, created on first use (template built if needed).

        A failure is remembered: later tests of this process get the same error at once.
        """
        if self._failure is not None:
            raise self._failure
        if self._db is None:
            try:
                self._db = self._create()
            except PgTemplateError as exc:
                self._failure = self.explain(exc) or exc
                if self._failure is not exc:
                    raise self._failure from exc
                raise
        return self._db

    def explain(self, exc: BaseException) -> PgTemplateError | None:
        """``exc`` as the out-of-connections error if the server refused a connection for
        lack of slots (see ``capacity``), else None.  The whole story is told once per run
        (the first process to tell it leaves a note); later reports name the limit only."""
        if self._admin is None:
            return None  # the admin connection was refused: connect() said so already
        # xdist tells its workers how many they are; a process that is none may inherit that.
        workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0")) if self.worker != "main" else 0
        return self.loop.run(capacity.explain(self._admin.conn, where(self.server_url), exc, workers=workers,
                                              brief=lambda: not _first(self._capacity_note())))

    def _capacity_note(self) -> Path:
        return lock_dir() / f"{self.run_id}-capacity.failed"  # pruned with the failure notes

    def _create(self) -> WorkerDatabase:
        if self._admin is None:
            self._admin = self.loop.run(Admin.open(self.server_url))
            # Alive from here on: sweeps of other runs spare what this run creates.
            self.loop.run(self._admin.hold_shared(run_lock(self.run_id)))
        if self.timings.template is None:
            request = BuildRequest(
                migrator=make_migrator(self.settings, self.seeds()),
                prefix=self.settings.prefix,
                run_id=self.run_id,
                rebuild=self.settings.rebuild,
                timeout=self.settings.timeout,
                notify=self.notify,
                env_var=self.settings.env,
                database=self.settings.database,
                redirect=frozenset({self._worker_name()}),
                project=self.settings.rootdir.name,
            )
            self.timings.template = ensure(self.loop, self._admin, request)
            # After the build, so the new template counts among the newest kept.
            swept = self.loop.run(sweep(self._admin, prefix=self.settings.prefix,
                                        keep_templates=self.settings.keep_templates,
                                        include_kept=False, project=self.settings.rootdir.name))
            self.timings.swept.extend(swept.dropped)
            self.timings.pruned.extend(swept.pruned)
        return self._clone(self.timings.template)

    def _clone(self, template: Template) -> WorkerDatabase:
        assert self._admin is not None
        name = self._worker_name()
        start = time.perf_counter()
        # A restarted xdist worker reuses its id within the run: replace its database.
        self.loop.run(self._admin.drop_ours(name))
        marker = Marker.new(WORKER, template.fingerprint, self.run_id, self.settings.prefix)
        if self.generation == 0 and self._take_spare(template, name, marker):
            self.timings.spare_seconds.append(time.perf_counter() - start)
        else:
            self.loop.run(self._admin.create(name, marker, template.name, self.clone_strategy,
                                             throwaway=not self.settings.durable))
            self.timings.clone_seconds.append(time.perf_counter() - start)
            conn = self.loop.run(connect(self.server_url, name))
            self._resetter = TruncateReset(conn, name, self.settings.reset_timeout)
            self._settings = self.loop.run(self._admin.settings(name))
        return self._named(name)

    def _take_spare(self, template: Template, name: str, marker: Marker) -> bool:
        """Take a spare an earlier run left (see ``close``) as worker database ``name``.  It is
        reset and checked once more first (that catches what happened after the earlier run's
        last check, its settings compared with those it was created with); one that fails
        either is dropped, and the caller clones."""
        assert self._admin is not None
        if self.settings.no_spares:
            return False
        admin = self._admin
        self._source = self.loop.run(admin.source(template.name, throwaway=not self.settings.durable))
        taken = None if self._source is None else self.loop.run(
            admin.take_spare(self._source, self.settings.prefix, name, marker))
        if taken is None:
            return False
        resetter: TruncateReset | None = None
        try:
            resetter = TruncateReset(self.loop.run(connect(self.server_url, name)), name,
                                     self.settings.reset_timeout)
            if self.loop.run(resetter.renew(taken.settings)):
                self._resetter, self._settings = resetter, taken.settings
                return True
        except (PgTemplateError, asyncpg.PostgresError, *CONNECTION_LOST):
            pass
        if resetter is not None:
            self.loop.run(resetter.conn.close(timeout=5))
        self.loop.run(admin.drop_ours(name))
        return False

    def _named(self, name: str) -> WorkerDatabase:
        return WorkerDatabase(
            name,
            with_driver(self.server_url, "asyncpg", name),
            with_driver(self.server_url, "psycopg", name),
        )

    def begin_test(self, strategy: str) -> WorkerDatabase:
        """The database one test uses: the worker database, or (``clone``) a fresh clone."""
        db = self.database()
        if strategy != "clone":
            return db
        if self._pool is None:
            template = self.timings.template
            assert template is not None
            self._pool = ClonePool(
                LoopThread(), self.server_url, template=template.name, fingerprint=template.fingerprint,
                prefix=self.settings.prefix, run_id=self.run_id, worker=self.worker,
                strategy=self.clone_strategy, database=self._suffix, throwaway=not self.settings.durable,
                reset_timeout=self.settings.reset_timeout, recycle=not self.settings.no_spares,
            )
        start = time.perf_counter()
        name = self._pool.take()
        self._takes += 1
        self.reset_seconds.setdefault("clone", []).append(time.perf_counter() - start)
        return self._named(name)

    def engine_key(self, db: WorkerDatabase) -> tuple[str, int]:
        """What the engines of ``db`` may be kept for: the worker database until it is
        re-created; a clone only for the test it was handed to (a clone brought back by a
        reset has had its sessions ended, and may be handed out twice in a row)."""
        return (db.name, self.generation) if db.name == self.current_name else (db.name, -self._takes)

    def end_test(self, strategy: str, db: WorkerDatabase) -> None:
        """After one test: drop its clone in the background, or reset the worker database."""
        if strategy == "clone":
            assert self._pool is not None
            self._pool.release(db.name)
        elif strategy != "none":
            start = time.perf_counter()
            self.reset()
            self.reset_seconds.setdefault(strategy, []).append(time.perf_counter() - start)

    def reset(self) -> None:
        """Restore the worker database after a test.  If that fails, the database is
        re-created from the template (so later tests start clean) and the error raised."""
        if self._db is None or self._resetter is None:
            return
        resetter = self._resetter
        general = resetter.stats.general
        try:
            ddl = self.loop.run(resetter.reset())
            self.terminated, resetter.terminated = resetter.terminated, ""
        except PgTemplateError as exc:
            self._recover(exc)
            raise
        self._reset_failures = 0
        if resetter.stats.general > general:
            self.general_resets += 1
            self.general_tables = resetter.general_tables
        if ddl is not None:
            start = time.perf_counter()
            self._recreate()
            advice = (
                "The app's own pooled connections to it were closed with it: give its engine "
                "pool_pre_ping=True, or dispose of it after each test." if self.app_found else
                "Give such tests @pytest.mark.pgtemplate(reset=\"clone\") to say so.")
            warnings.warn(PgTemplateWarning(
                f"pytest-pgtemplate: the test changed the schema ({ddl}); a truncate reset cannot undo "
                f"that, so the worker database was re-created from the template "
                f"({(time.perf_counter() - start) * 1000:.0f} ms). {advice}"
            ), stacklevel=1)

    def planned_database(self) -> URL:
        """The worker database's URL (``postgresql+asyncpg``) before it exists (its name does
        not depend on the server)."""
        return with_driver(self.server_url, "asyncpg", self._worker_name())

    def _worker_name(self) -> str:
        return worker_name(self.settings.prefix, self.run_id, self.worker, self._suffix)

    @property
    def _suffix(self) -> str:
        """In database names: nothing for the default database, else its name."""
        return "" if self.settings.database == DEFAULT_DATABASE else self.settings.database

    @property
    def clone_counts(self) -> tuple[int, int]:
        """reset="clone": clones created, and used ones brought back by a reset."""
        return (0, 0) if self._pool is None else (self._pool.created, self._pool.recycled)

    @property
    def failed(self) -> bool:
        """Set up failed for good: every later test of this process gets the error."""
        return self._failure is not None

    @property
    def used(self) -> bool:
        """This process reached the server for this database."""
        return self._admin is not None

    @property
    def current_name(self) -> str | None:
        return None if self._db is None else self._db.name

    def _recover(self, exc: PgTemplateError) -> None:
        """After a failed reset: a fresh worker database, unless that fails too or resets keep
        failing; then every later test of this process gets the error at once."""
        self._reset_failures += 1
        if self._reset_failures >= 2 or exc.setting == "url":
            self._failure = exc
            return
        try:
            self._recreate()
        except PgTemplateError as again:
            self._failure = again
        except CONNECTION_LOST as again:
            self._failure = lost(self.server_url, again)
        except asyncpg.PostgresError as again:
            self._failure = PgTemplateError(
                f"pytest-pgtemplate: after a failed reset, the worker database "
                f"{self.current_name} could not be re-created from the template "
                f"({type(again).__name__}: {again}); later tests of this process that need it "
                "fail with this error.")

    def _recreate(self) -> None:
        assert self.timings.template is not None
        old = self._resetter
        self._resetter = None
        if old is not None:
            self.loop.run(old.conn.close())
        self.generation += 1
        self._db = self._clone(self.timings.template)
        if old is not None and self._resetter is not None:
            self._resetter.replica = old.replica  # the same role: no need to ask again

    def close(self) -> tuple[WorkerDatabase | None, list[str]]:
        """Drop the worker database (unless --pgt-keep; then return it) and disconnect.

        Best effort: with the server gone, each step that fails is reported as a
        problem (returned), none stops the others or pytest's own summary.
        """
        kept: WorkerDatabase | None = None
        problems: list[str] = []

        def attempt(step: Callable[[], object]) -> None:
            try:
                step()
            except (PgTemplateError, asyncpg.PostgresError, *CONNECTION_LOST) as exc:
                problems.append(f"{type(exc).__name__}: {exc}")

        if self._pool is not None:
            attempt(self._pool.close)
        db = self._db
        spare = (db is not None and not self.settings.keep and self._failure is None
                 and self._resetter is not None and self._admin is not None and self._source is not None
                 and not self.settings.no_spares)
        if spare:
            self._check_spare()
        if self._resetter is not None:
            resetter = self._resetter
            attempt(lambda: self.loop.run(resetter.conn.close(timeout=5)))
        if self._admin is not None:
            admin = self._admin
            if db is not None and self.settings.keep:
                kept = db
                attempt(lambda: self.loop.run(admin.mark(db.name, self._kept_marker())))
            elif db is not None and self.spared is not None:
                self._park(admin, db.name)
            if db is not None and not self.settings.keep and self.spared is None:
                attempt(lambda: self.loop.run(admin.drop_ours(db.name)))
            attempt(lambda: self.loop.run(admin.conn.close(timeout=5)))
        if self._loop is not None:
            self._loop.close()
        return kept, problems

    def _check_spare(self) -> None:
        """Whether the worker database can be left as a spare: reset once more (the app's own
        session-scoped teardown may have written since the last test's reset), and then as a
        fresh clone would be (``TruncateReset.renew``)."""
        assert self._resetter is not None
        assert self.timings.template is not None
        resetter = self._resetter
        try:
            why = self.loop.run(resetter.not_renewed(self._settings))
        except (PgTemplateError, asyncpg.PostgresError, *CONNECTION_LOST) as exc:
            why = f"its last reset failed ({type(exc).__name__})"
        if why is not None:  # a spare is only a shortcut: the database is dropped as before
            if "event triggers" not in why:  # a standing property of the role, not news
                self.not_spared = f"{self.worker}'s worker database: {why} after the last test"
            return
        self.spared = spare_name(self.settings.prefix, self.timings.template.fingerprint,
                                 os.urandom(4).hex())

    def _park(self, admin: Admin, name: str) -> None:
        """Leave the worker database as a spare; if that fails it is dropped as before."""
        assert self.spared is not None
        assert self.timings.template is not None
        assert self._source is not None
        marker = Marker.new(SPARE, self.timings.template.fingerprint, self.run_id, self.settings.prefix,
                            source=self._source, settings=self._settings)
        try:
            self.loop.run(admin.park(name, self.spared, marker))
        except (PgTemplateError, asyncpg.PostgresError, *CONNECTION_LOST):
            self.spared = None  # dropped under its own name instead

    def _kept_marker(self) -> Marker:
        assert self.timings.template is not None
        return Marker.new(KEPT, self.timings.template.fingerprint, self.run_id, self.settings.prefix)


def _first(note: Path) -> bool:
    """True for the one process of a run that creates ``note``."""
    try:
        note.touch(exist_ok=False)
    except FileExistsError:
        return False
    return True
