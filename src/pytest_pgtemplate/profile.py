"""``--pgt-profile``: where a run's time goes, per test and before each process's first test.

Per test, pytest's own phases (setup, call, teardown: the reports' durations) and, within
setup and teardown, the time spent inside the plugin's fixtures (teardown: the reset,
engine release, closing sessions).  Per process, the time from the process's start to its
first test: Python and pytest before the plugin, the plugin's import, configure and
collection, then the first test's setup (the template and the worker database are made
there).  Plain lists and dicts, so xdist ships them from workers to the controller.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

PHASES = ("setup", "call", "teardown")


def process_age() -> float | None:
    """Seconds since this process started (Linux: /proc), or None where unknown."""
    try:
        with open("/proc/self/stat") as stat:
            # Field 22 (starttime, clock ticks after boot); the name (field 2) may hold spaces.
            start_ticks = int(stat.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as uptime:
            up = float(uptime.read().split()[0])
        return max(0.0, up - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


@dataclass(slots=True)
class Profiler:
    """One process's profile.  ``active`` is the one the fixtures report to (None: off)."""

    phases: dict[str, list[float]] = field(default_factory=lambda: {p: [] for p in PHASES})
    plugin: dict[str, list[float]] = field(default_factory=lambda: {"setup": [], "teardown": []})
    startup: dict[str, float] = field(default_factory=dict)
    connections: int = 0  # opened by the plugin's async engines
    reused: int = 0  # of those, served by a server session of an earlier test (the relay)
    _current: dict[str, float] = field(default_factory=lambda: {"setup": 0.0, "teardown": 0.0})
    marks: dict[str, float] = field(default_factory=dict)  # perf_counter moments

    def mark(self, name: str) -> None:
        """A moment of the startup (perf_counter), the first time only."""
        self.marks.setdefault(name, time.perf_counter())

    def add(self, phase: str, seconds: float) -> None:
        self._current[phase] += seconds

    def phase_done(self, phase: str, seconds: float) -> None:
        """pytest finished a phase of a test; after teardown, the test is complete."""
        self.phases[phase].append(seconds)
        if phase == "setup" and not self.startup:
            self._first_test(seconds)
        if phase == "teardown":
            for part in ("setup", "teardown"):
                self.plugin[part].append(self._current[part])
                self._current[part] = 0.0

    def _first_test(self, setup: float) -> None:
        marks = self.marks
        if not {"import_start", "imported", "first_setup"} <= marks.keys():
            return
        age = process_age()
        plugin_setup = self._current["setup"]
        self.startup = {
            "import": marks["imported"] - marks["import_start"],
            "collection": marks["first_setup"] - marks["imported"],
            "plugin_setup": plugin_setup,
            "other_setup": max(0.0, setup - plugin_setup),
        }
        if age is not None:  # the process's age now, less what came since the import started
            since_import = time.perf_counter() - marks["import_start"]
            self.startup["before"] = max(0.0, age - since_import)

    def to_dict(self) -> dict[str, Any]:
        return {"phases": self.phases, "plugin": self.plugin, "connections": self.connections,
                "reused": self.reused,
                "startups": [self.startup] if self.startup else []}


class Clock:
    """``with Clock(phase):`` adds the block's time to the active profiler's current test.
    Nested blocks (a fixture asking for another with getfixturevalue) count once."""

    __slots__ = ("_phase", "_start")
    _depth = 0

    def __init__(self, phase: str) -> None:
        self._phase = phase
        self._start = 0.0

    def __enter__(self) -> None:
        self._start = time.perf_counter()
        Clock._depth += 1

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        Clock._depth -= 1
        if ACTIVE is not None and Clock._depth == 0:
            ACTIVE.add(self._phase, time.perf_counter() - self._start)


ACTIVE: Profiler | None = None


def merge(into: dict[str, Any], other: dict[str, Any]) -> None:
    """Add one process's ``to_dict()`` to the run's."""
    for group in ("phases", "plugin"):
        for key, values in other.get(group, {}).items():
            into.setdefault(group, {}).setdefault(key, []).extend(values)
    into.setdefault("startups", []).extend(other.get("startups", []))
    for key in ("connections", "reused"):
        into[key] = into.get(key, 0) + other.get(key, 0)


def _stats(values: list[float]) -> str:
    ordered = sorted(values)
    p50 = ordered[len(ordered) // 2]
    return (f"p50 {p50 * 1000:.1f} ms, mean {sum(values) / len(values) * 1000:.1f} ms, "
            f"total {sum(values):.2f} s")


def format_profile(profile: dict[str, Any], resets: list[float]) -> list[str]:
    """The summary's profile lines (none if no test ran)."""
    phases: dict[str, list[float]] = profile.get("phases", {})
    plugin: dict[str, list[float]] = profile.get("plugin", {})
    if not phases.get("call"):
        return []
    lines = [f"profile of {len(phases['call'])} tests, per test:"]
    for phase in PHASES:
        values = phases.get(phase, [])
        if not values:
            continue
        line = f"  {phase:<8} {_stats(values)}"
        if plugin.get(phase):
            line += f"; in the plugin's fixtures {_stats(plugin[phase])}"
        if phase == "teardown" and resets:
            line += f"; resets (part of the plugin's fixtures, {len(resets)} of them) {_stats(resets)}"
        lines.append(line)
    tests, opened = len(phases["call"]), int(profile.get("connections", 0))
    if opened:
        line = f"  connections opened by the plugin's async engine: {opened}"
        reused = int(profile.get("reused", 0))
        if opened * 2 > tests > 1:
            line += (" (about one per test: function-scoped event loops, each test connects anew; a "
                     "session-scoped loop keeps connections warm: asyncio_default_fixture_loop_scope "
                     "= session, and the same for the tests' loops)")
        if reused:
            line += (f"; {reused} of them given the server session of an earlier test "
                     "(the relay: no new backend to start and warm)")
        lines.append(line)
    startups: list[dict[str, float]] = profile.get("startups", [])
    if startups:
        slowest = max(startups, key=lambda s: sum(s.values()))
        parts = [("Python and pytest before the plugin", "before"), ("the plugin's import", "import"),
                 ("configure and collection", "collection"),
                 ("the plugin's fixtures (template, worker database, engine)", "plugin_setup"),
                 ("other fixtures", "other_setup")]
        shown = ", ".join(f"{label} {slowest[key]:.2f} s" for label, key in parts if key in slowest)
        which = "" if len(startups) == 1 else f" (the slowest of {len(startups)} processes)"
        lines.append(f"  startup  {sum(slowest.values()):.2f} s from the process's start to its first "
                     f"test's call{which}: {shown}")
    return lines
