"""Resume after SIGKILL: `asympo serve learner` as a real process, killed mid-run.

2K steps straight versus K steps, SIGKILL, restart, continue to 2K: the final weights
match and no group is trained twice.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
import torch
from safetensors.torch import load_file

from asympo.config import Settings
from services.weights.server import WeightsService
from tests.integration.test_learner import FastRollout
from tests.integration.test_learner_service import free_port, small_model_dir

K = 3
REPO = Path(__file__).resolve().parents[2]


def learner_env(
    redis_url: str, run_id: str, root: Path, model: Path, grpc_port: int
) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "ASYMPO_REDIS__URL": redis_url,
            "ASYMPO_STREAMS__RUN_ID": run_id,
            "ASYMPO_WEIGHTS__GRPC_PORT": str(grpc_port),
            "ASYMPO_WEIGHTS__PUBLISH_TOKEN": "kill-test",
            "ASYMPO_MODEL__PATH": str(model),
            "ASYMPO_LEARNER__MAX_STEPS": str(2 * K),
            "ASYMPO_LEARNER__CHECKPOINT_EVERY": str(K),
            "ASYMPO_LEARNER__EVAL_EVERY": "0",
            "ASYMPO_LEARNER__GROUPS_PER_STEP": "2",
            "ASYMPO_LEARNER__MAX_STALENESS": "50",
            "ASYMPO_LEARNER__CHECKPOINT_DIR": str(root / "ckpt"),
            "ASYMPO_LEARNER__HTTP_PORT": str(free_port()),
            "ASYMPO_LEARNER__GRPC_PORT": str(free_port()),
            "ASYMPO_LEARNER__DEVICE": "cpu",
            "ASYMPO_LEARNER__LR": "0.01",
            "ASYMPO_SAMPLING__NUM_SAMPLES": "3",
            "ASYMPO_TASK__TRAIN_SIZE": "40",
            "ASYMPO_RUN_DIR": str(root / "run"),
            "OMP_NUM_THREADS": "1",
        }
    )
    return env


def start_learner(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "asympo.cli", "serve", "learner"],
            env=env,
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def steps_logged(root: Path) -> list[int]:
    path = root / "run" / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if "loss" in line]


def one_run(
    redis_client: redis.Redis, redis_url: str, run_id: str, root: Path, model: Path, kill: bool
) -> tuple[dict[str, torch.Tensor], int]:
    """Final weights, and the last step logged when the learner was killed (0: no kill)."""
    root.mkdir()
    store = Settings(
        weights={"store_dir": str(root / "store"), "publish_token": "kill-test"},  # type: ignore[arg-type]
        streams={"run_id": run_id},  # type: ignore[arg-type]
    )
    weights = WeightsService(store, grpc_port=0, http_port=0).start()
    rollout = FastRollout(redis_client, Settings(streams={"run_id": run_id}))  # type: ignore[arg-type]
    rollout.start()
    env = learner_env(redis_url, run_id, root, model, weights.grpc_port)
    log = root / "learner.log"
    killed_at = 0
    try:
        proc = start_learner(env, log)
        if kill:
            deadline = time.monotonic() + 120
            while max(steps_logged(root), default=0) < K + 1:
                assert proc.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, "learner too slow"
                time.sleep(0.05)
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            killed_at = max(steps_logged(root))
            proc = start_learner(env, log)
        assert proc.wait(180) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        rollout.stop.set()
        rollout.join(5)
        weights.stop(grace=0.5)
        keys = list(redis_client.scan_iter(match=f"asympo:{run_id}:*"))
        if keys:
            redis_client.delete(*keys)
    return load_file(str(root / "run" / "final" / "model.safetensors")), killed_at


@pytest.mark.timeout(400)
def test_sigkill_and_restart_ends_with_the_weights_of_an_uninterrupted_run(
    redis_client: redis.Redis, redis_url: str, run_id: str, key_prefix: str, tmp_path: Path
) -> None:
    model = small_model_dir(tmp_path / "model")
    straight, _ = one_run(redis_client, redis_url, f"{run_id}-a", tmp_path / "a", model, kill=False)
    resumed, killed_at = one_run(
        redis_client, redis_url, f"{run_id}-b", tmp_path / "b", model, kill=True
    )
    assert set(straight) == set(resumed)
    for name, value in straight.items():
        torch.testing.assert_close(resumed[name], value, rtol=1e-5, atol=1e-6, msg=name)
    steps = steps_logged(tmp_path / "b")
    # Steps after the checkpoint at K were redone after the kill, from the checkpoint.
    assert steps[-K:] == list(range(K + 1, 2 * K + 1))
    if killed_at < 2 * K:  # killed before the last checkpoint (almost always)
        assert steps == [*range(1, killed_at + 1), *range(K + 1, 2 * K + 1)]
    ckpt = json.loads((tmp_path / "b" / "ckpt" / "step-00000006" / "state.json").read_text())
    trained = ckpt["trained_group_ids"]
    assert len(trained) == len(set(trained)) == 2 * K * 2
    assert ckpt["counters"]["groups_trained"] == 2 * K * 2
