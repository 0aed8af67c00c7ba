"""results.md (wall times with ratios, reset latencies, the issue's targets) and chart.png."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from contenders import BASELINE, SMALL_BASELINE, RunResult
from matplotlib.axes import Axes
from resetbench import METHOD_LABELS, METHODS, Cell

OURS_COLOR, OTHER_COLOR, FLOOR_COLOR = "#2a9d8f", "#8d99ae", "#d9d9d9"


@dataclass(frozen=True, slots=True)
class Meta:
    size: str
    server: str
    machine: str
    tables: int
    tests: int
    started: str
    phases: dict[str, float]  # seconds per phase of the bench itself
    load: str  # the machine's load average before and after: other work on it skews timings
    plugin: str  # version and commit of pytest-pgtemplate
    small_tables: int = 0  # the small suite's size
    small_tests: int = 0


def percentile(samples: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(pct / 100 * len(ordered)) - 1)]


def ms(seconds: float) -> str:
    value = seconds * 1000
    return f"{value:.2f}" if value < 10 else f"{value:.1f}" if value < 100 else f"{value:.0f}"


def markdown(meta: Meta, runs: list[RunResult], cells: list[Cell], small: list[RunResult]) -> str:
    parts = [
        f"# pytest-pgtemplate benchmark (size {meta.size})\n",
        f"- pytest-pgtemplate {meta.plugin}",
        f"- server: {meta.server}; machine: {meta.machine}",
        f"- suite: {meta.tables} tables, {meta.tests} async tests, each writing 3-5 rows into "
        "4-5 FK-linked tables (the audit trigger's included), asserting the clean state first",
        f"- started {meta.started}; bench phases: "
        + ", ".join(f"{name} {secs:.0f} s" for name, secs in meta.phases.items()),
        f"- load average (1 min) {meta.load}",
        "",
        "## Wall time of the suite (`python -m pytest`, start to exit)\n",
        wall_table(runs, meta.tests),
        "",
        "### What pytest-pgtemplate reported about each of its runs\n",
        *plugin_lines(runs),
        "",
        "## A small suite, one process\n",
        f"{meta.small_tests} async tests on {meta.small_tables} tables (the same generator): the common "
        "case of a young project, where a run must not start slower than a hand-written conftest that "
        "creates and migrates a database per run. The hand-written setups migrate on every run (cold "
        "and warm are the same for them).\n",
        wall_table(small, meta.small_tests, SMALL_BASELINE) if small else "(not run)",
        "",
        *plugin_lines(small),
        "",
        "## Reset latency (ms, p50 / p95), one reset after a test wrote k tables\n",
        reset_table(cells),
        "",
        "## Targets (issue 12)\n",
        *targets(runs, cells, meta.tests, small),
    ]
    return "\n".join(parts) + "\n"


def wall_table(runs: list[RunResult], tests: int, baseline: str = BASELINE) -> str:
    base = _baseline(runs, baseline)
    versus = next((f"{r.contender.label} ({r.contender.processes}, {r.contender.template})" for r in runs
                   if r.contender.key.removeprefix("small-") == baseline), baseline)
    lines = [
        f"| contender | processes | template | wall time | vs {versus} | result |",
        "| --- | --- | --- | ---: | ---: | --- |",
    ]
    for r in runs:
        c = r.contender
        ok = r.status == "passed"
        whole = r.tests == tests or c.collect_only
        wall = "-" if not ok else f"{r.seconds:.1f} s" + ("" if whole else f" ({r.tests} tests)")
        ratio = f"{r.seconds / base:.1f}x" if ok and base and whole else "-"
        result = r.detail if ok else f"**{r.status.upper()}**: {r.detail} (see logs/{r.log.name})"
        lines.append(f"| {c.label} | {c.processes} | {c.template} | {wall} | {ratio} | {result} |")
    return "\n".join(lines)


def plugin_lines(runs: list[RunResult]) -> list[str]:
    lines = [
        f"- `{r.contender.key}`: " + "; ".join(r.plugin_summary)
        for r in runs if r.plugin_summary
    ]
    return lines or ["- (none)"]


def _baseline(runs: list[RunResult], key: str = BASELINE) -> float | None:
    for r in runs:
        if r.contender.key.removeprefix("small-") == key and r.status == "passed":
            return r.seconds
    return None


def reset_table(cells: list[Cell]) -> str:
    head = "| tables | written | " + " | ".join(METHOD_LABELS[m] for m in METHODS) + " |"
    lines = [head, "| ---: | ---: |" + " ---: |" * len(METHODS)]
    for tables, written in dict.fromkeys((c.tables, c.written) for c in cells):
        row = {c.method: c for c in cells if (c.tables, c.written) == (tables, written)}
        values = [_cell_text(row.get(m)) for m in METHODS]
        lines.append(f"| {tables} | {written} | " + " | ".join(values) + " |")
    lines.append("")
    lines.append("Samples per cell: " + ", ".join(
        f"{METHOD_LABELS[m]} {n}" for m, n in _sample_counts(cells).items()
    ) + ". NOT CLEAN marks a method that did not restore every row count and sequence.")
    return "\n".join(lines)


def _cell_text(cell: Cell | None) -> str:
    if cell is None or not cell.samples:
        return "-"
    text = f"{ms(percentile(cell.samples, 50))} / {ms(percentile(cell.samples, 95))}"
    return text if cell.clean else text + " NOT CLEAN"


def _sample_counts(cells: list[Cell]) -> dict[str, int]:
    return {m: max((len(c.samples) for c in cells if c.method == m), default=0) for m in METHODS}


def targets(runs: list[RunResult], cells: list[Cell], base_tests: int,
            small: Sequence[RunResult] = ()) -> list[str]:
    """Issue 12's targets, as met or not in this run."""
    lines = []
    for method, limit in (("ours", 0.5), ("ours-no-replica", 1.0)):
        cell = next((c for c in cells if (c.tables, c.method, c.written) == (35, method, 5)), None)
        if cell is not None:
            p50 = percentile(cell.samples, 50) * 1000
            lines.append(f"- {METHOD_LABELS[method]} p50, 5 of 35 tables written: {p50:.2f} ms "
                         f"(target <= {limit:g} ms): {'met' if p50 <= limit else 'NOT met'}")
    base = _baseline(runs)
    for key, want in (("rollback", "<= 1.0x"), ("classic", ">= 10x faster")):
        other = _passed(runs, key, base_tests)
        if base and other is not None:
            ratio = other.seconds / base
            met = ratio >= 1.0 if key == "rollback" else ratio >= 10
            lines.append(f"- ours -n 2 warm vs {other.contender.label}: {base / other.seconds:.2f}x its "
                         f"time, {ratio:.1f}x faster (target {want}): {'met' if met else 'NOT met'}")
    hand = _passed(small, "small-" + SMALL_BASELINE, None)
    for key in ("small-ours-1-cold", "small-ours-1-warm"):
        ours = _passed(small, key, None)
        if hand is not None and ours is not None:
            lines.append(f"- small suite, {key.removeprefix('small-')}: {ours.seconds:.2f} s vs "
                         f"{hand.contender.label} {hand.seconds:.2f} s (target: not slower): "
                         f"{'met' if ours.seconds <= hand.seconds else 'NOT met'}")
    if lines and base_tests != 300:
        lines.append(f"- (the targets are set for 35 tables / 300 tests; this run has {base_tests} tests)")
    return lines or ["- not measured at this size"]


def _passed(runs: Sequence[RunResult], key: str, tests: int | None) -> RunResult | None:
    return next((r for r in runs if r.contender.key == key and r.status == "passed"
                 and (tests is None or r.tests == tests)), None)


def chart(path: Path, meta: Meta, runs: list[RunResult], cells: list[Cell]) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(15, 6.5), gridspec_kw={"width_ratios": [1.1, 1]})
    _wall_panel(left, meta, [r for r in runs if r.status == "passed"
                             and (r.tests == meta.tests or r.contender.collect_only)])
    _reset_panel(right, cells)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def _wall_panel(ax: Axes, meta: Meta, runs: list[RunResult]) -> None:
    runs = sorted(runs, key=lambda r: r.seconds, reverse=True)
    labels = [f"{r.contender.label} [{r.contender.processes}, {r.contender.template}]" for r in runs]
    colors = [FLOOR_COLOR if r.contender.collect_only else OURS_COLOR if r.contender.kind == "ours"
              else OTHER_COLOR for r in runs]
    bars = ax.barh(range(len(runs)), [r.seconds for r in runs], color=colors)
    ax.set_yticks(range(len(runs)), labels, fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("wall time, seconds (log scale)")
    ax.set_title(f"{meta.tests} async tests, {meta.tables} tables: wall time")
    for bar, r in zip(bars, runs, strict=True):
        ax.text(bar.get_width() * 1.05, bar.get_y() + bar.get_height() / 2, f"{r.seconds:.1f} s",
                va="center", fontsize=8)
    ax.set_xlim(right=max((r.seconds for r in runs), default=1) * 3)


def _reset_panel(ax: Axes, cells: list[Cell]) -> None:
    keys = list(dict.fromkeys((c.tables, c.written) for c in cells))
    width = 0.8 / len(METHODS)
    colors = (OURS_COLOR, "#90e0ef", "#f4a261", "#e76f51")
    for i, (method, color) in enumerate(zip(METHODS, colors, strict=True)):
        values = []
        for key in keys:
            cell = next((c for c in cells if (c.tables, c.written) == key and c.method == method), None)
            values.append(percentile(cell.samples, 50) * 1000 if cell and cell.samples else 0.0)
        ax.bar([k + i * width for k in range(len(keys))], values, width, label=METHOD_LABELS[method],
               color=color)
    ax.set_xticks([k + 0.4 - width / 2 for k in range(len(keys))], [f"{t}/{w}" for t, w in keys],
                  fontsize=8)
    ax.set_xlabel("tables existing / tables written by the test")
    ax.set_yscale("log")
    ax.set_ylabel("reset latency p50, ms (log scale)")
    ax.set_title("one reset after a test")
    ax.legend(fontsize=8)
