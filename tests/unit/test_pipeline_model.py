"""The pipeline model (sync = 1/sum, async = 1/max, shared-core bound) and `asympo plan`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from asympo.cli import app
from asympo.pipeline_model import ClusterFigures, Stage, cluster_stages, plan_table, project
from asympo.plan_cli import PlanError, build_figures, run_plan


def test_sync_is_one_over_the_sum_and_async_one_over_the_max() -> None:
    stages = [Stage("generate", 0.01), Stage("reward", 0.001), Stage("train", 0.004, 0.1)]
    p = project(stages, batch=100, max_staleness=2)
    # step times: generate 1.0 s, reward 0.1 s, train 0.5 s (0.4 + 0.1 publish)
    assert p.sync_samples_per_s == pytest.approx(100 / 1.6)
    assert p.async_samples_per_s == pytest.approx(100 / 1.0)
    assert p.bottleneck == "generate"
    assert p.staleness_mean == 1.0  # generation-bound: trained as they arrive
    assert p.speedup == pytest.approx(1.6)


def test_a_hand_off_slows_only_the_synchronous_pipeline() -> None:
    """The background part of a publish is on the critical path only when stages take turns."""
    plain = [Stage("generate", 0.01), Stage("train", 0.004, 0.1)]
    handed = [Stage("generate", 0.01), Stage("train", 0.004, 0.1, handoff_s=0.4)]
    a, b = project(plain, batch=100, max_staleness=2), project(handed, batch=100, max_staleness=2)
    assert b.sync_samples_per_s == pytest.approx(100 / 1.9)  # 1.0 + (0.4 + 0.1 publish) + 0.4
    assert a.sync_samples_per_s == pytest.approx(100 / 1.5)
    assert b.async_samples_per_s == a.async_samples_per_s == pytest.approx(100 / 1.0)


def test_max_staleness_zero_is_the_synchronous_rate() -> None:
    stages = [Stage("generate", 0.01), Stage("train", 0.02)]
    p = project(stages, batch=10, max_staleness=0)
    assert p.async_samples_per_s == p.sync_samples_per_s


def test_shared_cores_cap_the_async_rate() -> None:
    # Equal stages, each keeping 2 cores busy, on a 2-core machine: running them at once
    # cannot beat taking turns.
    stages = [Stage("generate", 0.01, cores=2), Stage("train", 0.01, cores=2)]
    p = project(stages, batch=10, max_staleness=2, shared_cores=2)
    assert p.core_bound_samples_per_s == pytest.approx(2 / (0.01 * 2 + 0.01 * 2))
    assert p.async_samples_per_s == pytest.approx(p.sync_samples_per_s)
    # one core each: the stages really overlap, the async rate is 1/max
    split = [Stage("generate", 0.01, cores=1), Stage("train", 0.01, cores=1)]
    q = project(split, batch=10, max_staleness=2, shared_cores=2)
    assert q.async_samples_per_s == pytest.approx(100.0)
    assert q.speedup == pytest.approx(2.0)


def test_training_bound_runs_at_the_staleness_bound() -> None:
    p = project([Stage("generate", 0.001), Stage("train", 0.01)], batch=8, max_staleness=4)
    assert p.bottleneck == "train"
    assert p.staleness_mean == 4.0


def test_replicas_divide_generation_and_gpus_training() -> None:
    figures = ClusterFigures(generate_s_per_sample=0.1, train_s_per_sample=0.1, dp_efficiency=1.0)
    one = {s.name: s for s in cluster_stages(figures, 1, 1)}
    four = {s.name: s for s in cluster_stages(figures, 4, 2)}
    assert four["generate"].seconds_per_sample == pytest.approx(0.025)
    assert four["train"].seconds_per_sample == pytest.approx(0.05)
    assert one["train"].seconds_per_sample == pytest.approx(0.1)
    rows = plan_table(figures, [1, 4], [2], batch=10, max_staleness=1)
    assert [r["bottleneck"] for r in rows] == ["generate", "train"]
    assert rows[0]["async_samples_per_s"] == pytest.approx(10.0)  # 1 s of generation a step
    assert rows[1]["async_samples_per_s"] == pytest.approx(20.0)  # 0.5 s of training a step


def test_bad_inputs_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(PlanError):
        run_plan("0", "1", 8, 1, None, {})
    with pytest.raises(PlanError):
        run_plan("1", "1", 8, 1, tmp_path / "missing.json", {})
    with pytest.raises(PlanError):
        build_figures(None, {"train_s_per_sample": -1.0})
    result = CliRunner().invoke(app, ["plan", "--gpus", "a"])
    assert result.exit_code == 2
    assert "Traceback" not in result.output


def test_plan_reads_measured_stages_from_a_bench_report(tmp_path: Path) -> None:
    report = tmp_path / "e2e.json"
    report.write_text(
        json.dumps({"stages": {"generate_s_per_sample": 0.002, "train_s_per_sample": 0.004}})
    )
    result = CliRunner().invoke(
        app, ["plan", "--report", str(report), "--replicas", "1,2", "--gpus", "1", "--json"]
    )
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert [r["rollout_replicas"] for r in rows] == [1, 2]
    assert all(r["bottleneck"] == "train" for r in rows)  # 0.004 s/sample > 0.002
