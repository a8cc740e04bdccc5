"""What ``asympo experiment staleness`` does: build the grid, load the model, run, report."""

from __future__ import annotations

import dataclasses
import shlex
from collections.abc import Callable, Sequence
from pathlib import Path

from asympo.experiments.staleness import QUICK, Policy, StalenessConfig, run_grid
from asympo.experiments.staleness_report import write_report


def parse_names(text: str) -> tuple[str, ...]:
    """``"asympo,spo"`` -> ``("asympo", "spo")`` (blanks ignored)."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


def parse_ints(text: str, what: str) -> tuple[int, ...]:
    """``"0,1,4"`` -> ``(0, 1, 4)``; ValueError naming ``what`` otherwise."""
    try:
        return tuple(int(part) for part in parse_names(text))
    except ValueError as exc:
        raise ValueError(f"{what} must be comma-separated integers, got {text!r}") from exc


def build_config(quick: bool, **overrides: object) -> StalenessConfig:
    """The full (or ``--quick``) grid with the given fields replaced (None = keep)."""
    base = QUICK if quick else StalenessConfig()
    changes = {k: v for k, v in overrides.items() if v is not None}
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def command_line(
    cfg: StalenessConfig, out_dir: Path, work_dir: Path, overrides: Sequence[str] = ()
) -> str:
    """The explicit command that reproduces ``cfg`` (every grid and budget option spelled out)."""
    parts = [
        "asympo experiment staleness",
        f"--losses {','.join(cfg.losses)}",
        f"--staleness {','.join(map(str, cfg.staleness))}",
        f"--seeds {','.join(map(str, cfg.seeds))}",
        f"--steps {cfg.steps}",
        f"--groups {cfg.groups_per_step}",
        f"--samples {cfg.samples_per_group}",
        f"--lr {cfg.lr:g}",
        f"--eval-every {cfg.eval_every}",
        f"--eval-size {cfg.eval_size}",
        f"--threads {cfg.threads}",
        f"--out {out_dir}",
        f"--work-dir {work_dir}",
        *(f"--set {shlex.quote(o)}" for o in overrides),
    ]
    return " \\\n  ".join(parts)


def run_experiment(
    cfg: StalenessConfig,
    model_path: str,
    out_dir: Path,
    work_dir: Path,
    resume: bool = True,
    shard: tuple[int, int] = (0, 1),
    report_only: bool = False,
    log: Callable[[str], None] = print,
    overrides: Sequence[str] = (),
) -> dict[str, Path]:
    """Run this shard's cells (resuming from ``work_dir``) and report into ``out_dir``.

    The report is written when every cell has finished, or with ``report_only`` (no new
    runs; whatever has finished is reported, the missing cells are named). Returns the
    written paths (empty when the grid is still incomplete).
    """
    from asympo.model import load_causal_lm, load_tokenizer

    policy = Policy(load_causal_lm(model_path), load_tokenizer(model_path), model_path)
    outcome = run_grid(
        policy, cfg, work_dir, resume=resume or report_only, shard=shard,
        max_new_runs=0 if report_only else None, log=log,
    )  # fmt: skip
    if outcome.missing and not report_only:
        log(f"{len(outcome.missing)} cells still missing (other shards?): no report yet")
        return {}
    if not outcome.runs:
        log("no finished runs to report")
        return {}
    if outcome.missing:
        log(f"partial report: missing {outcome.missing}")
    return write_report(
        cfg, outcome.runs, outcome.warm_accuracy, out_dir, model_path,
        command_line(cfg, out_dir, work_dir, overrides), missing=outcome.missing,
    )  # fmt: skip


def parse_shard(text: str) -> tuple[int, int]:
    """``"1/2"`` -> ``(1, 2)``; ValueError otherwise."""
    head, sep, tail = text.partition("/")
    try:
        index, count = int(head), int(tail)
    except ValueError as exc:
        raise ValueError(f"--shard must look like i/n (e.g. 0/2), got {text!r}") from exc
    if not sep or not 0 <= index < count:
        raise ValueError(f"--shard must be i/n with 0 <= i < n, got {text!r}")
    return index, count
