"""bench/demo_learning.py's scoring: rise, peak, minimum after halfway, intervals, targets."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest


def _bench() -> ModuleType:
    path = Path(__file__).resolve().parents[2] / "bench" / "demo_learning.py"
    spec = importlib.util.spec_from_file_location("demo_learning_bench", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _records(curve: list[tuple[int, float]], n: int = 200) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for step in range(1, curve[-1][0] + 1):
        out.append({"step": step, "loss_balance": 0.0, "time": 1000.0 + 2.0 * step})
    for step, acc in curve:
        out.append({"step": step, "version": step, "accuracy": acc, "eval_size": n})
    return sorted(out, key=lambda r: (r["step"], "accuracy" in r))


def test_score_reads_start_end_peak_and_the_late_minimum() -> None:
    bench = _bench()
    curve = [(0, 0.30), (10, 0.25), (20, 0.50), (30, 0.29), (40, 0.45)]
    row = bench.score_run(_records(curve), steps=40)
    assert row["start"]["accuracy"] == 0.30 and row["end"]["accuracy"] == 0.45
    assert row["rise"] == pytest.approx(0.15)
    assert row["peak"]["accuracy"] == 0.50 and row["peak"]["step"] == 20
    # The dip at step 10 is before halfway; the one at step 30 is after it and counts.
    assert row["min_after_half"]["step"] == 30
    assert row["below_start_after_half"]
    assert row["train_s"] == pytest.approx(78.0)  # steps 1..40, 2 s apart
    lo, hi = row["start"]["low"], row["start"]["high"]
    assert lo < 0.30 < hi and hi - lo == pytest.approx(0.126, abs=0.005)  # 200 problems


def test_targets_need_the_mean_every_seed_and_no_late_dip() -> None:
    bench = _bench()
    good = [(0, 0.30), (20, 0.42), (40, 0.48)]
    weak = [(0, 0.30), (20, 0.38), (40, 0.38)]  # +8 points only
    rows = [bench.score_run(_records(c), 40) for c in (good, good, good)]
    assert all(bench.verdict(rows).values())
    rows[2] = bench.score_run(_records(weak), 40)
    checks = bench.verdict(rows)
    assert not checks["every_seed_rise_ge_10"] and checks["never_below_start_after_half"]
    with pytest.raises(ValueError, match="no held-out evaluation"):
        bench.score_run([{"step": 1, "loss_balance": 0.0, "time": 1.0}], 40)
