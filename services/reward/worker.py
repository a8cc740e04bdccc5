"""The reward loop: rollout groups in, scored groups out, each group scored once.

Many workers share the ``reward`` consumer group of the rollouts stream. A batch of
groups is verified together in the pool (every sample of every group in parallel up to
the pool size). Each scored group is produced and its rollout entry acked in one atomic
Redis script guarded by a per-group marker (``produce_and_ack`` with ``once_key``), so a
group redelivered after its first worker stalled or died is acked without a second
ScoredGroup. A group that cannot be scored for a reason other than the answers
(verifier crashed or raised, unknown verifier, no samples) is dead-lettered with that
reason; a wrong answer is reward 0 and a verifier time-out is reward 0 with
``timed_out`` set.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass

import redis

from asympo.config import Settings
from asympo.tasks import default_verifier
from asympo.transport.streams import Consumer, Delivery, Producer, produce_and_ack
from asympo.v1 import records_pb2
from asympo.verifiers import Verdict, VerifierPool
from services.reward import metrics
from services.reward.scoring import score_items

log = logging.getLogger(__name__)

ROLLOUTS_GROUP = "reward"
ONCE_TTL_S = 7 * 24 * 3600.0

# Dead-letter reasons (labels of asympo_dead_letters_total).
REASON_VERIFIER_FAILED = "verifier_failed"
REASON_NO_SAMPLES = "no_samples"
REASON_NO_VERIFIER = "no_verifier"
REASON_UNTRUSTED_VERIFIER = "untrusted_verifier"


def default_consumer_name() -> str:
    """``<host>-<pid>``: unique per process, stable for the life of the process."""
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass
class StepResult:
    """What one ``RewardWorker.step`` did (for logs and tests)."""

    scored: int = 0
    duplicates: int = 0
    dead_lettered: int = 0


class RewardWorker:
    """Reads rollout groups, scores them in ``pool``, produces ScoredGroups."""

    def __init__(
        self,
        settings: Settings,
        redis_client: redis.Redis,
        pool: VerifierPool,
        consumer_name: str = "",
    ) -> None:
        streams = settings.streams
        self.settings = settings
        self.redis = redis_client
        self.pool = pool
        self.name = consumer_name or default_consumer_name()
        self.rollouts = Consumer.from_settings(
            redis_client,
            streams,
            streams.rollouts,
            ROLLOUTS_GROUP,
            self.name,
            records_pb2.RolloutGroup,
            registry=metrics.REGISTRY,
        )
        self.scored = Producer.from_settings(
            redis_client, streams, streams.scored, records_pb2.ScoredGroup
        )
        self.once_prefix = streams.key("reward-done") + ":"
        self.fallback_verifier = settings.task.verifier
        # A literal "module:function" imports code: only specs the operator configured are
        # honoured, never one that merely arrived on the stream.
        self.trusted_specs = {settings.task.verifier, *settings.reward.plugins.values()}

    def once_key(self, group: records_pb2.RolloutGroup) -> str:
        """The marker key that records ``group`` as scored (under the run's prefix)."""
        return self.once_prefix + (group.group_id or group.prompt.prompt_id)

    def verifier_for(self, group: records_pb2.RolloutGroup) -> str:
        """The prompt's verifier; else the configured task.verifier; else the task's default."""
        return (
            group.prompt.verifier or self.fallback_verifier or default_verifier(group.prompt.task)
        )

    def step(self, block_ms: int = 1000) -> StepResult:
        """Read one batch (up to ``reward.batch`` groups), score it, commit each group."""
        deliveries = self.rollouts.read(count=self.settings.reward.batch, block_ms=block_ms)
        result = StepResult()
        if not deliveries:
            return result
        todo = self._skip_already_scored(deliveries, result)
        runnable: list[Delivery[records_pb2.RolloutGroup]] = []
        items: list[tuple[str, str, str]] = []
        for delivery in todo:
            group = delivery.msg
            verifier = self.verifier_for(group)
            if not group.samples:
                self.rollouts.dead_letter(delivery, REASON_NO_SAMPLES, group.group_id)
                result.dead_lettered += 1
                continue
            if not verifier:
                detail = f"{group.group_id}: prompt has no verifier and task {group.prompt.task!r}"
                self.rollouts.dead_letter(delivery, REASON_NO_VERIFIER, detail + " has no default")
                result.dead_lettered += 1
                continue
            if ":" in verifier and verifier not in self.trusted_specs:
                detail = f"{group.group_id}: verifier {verifier!r} is not configured"
                self.rollouts.dead_letter(delivery, REASON_UNTRUSTED_VERIFIER, detail)
                result.dead_lettered += 1
                continue
            runnable.append(delivery)
            reference = group.prompt.reference_answer
            items += [(verifier, s.completion_text, reference) for s in group.samples]
        # Scoring a batch can outlast streams.reclaim_idle_ms (many samples, slow
        # verifiers): without its leases, live work would be verified twice.
        with self.rollouts.holding(runnable):
            verdicts = score_items(self.pool, items)
        offset = 0
        for delivery in runnable:
            count = len(delivery.msg.samples)
            self._commit(delivery, verdicts[offset : offset + count], result)
            offset += count
        return result

    def _skip_already_scored(
        self, deliveries: Sequence[Delivery[records_pb2.RolloutGroup]], result: StepResult
    ) -> list[Delivery[records_pb2.RolloutGroup]]:
        """Ack redeliveries of groups already scored, without verifying them again."""
        pipe = self.redis.pipeline(transaction=False)
        for delivery in deliveries:
            pipe.exists(self.once_key(delivery.msg))
        done = pipe.execute()
        todo = []
        for delivery, exists in zip(deliveries, done, strict=True):
            if exists:
                self.rollouts.ack(delivery)
                metrics.DUPLICATES.inc()
                result.duplicates += 1
            else:
                todo.append(delivery)
        return todo

    def _commit(
        self,
        delivery: Delivery[records_pb2.RolloutGroup],
        verdicts: Sequence[Verdict],
        result: StepResult,
    ) -> None:
        group = delivery.msg
        failures = [v for v in verdicts if v.failed]
        if failures:
            detail = f"{group.group_id}: {len(failures)} sample(s): {failures[0].reason}"
            self.rollouts.dead_letter(delivery, REASON_VERIFIER_FAILED, detail)
            result.dead_lettered += 1
            return
        scored = records_pb2.ScoredGroup(
            rollout=group,
            scores=[
                records_pb2.SampleScore(
                    reward=v.reward, reason=v.reason, timed_out=v.timed_out, correct=v.correct
                )
                for v in verdicts
            ],
            scorer=self.name,
            scored_at=time.time(),
        )
        committed = produce_and_ack(
            [(self.scored, scored)],
            self.rollouts,
            delivery,
            once_key=self.once_key(group),
            once_ttl_s=ONCE_TTL_S,
        )
        if committed.duplicate:
            metrics.DUPLICATES.inc()
            result.duplicates += 1
            log.info("group %s was already scored by another worker", group.group_id)
            return
        task = group.prompt.task or "unknown"
        metrics.GROUPS.labels(task=task).inc()
        metrics.observe_group_reward(task, sum(v.reward for v in verdicts) / len(verdicts))
        result.scored += 1
