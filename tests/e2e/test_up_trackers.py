"""`asympo up` with every tracker, then `asympo eval` on the run's id.

A short run on an untrained tiny model (what is measured here is the plumbing, not
learning): each tracker, read back from its own files, holds the per-step values of
metrics.jsonl; `asympo eval --model <run id>` finds ``runs/<id>/final``, uses the run's
configuration (its chat prompts) and reports maj@k and mean@k with intervals.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from asympo.model.architecture import TinyArchitecture, build_tiny_model
from asympo.model.char_tokenizer import save_char_tokenizer
from asympo.run_log import read_metrics
from tests.tracker_files import metrics_values, mlflow_values, tensorboard_values, wandb_values

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
BACKENDS = [m for m in ("wandb", "tensorboard", "mlflow") if importlib.util.find_spec(m)]


def test_up_with_trackers_then_eval_by_run_id(tmp_path: Path, redis_url: str, run_id: str) -> None:
    if not BACKENDS:
        pytest.skip("no tracker extra installed")
    model = tmp_path / "tiny-untrained"
    arch = TinyArchitecture()
    build_tiny_model(arch, seed=0).save_pretrained(model)
    save_char_tokenizer(model, arch.max_positions)
    runs = tmp_path / "runs"
    run_dir = runs / run_id
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "REDIS_URL": redis_url,
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
    }
    argv = [
        sys.executable, "-m", "asympo.cli", "up", "--steps", "3", "--run-id", run_id,
        "--no-live", "--max-wall", "600",
        "--set", f"run_dir={run_dir}",
        "--set", f"model.path={model}",
        "--set", "rollout.engine=transformers",
        "--set", "task.prompt_format=chat",
        "--set", "task.eval_size=16",
        "--set", "learner.eval_every=2",
        "--set", "learner.groups_per_step=2",
        "--set", "sampling.num_samples=4",
        "--set", f"tracking.backends={json.dumps(BACKENDS)}",
        "--set", "tracking.project=asympo-e2e",
    ]  # fmt: skip
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = read_metrics(run_dir / "metrics.jsonl")
    expected = metrics_values(records)
    assert len([r for r in records if "loss" in r]) == 3
    trackers = run_dir / "trackers"
    seen = {}
    if "wandb" in BACKENDS:
        seen["wandb"] = wandb_values(trackers)[0]
    if "tensorboard" in BACKENDS:
        seen["tensorboard"] = tensorboard_values(trackers / "tensorboard")[0]
    if "mlflow" in BACKENDS:
        seen["mlflow"] = mlflow_values((trackers / "mlruns").resolve().as_uri(), "asympo-e2e")[0]
    for name, values in seen.items():
        assert sorted(values) == sorted(expected), name
        for step, row in expected.items():
            assert values[step] == pytest.approx(row, rel=1e-6, abs=1e-9), (name, step)

    # eval by run id, from the directory that holds runs/
    eval_argv = [
        sys.executable, "-m", "asympo.cli", "eval", "--model", run_id, "--task", "arith",
        "--k", "4", "--n-problems", "6", "--engine", "transformers", "--json",
    ]  # fmt: skip
    proc = subprocess.run(
        eval_argv, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["model"] == str(Path("runs") / run_id / "final")
    assert report["prompt_format"] == "chat"  # the run's own configuration
    for metric in ("pass_at_1", "pass_at_k", "mean_at_k", "maj_at_k"):
        low, high = report[f"{metric}_ci"]
        assert 0.0 <= low <= report[metric] <= high <= 1.0, metric
