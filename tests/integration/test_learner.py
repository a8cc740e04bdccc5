"""The learner service loop against real Redis streams: resume and admission control.

Upstream services are not started here: the test writes the ``ScoredGroup`` records the
reward service would write (the stream contract), and for admission it answers prompts
itself as a fast rollout that uses the oldest weights each prompt allows.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
import redis
import torch
from pydantic import SecretStr

from asympo.config import LearnerSettings, SamplingSettings, Settings, StreamSettings, TaskSettings
from asympo.run_log import METRICS_FILE, MetricsWriter, read_metrics
from asympo.tasks import load_task
from asympo.transport.serving import bearer_metadata
from asympo.transport.streams import Consumer, Producer, decode
from asympo.v1 import learner_pb2, learner_pb2_grpc, records_pb2
from services.learner.learner import CONSUMER_GROUP, Learner
from services.learner.publisher import BackgroundPublisher, Snapshot
from services.learner.server import start_grpc
from tests.unit.test_learner_step import VOCAB, tiny_model


def scored_group(run_id: str, i: int, version: int, g: int = 3) -> records_pb2.ScoredGroup:
    gen = torch.Generator().manual_seed(1000 + i)
    samples = []
    for _ in range(g):
        n = int(torch.randint(1, 6, (1,), generator=gen))
        toks = torch.randint(1, VOCAB, (n,), generator=gen).tolist()
        samples.append(
            records_pb2.Sample(
                completion_tokens=toks,
                version=records_pb2.VersionRange(start=version, end=version),
            )
        )
    rewards = torch.randint(0, 2, (g,), generator=gen).tolist()
    rollout = records_pb2.RolloutGroup(
        group_id=f"{run_id}/0:{i}",
        prompt_tokens=torch.randint(1, VOCAB, (4,), generator=gen).tolist(),
        samples=samples,
    )
    scores = [
        # A plug-in's own reason: train accuracy must come from ``correct``, not the text.
        records_pb2.SampleScore(
            reward=float(r), reason="exact match" if r else "no", correct=bool(r)
        )
        for r in rewards
    ]
    return records_pb2.ScoredGroup(rollout=rollout, scores=scores)


def settings_for(run_id: str, ckpt: Path, **learner: object) -> Settings:
    base = {
        "groups_per_step": 2,
        "micro_batch": 4,
        "checkpoint_every": 2,
        "checkpoint_dir": str(ckpt),
        "max_staleness": 100,
        "lr": 1e-2,
        "warmup_steps": 3,  # so the scheduler's state matters on resume
    }
    base.update(learner)
    return Settings(
        streams=StreamSettings(run_id=run_id),
        learner=LearnerSettings(**base),  # type: ignore[arg-type]
        sampling=SamplingSettings(num_samples=3),
        task=TaskSettings(train_size=40, eval_size=5),
    )


def flat_params(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def fill(r: redis.Redis, settings: Settings, run_id: str, n: int) -> None:
    producer = Producer.from_settings(
        r, settings.streams, settings.streams.scored, records_pb2.ScoredGroup
    )
    for i in range(n):
        producer.send(scored_group(run_id, i, version=0))


def train_until(learner: Learner, version: int, timeout_s: float = 120) -> list[str]:
    """Step ``learner`` to ``version``; the group ids it trained, in order (from the
    records' audit trail, ``group_ids``)."""
    trained: list[str] = []
    deadline = time.monotonic() + timeout_s
    while learner.version < version:
        assert time.monotonic() < deadline, f"stuck at version {learner.version}"
        record = learner.step(timeout_s=1.0)
        if record is not None:
            trained += record["group_ids"]
    return trained


def pending(r: redis.Redis, settings: Settings) -> int:
    info = r.xpending(settings.streams.key(settings.streams.scored), CONSUMER_GROUP)
    return int(info["pending"])


def test_resume_after_a_crash_matches_an_uninterrupted_run(
    redis_client: redis.Redis, run_id: str, key_prefix: str, tmp_path: Path
) -> None:
    # Straight: 4 steps (checkpoints at 2 and 4).
    run_a = f"{run_id}-a"
    settings_a = settings_for(run_a, tmp_path / "a")
    run_b = f"{run_id}-b"
    settings_b = settings_for(run_b, tmp_path / "b")
    try:
        fill(redis_client, settings_a, run_id, 10)
        fill(redis_client, settings_b, run_id, 10)
        straight = Learner(settings_a, redis_client, tiny_model())
        straight_log = train_until(straight, 4)

        # Interrupted: 2 steps (checkpoint, acked), one more step that is never
        # checkpointed, then the process "dies" without any cleanup.
        first = Learner(settings_b, redis_client, tiny_model())
        first_log = train_until(first, 3)
        assert pending(redis_client, settings_b) >= 2  # step 3's groups: trained, not acked
        acked_before_crash = first_log[:4]
        del first

        # Restart: a fresh model object with other weights; the checkpoint decides.
        second = Learner(settings_b, redis_client, tiny_model(seed=5))
        assert second.version == 2
        second_log = train_until(second, 4)

        torch.testing.assert_close(
            flat_params(second.model), flat_params(straight.model), rtol=1e-5, atol=1e-6
        )
        history = acked_before_crash + second_log
        assert history == straight_log
        assert len(set(history)) == len(history) == 8  # no group trained twice
        assert not set(acked_before_crash) & set(second_log)
        assert pending(redis_client, settings_b) == 0  # everything trained is acked
        assert pending(redis_client, settings_a) == 0
    finally:
        for prefix in (f"asympo:{run_a}:", f"asympo:{run_b}:"):
            keys = list(redis_client.scan_iter(match=f"{prefix}*"))
            if keys:
                redis_client.delete(*keys)


def test_crash_between_checkpoint_and_ack_trains_nothing_twice(
    redis_client: redis.Redis, run_id: str, key_prefix: str, tmp_path: Path
) -> None:
    settings = settings_for(run_id, tmp_path / "ckpt")
    fill(redis_client, settings, run_id, 8)
    first = Learner(settings, redis_client, tiny_model())
    step_1 = first.step(timeout_s=5)
    assert step_1 is not None

    def die(*args: object, **kwargs: object) -> int:
        raise RuntimeError("killed after the checkpoint was written, before the ack")

    first.consumer.ack = die  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="killed"):
        first.step(timeout_s=5)  # step 2 trains, checkpoints, then dies
    assert pending(redis_client, settings) == 4  # nothing acked yet
    # Step 2's record was written before its checkpoint, so the learner still holds it.
    trained_before = step_1["group_ids"] + first.last_record["group_ids"]
    assert first.last_record["step"] == 2
    del first

    second = Learner(settings, redis_client, tiny_model(seed=3))
    assert second.version == 2
    assert pending(redis_client, settings) == 0  # the checkpoint's entries were acked on resume
    step_3 = second.step(timeout_s=5)
    assert step_3 is not None
    assert not set(trained_before) & set(step_3["group_ids"])
    assert len(step_3["group_ids"]) == 2


def test_a_checkpointed_step_has_its_metrics_line_before_the_checkpoint_exists(
    redis_client: redis.Redis, run_id: str, key_prefix: str, tmp_path: Path
) -> None:
    # A kill between a checkpoint and its step's metrics line would lose that line for
    # good (the resumed learner starts after the step), so the line must come first.
    settings = settings_for(run_id, tmp_path / "ckpt")
    fill(redis_client, settings, run_id, 4)
    writer = MetricsWriter(tmp_path / "run" / METRICS_FILE)
    learner = Learner(settings, redis_client, tiny_model(), metrics_writer=writer)
    seen_at_checkpoint: list[list[int]] = []
    real_checkpoint = learner.checkpoint

    def checkpoint_after_looking() -> str:
        steps = [r["step"] for r in read_metrics(writer.path) if "loss" in r]
        seen_at_checkpoint.append(steps)
        return real_checkpoint()

    learner.checkpoint = checkpoint_after_looking  # type: ignore[method-assign]
    try:
        for _ in range(2):
            assert learner.step(timeout_s=5) is not None
    finally:
        writer.close()
    assert seen_at_checkpoint == [[1, 2]]  # checkpoint_every=2: step 2 already logged
    records = read_metrics(writer.path)
    assert [r["checkpoint_s"] for r in records] == [0.0, 0.0]  # reported by the next step
    # Train accuracy counts the verifier's ``correct``, whatever its reason text says.
    rewards = {
        g.rollout.group_id: [sc.reward for sc in g.scores]
        for g in (scored_group(run_id, i, version=0) for i in range(4))
    }
    for r in records:
        got = [x for gid in r["group_ids"] for x in rewards[gid]]
        assert r["train_accuracy"] == pytest.approx(sum(got) / len(got))
    assert any(r["train_accuracy"] > 0 for r in records)


class FastRollout(threading.Thread):
    """Answers every prompt at once, with the oldest weights the prompt allows."""

    def __init__(self, r: redis.Redis, settings: Settings) -> None:
        super().__init__(daemon=True)
        self.settings = settings
        self.stop = threading.Event()
        s = settings.streams
        self.prompts = Consumer.from_settings(
            r, s, s.prompts, "rollout", "fast-0", records_pb2.PromptTask
        )
        self.scored = Producer.from_settings(r, s, s.scored, records_pb2.ScoredGroup)
        self.answered = 0

    def run(self) -> None:
        while not self.stop.is_set():
            for d in self.prompts.read(count=16, block_ms=50):
                p = d.msg
                msg = scored_group(
                    self.settings.streams.run_id, p.seq, p.min_version, p.num_samples
                )
                msg.rollout.group_id = f"{p.run_id}/{p.prompt_id}"
                msg.rollout.prompt.CopyFrom(p)
                self.scored.send(msg)
                self.prompts.ack(d)
                self.answered += 1


@pytest.mark.parametrize("max_staleness", [0, 2])
def test_admission_bounds_staleness_with_a_slow_learner_and_fast_rollout(
    redis_client: redis.Redis, run_id: str, key_prefix: str, tmp_path: Path, max_staleness: int
) -> None:
    settings = settings_for(
        run_id, tmp_path / "ckpt", max_staleness=max_staleness, checkpoint_every=100
    )
    task = load_task("arith", seed=0, train_size=40, eval_size=5)
    published: list[int] = []
    learner = Learner(
        settings,
        redis_client,
        tiny_model(),
        task=task,
        publisher=lambda version, parent, model: published.append(version),
    )
    rollout = FastRollout(redis_client, settings)
    rollout.start()
    try:
        records = []
        for _ in range(6):
            record = learner.step(timeout_s=20)
            assert record is not None
            records.append(record)
            admitted = learner.admitter.admitted() if learner.admitter else 0
            bound = (learner.version + max_staleness + 1) * settings.learner.groups_per_step
            assert admitted <= bound
        assert published == list(range(7))
        assert all(r["staleness_max"] <= max_staleness for r in records)
        assert max(r["staleness_max"] for r in records) == max_staleness  # the bound is reached
        assert learner.counters["groups_dropped_stale"] == 0
        # Prompts run through a deterministic permutation of the train split.
        entries: list[Any] = cast("list[Any]", redis_client.xrange(settings.streams.key("prompts")))
        ids = [decode(fields, records_pb2.PromptTask).prompt_id for _, fields in entries]
        assert len(ids) == len(set(ids)) >= 12
        assert all(i.startswith("0:") for i in ids)
    finally:
        rollout.stop.set()
        rollout.join(5)


@pytest.mark.parametrize("background", [False, True])
def test_publish_every_3_drops_nothing_for_staleness_in_a_steady_run(
    redis_client: redis.Redis, run_id: str, key_prefix: str, tmp_path: Path, background: bool
) -> None:
    # Admission bounds by the published version: bounding by the learner's would admit
    # prompts rollout answers with weights up to publish_every - 1 versions older.
    settings = settings_for(
        run_id, tmp_path / "ckpt", max_staleness=2, publish_every=3, checkpoint_every=100
    )
    task = load_task("arith", seed=0, train_size=40, eval_size=5)
    published: list[int] = []

    def publish(version: int, parent: int, model: torch.nn.Module) -> None:
        published.append(version)

    def sink(snap: Snapshot) -> None:
        time.sleep(0.05)  # a publish takes a while; training goes on meanwhile
        published.append(snap.version)

    publisher: Any = BackgroundPublisher(sink) if background else publish
    learner = Learner(settings, redis_client, tiny_model(), task=task, publisher=publisher)
    rollout = FastRollout(redis_client, settings)
    rollout.start()
    try:
        records = [learner.step(timeout_s=20) for _ in range(12)]
        assert all(r is not None for r in records)
        assert learner.finish_publishing(10)
        assert learner.counters["groups_dropped_stale"] == 0
        stalenesses = [r["staleness_max"] for r in records if r is not None]
        assert max(stalenesses) == 2  # the bound is reached, never passed
        assert published == [0, 3, 6, 9, 12]
    finally:
        rollout.stop.set()
        rollout.join(5)
        if isinstance(publisher, BackgroundPublisher):
            publisher.close()


def test_stale_groups_are_dropped_and_counted(
    redis_client: redis.Redis, run_id: str, key_prefix: str, tmp_path: Path
) -> None:
    settings = settings_for(
        run_id, tmp_path / "ckpt", max_staleness=1, checkpoint_every=1, groups_per_step=3
    )
    producer = Producer.from_settings(
        redis_client, settings.streams, settings.streams.scored, records_pb2.ScoredGroup
    )
    learner = Learner(settings, redis_client, tiny_model())
    learner.version = 5  # as if trained for a while
    for i, version in enumerate([1, 4, 2, 5, 3, 4]):
        producer.send(scored_group(run_id, i, version))
    record = learner.step(timeout_s=5)
    assert record is not None
    assert learner.counters["groups_dropped_stale"] == 3  # versions 1, 2, 3
    assert record["staleness_max"] == 1
    assert pending(redis_client, settings) == 0  # dropped ones are acked at the checkpoint


def test_grpc_status_and_token_protected_checkpoint(
    redis_client: redis.Redis, run_id: str, key_prefix: str, tmp_path: Path
) -> None:
    settings = settings_for(run_id, tmp_path / "ckpt", checkpoint_every=100)
    settings = settings.model_copy(update={"service_token": SecretStr("svc-token")})
    fill(redis_client, settings, run_id, 4)
    learner = Learner(settings, redis_client, tiny_model())
    assert learner.step(timeout_s=5) is not None
    server = start_grpc(settings, learner, port=0)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = learner_pb2_grpc.LearnerStub(channel)
            status = stub.Status(learner_pb2.StatusRequest(), timeout=10)
            assert (status.version, status.groups_trained, status.loss) == (1, 2, "asympo")
            assert status.last_loss == pytest.approx(learner.last_record["loss"])
            with pytest.raises(grpc.RpcError) as denied:
                stub.Checkpoint(learner_pb2.CheckpointRequest(), timeout=10)
            assert denied.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert pending(redis_client, settings) == 2  # nothing checkpointed, nothing acked

            replies: list[learner_pb2.CheckpointReply] = []
            call = threading.Thread(
                target=lambda: replies.append(
                    stub.Checkpoint(
                        learner_pb2.CheckpointRequest(),
                        metadata=bearer_metadata("svc-token"),
                        timeout=30,
                    )
                )
            )
            call.start()
            while call.is_alive():  # the training loop's side: answer between steps
                learner.serve_requests()
                time.sleep(0.01)
            assert replies and replies[0].version == 1
            assert Path(replies[0].path, "state.json").is_file()
            assert pending(redis_client, settings) == 0
    finally:
        server.stop(grace=0.5)
