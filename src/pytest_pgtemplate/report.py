"""Numbers for the terminal summary, gathered from every process of the run."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .profile import merge as merge_profile
from .runtime import Runtime


@dataclass(slots=True)
class Summary:
    """Plain lists and dicts only: xdist ships it from workers to the controller."""

    templates: list[dict[str, Any]] = field(default_factory=list)
    clone_seconds: list[float] = field(default_factory=list)
    spare_seconds: list[float] = field(default_factory=list)  # spares of earlier runs taken instead
    reset_seconds: dict[str, list[float]] = field(default_factory=dict)
    databases: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    spared: list[str] = field(default_factory=list)  # worker databases left for the next run
    not_spared: list[str] = field(default_factory=list)  # why a worker database was not left
    swept: list[str] = field(default_factory=list)
    pruned: list[str] = field(default_factory=list)
    foreign: list[str] = field(default_factory=list)  # databases tests reached, none of ours used
    clones_created: int = 0  # reset="clone": clones made by CREATE DATABASE
    clones_recycled: int = 0  # ... and used ones brought back by a reset instead
    general_resets: int = 0  # truncate resets that took the general (slower) path
    general_tables: str = ""  # which tables send resets there, and why
    processes: int = 0
    profile: dict[str, Any] = field(default_factory=dict)  # --pgt-profile: see profile.py

    def merge(self, other: dict[str, Any]) -> None:
        for key in ("templates", "clone_seconds", "spare_seconds", "databases", "kept", "spared",
                    "not_spared", "swept", "pruned", "foreign"):
            getattr(self, key).extend(other.get(key, []))
        self.processes += int(other.get("processes", 0))
        self.general_resets += int(other.get("general_resets", 0))
        self.clones_created += int(other.get("clones_created", 0))
        self.clones_recycled += int(other.get("clones_recycled", 0))
        self.general_tables = self.general_tables or str(other.get("general_tables", ""))
        merge_profile(self.profile, other.get("profile", {}))
        for strategy, seconds in other.get("reset_seconds", {}).items():
            self.reset_seconds.setdefault(strategy, []).extend(seconds)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def worker_payload(runtime: Runtime) -> dict[str, Any]:
    template = runtime.timings.template
    return {
        "templates": [] if template is None else [{
            "name": template.name,
            "built": template.built,
            "seconds": template.seconds,
            "worker": runtime.worker,
            "database": runtime.settings.database,
            "caveat": template.caveat,
        }],
        "clone_seconds": list(runtime.timings.clone_seconds),
        "spare_seconds": list(runtime.timings.spare_seconds),
        "reset_seconds": {k: list(v) for k, v in runtime.reset_seconds.items()},
        "databases": [] if runtime.current_name is None else [runtime.current_name],
        "swept": list(runtime.timings.swept),
        "pruned": list(runtime.timings.pruned),
        "general_resets": runtime.general_resets,
        "clones_created": runtime.clone_counts[0],
        "clones_recycled": runtime.clone_counts[1],
        "general_tables": runtime.general_tables,
    }


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def overhead(summary: Summary, wall: float) -> str | None:
    """Database work (template, clones, resets) as a share of the processes' wall time."""
    if not summary.processes or wall <= 0:
        return None
    template = sum(t["seconds"] for t in summary.templates)
    clones = sum(summary.clone_seconds) + sum(summary.spare_seconds)
    resets = sum(sum(v) for v in summary.reset_seconds.values())
    total = template + clones + resets
    share = total / (wall * summary.processes) * 100
    return (f"database overhead: {total:.2f} s (template {template:.2f} s with waits, clones {clones:.2f} s, "
            f"resets {resets:.2f} s) = {share:.0f}% of {summary.processes} process(es) x {wall:.1f} s")


def format_summary(summary: Summary, wall: float = 0.0, keep_templates: int = 0) -> list[str]:
    lines: list[str] = []
    names = dict.fromkeys(t["name"] for t in summary.templates)  # in order of first use
    for name in names:
        seen = [t for t in summary.templates if t["name"] == name]
        built = [t for t in seen if t["built"]]
        database = seen[0].get("database", "default")
        label = "" if database == "default" else f" ({database})"
        if built:
            lines.append(f"template{label} {name}: built in {built[0]['seconds']:.2f} s "
                         f"(by {built[0]['worker']})")
        else:
            caveat = seen[0].get("caveat", "")
            lines.append(f"template{label} {name}: reused" + (f"; {caveat}" if caveat else ""))
    made = [f"{len(seconds)} {how}, {sum(seconds) / len(seconds) * 1000:.0f} ms each on average"
            for seconds, how in ((summary.spare_seconds, "spare(s) of an earlier run taken"),
                                 (summary.clone_seconds, "cloned")) if seconds]
    if made:
        lines.append("worker databases: " + "; ".join(made))
    for strategy, r in sorted(summary.reset_seconds.items()):
        what = "clone waits" if strategy == "clone" else f"resets ({strategy})"
        lines.append(
            f"{what}: {len(r)}, p50 {percentile(r, 0.5) * 1000:.1f} ms, "
            f"p95 {percentile(r, 0.95) * 1000:.1f} ms, max {max(r) * 1000:.1f} ms"
        )
    if summary.clones_created or summary.clones_recycled:
        lines.append(f"clones: {summary.clones_created} created, {summary.clones_recycled} used ones brought "
                     "back by a reset (no schema change seen)")
    if summary.general_resets:
        lines.append(
            f"{summary.general_resets} of the truncate resets took the slower general path, for tables "
            f"that one DELETE per table cannot reset: {summary.general_tables}"
        )
    if (line := overhead(summary, wall)) is not None:
        lines.append(line)
    if summary.swept:
        lines.append(f"swept {len(summary.swept)} leftover database(s) (of dead runs, or spares of an "
                     "older build of a template): "
                     + ", ".join(sorted(summary.swept)))
    if summary.pruned:
        lines.append(f"pruned {len(summary.pruned)} unused template(s) of this project beyond the newest "
                     f"{keep_templates} (--pgt-keep-templates): " + ", ".join(sorted(summary.pruned)))
    if summary.spared:
        lines.append(f"left {len(summary.spared)} spare worker database(s), reset, for the next run to take "
                     "(--pgt-no-spares drops them instead; --pgt-gc drops what is left)")
    for why in dict.fromkeys(summary.not_spared):
        lines.append(f"left no spare for the next run (it clones anew): {why}")
    for url in summary.kept:
        lines.append(f"kept worker database: {url}")
    return lines
