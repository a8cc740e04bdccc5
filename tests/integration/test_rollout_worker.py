"""A prompt the engine can never serve is dead-lettered; it neither fails the batch nor the loop.

The issue's reproduction put ``max_tokens`` 5000 on the tiny model (context 256): the
engine raised inside the rollout loop and, supervised, the replica would die on that
prompt at every restart. Real Redis, the real transformers engine on a small model.
"""

from __future__ import annotations

from pathlib import Path

import redis

from asympo.config import Settings, StreamSettings
from asympo.engines.hf_engine import HFEngine
from asympo.transport.streams import Consumer, Producer, decode
from asympo.v1 import records_pb2
from services.rollout.swap import WeightSwapper
from services.rollout.worker import REASON_UNSERVABLE, RolloutWorker
from tests.unit.test_preflight import save_small_model


def prompt(run_id: str, index: int, max_tokens: int) -> records_pb2.PromptTask:
    return records_pb2.PromptTask(
        run_id=run_id,
        prompt_id=f"0:{index}",
        seq=index,
        task="arith",
        prompt_text=f"{index}+1=",
        num_samples=2,
        sampling=records_pb2.SamplingParams(temperature=1.0, top_p=1.0, max_tokens=max_tokens),
    )


def test_unservable_prompt_is_dead_lettered_and_the_rest_generated(
    tmp_path: Path, redis_client: redis.Redis, stream_settings: StreamSettings
) -> None:
    model = save_small_model(tmp_path / "model")
    settings = Settings(
        streams=stream_settings,
        rollout={"work_dir": str(tmp_path / "work"), "replica": "r0"},  # type: ignore[arg-type]
    )
    engine = HFEngine(str(model))
    try:
        worker = RolloutWorker(settings, redis_client, engine, WeightSwapper(engine, 0, model))
        out = Consumer.from_settings(
            redis_client,
            stream_settings,
            stream_settings.rollouts,
            "check",
            "c",
            records_pb2.RolloutGroup,
        )
        producer = Producer.from_settings(
            redis_client, stream_settings, stream_settings.prompts, records_pb2.PromptTask
        )
        for msg in (
            prompt(stream_settings.run_id, 1, 4),
            prompt(stream_settings.run_id, 2, 5000),
            prompt(stream_settings.run_id, 3, 4),
        ):
            producer.send(msg)
        assert worker.step(block_ms=100) == 2
        groups = [d.msg for d in out.read(count=10, block_ms=100)]
        assert sorted(g.prompt.prompt_id for g in groups) == ["0:1", "0:3"]
        letters = redis_client.xrange(stream_settings.key(stream_settings.dead_letter))
        assert len(letters) == 1
        letter = decode(dict(letters[0][1]), records_pb2.DeadLetter)
        assert letter.reason.startswith(f"{REASON_UNSERVABLE}: prompt (4) + max_tokens (5000)")
        pending = redis_client.xpending(
            stream_settings.key(stream_settings.prompts), worker.prompts.group
        )
        assert pending["pending"] == 0  # every prompt acked: nothing comes back on a restart
    finally:
        engine.close()
