"""Summaries of the staleness experiment: per-cell statistics, a Markdown table, JSON, plots.

A *cell* is one (loss, staleness) pair; its runs are the seeds. Statistics per cell:

* final held-out greedy accuracy, mean and sample std over seeds;
* collapsed: seeds whose final accuracy is below the warm start's;
* mean ``|loss balance|`` over all steps (``sum_{A>0} L_i + sum_{A<0} L_i``, the learner's
  own statistic) and the same relative to the step's loss scale ``sum_i |L_i|``
  (``|loss_positive| + |loss_negative|``), comparable across losses;
* mean current-policy NLL of positive and of negative responses, weighted by how many
  there were in each step.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from asympo.experiments.staleness import RunResult, StalenessConfig

DISCUSSION_HEADING = "## Discussion"


@dataclass(frozen=True)
class CellSummary:
    """Statistics of one (loss, staleness) cell over its seeds."""

    loss: str
    staleness: int
    seeds: int
    final_accuracy_mean: float
    final_accuracy_std: float
    collapsed: int
    mean_abs_balance: float
    mean_rel_balance: float
    mean_loss_scale: float
    nll_positive: float
    nll_negative: float
    reward_mean: float
    signal_fraction: float
    final_entropy: float
    update_norm_positive: float = math.nan
    update_norm_negative: float = math.nan
    update_share_positive: float = math.nan


def _weighted_mean(values: Sequence[float], weights: Sequence[float]) -> float:
    total = sum(weights)
    return sum(v * w for v, w in zip(values, weights, strict=True)) / total if total else math.nan


def summarise_cell(runs: Sequence[RunResult], warm_accuracy: float) -> CellSummary:
    """Aggregate the seeds of one cell (all ``runs`` share loss and staleness)."""
    if not runs:
        raise ValueError("a cell needs at least one run")
    finals = [r.accuracy[-1][1] for r in runs]
    steps = [s for r in runs for s in r.steps]
    scales = [abs(s["loss_positive"]) + abs(s["loss_negative"]) for s in steps]
    rel = [abs(s["loss_balance"]) / sc for s, sc in zip(steps, scales, strict=True) if sc > 0]
    return CellSummary(
        loss=runs[0].loss,
        staleness=runs[0].staleness,
        seeds=len(runs),
        final_accuracy_mean=statistics.fmean(finals),
        final_accuracy_std=statistics.stdev(finals) if len(finals) > 1 else 0.0,
        collapsed=sum(f < warm_accuracy for f in finals),
        mean_abs_balance=statistics.fmean(abs(s["loss_balance"]) for s in steps),
        mean_rel_balance=statistics.fmean(rel) if rel else 0.0,
        mean_loss_scale=statistics.fmean(scales),
        nll_positive=_weighted_mean(
            [s["nll_positive"] for s in steps], [s["responses_positive"] for s in steps]
        ),
        nll_negative=_weighted_mean(
            [s["nll_negative"] for s in steps], [s["responses_negative"] for s in steps]
        ),
        reward_mean=statistics.fmean(s["reward_mean"] for s in steps),
        signal_fraction=1.0
        - sum(s["zero_adv_groups"] for s in steps) / max(sum(s["groups"] for s in steps), 1.0),
        final_entropy=statistics.fmean(r.steps[-1]["entropy"] for r in runs),
        update_norm_positive=_mean_of(steps, "update_norm_positive"),
        update_norm_negative=_mean_of(steps, "update_norm_negative"),
        update_share_positive=_mean_of(steps, "update_share_positive"),
    )


def _mean_of(steps: Sequence[dict[str, float]], key: str) -> float:
    """Mean of ``key`` over the steps (NaN for runs recorded before it existed)."""
    values = [s[key] for s in steps if key in s]
    return statistics.fmean(values) if values else math.nan


def summarise(runs: Sequence[RunResult], warm_accuracy: float) -> list[CellSummary]:
    """One summary per (loss, staleness) cell, in the order cells first appear in ``runs``."""
    cells: dict[tuple[str, int], list[RunResult]] = {}
    for r in runs:
        cells.setdefault((r.loss, r.staleness), []).append(r)
    return [summarise_cell(rs, warm_accuracy) for rs in cells.values()]


def mean_curve(runs: Sequence[RunResult]) -> tuple[list[int], list[float], list[float]]:
    """Versions, mean and std over seeds of the accuracy curve (versions common to all runs)."""
    common = set.intersection(*(set(v for v, _ in r.accuracy) for r in runs))
    versions = sorted(common)
    means, stds = [], []
    for v in versions:
        vals = [dict(r.accuracy)[v] for r in runs]
        means.append(statistics.fmean(vals))
        stds.append(statistics.stdev(vals) if len(vals) > 1 else 0.0)
    return versions, means, stds


def _fmt(x: float, digits: int = 3) -> str:
    return "—" if math.isnan(x) else f"{x:.{digits}f}"


def markdown_table(cells: Sequence[CellSummary], warm_accuracy: float) -> str:
    """The results table, one row per cell, grouped by staleness."""
    head = (
        "| staleness k | loss | final accuracy (mean ± std) | Δ vs warm start | collapsed "
        "| mean \\|balance\\| | \\|balance\\| / scale | NLL⁺ | NLL⁻ | NLL⁻ / NLL⁺ "
        "| ‖∂L/∂z‖⁺ | ‖∂L/∂z‖⁻ | update share⁺ | reward | groups with signal |\n"
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    rows = []
    for c in sorted(cells, key=lambda c: (c.staleness, _loss_order(c.loss))):
        ratio = c.nll_negative / c.nll_positive if c.nll_positive > 0 else math.nan
        rows.append(
            f"| {c.staleness} | `{c.loss}` | {c.final_accuracy_mean:.3f} ± "
            f"{c.final_accuracy_std:.3f} | {c.final_accuracy_mean - warm_accuracy:+.3f} "
            f"| {c.collapsed}/{c.seeds} | {c.mean_abs_balance:.2e} | {c.mean_rel_balance:.2e} "
            f"| {_fmt(c.nll_positive)} | {_fmt(c.nll_negative)} | {_fmt(ratio, 2)} "
            f"| {_fmt(c.update_norm_positive, 4)} | {_fmt(c.update_norm_negative, 4)} "
            f"| {_fmt(c.update_share_positive, 2)} "
            f"| {c.reward_mean:.3f} | {c.signal_fraction:.1%} |"
        )
    return head + "\n".join(rows) + "\n"


_LOSS_ORDER = ("asympo", "spo", "reinforce", "grpo", "tis")


def _loss_order(name: str) -> int:
    return _LOSS_ORDER.index(name) if name in _LOSS_ORDER else len(_LOSS_ORDER)


def plot_accuracy(
    runs: Sequence[RunResult], warm_accuracy: float, out: Path, title: str = ""
) -> Path:
    """One panel per staleness, one line per loss: mean held-out accuracy vs policy version."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = sorted({r.staleness for r in runs})
    losses = sorted({r.loss for r in runs}, key=_loss_order)
    cols = min(len(ks), 4)
    rows = math.ceil(len(ks) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax, k in zip(axes.flat, ks, strict=False):
        for loss in losses:
            cell = [r for r in runs if r.staleness == k and r.loss == loss]
            if not cell:
                continue
            versions, mean, std = mean_curve(cell)
            (line,) = ax.plot(versions, mean, label=loss, marker=".")
            lo = [m - s for m, s in zip(mean, std, strict=True)]
            hi = [m + s for m, s in zip(mean, std, strict=True)]
            ax.fill_between(versions, lo, hi, color=line.get_color(), alpha=0.12)
        ax.axhline(warm_accuracy, color="grey", linestyle="--", linewidth=1, label="warm start")
        ax.set_title(f"staleness k = {k}")
        ax.set_xlabel("learner step (policy version)")
        ax.set_ylabel("held-out greedy accuracy")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(ks) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_balance(cells: Sequence[CellSummary], out: Path) -> Path:
    """Relative loss balance and the NLL⁻/NLL⁺ ratio against staleness, one line per loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    for loss in sorted({c.loss for c in cells}, key=_loss_order):
        mine = sorted((c for c in cells if c.loss == loss), key=lambda c: c.staleness)
        ks = [c.staleness for c in mine]
        # A floor keeps exact zeros visible on the log axis.
        left.plot(ks, [max(c.mean_rel_balance, 1e-9) for c in mine], marker="o", label=loss)
        ratio = [c.nll_negative / c.nll_positive if c.nll_positive > 0 else math.nan for c in mine]
        right.plot(ks, ratio, marker="o", label=loss)
    left.set_yscale("log")
    left.set_xlabel("staleness k")
    left.set_ylabel("mean |balance| / loss scale")
    left.set_title("loss balance (0 = zero-sum groups)")
    right.set_xlabel("staleness k")
    right.set_ylabel("NLL⁻ / NLL⁺ (current policy)")
    right.set_title("scale imbalance of stale responses")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    left.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


DYNAMICS = (
    ("entropy", "entropy of completion tokens (nats)"),
    ("update_share_positive", "update share of positives (‖∂L/∂z‖⁺ / total)"),
    ("reward_mean", "sampled reward"),
)


def mean_step_curve(runs: Sequence[RunResult], key: str, window: int = 10) -> list[float]:
    """``key`` per step averaged over ``runs`` (seeds), then a trailing mean over ``window``."""
    steps = min(len(r.steps) for r in runs)
    per_step = [statistics.fmean(r.steps[t][key] for r in runs) for t in range(steps)]
    return [statistics.fmean(per_step[max(0, t - window + 1) : t + 1]) for t in range(steps)]


def plot_dynamics(runs: Sequence[RunResult], out: Path) -> Path:
    """Entropy, update split and reward over the steps, one line per (loss, staleness)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(DYNAMICS), figsize=(4.4 * len(DYNAMICS), 3.4))
    ks = sorted({r.staleness for r in runs})
    for loss in sorted({r.loss for r in runs}, key=_loss_order):
        for k in ks:
            cell = [r for r in runs if r.loss == loss and r.staleness == k and r.steps]
            if not cell:
                continue
            label = loss if len(ks) == 1 else f"{loss} k={k}"
            for ax, (key, _) in zip(axes, DYNAMICS, strict=True):
                curve = mean_step_curve(cell, key)
                ax.plot(range(1, len(curve) + 1), curve, label=label)
    for ax, (_, title) in zip(axes, DYNAMICS, strict=True):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("learner step")
        ax.grid(alpha=0.3)
    axes[1].axhline(0.5, color="grey", linestyle="--", linewidth=1)
    axes[0].legend(fontsize=8)
    fig.suptitle("mean over seeds, trailing mean over 10 steps", fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return float(f"{value:.6g}") if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_rounded(v) for v in value]
    return value


def results_json(
    cfg: StalenessConfig,
    runs: Sequence[RunResult],
    cells: Sequence[CellSummary],
    warm_accuracy: float,
    model_path: str,
    command: str,
) -> dict[str, Any]:
    """Everything the Markdown shows and the raw per-step runs, as one JSON-ready dict."""
    return _rounded(
        {
            "experiment": "staleness",
            "command": command,
            "config": cfg.as_dict(),
            "budget_key": cfg.budget_key(model_path),
            "samples_per_run": cfg.samples_per_run(),
            "model_path": model_path,
            "warm_start_accuracy": warm_accuracy,
            "cells": [asdict(c) for c in cells],
            "runs": [
                {
                    "loss": r.loss,
                    "staleness": r.staleness,
                    "seed": r.seed,
                    "seconds": r.seconds,
                    "accuracy": r.accuracy,
                    "summary": asdict(summarise_cell([r], warm_accuracy)),
                }
                for r in runs
            ],
        }
    )


def _schedule_note(cfg: StalenessConfig) -> str:
    """The schedule and entropy bonus of the runs, when they differ from the defaults."""
    parts = []
    if cfg.warmup_steps:
        parts.append(f"a {cfg.warmup_steps}-step linear warm-up")
    if cfg.lr_decay_steps:
        parts.append(f"a cosine decay over {cfg.lr_decay_steps} steps to {cfg.min_lr_ratio}× lr")
    if cfg.entropy_coef:
        parts.append(f"entropy bonus {cfg.entropy_coef}")
    if cfg.kl_coef:
        parts.append(f"KL penalty {cfg.kl_coef} towards the warm start")
    return f" ({', '.join(parts)})" if parts else ""


def _manifest_note(model_path: str) -> str:
    """What the tiny model's manifest says about its warm start, if it has one."""
    file = Path(model_path) / "asympo_model.json"
    if not file.is_file():
        return ""
    try:
        manifest = json.loads(file.read_text())
        return (
            f" (tiny model, {manifest['parameters'] / 1e6:.2f} M parameters, supervised warm "
            f"start of {manifest['warm_start_steps']} steps in {manifest['warm_start_seconds']} s)"
        )
    except (ValueError, KeyError, TypeError):
        return ""


def _missing_note(missing: Sequence[tuple[str, int, int]]) -> str:
    if not missing:
        return ""
    names = ", ".join(f"{loss}/k={k}/seed={seed}" for loss, k, seed in missing)
    return (
        f"\n**Incomplete grid**: {len(missing)} runs did not finish and are not in the "
        f"table: {names}.\n"
    )


def _existing_discussion(path: Path) -> str:
    if not path.is_file():
        return ""
    text = path.read_text()
    index = text.find(DISCUSSION_HEADING)
    return text[index:] if index != -1 else ""


def write_report(
    cfg: StalenessConfig,
    runs: Sequence[RunResult],
    warm_accuracy: float,
    out_dir: Path,
    model_path: str,
    command: str,
    stem: str = "staleness",
    missing: Sequence[tuple[str, int, int]] = (),
) -> dict[str, Path]:
    """Write ``<stem>.md``, ``<stem>_results.json`` and the two ``<stem>_*.png`` plots.

    A ``## Discussion`` section already in ``<stem>.md`` is kept (written by a person).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    cells = summarise(runs, warm_accuracy)
    paths = {
        "markdown": out_dir / f"{stem}.md",
        "json": out_dir / f"{stem}_results.json",
        "accuracy_png": out_dir / f"{stem}_accuracy.png",
        "balance_png": out_dir / f"{stem}_balance.png",
        "dynamics_png": out_dir / f"{stem}_dynamics.png",
    }
    paths["json"].write_text(
        json.dumps(results_json(cfg, runs, cells, warm_accuracy, model_path, command)) + "\n"
    )
    plot_accuracy(runs, warm_accuracy, paths["accuracy_png"])
    plot_balance(cells, paths["balance_png"])
    plot_dynamics(runs, paths["dynamics_png"])
    seconds = sum(r.seconds for r in runs)
    lr_text = f"{cfg.lr}{_schedule_note(cfg)}"
    body = f"""# Staleness experiment: ASymPO vs. naive and behaviour-corrected losses

Every run trains the model `{model_path}`{_manifest_note(model_path)} (held-out greedy
accuracy **{warm_accuracy:.3f}** on the first {cfg.eval_size} test problems) on the
`{cfg.task}` task with the learner's own step
(`asympo.rl.training.train_step`). Staleness is forced exactly: at step t the groups are
sampled from the policy snapshot of version max(0, t − k), scored by the task's verifier,
and the current policy (version t) is trained on them. `grpo` (PPO-clip) and `tis`
(truncated importance sampling) receive the sampling snapshot's per-token log-probs;
`asympo`, `spo` and `reinforce` receive none.

Budget, identical for every cell: {cfg.steps} steps × {cfg.groups_per_step} prompts ×
{cfg.samples_per_group} samples = {cfg.samples_per_run()} samples per run; AdamW lr {lr_text},
grad-clip {cfg.grad_clip}, `{cfg.advantage}` advantages, sequence-mean aggregation,
temperature 1 (full softmax), at most {cfg.max_tokens} new tokens; held-out greedy accuracy
on {cfg.eval_size} problems every {cfg.eval_every} steps; seeds {list(cfg.seeds)} (the seed
fixes the prompts and the sampling noise, shared by every loss). {len(runs)} runs,
{seconds / 60:.1f} min of compute.

Reproduce:

```
{command}
```

## Results
{_missing_note(missing)}
{markdown_table(cells, warm_accuracy)}
*collapsed*: seeds whose final accuracy is below the warm start's. *balance*: the
learner's `loss_balance` = Σ_(A>0) L_i + Σ_(A<0) L_i per step (per-response losses,
sequence-mean); *scale*: |Σ_(A>0) L_i| + |Σ_(A<0) L_i|. *NLL⁺ / NLL⁻*: mean per-token NLL
under the current policy of positive / negative-advantage responses. *‖∂L/∂z‖⁺ / ‖∂L/∂z‖⁻*:
mean per step of the loss gradient's norm at the logits summed over the tokens of positive
/ negative-advantage responses (the update split: how hard each side pulls the policy;
the balance above is zero by construction under ASymPO, this is not); *update share⁺*:
the positive side's share of their sum (0.5 = balanced). *reward*: mean
reward of the trained samples; *groups with signal*: share of groups whose rewards are not
all equal (the others have zero advantage and train nothing).

![held-out accuracy vs step, one panel per staleness]({paths["accuracy_png"].name})

![loss balance and NLL ratio vs staleness]({paths["balance_png"].name})

![entropy, update split and reward over the steps]({paths["dynamics_png"].name})

Machine-readable: [`{paths["json"].name}`]({paths["json"].name}) (configuration,
cell statistics, every run's accuracy curve and statistics; the per-step learner
statistics of every run are in the work directory's `runs*.jsonl`).

"""
    discussion = _existing_discussion(paths["markdown"])
    paths["markdown"].write_text(body + discussion if discussion else body)
    return paths
