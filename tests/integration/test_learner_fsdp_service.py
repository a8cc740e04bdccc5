"""`asympo serve learner` under torchrun with learner.strategy=fsdp (gloo, 2 processes).

Real Redis, a real weights service, the fast rollout stand-in. The sharded learner
trains, publishes every version with a probe computed on the sharded model, writes
sharded checkpoints and an HF export; started again it resumes from the sharded
checkpoint and continues the version sequence.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import redis
import torch
import yaml
from transformers import AutoModelForCausalLM

from asympo.config import Settings
from asympo.rl.probe import probe_logprobs
from asympo.transport.weight_store import WeightStore
from services.weights.server import WeightsService
from tests.integration.test_learner import FastRollout
from tests.integration.test_learner_service import TOKEN, free_port, small_model_dir


def _config(tmp_path: Path, redis_url: str, run_id: str, grpc_port: int, steps: int) -> Path:
    run_dir = tmp_path / "run"
    tree: dict[str, Any] = {
        "redis": {"url": redis_url},
        "streams": {"run_id": run_id},
        "weights": {
            "store_dir": str(tmp_path / "store"),
            "publish_token": TOKEN,
            "grpc_port": grpc_port,
        },
        "model": {"path": str(tmp_path / "model")},
        "learner": {
            "http_port": free_port(),
            "grpc_port": free_port(),
            "max_steps": steps,
            "eval_every": 1,  # ignored under fsdp, with a warning
            "groups_per_step": 3,  # 2 + 1 groups: the ranks run different micro-batch counts
            "micro_batch": 2,
            "checkpoint_every": 2,
            "checkpoint_dir": str(run_dir / "checkpoints"),
            "device": "cpu",
            "strategy": "fsdp",
            "mixed_precision": "fp32",
            "activation_checkpointing": True,
        },
        "sampling": {"num_samples": 3, "max_tokens": 4},
        "task": {"train_size": 40, "eval_size": 4},
        "run_dir": str(run_dir),
    }
    path = tmp_path / f"config-{steps}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def _torchrun(config: Path, log: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    cmd += ["-m", "asympo.cli", "serve", "learner", "--config", str(config)]
    with log.open("w") as out:
        proc = subprocess.run(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=420)
    assert proc.returncode == 0, log.read_text()[-4000:]


@pytest.mark.timeout(900)
def test_fsdp_learner_under_torchrun_trains_publishes_and_resumes(
    redis_url: str, redis_client: redis.Redis, run_id: str, key_prefix: str, tmp_path: Path
) -> None:
    small_model_dir(tmp_path / "model")
    base = Settings(
        weights={"store_dir": str(tmp_path / "store"), "publish_token": TOKEN},  # type: ignore[arg-type]
        streams={"run_id": run_id},  # type: ignore[arg-type]
    )
    weights = WeightsService(base, grpc_port=0, http_port=0).start()
    rollout = FastRollout(redis_client, base)
    rollout.start()
    run_dir = tmp_path / "run"
    try:
        _torchrun(_config(tmp_path, redis_url, run_id, weights.grpc_port, 2), tmp_path / "a.log")
        first = (tmp_path / "a.log").read_text()
        assert "eval_every is ignored under fsdp" in first
        latest = (run_dir / "checkpoints" / "LATEST").read_text().strip()
        assert latest == "step-00000002"
        assert (run_dir / "checkpoints" / latest / "dcp").is_dir()
        final = AutoModelForCausalLM.from_pretrained(str(run_dir / "final"), dtype=torch.float32)
        store = WeightStore(tmp_path / "store")
        assert store.versions() == [0, 1, 2]
        manifest = store.manifest(2)
        # The probe came from the sharded model; the exported full weights reproduce it.
        got = probe_logprobs(final, list(manifest.probe.tokens))
        assert max(abs(a - b) for a, b in zip(got, manifest.probe.logprobs, strict=True)) < 1e-5

        _torchrun(_config(tmp_path, redis_url, run_id, weights.grpc_port, 3), tmp_path / "b.log")
        assert "resumed from" in (tmp_path / "b.log").read_text()
        assert WeightStore(tmp_path / "store").versions()[-1] == 3
    finally:
        rollout.stop.set()
        rollout.join(5)
        weights.stop(grace=0.5)
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r] == [1, 2, 3]
    assert not any("accuracy" in r for r in lines)
