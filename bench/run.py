"""Benchmark pytest-pgtemplate against the usual ways of getting a clean database per test.

    python bench/run.py --size small|full [--url postgresql://postgres@127.0.0.1:5432/postgres]
                        [--out bench/results]

Generates the projects into a temp dir, runs every contender side by side against the same
server, micro-benchmarks the reset, writes results.md and chart.png into --out and prints
results.md.  Every database it creates is named ``scratch_<hex>...`` and dropped at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import conftests
import contenders
import generate
import pgadmin
import report
import resetbench
from schema import build_schema
from sqlalchemy.engine import URL, make_url

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True, slots=True)
class Size:
    name: str
    tables: int
    tests: int
    reset_tables: tuple[int, ...]
    written: tuple[int, ...]
    iterations: dict[str, int]  # reset samples per method
    timeout: float  # seconds, for each pytest run
    slow_subset: int | None = None  # tests the slowest contenders run (None: the whole suite)
    repeat: int = 1  # runs of each quick contender; the median is reported
    quick: bool = False  # skip the contenders marked full_only
    small_tables: int = 4  # the small suite: the common case of a young project
    small_tests: int = 40


SIZES = {
    "small": Size("small", tables=10, tests=20, reset_tables=(10,), written=(1, 5),
                  iterations={"ours": 30, "ours-no-replica": 10, "delete": 30, "truncate-all": 6},
                  timeout=100, slow_subset=4, quick=True),
    "full": Size("full", tables=35, tests=300, reset_tables=(10, 35, 100), written=(1, 5, 10),
                 iterations={"ours": 300, "ours-no-replica": 60, "delete": 300, "truncate-all": 20},
                 timeout=1800, repeat=3),
}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    size = SIZES[args.size]
    url = _server_url(args.url)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    prefix = "scratch_" + secrets.token_hex(3)  # fresh per run: no template of anyone else reused
    phases: dict[str, float] = {}
    started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load_before = os.getloadavg()[0]
    plugin = _plugin_version()  # now: the source may change while the bench runs
    _compile_plugin()
    with _workdirs(keep=args.keep_temp) as (work, embedded_dir):
        try:
            with _phase(phases, "generate"):
                projects = _generate(work, size)
            with _phase(phases, "wall-time runs"):
                runs = _wall_times(size, projects[size.tables], work, url, prefix, embedded_dir,
                                   out / "logs", args.only)
            with _phase(phases, "small suite"):
                small = _small_suite(size, work, url, prefix, embedded_dir, out / "logs", args.only)
            cells: list[resetbench.Cell] = []
            if not args.no_reset_bench:
                with _phase(phases, "reset micro-benchmark"):
                    cells = _reset_bench(size, projects, url, prefix)
        finally:
            dropped = pgadmin.drop_prefixed(url, prefix)
            _log(f"dropped {len(dropped)} databases named {prefix}*")
    load = f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after"
    meta = report.Meta(size.name, pgadmin.describe_server(url), _machine(), size.tables, size.tests,
                       started, phases, load, plugin, size.small_tables, size.small_tests)
    _write(out, meta, runs, cells, small)
    print((out / "results.md").read_text())
    return 0 if all(r.status == "passed" for r in runs + small) else 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--url", default="postgresql://postgres@127.0.0.1:5432/postgres",
                        help="the server every contender uses; its database is the maintenance one")
    parser.add_argument("--out", default=str(HERE / "results"), help="where results.md and chart.png go")
    parser.add_argument("--only", default="", help="comma-separated contender keys (default: all)")
    parser.add_argument("--no-reset-bench", action="store_true", help="skip the reset micro-benchmark")
    parser.add_argument("--keep-temp", action="store_true", help="keep the generated projects")
    return parser


def _server_url(raw: str) -> URL:
    url = make_url(raw)
    if url.get_backend_name() != "postgresql":
        raise SystemExit(f"--url must be a postgresql:// URL, got {raw!r}")
    return url.set(drivername="postgresql", database=url.database or "postgres")


@contextlib.contextmanager
def _workdirs(*, keep: bool) -> Iterator[tuple[Path, Path]]:
    """A temp dir for the projects, and one the embedded server's user (postgres) can enter."""
    work = Path(tempfile.mkdtemp(prefix="pgt-bench-"))
    shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    embedded_root = Path(tempfile.mkdtemp(prefix="pgt-bench-embedded-", dir=shm))
    embedded_root.chmod(0o755)  # PostgreSQL refuses root: the plugin runs it as another user
    try:
        yield work, embedded_root / "clusters"
    finally:
        if keep:
            _log(f"kept {work} and {embedded_root}")
        else:
            shutil.rmtree(work, ignore_errors=True)
            shutil.rmtree(embedded_root, ignore_errors=True)


@contextlib.contextmanager
def _phase(phases: dict[str, float], name: str) -> Iterator[None]:
    start = time.perf_counter()
    _log(f"{name}...")
    try:
        yield
    finally:
        phases[name] = time.perf_counter() - start


def _generate(work: Path, size: Size) -> dict[int, Path]:
    """The suite's project, and one per schema size of the micro-benchmark (few tests)."""
    projects = {}
    for tables in dict.fromkeys((size.tables, *size.reset_tables)):
        root = work / f"project-{tables}"
        generate.write_project(root, build_schema(tables), size.tests if tables == size.tables else 3)
        projects[tables] = root
    return projects


def _wall_times(size: Size, project: Path, work: Path, url: URL, prefix: str, embedded_dir: Path,
                logs: Path, only: str) -> list[contenders.RunResult]:
    server = url.render_as_string(hide_password=False)
    env = contenders.base_env(server, prefix)
    chosen = [c for c in contenders.contenders(server, prefix, embedded_dir)
              if not (c.full_only and size.quick)]
    if only:
        keys = set(only.split(","))
        chosen = [c for c in chosen if c.key in keys]
    results = []
    for contender in chosen:
        directory = _contender_dir(project, work, contender.kind)
        tests: list[str] | int = size.tests
        if contender.slow and size.slow_subset is not None:
            tests = generate.node_ids(build_schema(size.tables), range(size.slow_subset))
        times = size.repeat if contender.repeatable else 1
        result = contenders.median_of([
            contenders.run(contender, directory, tests=tests, env=env, logs=logs, timeout=size.timeout,
                           attempt=attempt)
            for attempt in range(1, times + 1)
        ])
        _log(f"  {contender.key}: {result.status} in {result.seconds:.1f} s ({result.detail})")
        results.append(result)
    return results


def _small_suite(size: Size, work: Path, url: URL, prefix: str, embedded_dir: Path, logs: Path,
                 only: str) -> list[contenders.RunResult]:
    """The small suite, one process: ours (cold, warm) against hand-written per-run setups."""
    keys = set(contenders.SMALL_SUITE) & (set(only.split(",")) if only else set(contenders.SMALL_SUITE))
    if not keys:
        return []
    root = work / "small"
    project = root / "project"
    generate.write_project(project, build_schema(size.small_tables), size.small_tests)
    server = url.render_as_string(hide_password=False)
    env = contenders.base_env(server, prefix + "_s")
    results = []
    for contender in contenders.contenders(server, prefix + "_s", embedded_dir):
        if contender.key not in keys:
            continue
        contender = replace(contender, key=f"small-{contender.key}")
        directory = _contender_dir(project, root, contender.kind)
        times = size.repeat if contender.repeatable else 1
        result = contenders.median_of([
            contenders.run(contender, directory, tests=size.small_tests, env=env, logs=logs,
                           timeout=size.timeout, attempt=attempt)
            for attempt in range(1, times + 1)
        ])
        _log(f"  {contender.key}: {result.status} in {result.seconds:.1f} s ({result.detail})")
        results.append(result)
    return results


def _contender_dir(project: Path, work: Path, kind: str) -> Path:
    """A copy of the suite with this kind's conftest.py (made once per kind)."""
    directory = work / f"run-{kind}"
    if not directory.exists():
        shutil.copytree(project, directory)
        (directory / "conftest.py").write_text(conftests.conftest(kind))
    return directory


def _reset_bench(size: Size, projects: dict[int, Path], url: URL, prefix: str) -> list[resetbench.Cell]:
    cells = []
    for tables in size.reset_tables:
        found = resetbench.measure(build_schema(tables), projects[tables], url, prefix,
                                   written=size.written, iterations=size.iterations,
                                   timeout=size.timeout)
        for cell in found:
            p50 = report.percentile(cell.samples, 50) * 1000
            _log(f"  {tables} tables, {cell.written} written, {cell.method}: p50 {p50:.2f} ms"
                 + ("" if cell.clean else " NOT CLEAN"))
        cells.extend(found)
    return cells


def _write(out: Path, meta: report.Meta, runs: list[contenders.RunResult],
           cells: list[resetbench.Cell], small: list[contenders.RunResult]) -> None:
    (out / "results.md").write_text(report.markdown(meta, runs, cells, small))
    report.chart(out / "chart.png", meta, runs, cells)
    raw = {
        "meta": asdict(meta),
        "runs": [{"key": r.contender.key, "label": r.contender.label, "status": r.status,
                  "seconds": r.seconds, "detail": r.detail} for r in runs + small],
        "reset": [{"tables": c.tables, "written": c.written, "method": c.method,
                   "clean": c.clean, "samples_ms": [s * 1000 for s in c.samples]} for c in cells],
    }
    (out / "results.json").write_text(json.dumps(raw, indent=1))


def _machine() -> str:
    system = f"{platform.system()} {platform.release()}"
    return f"{os.cpu_count()} CPUs, {system}, Python {platform.python_version()}"


def _compile_plugin() -> None:
    """Byte-compile the plugin, as installing it from a wheel does.  The runs write no
    bytecode (PYTHONDONTWRITEBYTECODE), so an editable install of it would otherwise be
    compiled again by every process of every run, unlike the libraries the other
    contenders use, which pip compiled at install time."""
    import compileall

    import pytest_pgtemplate

    compileall.compile_dir(str(Path(pytest_pgtemplate.__file__).parent), quiet=1)


def _plugin_version() -> str:
    """The plugin's version and commit, and whether its source differs from the commit."""
    from importlib.metadata import version

    git = ["git", "-C", str(HERE.parent)]
    try:
        commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        changed = subprocess.run([*git, "status", "--porcelain", "--", "src"], capture_output=True,
                                 text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return version("pytest-pgtemplate")
    dirty = " + uncommitted changes in src/" if changed else ""
    return f"{version('pytest-pgtemplate')} at {commit}{dirty}"


def _log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
