"""Groups the learner cannot train are dead-lettered at intake and never reach a step.

Before, such a group raised inside ``train_step``; the service exited, and on restart it
re-read the same pending entry and died again, forever. Here they are injected into a
running learner's scored stream (real Redis) between good groups: the learner
dead-letters each with its reason, keeps stepping, and a restart never sees them again.
"""

from __future__ import annotations

import threading
from pathlib import Path

import redis

from asympo.config import Settings
from asympo.transport.streams import Producer, decode
from asympo.v1 import records_pb2
from services.learner import metrics
from services.learner.learner import Learner
from tests.integration.test_learner import pending, scored_group, settings_for, train_until
from tests.unit.test_learner_step import VOCAB, tiny_model

POISON_REASONS = {
    "no-behaviour": "missing_behaviour_logprobs",
    "one-sample": "too_few_responses",
    "nan-reward": "non_finite_reward",
    "bad-token": "token_out_of_vocabulary",
}


def good(run_id: str, i: int) -> records_pb2.ScoredGroup:
    msg = scored_group(run_id, i, version=0)
    for s in msg.rollout.samples:
        s.behaviour_logprobs.extend([-4.0] * len(s.completion_tokens))
    return msg


def poison(run_id: str, kind: str, i: int) -> records_pb2.ScoredGroup:
    msg = good(run_id, 100 + i)
    msg.rollout.group_id = f"{run_id}/poison:{kind}"
    if kind == "no-behaviour":
        for s in msg.rollout.samples:
            del s.behaviour_logprobs[:]
    elif kind == "one-sample":
        del msg.rollout.samples[1:]
        del msg.scores[1:]
    elif kind == "nan-reward":
        msg.scores[0].reward = float("nan")
    elif kind == "bad-token":
        msg.rollout.samples[0].completion_tokens[0] = VOCAB + 7
    return msg


def dead_letters(r: redis.Redis, settings: Settings) -> list[records_pb2.DeadLetter]:
    rows = r.xrange(settings.streams.key(settings.streams.dead_letter))
    return [decode(fields, records_pb2.DeadLetter) for _, fields in rows]


def counted(settings: Settings, reason: str) -> float:
    stream = settings.streams.key(settings.streams.scored)
    labels = {"stream": stream, "reason": reason}
    return metrics.REGISTRY.get_sample_value("asympo_dead_letters_total", labels) or 0.0


def test_poison_groups_are_dead_lettered_at_intake_and_stay_gone(
    redis_client: redis.Redis, run_id: str, key_prefix: str, tmp_path: Path
) -> None:
    # grpo needs behaviour log-probs, rloo needs two responses: both kinds of poison apply.
    settings = settings_for(run_id, tmp_path / "ckpt", loss="grpo", advantage="rloo")
    producer = Producer.from_settings(
        redis_client, settings.streams, settings.streams.scored, records_pb2.ScoredGroup
    )
    before = {r: counted(settings, r) for r in POISON_REASONS.values()}
    learner = Learner(settings, redis_client, tiny_model())
    # The learner is already running (and waiting) when the poison arrives.
    trained: list[str] = []
    runner = threading.Thread(
        target=lambda out, lrn: out.extend(train_until(lrn, 3)),
        args=(trained, learner),
        daemon=True,
    )
    runner.start()
    kinds = list(POISON_REASONS)
    for i in range(8):
        producer.send(good(run_id, i))
        if i < len(kinds):  # among the groups of the first three steps
            producer.send(poison(run_id, kinds[i], i))
    runner.join(timeout=120)
    assert not runner.is_alive() and learner.version == 3  # it kept stepping

    letters = dead_letters(redis_client, settings)
    assert sorted(dl.reason.split(":")[0] for dl in letters) == sorted(POISON_REASONS.values())
    for dl in letters:
        msg = records_pb2.ScoredGroup.FromString(dl.payload)
        assert POISON_REASONS[msg.rollout.group_id.rsplit(":", 1)[1]] == dl.reason.split(":")[0]
    for reason in POISON_REASONS.values():
        assert counted(settings, reason) == before[reason] + 1
    assert len(trained) == 3 * 2 and not any("poison" in g for g in trained)
    # Under a behaviour-corrected loss each step's record and /metrics carry the ratio
    # statistics, and under every loss the update split.
    rec = learner.last_record
    for key, metric, labels in (
        ("ratio_mean", "asympo_importance_ratio_mean", {}),
        ("clip_fraction", "asympo_clip_fraction_ratio", {}),
        ("update_norm_positive", "asympo_update_norm", {"side": "positive"}),
        ("update_norm_negative", "asympo_update_norm", {"side": "negative"}),
        ("update_share_positive", "asympo_update_share_positive_ratio", {}),
    ):
        assert metrics.REGISTRY.get_sample_value(metric, labels) == rec[key], key
    assert 0 <= rec["clip_fraction"] <= 1 and rec["ratio_mean"] > 0

    # A restart (step 3 was never checkpointed: its entries are still pending) re-reads
    # what it held, and none of it is poison; it goes on to step 4 on good groups only.
    assert pending(redis_client, settings) >= 2
    del learner
    second = Learner(settings, redis_client, tiny_model(seed=3))
    assert second.version == 2
    assert not any("poison" in h.group.group_id for h in second.intake.buffer)
    resumed = train_until(second, 4)
    assert len(resumed) == 2 * 2 and not any("poison" in g for g in resumed)
    assert len(dead_letters(redis_client, settings)) == len(POISON_REASONS)
