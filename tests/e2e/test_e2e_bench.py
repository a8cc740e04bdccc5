"""bench/e2e.py, shortened: two staleness settings, few steps, its accounting checked.

Runs the real system (`asympo up`'s launcher: weights, reward, rollout on vLLM, learner
as processes) twice against the test Redis, then ``train_step`` alone on the same
batches. The engine-alone timing is left to the full bench (one more vLLM start).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def load_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_e2e", ROOT / "bench" / "e2e.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_e2e"] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.timeout(1500)
def test_short_e2e_bench_accounts_for_every_setting(tmp_path: Path, redis_url: str) -> None:
    bench = load_bench()
    model = bench.build_untrained_tiny(tmp_path / "model")
    cfg = bench.BenchConfig(
        staleness=[0, 2],
        steps=3,
        warmup=1,
        groups=2,
        samples=4,
        max_tokens=8,
        isolate_engine=False,
        isolate_reps=1,
        model=model,
        work_dir=tmp_path / "runs",
    )
    rep = bench.run_bench(cfg, url=redis_url, log=print)
    rows = rep["settings"]
    assert [r["max_staleness"] for r in rows] == [0, 2]
    # Same trained sample count in every setting: the comparison is like for like.
    assert {r["samples"] for r in rows} == {3 * 2 * 4}
    for r in rows:
        assert r["samples_per_s"] > 0
        assert 0.0 <= r["learner_busy"] <= 1.0
        assert r["generator_busy"] is not None and 0.0 <= r["generator_busy"] <= 1.0
        assert r["staleness_mean"] <= r["max_staleness"]
        # busy + waiting cannot exceed the step's wall time
        assert r["step_train_s"] > 0
    assert rows[0]["staleness_mean"] == 0.0  # max_staleness 0 is truly synchronous
    assert rows[0]["ratio_to_sync"] == pytest.approx(1.0)
    assert rep["stages"]["train_s_per_sample"] > 0
    # The verifiers alone on the same responses: the pipeline's third stage.
    assert rep["stages"]["reward_s_per_sample"] > 0
    assert set(rep["stage_limits_samples_per_s"]) == {"train", "reward"}
    # The learner's publish latency was scraped: its background part is the sync hand-off.
    assert all(r["publish_latency_s"] is not None and r["publish_latency_s"] > 0 for r in rows)
    assert rep["stages"]["publish_handoff_s"] >= 0.0
    text = bench.render(rep)
    assert "samples/s" in text and "stages alone" in text
