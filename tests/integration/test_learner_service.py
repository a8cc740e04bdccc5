"""`asympo serve learner`'s run(): real weights service, real Redis, a fast rollout stand-in."""

from __future__ import annotations

import json
import signal
import socket
from pathlib import Path

import pytest
import redis
import torch
from transformers import AutoModelForCausalLM

from asympo.config import Settings
from asympo.model.architecture import TinyArchitecture, build_tiny_model
from asympo.model.char_tokenizer import save_char_tokenizer
from asympo.rl.probe import probe_logprobs
from asympo.transport.weight_store import WeightStore
from services.learner.main import run
from services.weights.server import WeightsService
from tests.integration.test_learner import FastRollout

TOKEN = "learner-test-token"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def small_model_dir(path: Path) -> Path:
    arch = TinyArchitecture(
        hidden_size=64, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64
    )
    build_tiny_model(arch, seed=0).save_pretrained(str(path))
    save_char_tokenizer(path, arch.max_positions)
    return path


@pytest.mark.timeout(300)
def test_run_trains_publishes_with_probe_evaluates_and_saves(
    redis_url: str, redis_client: redis.Redis, run_id: str, key_prefix: str, tmp_path: Path
) -> None:
    base = Settings(
        weights={"store_dir": str(tmp_path / "store"), "publish_token": TOKEN},  # type: ignore[arg-type]
        streams={"run_id": run_id},  # type: ignore[arg-type]
    )
    weights = WeightsService(base, grpc_port=0, http_port=0).start()
    run_dir = tmp_path / "run"
    settings = Settings(
        redis={"url": redis_url},  # type: ignore[arg-type]
        streams={"run_id": run_id},  # type: ignore[arg-type]
        weights={  # type: ignore[arg-type]
            "store_dir": str(tmp_path / "store"),
            "publish_token": TOKEN,
            "grpc_port": weights.grpc_port,
        },
        model={"path": str(small_model_dir(tmp_path / "model"))},  # type: ignore[arg-type]
        learner={  # type: ignore[arg-type]
            "http_port": free_port(),
            "grpc_port": free_port(),
            "max_steps": 2,
            "eval_every": 2,
            "groups_per_step": 2,
            "micro_batch": 8,
            "checkpoint_dir": str(run_dir / "checkpoints"),
            "device": "cpu",
        },
        sampling={"num_samples": 3, "max_tokens": 4},  # type: ignore[arg-type]
        task={"train_size": 40, "eval_size": 4},  # type: ignore[arg-type]
        run_dir=str(run_dir),
    )
    rollout = FastRollout(redis_client, settings)
    rollout.start()
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        run(settings)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        rollout.stop.set()
        rollout.join(5)
        weights.stop(grace=0.5)

    store = WeightStore(tmp_path / "store")
    assert store.versions() == [0, 1, 2]
    manifest = store.manifest(2)
    assert manifest.parent_version == 1
    final = AutoModelForCausalLM.from_pretrained(str(run_dir / "final"), dtype=torch.float32)
    got = probe_logprobs(final, list(manifest.probe.tokens))
    assert len(got) == len(manifest.probe.tokens) - 1 == 31
    assert max(abs(a - b) for a, b in zip(got, manifest.probe.logprobs, strict=True)) < 1e-5
    v0 = store.manifest(0).probe.logprobs
    assert max(abs(a - b) for a, b in zip(v0, manifest.probe.logprobs, strict=True)) > 1e-6

    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in lines if "loss" in r]
    evals = [r for r in lines if "accuracy" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert [r["step"] for r in evals] == [0, 2]
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in evals)
    for key in ("loss_balance", "loss_positive", "loss_negative", "staleness_max", "entropy"):
        assert key in steps[-1]
    assert (run_dir / "checkpoints" / "LATEST").is_file()
