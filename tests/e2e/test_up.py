"""End to end: `asympo up` runs every service as a process on the tiny model and stops clean.

Runs against the test Redis (not the embedded one) so the streams can be audited after
the run: every group generated is trained, dropped as stale, dead-lettered, or still in
flight at stop — nothing else.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import redis
import yaml

from asympo.config import StreamSettings
from asympo.run_log import read_metrics
from asympo.transport.streams import lag

pytestmark = pytest.mark.slow

STEPS = 4


def processes_with_env(needle: str) -> list[int]:
    """Pids of live processes whose environment mentions ``needle``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle.encode() in (entry / "environ").read_bytes():
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def pending(client: redis.Redis, key: str, group: str) -> int:
    try:
        return int(client.xpending(key, group)["pending"])
    except redis.ResponseError:
        return 0


def test_up_runs_learns_accounts_and_leaves_nothing(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis, run_id: str, key_prefix: str
) -> None:
    run_dir = tmp_path / "run"
    env = {**os.environ, "REDIS_URL": redis_url}
    argv = [
        sys.executable, "-m", "asympo.cli", "up",
        "--steps", str(STEPS), "--run-id", run_id, "--no-live", "--max-wall", "600",
        "--set", f"run_dir={run_dir}",
        "--set", "task.eval_size=64",
        "--set", "learner.eval_every=2",
        "--set", "learner.groups_per_step=4",
        "--set", "learner.checkpoint_every=2",
        # The accounting below counts stream lengths: keep acknowledged entries (trimming
        # them has its own test, tests/integration/test_stream_trim.py).
        "--set", "streams.trim_acked_every_s=0",
    ]  # fmt: skip
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "held-out accuracy" in proc.stderr

    # The run directory holds what `up` promises.
    for name in (
        "config.yaml",
        "metrics.jsonl",
        "plot.png",
        "final/config.json",
        "logs/learner.log",
    ):
        assert (run_dir / name).exists(), name
    assert list((run_dir / "final").glob("*.safetensors"))
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["streams"]["run_id"] == run_id
    assert config["weights"]["publish_token"] == "***"  # secrets never written

    # Versions advance one per step; the loss balance under asympo stays ~0.
    records = read_metrics(run_dir / "metrics.jsonl")
    steps = [r for r in records if "loss_balance" in r]
    assert [r["version"] for r in steps] == list(range(1, STEPS + 1))
    for r in steps:
        scale = abs(r["loss_positive"]) + abs(r["loss_negative"]) + 1e-3
        assert abs(r["loss_balance"]) <= 1e-4 * scale, r
        assert r["staleness_max"] <= config["learner"]["max_staleness"]
    assert any("accuracy" in r for r in records)

    # Accounting: generated = trained + dropped stale + dead-lettered + in flight at stop.
    streams = StreamSettings(run_id=run_id)
    rollouts, scored = streams.key(streams.rollouts), streams.key(streams.scored)
    generated = redis_client.xlen(rollouts)
    n_scored = redis_client.xlen(scored)
    dead = redis_client.xlen(streams.key(streams.dead_letter))
    unscored = lag(redis_client, rollouts, "reward") + pending(redis_client, rollouts, "reward")
    unconsumed = lag(redis_client, scored, "learner") + pending(redis_client, scored, "learner")
    trained, dropped = steps[-1]["groups_trained"], steps[-1]["groups_dropped_stale"]
    assert trained == STEPS * 4
    assert generated == n_scored + unscored + dead
    assert n_scored == trained + dropped + unconsumed

    # No child process survives the launcher.
    assert processes_with_env(str(run_dir)) == []
