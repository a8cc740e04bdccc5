"""Admission control: which prompts the learner may put on the prompts stream, and when.

The learner admits prompt ``seq`` (0, 1, 2, ...) only while
``seq < (version + max_staleness + 1) * groups_per_step``. A group is trained roughly
at step ``seq // groups_per_step``, so every admitted prompt can be trained within
``max_staleness`` versions of the version current when it was admitted; the prompt's
``min_version`` tells rollout not to answer it with older weights. The staleness filter
at the learner is the backstop for groups that arrive out of order.

Prompts run through the task's train split in epochs; each epoch is a permutation
that depends only on ``(seed, epoch)``, so a run (and a resumed run) admits the same
sequence of prompts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import redis
import torch

from asympo.config import Settings
from asympo.rl.losses import needs_behaviour_logprobs
from asympo.tasks import Problem, Task
from asympo.transport.streams import Producer
from asympo.v1 import records_pb2


def admission_bound(version: int, max_staleness: int, groups_per_step: int) -> int:
    """How many prompts may have been admitted in total while the learner is at ``version``."""
    return (version + max_staleness + 1) * groups_per_step


@dataclass(frozen=True)
class Slot:
    """The problem admitted as prompt number ``seq``."""

    seq: int
    epoch: int
    index: int  # index into the task's train split
    problem: Problem

    @property
    def prompt_id(self) -> str:
        """``"<epoch>:<index>"``, unique within the run."""
        return f"{self.epoch}:{self.index}"


class EpochSchedule:
    """Deterministic order of the train split: a seeded permutation per epoch."""

    def __init__(self, problems: list[Problem], seed: int) -> None:
        if not problems:
            raise ValueError("the task's train split is empty: nothing to admit")
        self.problems = problems
        self.seed = seed
        self._epoch = -1
        self._order: list[int] = []

    def slot(self, seq: int) -> Slot:
        """The problem of admission number ``seq``."""
        epoch, pos = divmod(seq, len(self.problems))
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._order = torch.randperm(len(self.problems), generator=gen).tolist()
            self._epoch = epoch
        index = self._order[pos]
        return Slot(seq, epoch, index, self.problems[index])


class Admitter:
    """Admits prompts to the prompts stream, keeping the admitted count in Redis.

    The count and the XADDs go in one MULTI, so a crash never admits a prompt twice
    or skips one: a restarted learner continues from the count Redis holds.
    """

    def __init__(self, settings: Settings, redis_client: redis.Redis, task: Task) -> None:
        self.settings = settings
        self.redis = redis_client
        self.task = task
        self.schedule = EpochSchedule(task.train, settings.learner.seed)
        self.producer = Producer.from_settings(
            redis_client, settings.streams, settings.streams.prompts, records_pb2.PromptTask
        )
        self.count_key = settings.streams.key("learner:admitted")

    def admitted(self) -> int:
        """Prompts admitted so far in this run."""
        raw = self.redis.get(self.count_key)
        return int(raw) if raw is not None else 0

    def prompt(self, slot: Slot, version: int, min_version: int) -> records_pb2.PromptTask:
        """The ``PromptTask`` record of ``slot``."""
        s = self.settings
        sampling = records_pb2.SamplingParams(
            temperature=s.sampling.temperature,
            top_p=s.sampling.top_p,
            max_tokens=s.sampling.max_tokens,
            stop=list(s.sampling.stop),
        )
        return records_pb2.PromptTask(
            run_id=s.streams.run_id,
            prompt_id=slot.prompt_id,
            seq=slot.seq,
            task=self.task.name,
            prompt_text=self.task.render(slot.problem),
            reference_answer=slot.problem.answer,
            verifier=self.task.verifier,
            num_samples=s.sampling.num_samples,
            sampling=sampling,
            want_behaviour_logprobs=needs_behaviour_logprobs(s.learner.loss.name),
            admitted_at_version=version,
            created_at=time.time(),
            min_version=min_version,
        )

    def admit(self, version: int, min_version: int) -> int:
        """Admit every prompt the bound allows at ``version``; returns how many were added."""
        lc = self.settings.learner
        bound = admission_bound(version, lc.max_staleness, lc.groups_per_step)
        start = self.admitted()
        if start >= bound:
            return 0
        msgs = [
            self.prompt(self.schedule.slot(seq), version, min_version)
            for seq in range(start, bound)
        ]
        pipe = self.redis.pipeline(transaction=True)
        self.producer.queue(pipe, msgs)
        pipe.set(self.count_key, bound)
        pipe.execute()
        return len(msgs)
