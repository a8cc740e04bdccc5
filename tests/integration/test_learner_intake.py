"""The learner's intake on its own (no model, no Learner): real Redis, a real Consumer."""

from __future__ import annotations

from pathlib import Path

import redis

from asympo.transport.streams import Consumer, Producer
from asympo.v1 import records_pb2
from services.learner.intake import Intake
from tests.integration.test_learner import pending, scored_group, settings_for
from tests.integration.test_learner_poison import dead_letters


def test_intake_holds_settles_and_acks_only_after_a_checkpoint(
    redis_client: redis.Redis, run_id: str, key_prefix: str, tmp_path: Path
) -> None:
    settings = settings_for(run_id, tmp_path / "ckpt")
    producer = Producer.from_settings(
        redis_client, settings.streams, settings.streams.scored, records_pb2.ScoredGroup
    )
    for i in range(4):
        producer.send(scored_group(run_id, i, version=i))  # group i generated at version i
    consumer = Consumer.from_settings(
        redis_client, settings.streams, settings.streams.scored, "learner", "c0",
        records_pb2.ScoredGroup,
    )  # fmt: skip
    counters = {"duplicates_skipped": 0.0, "groups_dropped_stale": 0.0}
    poisoned = f"{run_id}/0:3"
    intake = Intake(
        consumer,
        lambda g: ("poison", "test") if g.group_id == poisoned else None,
        counters,
    )
    intake.restore([f"{run_id}/0:2"])  # a checkpoint says group 2 was trained already
    deliveries = consumer.read(count=10, block_ms=100)
    for d in deliveries + deliveries[:1]:  # a re-delivery of a held entry is ignored
        intake.accept(d)
    assert [h.group.group_id for h in intake.buffer] == [f"{run_id}/0:0", f"{run_id}/0:1"]
    assert counters["duplicates_skipped"] == 1  # group 2: settled, awaiting the ack
    assert [dl.reason for dl in dead_letters(redis_client, settings)] == ["poison: test"]

    batch: list = []
    intake.take(2, lambda g: g.oldest_version < 1, batch)  # group 0 is too stale
    assert [h.group.group_id for h in batch] == [f"{run_id}/0:1"]
    assert counters["groups_dropped_stale"] == 1
    intake.trained(batch)
    assert pending(redis_client, settings) == 3  # nothing acked before the checkpoint
    intake.ack_checkpointed()
    assert pending(redis_client, settings) == 0 and intake.held_ids == set()
    assert list(intake.trained_ids) == [f"{run_id}/0:2", f"{run_id}/0:1"]
