"""`asympo plan`: size a cluster before renting it, with the pipeline model.

Per-stage figures come from a bench/e2e.py JSON report (measured on this machine: its
``stages`` block), or from stated GPU assumptions (``pipeline_model.GPU_ASSUMPTIONS``),
each overridable on the command line.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from asympo.pipeline_model import GPU_ASSUMPTIONS, ClusterFigures, plan_table


class PlanError(ValueError):
    """A user mistake in the plan's inputs (one line, no traceback)."""


def figures_from_report(path: Path) -> ClusterFigures:
    """Per-device figures from a bench/e2e.py ``--json`` report's ``stages`` block."""
    try:
        report = json.loads(path.read_text())
        stages = report["stages"]
        return ClusterFigures(
            generate_s_per_sample=float(stages["generate_s_per_sample"]),
            train_s_per_sample=float(stages["train_s_per_sample"]),
            reward_s_per_sample=float(stages.get("reward_s_per_sample", 0.0)),
            publish_s=float(stages.get("publish_s", 0.0)),
            swap_s=float(stages.get("swap_s", 0.0)),
            source=f"measured: {path}",
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PlanError(f"cannot read stage figures from {path}: {exc}") from exc


def parse_counts(text: str, what: str) -> list[int]:
    """``"1,2,4"`` -> ``[1, 2, 4]``; every count >= 1."""
    try:
        counts = [int(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise PlanError(f"{what}: expected comma-separated integers, got {text!r}") from exc
    if not counts or min(counts) < 1:
        raise PlanError(f"{what}: every count must be >= 1, got {text!r}")
    return counts


def build_figures(report: Path | None, overrides: dict[str, float | None]) -> ClusterFigures:
    """The figures of ``report`` (else the GPU assumptions) with ``overrides`` applied."""
    figures = figures_from_report(report) if report is not None else GPU_ASSUMPTIONS
    changes: dict[str, Any] = {k: v for k, v in overrides.items() if v is not None}
    for key, value in changes.items():
        if value < 0:
            raise PlanError(f"--{key.replace('_', '-')} must be >= 0, got {value}")
    if changes:
        figures = dataclasses.replace(figures, **changes, source=figures.source + " (+ overrides)")
    if figures.generate_s_per_sample <= 0 or figures.train_s_per_sample <= 0:
        raise PlanError("generation and training seconds per sample must be > 0")
    return figures


def render(rows: list[dict[str, Any]], figures: ClusterFigures, batch: int, k: int) -> str:
    """The plan as a plain-text table with its inputs."""
    lines = [
        f"pipeline model, batch {batch} samples/step, max_staleness {k}",
        f"figures ({figures.source}): generate {figures.generate_s_per_sample:.4g} s/sample"
        f" per replica, train {figures.train_s_per_sample:.4g} s/sample per GPU,"
        f" reward {figures.reward_s_per_sample:.4g} s/sample, publish {figures.publish_s:.3g} s,"
        f" swap {figures.swap_s:.3g} s, data-parallel efficiency {figures.dp_efficiency:.2f}",
        "",
        f"{'replicas':>8} {'gpus':>5} {'sync/s':>9} {'async/s':>9} {'speedup':>8}"
        f" {'staleness':>9} {'per device/s':>12}  bottleneck",
    ]
    for r in rows:
        lines.append(
            f"{r['rollout_replicas']:>8} {r['learner_gpus']:>5} {r['sync_samples_per_s']:>9.2f}"
            f" {r['async_samples_per_s']:>9.2f} {r['speedup']:>7.2f}x {r['staleness_mean']:>9.1f}"
            f" {r['samples_per_s_per_gpu']:>12.2f}  {r['bottleneck']}"
        )
    return "\n".join(lines)


def run_plan(
    replicas: str,
    gpus: str,
    batch: int,
    max_staleness: int,
    report: Path | None,
    overrides: dict[str, float | None],
) -> tuple[str, list[dict[str, Any]]]:
    """The plan's table text and rows (raises PlanError on bad input)."""
    if batch < 1:
        raise PlanError(f"--batch must be >= 1, got {batch}")
    if max_staleness < 0:
        raise PlanError(f"--max-staleness must be >= 0, got {max_staleness}")
    figures = build_figures(report, overrides)
    rows = plan_table(
        figures, parse_counts(replicas, "--replicas"), parse_counts(gpus, "--gpus"), batch,
        max_staleness,
    )  # fmt: skip
    return render(rows, figures, batch, max_staleness), rows
