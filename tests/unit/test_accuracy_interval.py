"""Confidence intervals of held-out accuracy: the live table and plot tell a rise from noise."""

from __future__ import annotations

from pathlib import Path

import pytest

from asympo.launcher.live import accuracy_with_interval
from asympo.run_log import wilson_interval


def test_wilson_interval_matches_the_closed_form_and_stays_in_range() -> None:
    lo, hi = wilson_interval(0.34, 200)
    assert (lo, hi) == pytest.approx((0.2779, 0.4081), abs=5e-4)
    assert wilson_interval(0.0, 200)[0] == 0.0 and wilson_interval(0.0, 200)[1] > 0.0
    assert wilson_interval(1.0, 10)[1] == 1.0 and wilson_interval(1.0, 10)[0] < 1.0
    # Four times the problems, about half the width.
    wide, narrow = wilson_interval(0.4, 200), wilson_interval(0.4, 800)
    assert (narrow[1] - narrow[0]) == pytest.approx((wide[1] - wide[0]) / 2, rel=0.05)
    with pytest.raises(ValueError):
        wilson_interval(0.5, 0)


def test_table_cell_shows_the_interval_when_the_record_names_its_size() -> None:
    assert accuracy_with_interval({"accuracy": 0.34, "eval_size": 200}) == "0.340 [0.278, 0.408]"
    assert accuracy_with_interval({"accuracy": 0.34}) == "0.340"  # older metrics files


def test_plot_draws_the_band(tmp_path: Path) -> None:
    from asympo.run_plot import plot_run

    records = [
        {"step": s, "accuracy": a, "eval_size": 200} for s, a in ((0, 0.3), (10, 0.4), (20, 0.5))
    ] + [{"step": s, "reward_mean": 0.2, "loss_balance": 0.0, "staleness_mean": 1.0}
         for s in range(1, 21)]  # fmt: skip
    out = plot_run(records, tmp_path / "plot.png")
    assert out.is_file() and out.stat().st_size > 1000
