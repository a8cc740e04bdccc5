"""What ``asympo experiment staleness`` does: build the grid, load the model, run, report."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
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


def command_line(cfg: StalenessConfig, out_dir: Path, work_dir: Path) -> str:
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
    ]
    return " \\\n  ".join(parts)


def run_experiment(
    cfg: StalenessConfig,
    model_path: str,
    out_dir: Path,
    work_dir: Path,
    resume: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Path]:
    """Run every cell (resuming from ``work_dir``) and write the report into ``out_dir``."""
    from asympo.model import load_causal_lm, load_tokenizer

    policy = Policy(load_causal_lm(model_path), load_tokenizer(model_path), model_path)
    runs, warm = run_grid(policy, cfg, work_dir, resume=resume, log=log)
    return write_report(cfg, runs, warm, out_dir, model_path, command_line(cfg, out_dir, work_dir))
