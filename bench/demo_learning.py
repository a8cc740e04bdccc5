"""Does the demo learn? ``asympo up`` (what ``make demo`` runs) for several seeds, scored.

Each seed is one whole-system run: ``asympo up --no-live --steps N --set learner.seed=S``
plus any ``--set`` given here, on the shipped tiny model (the same warm start for every
seed: the RL seed does not change the base model). From each run's metrics.jsonl:

* start / end / peak held-out greedy accuracy with Wilson 95 % intervals (the eval
  records carry ``eval_size``), the rise end - start in points;
* the minimum over the evaluations after the halfway step, and whether it fell below
  the start;
* wall time of the whole command and training time (first to last learner step).

Targets (issue 16): mean rise >= 15 points over the seeds, every seed >= 10, no seed
below its start at an evaluation after halfway, training within 300 s. Note the
machine's load next to the figures: the runs share the cores with whatever else runs.

    .venv/bin/python bench/demo_learning.py [--seeds 0,1,2] [--steps 40]
                                            [--set learner.lr=2e-4 ...] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from asympo.run_log import METRICS_FILE, read_metrics, wilson_interval

TARGET_MEAN_RISE = 0.15
TARGET_MIN_RISE = 0.10
TARGET_TRAIN_S = 300.0


def score_run(records: list[dict[str, Any]], steps: int) -> dict[str, Any]:
    """Accuracy figures of one run's metrics records (see the module docstring)."""
    evals = [r for r in records if isinstance(r.get("accuracy"), int | float) and "step" in r]
    if not evals:
        raise ValueError("the run wrote no held-out evaluation (learner.eval_every = 0?)")
    trained = [r for r in records if "loss_balance" in r and isinstance(r.get("time"), float)]

    def point(rec: dict[str, Any]) -> dict[str, Any]:
        acc = float(rec["accuracy"])
        n = int(rec.get("eval_size") or 0)
        lo, hi = wilson_interval(acc, n) if n else (acc, acc)
        return {"step": int(rec["step"]), "accuracy": acc, "low": lo, "high": hi, "n": n}

    start, end = point(evals[0]), point(evals[-1])
    peak = point(max(evals, key=lambda r: float(r["accuracy"])))
    late = [point(r) for r in evals if int(r["step"]) > steps / 2]
    late_min = min(late, key=lambda p: p["accuracy"]) if late else end
    return {
        "start": start,
        "end": end,
        "peak": peak,
        "rise": end["accuracy"] - start["accuracy"],
        "min_after_half": late_min,
        "below_start_after_half": late_min["accuracy"] < start["accuracy"],
        "train_s": (trained[-1]["time"] - trained[0]["time"]) if len(trained) > 1 else None,
        "steps": max((int(r.get("step", 0)) for r in records), default=0),
        "curve": [(p["step"], p["accuracy"]) for p in map(point, evals)],
    }


def run_seed(seed: int, steps: int, overrides: list[str], prefix: str) -> dict[str, Any]:
    """One ``asympo up`` run for ``seed``; its scored metrics plus the command's wall time."""
    run_id = f"{prefix}-s{seed}"
    cmd = [
        sys.executable, "-m", "asympo.cli", "up", "--no-live", "--steps", str(steps),
        "--run-id", run_id, "--set", f"learner.seed={seed}",
        *(arg for o in overrides for arg in ("--set", o)),
    ]  # fmt: skip
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.monotonic() - start
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-20:])
        raise SystemExit(f"seed {seed}: asympo up exited {proc.returncode}:\n{tail}")
    records = read_metrics(Path("runs") / run_id / METRICS_FILE)
    return {"seed": seed, "run_id": run_id, "wall_s": wall, **score_run(records, steps)}


def verdict(rows: list[dict[str, Any]]) -> dict[str, bool]:
    """Each target of the issue: met or not."""
    rises = [r["rise"] for r in rows]
    train = [r["train_s"] for r in rows if r["train_s"] is not None]
    return {
        "mean_rise_ge_15": sum(rises) / len(rises) >= TARGET_MEAN_RISE,
        "every_seed_rise_ge_10": min(rises) >= TARGET_MIN_RISE,
        "never_below_start_after_half": not any(r["below_start_after_half"] for r in rows),
        "train_within_300s": bool(train) and max(train) <= TARGET_TRAIN_S,
    }


def _interval(p: dict[str, Any]) -> str:
    return f"{p['accuracy']:.3f} [{p['low']:.3f},{p['high']:.3f}]"


def print_table(rows: list[dict[str, Any]], checks: dict[str, bool], load: str) -> None:
    """Human-readable table, one row per seed, then the targets."""
    head = (
        f"{'seed':>4}  {'start [95% CI]':>22}  {'end [95% CI]':>22}  {'rise':>6}  "
        f"{'peak (step)':>12}  {'min after half':>14}  {'train s':>7}  {'wall s':>6}"
    )
    print(head)
    for r in rows:
        train = f"{r['train_s']:.0f}" if r["train_s"] is not None else "—"
        print(
            f"{r['seed']:>4}  {_interval(r['start']):>22}  {_interval(r['end']):>22}  "
            f"{100 * r['rise']:>+5.1f}p  "
            f"{r['peak']['accuracy']:.3f} ({r['peak']['step']:>2})  "
            f"{r['min_after_half']['accuracy']:>14.3f}  {train:>7}  {r['wall_s']:>6.0f}"
        )
    mean = sum(r["rise"] for r in rows) / len(rows)
    print(f"mean rise {100 * mean:+.1f} points over {len(rows)} seeds; load: {load}")
    for name, ok in checks.items():
        print(f"  {'PASS' if ok else 'FAIL'}  {name}")


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run every seed, print the table (or JSON)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated learner seeds")
    parser.add_argument("--steps", type=int, default=40, help="learner steps per run")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="setting override passed to asympo up (repeatable)")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    prefix = time.strftime("demo-learning-%Y%m%d-%H%M%S")
    load_before = os.getloadavg()
    rows = [run_seed(seed, args.steps, args.overrides, prefix) for seed in seeds]
    load_after = os.getloadavg()
    checks = verdict(rows)
    load = f"1-min load avg {load_before[0]:.1f} before, {load_after[0]:.1f} after"
    if args.json:
        out = {"steps": args.steps, "overrides": args.overrides, "load": load}
        print(json.dumps(out | {"seeds": rows, "targets": checks}, indent=2))
    else:
        print_table(rows, checks, load)
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
