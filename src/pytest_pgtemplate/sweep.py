"""Garbage collection: drop what dead runs left behind, prune old templates.

Liveness: every process of a run holds a shared advisory lock on ``run:<run id>`` on
its admin connection, and a shared lock on ``use:<template>`` for the template it
clones from, for as long as it lives (a killed process's locks vanish with its
connection).  The sweep drops a marked database only when it can take the owner's
lock exclusively, i.e. nobody alive holds it, and holds that lock while dropping.
Databases without our marker are never touched, whatever their name.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field

import asyncpg

from .admin import Admin, DatabaseRow, run_lock, use_lock
from .naming import (
    BUILDING,
    CLONE,
    KEPT,
    SPARE,
    TEMPLATE,
    WORKER,
    source_build,
    source_template,
    template_build,
)

SWEEP_LOCK = "sweep"


@dataclass(slots=True)
class SweepResult:
    dropped: list[str] = field(default_factory=list)  # leftovers of dead runs (kept ones if asked)
    pruned: list[str] = field(default_factory=list)  # unused templates beyond the newest N
    skipped: bool = False  # another process was sweeping


async def sweep(admin: Admin, *, prefix: str, keep_templates: int, include_kept: bool,
                wait: float | None = None, project: str | None = None) -> SweepResult:
    """Drop worker and half-built databases of dead runs, whatever their prefix (nobody can
    use them), and, of ``prefix`` only, kept ones and spares if asked and all but the newest
    ``keep_templates`` templates per project and database that nobody uses (another
    prefix's are another project's choice); then spares of template builds that are gone.
    With ``project``, only that project's templates are pruned: a run leaves other projects
    sharing the prefix alone.

    Only one process sweeps at a time: a sweeper that finds another at work skips, or
    with ``wait`` (``--pgt-gc``), waits for it at most that many seconds.
    """
    result = SweepResult()
    if wait is not None:
        await admin.lock(SWEEP_LOCK, wait, "another process's sweep")
    elif not await admin.unused(SWEEP_LOCK):
        result.skipped = True
        return result
    try:
        rows = await admin.databases()
        marked = [(r, r.marker) for r in rows if r.marker is not None]
        # A spare stands in for a clone of one build of a template: once that is gone, so is
        # the spare's use.
        builds = {template_build(r.name, r.oid) for r, m in marked if m.kind == TEMPLATE}
        for row, marker in marked:
            kept_too = include_kept and marker.prefix == prefix
            if _is_leftover(row, kept_too) and await _drop_if_unused(admin, row, run_lock(marker.run)):
                result.dropped.append(row.name)
        ours = [row for row, marker in marked
                if marker.prefix == prefix and project in (None, marker.project)]
        for row in _surplus_templates(ours, keep_templates):
            if await _drop_if_unused(admin, row, use_lock(row.name)):
                result.pruned.append(row.name)
                builds.discard(template_build(row.name, row.oid))
        for row, marker in marked:
            if (marker.kind == SPARE and row.name not in result.dropped
                    and source_build(marker.source) not in builds
                    and await _drop_if_unused(admin, row, run_lock(marker.run))):
                result.dropped.append(row.name)
    finally:
        await admin.unlock(SWEEP_LOCK)
    return result


def _is_leftover(row: DatabaseRow, include_kept: bool) -> bool:
    assert row.marker is not None
    kinds = {WORKER, BUILDING, CLONE, KEPT, SPARE} if include_kept else {WORKER, BUILDING, CLONE}
    return row.marker.kind in kinds


def _surplus_templates(rows: list[DatabaseRow], keep: int) -> list[DatabaseRow]:
    """Per project and database (a project's second database keeps templates of its own)."""
    groups: dict[tuple[str, str, str], list[DatabaseRow]] = defaultdict(list)
    for row in rows:
        if row.marker is not None and row.marker.kind == TEMPLATE:
            groups[row.marker.prefix, row.marker.project, row.marker.database].append(row)
    surplus: list[DatabaseRow] = []
    for group in groups.values():
        group.sort(key=lambda r: r.marker.created if r.marker else 0.0, reverse=True)
        surplus += group[keep:]
    return surplus


async def _drop_if_unused(admin: Admin, row: DatabaseRow, owner_lock: str) -> bool:
    """Drop ``row`` if nobody holds ``owner_lock`` and its marker is still the one seen
    (between the listing and the lock its owner may have re-marked and released it)."""
    if not await admin.unused(owner_lock):
        return False
    try:
        return await admin.drop_ours(row.name, seen=row.marker)
    except asyncpg.PostgresError:
        return False  # e.g. dropped meanwhile by someone else: nothing left to do
    finally:
        await admin.unlock(owner_lock)


async def describe(admin: Admin) -> list[str]:
    """One line per database of ours: name, kind, fingerprint, owner (alive?), age, size."""
    lines = []
    now = time.time()
    for row in await admin.databases():
        marker = row.marker
        if marker is None:
            continue
        is_template = marker.kind == TEMPLATE
        used = await admin.held_shared(use_lock(row.name) if is_template else run_lock(marker.run))
        state = ("in use" if used else "unused") if is_template else ("alive" if used else "dead")
        if marker.kind == SPARE:
            state = f"ended; a spare for the next run from {source_template(marker.source)}"
        size = "?" if row.size is None else f"{row.size / 1e6:.1f} MB"
        lines.append(
            f"{row.name}  {marker.kind}  fingerprint {marker.fingerprint[:12]}  "
            f"run {marker.run[:8]} ({marker.host} pid {marker.pid}, {state})  "
            f"age {_age(now - marker.created)}  {size}"
        )
    return lines


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit}"
    return f"{seconds:.0f} s"
