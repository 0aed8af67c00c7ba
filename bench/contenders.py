"""The contenders of the wall-time table, and running one of them as ``python -m pytest``.

Each contender runs in a project directory of its own (the generated suite plus its
conftest.py); all runs of pytest-pgtemplate share one directory, so the warm runs find the
template the cold runs built.  A run counts only if pytest exits 0 with every test passed.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from pytest_pgtemplate.settings import RESET_STRATEGIES

# Plugins a contender does not use are switched off, so none pays for another's hooks.
NO_OURS = ("-p", "no:pgtemplate")
NO_PPG = ("-p", "no:pytest_postgresql")
SINGLE = ("-p", "no:xdist")
TWO = ("-n", "2")
FUNCTION_LOOPS = ("-o", "asyncio_default_fixture_loop_scope=function",
                  "-o", "asyncio_default_test_loop_scope=function")
BASELINE = "ours-n2-warm"
PROFILE = ("--pgt-profile",)  # the warm runs of ours report where their time went
# The small suite's contenders: one process, a hand-written per-run setup against ours.
SMALL_SUITE = ("floor", "ours-1-cold", "ours-1-warm", "classic", "rollback")
SMALL_BASELINE = "classic"


@dataclass(frozen=True, slots=True)
class Contender:
    key: str
    label: str
    kind: str  # which conftest: ours, classic, rollback, pytest-postgresql, migrate-per-test
    processes: str
    template: str  # cold / warm / n/a
    args: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)
    slow: bool = False  # seconds per test: may run a subset of the suite at small sizes
    collect_only: bool = False  # runs no test: the fixed cost of starting pytest
    repeatable: bool = True  # False: run once (too slow, or a rerun would measure something else)
    full_only: bool = False  # a variation the quick (CI) size skips


@dataclass(frozen=True, slots=True)
class RunResult:
    contender: Contender
    status: str  # passed / failed / timeout
    seconds: float
    detail: str  # pytest's counts, or why it failed
    log: Path
    tests: int  # how many tests it ran (all, or a subset for a slow contender)
    plugin_summary: tuple[str, ...] = ()  # pytest-pgtemplate's own lines at the end of the run


def contenders(url: str, prefix: str, embedded_dir: Path) -> list[Contender]:
    """Every contender, in the order they run (cold before warm)."""
    ours = ("--pgt-url", url, "--pgt-prefix", prefix, *NO_PPG)
    result = [
        Contender("floor", "pytest start + collection only, no test run (fixed cost)", "ours", "1",
                  "n/a", (*SINGLE, *NO_PPG, "--collect-only"), collect_only=True),
        *_ours_matrix(ours, "truncate"),
        Contender("ours-n2-warm-fnloop", "pytest-pgtemplate truncate, function-scoped event loops",
                  "ours", "-n 2", "warm",
                  (*TWO, *ours, "--pgt-reset", "truncate", *FUNCTION_LOOPS, *PROFILE), full_only=True),
    ]
    # Every other strategy the plugin offers, once each (at the quick size on a few tests).
    result += [
        Contender(f"ours-n2-warm-{strategy}", f"pytest-pgtemplate {strategy}", "ours", "-n 2", "warm",
                  (*TWO, *ours, "--pgt-reset", strategy), slow=True, repeatable=False)
        for strategy in RESET_STRATEGIES
        if strategy not in ("truncate", "none")
    ]
    emb = {"PGTEMPLATE_EMBEDDED_DIR": str(embedded_dir)}
    embedded_args = (*TWO, "--pgt-prefix", prefix, *NO_PPG)
    result += [
        Contender("ours-embedded-cold", "pytest-pgtemplate, embedded server (first run)", "ours",
                  "-n 2", "cold", embedded_args, emb, repeatable=False),
        Contender("ours-embedded-warm", "pytest-pgtemplate, embedded server", "ours",
                  "-n 2", "warm", embedded_args, emb),
        Contender("rollback", "SQLAlchemy external-transaction rollback", "rollback", "1", "n/a",
                  (*SINGLE, *NO_OURS, *NO_PPG)),
        Contender("classic", "session DB + TRUNCATE all tables after each test", "classic", "1",
                  "n/a", (*SINGLE, *NO_OURS, *NO_PPG)),
        Contender("pytest-postgresql", "pytest-postgresql (noproc, template clone per test)",
                  "pytest-postgresql", "-n 2", "n/a", (*TWO, *NO_OURS), slow=True, repeatable=False),
        Contender("migrate-per-test", "new database + alembic upgrade per test",
                  "migrate-per-test", "-n 2", "n/a", (*TWO, *NO_OURS, *NO_PPG), slow=True,
                  repeatable=False),
    ]
    return result


def _ours_matrix(ours: tuple[str, ...], strategy: str) -> list[Contender]:
    reset = ("--pgt-reset", strategy)
    rebuild = ("--pgt-rebuild",)
    label = f"pytest-pgtemplate {strategy}"
    return [
        Contender("ours-1-cold", label, "ours", "1", "cold", (*SINGLE, *ours, *reset, *rebuild)),
        Contender("ours-1-warm", label, "ours", "1", "warm", (*SINGLE, *ours, *reset, *PROFILE)),
        Contender("ours-n2-cold", label, "ours", "-n 2", "cold", (*TWO, *ours, *reset, *rebuild),
                  full_only=True),
        Contender(BASELINE, label, "ours", "-n 2", "warm", (*TWO, *ours, *reset, *PROFILE)),
    ]


def run(contender: Contender, project: Path, *, tests: list[str] | int, env: Mapping[str, str],
        logs: Path, timeout: float, attempt: int = 1) -> RunResult:
    """Run the contender's pytest in ``project``, timed from start to exit: the whole suite
    (``tests`` is its size) or the given node ids."""
    selected = tests if isinstance(tests, list) else []
    expected = 0 if contender.collect_only else tests if isinstance(tests, int) else len(tests)
    logs.mkdir(parents=True, exist_ok=True)
    name = contender.key if attempt == 1 else f"{contender.key}-{attempt}"
    log, junit = logs / f"{name}.log", logs / f"{name}.xml"
    junit.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pytest", "-q", "--junitxml", str(junit), *contender.args, *selected]
    full_env = {**env, **contender.env}
    with log.open("w") as out:
        out.write(f"$ (cd {project} && {' '.join(cmd)})\n")
        out.flush()
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=project, env=full_env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the pytest we started and its xdist workers
            proc.wait()
            seconds = time.perf_counter() - start
            return RunResult(contender, "timeout", seconds, f"killed after {timeout:.0f} s", log,
                             expected)
        seconds = time.perf_counter() - start
    status, detail = _verdict(code, junit, expected)
    return RunResult(contender, status, seconds, detail, log, expected, plugin_summary(log))


def plugin_summary(log: Path) -> tuple[str, ...]:
    """The lines of the terminal section pytest-pgtemplate writes (template, clones, resets)."""
    lines: list[str] = []
    inside = False
    for line in log.read_text(errors="replace").splitlines():
        if re.fullmatch(r"-+ pytest-pgtemplate -+", line.strip()):
            inside = True
        elif inside and (not line.strip() or re.match(r"=+|\d+ (passed|failed|error)", line)):
            break
        elif inside:
            lines.append(line.strip())
    return tuple(lines)


def median_of(results: list[RunResult]) -> RunResult:
    """The run of median wall time, its detail listing every run; a failure wins."""
    failed = [r for r in results if r.status != "passed"]
    if failed or len(results) == 1:
        return (failed or results)[0]
    ordered = sorted(results, key=lambda r: r.seconds)
    middle = ordered[len(ordered) // 2]
    times = ", ".join(f"{r.seconds:.1f}" for r in results)
    return replace(middle, detail=f"{middle.detail}; median of {len(results)} runs: {times} s")


def _verdict(code: int, junit: Path, expected: int) -> tuple[str, str]:
    counts = _junit_counts(junit)
    if counts is None:
        return "failed", f"exit {code}, no report"
    tests, failures, errors, skipped = counts
    passed = tests - failures - errors - skipped
    detail = f"{passed} passed" + "".join(
        f", {n} {what}" for n, what in ((failures, "failed"), (errors, "errors"), (skipped, "skipped"))
        if n
    )
    ok = code == 0 and passed == expected
    if ok and expected == 0:
        detail = "no test run"
    return ("passed" if ok else "failed"), (detail if ok else f"exit {code}: {detail}")


def _junit_counts(junit: Path) -> tuple[int, int, int, int] | None:
    if not junit.exists():
        return None
    root = ET.parse(junit).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    totals = [0, 0, 0, 0]
    for suite in suites:
        for i, name in enumerate(("tests", "failures", "errors", "skipped")):
            totals[i] += int(suite.get(name, "0"))
    return totals[0], totals[1], totals[2], totals[3]


def base_env(url: str, prefix: str) -> dict[str, str]:
    """The environment of every run: ours minus settings that would change what runs."""
    env = {
        k: v for k, v in os.environ.items()
        if not k.startswith(("PGTEMPLATE_", "PYTEST_", "PG")) and k != "DATABASE_URL"
    }
    env.update(BENCH_SERVER_URL=url, BENCH_DB_PREFIX=prefix, PYTHONDONTWRITEBYTECODE="1")
    return env
