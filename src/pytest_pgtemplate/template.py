"""The template: migrated once per server per fingerprint, then only ever cloned.

Concurrency contract: processes of one run (xdist workers) serialise on a file lock,
and every process on every machine serialises on a session advisory lock held on the
maintenance database.  Whoever takes the lock first builds; everyone else, once the
lock is theirs, finds the template published and reuses it.  A build happens under a
temporary name and is published (renamed, marked kind=template) only when complete,
so a build killed at any point never leaves a template a later run would trust.
A failed build is recorded for the run, so other workers report it without retrying.
"""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import os
import socket
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock, Timeout
from sqlalchemy.engine import URL

from . import capacity, fingerprint, reset
from .admin import NOTIFY_AFTER, Admin, use_lock
from .appenv import temporary_env
from .db import Loop, connect, where
from .downgrade import check_downgrade
from .errors import PgTemplateError
from .guard import only_into
from .migrate import AlembicMigrator, Migrator, Progress, require_alembic_ran
from .migrators import Seeded, fingerprint_caveat
from .naming import BUILDING, TEMPLATE, Marker, build_name, template_name


@dataclass(frozen=True, slots=True)
class Template:
    name: str
    fingerprint: str
    built: bool  # True when this process migrated it, False when reused
    seconds: float  # time to build it, or to find it (lock waits included)
    caveat: str = ""  # what its fingerprint may miss (``fingerprint_caveat``)


def notify_stderr(message: str) -> None:
    """Progress for a person watching (the pytest glue passes one that bypasses capture)."""
    sys.stderr.write(f"pytest-pgtemplate [pid {os.getpid()}]: {message}\n")


@dataclass(frozen=True, slots=True)
class BuildRequest:
    migrator: Migrator
    prefix: str
    run_id: str
    rebuild: bool
    timeout: float
    notify: Callable[[str], None] = notify_stderr
    env_var: str | None = None
    database: str = ""  # which of the project's databases (the sweep keeps templates per one)
    # This run's planned databases (the worker database): the app's settings may name them
    # already; while building, connections to them go to the database being built.
    redirect: frozenset[str] = frozenset()
    project: str = ""  # the project's name (its rootdir's), in the template's marker


def lock_dir() -> Path:
    """Where the run's processes share file locks and failure notes (per OS user)."""
    path = Path(tempfile.gettempdir()) / f"pytest-pgtemplate-{getpass.getuser()}"
    path.mkdir(mode=0o700, exist_ok=True)
    return path


def prune_notes(directory: Path, max_age: float = 86400.0) -> None:
    """Failure notes only matter during their run: drop those older than a day."""
    cutoff = time.time() - max_age
    for note in directory.glob("*.failed"):
        with contextlib.suppress(OSError):
            if note.stat().st_mtime < cutoff:
                note.unlink()


def ensure(loop: Loop, admin: Admin, request: BuildRequest) -> Template:
    """Return the template for the migrator's fingerprint, building it if needed."""
    start = time.perf_counter()
    inputs = request.migrator.inputs()
    fp = fingerprint.compute(inputs, server_major=admin.major, role=admin.role)
    name = template_name(request.prefix, fp)
    server = hashlib.sha1(where(admin.url).encode(), usedforsecurity=False).hexdigest()[:12]
    shared = lock_dir()
    failed_note = shared / f"{server}-{name}-{request.run_id}.failed"
    # Say "in use" before looking: a sweep of another run must not prune it meanwhile.
    loop.run(admin.hold_shared(use_lock(name)))
    _raise_if_failed(failed_note)
    prune_notes(shared)
    file_lock = FileLock(str(shared / f"{server}-{name}.lock"))
    _acquire(file_lock, request, f"another process of this machine building template {name}")
    try:
        _raise_if_failed(failed_note)
        loop.run(admin.lock(name, request.timeout, f"the build of template {name}", request.notify))
        try:
            built = _reuse_or_build(loop, admin, request, name, fp)
        except PgTemplateError as exc:
            # Out of connections: say so with the counts (the note is what other processes quote).
            clear = loop.run(capacity.explain(admin.conn, where(admin.url), exc))
            failed_note.write_text(str(clear or exc))
            if clear is not None:
                raise clear from exc
            raise
        finally:
            loop.run(admin.unlock(name))
    finally:
        file_lock.release()
    return Template(name, fp, built, time.perf_counter() - start, fingerprint_caveat(inputs))


async def status(admin: Admin, migrator: Migrator, prefix: str, rebuild: bool) -> str:
    """What ``ensure`` will do, for the report header: ``<name> reused`` / ``to be built``."""
    inputs = migrator.inputs()
    fp = fingerprint.compute(inputs, server_major=admin.major, role=admin.role)
    name = template_name(prefix, fp)
    info = await admin.info(name)
    caveat = fingerprint_caveat(inputs)
    if _complete(info.marker if info is not None else None, fp):
        return (f"{name} to be rebuilt (--pgt-rebuild)" if rebuild
                else f"{name} reused" + (f" ({caveat})" if caveat else ""))
    return f"{name} to be built"


def _acquire(file_lock: FileLock, request: BuildRequest, what: str) -> None:
    """Take the file lock, saying after a few seconds who holds it; bounded by the timeout."""
    owner = Path(str(file_lock.lock_file) + ".owner")
    waited = 0.0
    for limit in (min(NOTIFY_AFTER, request.timeout), request.timeout):
        try:
            file_lock.acquire(timeout=max(0.0, limit - waited))
            owner.write_text(f"pid {os.getpid()} on {socket.gethostname()}, run {request.run_id[:8]}")
            return
        except Timeout:
            waited = limit
            holder = owner.read_text() if owner.exists() else "an unknown process"
            if limit < request.timeout:
                request.notify(f"waiting for {what} (file lock held by {holder}), "
                               f"at most {request.timeout:g} s")
    raise PgTemplateError(
        f"pytest-pgtemplate: gave up after {request.timeout:g} s waiting for {what} (file lock "
        f"{file_lock.lock_file} held by {holder}). Raise --pgt-timeout / PGTEMPLATE_TIMEOUT / "
        "pgtemplate_timeout, or stop that process.",
        setting="timeout",
    )


def _raise_if_failed(note: Path) -> None:
    """The build failed in another process of this run: say so in one line (the full
    error is reported once, by the process that tried), and do not retry."""
    if note.exists():
        first = note.read_text().splitlines()[0].removeprefix("pytest-pgtemplate: ")
        if len(first) > 100:
            first = first[:97] + "..."
        raise PgTemplateError(
            "pytest-pgtemplate: the template could not be built; the process of this run that "
            f"tried first reported why ({first}); not retried here."
        )


def _complete(marker: Marker | None, fp: str) -> bool:
    """The marker of a published template of fingerprint ``fp``."""
    return marker is not None and marker.kind == TEMPLATE and marker.fingerprint == fp


def _reuse_or_build(loop: Loop, admin: Admin, request: BuildRequest, name: str, fp: str) -> bool:
    """True if this process built the template, False if it reuses it."""
    info = loop.run(admin.info(name))
    if info is not None:
        marker = info.marker
        if marker is None:
            raise PgTemplateError(
                f"pytest-pgtemplate: database {name} exists on {where(admin.url)} but was not "
                "created by pytest-pgtemplate (no marker), so it is left alone. Drop it yourself, "
                "or choose another --pgt-prefix / PGTEMPLATE_PREFIX / pgtemplate_prefix.",
                setting="prefix",
            )
        complete = _complete(marker, fp)
        rebuilt_by_us = marker.run == request.run_id
        if complete and (rebuilt_by_us or not request.rebuild):
            return False
        if not complete:
            loop.run(admin.drop_ours(name))  # unfinished: never usable
    # A --pgt-rebuild replaces the old template only once the new one is complete.
    _build(loop, admin, request, name, fp)
    return True


def _check_downgrade(loop: Loop, admin: Admin, request: BuildRequest, fp: str) -> None:
    """--pgt-check-downgrade, on a scratch database of its own (dropped afterwards)."""
    migrator = request.migrator
    if isinstance(migrator, Seeded):
        migrator = migrator.base  # seeds have no downgrade: the check is about the migrations
    if not (isinstance(migrator, AlembicMigrator) and migrator.check_downgrade):
        return
    scratch = build_name(request.prefix, fp, uuid.uuid4().hex)
    loop.run(admin.create(scratch, Marker.new(BUILDING, fp, request.run_id, request.prefix)))
    target = admin.url.set(database=scratch)
    try:
        with temporary_env([request.env_var], target), _guarded(request, target):
            check_downgrade(migrator, target)
    finally:
        loop.run(admin.drop_ours(scratch))


def _build(loop: Loop, admin: Admin, request: BuildRequest, name: str, fp: str) -> None:
    _check_downgrade(loop, admin, request, fp)
    building = build_name(request.prefix, fp, uuid.uuid4().hex)
    loop.run(admin.create(building, Marker.new(BUILDING, fp, request.run_id, request.prefix)))
    try:
        target: URL = admin.url.set(database=building)
        progress = Progress()
        with (temporary_env([request.env_var], target), _ticking(request, name, progress),
              _guarded(request, target)):
            request.migrator.migrate(target, progress)
        for note in progress.notes:
            request.notify(note)
        loop.run(_install_tracking(admin.url, building, request.migrator))
        marker = Marker.new(TEMPLATE, fp, request.run_id, request.prefix, request.database, request.project)
        loop.run(admin.drop_ours(name))  # the template being rebuilt, if any
        loop.run(admin.finalize_template(building, name, marker))
    except BaseException:
        loop.run(admin.drop_ours(building))
        raise


@contextmanager
def _guarded(request: BuildRequest, target: URL) -> Iterator[None]:
    """Only the database being built may be written (see ``guard``); say when the app's
    settings named the worker database and were sent to the one being built."""
    with only_into(target, request.redirect, f"building with {request.migrator.describe()}") as guard:
        yield
    for name in guard.redirected:
        request.notify(f"while building, connections to {name} (this process's worker database, which "
                       "the app's settings name) were sent to the database being built, as intended")


PROGRESS_EVERY = 5.0  # seconds between progress notes of a long build


@contextmanager
def _ticking(request: BuildRequest, name: str, progress: Progress) -> Iterator[None]:
    """While a build runs: every few seconds, one note of how far it is (builder only)."""
    done = threading.Event()
    start = time.monotonic()

    def tick() -> None:
        while not done.wait(PROGRESS_EVERY):
            request.notify(f"building template {name} with {request.migrator.describe()}: "
                           f"{time.monotonic() - start:.0f} s elapsed{progress.describe()}")

    thread = threading.Thread(target=tick, name="pytest-pgtemplate-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


async def _install_tracking(url: URL, database: str, migrator: Migrator) -> int:
    conn = await connect(url, database)
    try:
        if migrator.kind == "alembic":
            await require_alembic_ran(conn, database)
        return await reset.install(conn)
    finally:
        await conn.close()
