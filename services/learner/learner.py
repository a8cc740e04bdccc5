"""The learner loop: admit prompts, gather scored groups, filter stale ones, step, publish.

Delivery semantics (what makes resume exact):

* Scored entries stay pending in the ``learner`` consumer group until the checkpoint
  that contains their effect is on disk; then they are acked. The checkpoint lists
  those entry ids too, so a crash between "checkpoint written" and "acked" is repaired
  at restart by acking them again.
* A restarted learner first re-reads its own pending entries (``read_pending``,
  decoded and size-checked like every read), in stream order, then new ones: groups
  trained after the last checkpoint are trained again from the checkpointed weights, in
  the same order, so the run continues at the same version exactly as if it had never
  stopped, and no acked group is trained twice.
* The learner renews its leases on the entries it holds (``renew_due``) while it
  holds them, so a slow step never lets them look abandoned; re-deliveries of held
  entries and groups whose id was already trained are skipped.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from concurrent.futures import Future
from typing import Any

import redis
import torch

from asympo.config import Settings
from asympo.rl.probe import probe_logprobs, probe_tokens
from asympo.rl.schedule import lr_scheduler
from asympo.rl.training import (
    StepConfig,
    TrainGroup,
    train_step,
    untrainable_reason,
)
from asympo.run_log import MetricsWriter
from asympo.tasks import Task
from asympo.transport.streams import Consumer, Delivery
from asympo.v1 import records_pb2
from services.learner import metrics
from services.learner.admission import Admitter
from services.learner.checkpoint import (
    LearnerState,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    save_checkpoint_shards,
)
from services.learner.distributed import (
    BATCH,
    CHECKPOINT,
    GATHER,
    PUBLISH,
    STOP,
    DistInfo,
    broadcast_batch,
    decode_batch,
    receive_command,
    send_command,
    shard,
)
from services.learner.intake import Held, Intake
from services.learner.prefetch import Prefetcher
from services.learner.publisher import InlinePublisher, PublishFn, VersionPublisher
from services.learner.sharding import full_state_dict, is_sharded

log = logging.getLogger(__name__)

CONSUMER_GROUP = "learner"
# Publisher(version, parent_version, model): make ``version`` available to rollout, inline.
Publisher = PublishFn


def step_config(settings: Settings) -> StepConfig:
    """The training-step configuration of the learner settings."""
    lc = settings.learner
    return StepConfig(
        loss=lc.loss,
        advantage=lc.advantage,
        micro_batch=lc.micro_batch,
        max_tokens_per_micro_batch=lc.max_tokens_per_micro_batch,
        grad_clip=lc.grad_clip,
        entropy_coef=lc.entropy_coef,
        kl_coef=lc.kl_coef,
        temperature=settings.sampling.temperature if settings.sampling.temperature > 0 else 1.0,
    )


def make_optimizer(
    model: torch.nn.Module, settings: Settings
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW with the learning-rate schedule of :func:`asympo.rl.schedule.lr_factor`."""
    lc = settings.learner
    optimizer = torch.optim.AdamW(model.parameters(), lr=lc.lr, weight_decay=lc.weight_decay)
    return optimizer, lr_scheduler(optimizer, lc.warmup_steps, lc.lr_decay_steps, lc.min_lr_ratio)


class Learner:
    """One learner process (rank 0 of a data-parallel learner does all the I/O)."""

    def __init__(
        self,
        settings: Settings,
        redis_client: redis.Redis,
        model: torch.nn.Module,
        *,
        task: Task | None = None,
        publisher: Publisher | VersionPublisher | None = None,
        consumer_name: str = "learner-0",
        metrics_writer: MetricsWriter | None = None,
        pad_id: int = 0,
        dist_info: DistInfo | None = None,
    ) -> None:
        self.settings = settings
        self.dist = dist_info
        self.lc = settings.learner
        self.redis = redis_client
        self.model = model
        self.publisher: VersionPublisher | None = (
            InlinePublisher(publisher) if callable(publisher) else publisher
        )
        self.writer = metrics_writer
        self.pad_id = pad_id
        self.cfg = step_config(settings)
        inner = getattr(model, "module", model)  # the model itself under DDP
        vocab = getattr(getattr(inner, "config", None), "vocab_size", None)
        self.vocab_size: int | None = int(vocab) if vocab is not None else None
        self.optimizer, self.scheduler = make_optimizer(model, settings)
        self.admitter = Admitter(settings, redis_client, task) if task is not None else None
        self.consumer = Consumer.from_settings(
            redis_client,
            settings.streams,
            settings.streams.scored,
            CONSUMER_GROUP,
            consumer_name,
            records_pb2.ScoredGroup,
            registry=metrics.REGISTRY,
        )
        self.stop_event = threading.Event()
        self.counters: dict[str, float] = {
            "groups_trained": 0.0,
            "groups_dropped_stale": 0.0,
            "samples": 0.0,
            "duplicates_skipped": 0.0,
        }
        self.intake = Intake(
            self.consumer,
            lambda group: untrainable_reason(group, self.cfg, self.vocab_size),
            self.counters,
        )
        self.version = 0
        self.published_version = -1  # newest version verified in the store
        self.submitted_version = -1  # newest version handed to the publisher
        self.publish_blocked_s = 0.0  # the training loop's blocked time in the last publish
        # The frozen starting model learner.kl_coef pulls towards (set by the service).
        self.reference: torch.nn.Module | None = None
        self._checkpoint_s_since_record = 0.0  # goes into the next step's record
        # Set by the service (learner.prefetch): reads the stream on its own thread.
        self.prefetcher: Prefetcher | None = None
        self._first_publish_done = False
        self.last_record: dict[str, Any] = {}
        self._checkpoint_requests: queue.SimpleQueue[Future[str]] = queue.SimpleQueue()
        self._resume()

    # -- resume -------------------------------------------------------------------------

    def _resume(self) -> None:
        path = latest_checkpoint(self.lc.checkpoint_dir)
        if path is not None:
            state = load_checkpoint(path, self.model, self.optimizer, self.scheduler)
            self.version = state.version
            self.published_version = state.published_version
            self.counters.update(state.counters)
            self.intake.restore(state.trained_group_ids)
            if state.unacked_entry_ids:  # the crash may have come before these acks
                self.consumer.ack(state.unacked_entry_ids)
            log.info("resumed from %s at version %d", path, self.version)
        self.submitted_version = self.published_version
        if self.publisher is not None:
            self.publisher.resumed(self.published_version)
        for delivery in self.consumer.read_pending():  # what we held before a restart
            self.intake.accept(delivery)
        metrics.POLICY_VERSION.set(self.version)

    # -- intake (services/learner/intake.py) -------------------------------------------

    def admit(self) -> int:
        """Admit the prompts the staleness bound allows now.

        The bound counts from the *published* version, not the learner's: rollout can only
        be held to a version it can load, so a prompt admitted at learner version v with
        published version p < v is answered with weights as old as p and trained around
        step ``seq // groups_per_step``; bounding by v would let it arrive up to
        ``v - p`` versions staler than ``max_staleness`` and be dropped.
        """
        if self.admitter is None:
            return 0
        self._refresh_published()
        published = max(self.published_version, 0)
        # Without a publisher nothing holds rollout back: the learner's version bounds.
        bound_version = published if self.publisher is not None else self.version
        n = self.admitter.admit(bound_version, published)
        if n:
            metrics.PROMPTS_ADMITTED.inc(n)
        return n

    def staleness(self, group: TrainGroup) -> int:
        """Learner version minus the oldest version that generated a sample of ``group``."""
        return self.version - group.oldest_version

    def collect(self, timeout_s: float | None = None) -> list[Held] | None:
        """The next ``groups_per_step`` fresh groups (stale ones are dropped, counted).

        Returns None when stopped or after ``timeout_s`` without a full batch.
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        batch: list[Held] = []
        while True:
            self.intake.take(self.lc.groups_per_step, self._too_stale, batch)
            if len(batch) >= self.lc.groups_per_step:
                return batch
            if self.stop_event.is_set() or (deadline is not None and time.monotonic() > deadline):
                self.intake.put_back(batch)
                return None
            self.intake.renew_due()
            if self.publisher is not None:
                before = self.published_version
                self._refresh_published()
                if self.published_version != before:
                    self.admit()  # a newly published version opens the admission window
            for delivery in self._next_deliveries():
                self.intake.accept(delivery)

    def _too_stale(self, group: TrainGroup) -> bool:
        return self.staleness(group) > self.lc.max_staleness

    def _next_deliveries(self) -> list[Delivery[records_pb2.ScoredGroup]]:
        """What the prefetch thread read meanwhile, or else a read of our own (<= 200 ms)."""
        if self.prefetcher is not None:
            return self.prefetcher.take(timeout_s=0.2)
        return self.consumer.read(count=self.lc.groups_per_step, block_ms=200)

    # -- one step -----------------------------------------------------------------------

    def step(self, timeout_s: float | None = None) -> dict[str, Any] | None:
        """Admit, gather a batch, train one step, publish/checkpoint when due.

        Returns the metrics record of the step, or None if no batch came (stopped/timeout).
        """
        if self.publisher is not None and not self._first_publish_done:
            self._first_publish_done = True
            if self.submitted_version < self.version:
                self.publish()  # version 0, or a resumed version that never reached the store
        waited = time.monotonic()
        self.admit()
        batch = self.collect(timeout_s)
        if batch is None:
            return None
        start = time.monotonic()
        metrics.WAIT_SECONDS.inc(start - waited)
        stalenesses = [self.version - v for h in batch for v in h.group.versions]
        groups = [h.group for h in batch]
        local = groups
        if self.dist is not None and self.dist.active:
            broadcast_batch([h.delivery.msg.SerializeToString() for h in batch])
            local = shard(groups, self.dist)
        stats = train_step(
            self.model,
            self.optimizer,
            local,
            self.cfg,
            self.scheduler,
            pad_id=self.pad_id,
            reference=self.reference,
        )
        seconds = max(time.monotonic() - start, 1e-9)
        metrics.BUSY_SECONDS.inc(seconds)
        self.version += 1
        self.intake.trained(batch)
        n_samples = sum(len(g.completions) for g in groups)
        correct = sum(h.correct for h in batch)
        self.counters["groups_trained"] += len(batch)
        self.counters["samples"] += n_samples
        record = self._record(stats, stalenesses, correct / max(n_samples, 1), n_samples / seconds)
        # The audit trail of exactly-once training: which groups this version was trained on.
        record["group_ids"] = [h.group.group_id for h in batch]
        # Where the step's wall time went (seconds): waiting for a batch, training, and
        # below publishing and checkpointing (the learner's busy fraction is train/total).
        record["wait_s"] = start - waited
        record["train_s"] = seconds
        record["publish_blocked_s"] = 0.0
        mark = time.monotonic()
        if self.version % self.lc.publish_every == 0 and self.publisher is not None:
            self.publish()
            record["publish_blocked_s"] = self.publish_blocked_s
        record["publish_s"] = time.monotonic() - mark
        record["published_version"] = self.published_version
        # The checkpoint comes after the record is on disk, so a checkpointed step always
        # has its line in metrics.jsonl (a kill between the two would otherwise lose it
        # for good: the resumed learner starts after that step). Its time therefore goes
        # into the next record's checkpoint_s (time spent checkpointing since the last one).
        record["checkpoint_s"] = self._checkpoint_s_since_record
        self._export(record, stalenesses, len(batch), n_samples)
        self.last_record = record
        mark = time.monotonic()
        self._checkpoint_s_since_record = 0.0
        if self.version % self.lc.checkpoint_every == 0:
            self.checkpoint()
            self._checkpoint_s_since_record = time.monotonic() - mark
        self.admit()
        return record

    def _record(
        self, stats: dict[str, float], stalenesses: list[int], accuracy: float, rate: float
    ) -> dict[str, Any]:
        return {
            "step": self.version,
            "version": self.version,
            "time": time.time(),
            **{k: v for k, v in stats.items() if k not in ("groups", "samples", "tokens")},
            "tokens": int(stats["tokens"]),
            "staleness_mean": sum(stalenesses) / max(len(stalenesses), 1),
            "staleness_max": max(stalenesses, default=0),
            "train_accuracy": accuracy,
            "samples_per_s": rate,
            "groups_trained": int(self.counters["groups_trained"]),
            "groups_dropped_stale": int(self.counters["groups_dropped_stale"]),
            "lr": self.scheduler.get_last_lr()[0],
        }

    def _export(
        self, rec: dict[str, Any], stalenesses: list[int], groups: int, samples: int
    ) -> None:
        metrics.POLICY_VERSION.set(self.version)
        for s in stalenesses:
            metrics.STALENESS.observe(max(s, 0))
        for gauge, key in (
            (metrics.LOSS, "loss"),
            (metrics.LOSS_BALANCE, "loss_balance"),
            (metrics.LOSS_POSITIVE, "loss_positive"),
            (metrics.LOSS_NEGATIVE, "loss_negative"),
            (metrics.NLL_POSITIVE, "nll_positive"),
            (metrics.NLL_NEGATIVE, "nll_negative"),
            (metrics.ENTROPY, "entropy"),
            (metrics.REWARD_MEAN, "reward_mean"),
            (metrics.ACCURACY, "train_accuracy"),
            (metrics.GRAD_NORM, "grad_norm"),
            (metrics.SAMPLES_PER_S, "samples_per_s"),
            (metrics.UPDATE_NORM.labels(side="positive"), "update_norm_positive"),
            (metrics.UPDATE_NORM.labels(side="negative"), "update_norm_negative"),
            (metrics.UPDATE_SHARE_POSITIVE, "update_share_positive"),
            (metrics.IMPORTANCE_RATIO_MEAN, "ratio_mean"),
            (metrics.CLIP_FRACTION, "clip_fraction"),
        ):
            if key not in rec:  # ratio statistics exist only under behaviour-corrected losses
                continue
            value = float(rec[key])
            gauge.set(value if math.isfinite(value) else float("nan"))
        metrics.SAMPLES.inc(samples)
        metrics.GROUPS_TRAINED.inc(groups)
        metrics.GROUPS_ZERO_ADV.inc(rec["zero_adv_groups"])
        if self.writer is not None:
            self.writer.write(rec)

    # -- publish and checkpoint -----------------------------------------------------------

    def publish(self) -> None:
        """Hand the current weights to the publisher as ``version`` (see
        services/learner/publisher.py: a background publisher only snapshots here)."""
        if self.publisher is None:
            return
        self._tell_followers(PUBLISH)  # under fsdp they join the probe and the gather
        self.publish_blocked_s = self.publisher.submit(self.version, self.model)
        self.submitted_version = self.version
        self._refresh_published()

    def _refresh_published(self) -> None:
        """Take the publisher's newest verified version (and raise its failure, if any)."""
        if self.publisher is None:
            return
        self.publisher.check()
        published = self.publisher.published()
        if published > self.published_version:
            self.published_version = published
            metrics.PUBLISHED_VERSION.set(published)

    def finish_publishing(self, timeout_s: float | None = None) -> bool:
        """Publish the current version if it is not yet, and wait until the store has it."""
        if self.publisher is None:
            return True
        if self.submitted_version < self.version:
            self.publish()
        done = self.publisher.wait(timeout_s)
        self._refresh_published()
        return done

    def checkpoint(self) -> str:
        """Write a checkpoint, then ack every entry whose effect it contains."""
        self._refresh_published()
        state = LearnerState(
            version=self.version,
            published_version=self.published_version,
            unacked_entry_ids=list(self.intake.unacked),
            trained_group_ids=list(self.intake.trained_ids),
            counters=dict(self.counters),
        )
        self._tell_followers(CHECKPOINT, self.version)
        path = save_checkpoint(
            self.lc.checkpoint_dir, self.model, self.optimizer, self.scheduler, state
        )
        self.intake.ack_checkpointed()
        return str(path)

    def request_checkpoint(self) -> Future[str]:
        """Ask for a checkpoint from another thread; the training loop writes it between steps.

        The future resolves to the checkpoint's directory.
        """
        future: Future[str] = Future()
        self._checkpoint_requests.put(future)
        return future

    def serve_requests(self) -> None:
        """Write the checkpoints other threads asked for (call between steps)."""
        while True:
            try:
                future = self._checkpoint_requests.get_nowait()
            except queue.Empty:
                return
            try:
                future.set_result(self.checkpoint())
            except Exception as exc:  # the requester gets the failure; training goes on
                future.set_exception(exc)

    def _tell_followers(self, command: int, arg: int = 0) -> None:
        """Under FSDP the other ranks must join a publish/checkpoint/gather: tell them."""
        if self.dist is not None and self.dist.active and is_sharded(self.model):
            send_command(command, arg)

    def gather_weights(self) -> dict[str, torch.Tensor]:
        """The full weights on the CPU (rank 0; the other ranks join under FSDP)."""
        self._tell_followers(GATHER)
        return full_state_dict(self.model)

    def stop_followers(self) -> None:
        """Tell the other ranks (if any) that training is over."""
        if self.dist is not None and self.dist.active:
            broadcast_batch(None)


def follow(
    settings: Settings,
    model: torch.nn.Module,
    info: DistInfo,
    pad_id: int = 0,
    reference: torch.nn.Module | None = None,
) -> int:
    """Ranks > 0: train the shard of every batch rank 0 broadcasts until it says stop.

    Resumes model, optimiser and scheduler from the same checkpoint as rank 0 (the
    checkpoint directory must be shared). Under FSDP it also joins rank 0's checkpoints,
    publications (probe forward and weight gather) and gathers. Returns the steps taken.
    """
    optimizer, scheduler = make_optimizer(model, settings)
    path = latest_checkpoint(settings.learner.checkpoint_dir)
    if path is not None:
        load_checkpoint(path, model, optimizer, scheduler)
    cfg = step_config(settings)
    steps = 0
    while (command := receive_command()).kind != STOP:
        if command.kind == BATCH:
            groups = shard(decode_batch(command.payload or []), info)
            train_step(model, optimizer, groups, cfg, scheduler, pad_id=pad_id, reference=reference)
            steps += 1
        elif command.kind == CHECKPOINT:
            save_checkpoint_shards(settings.learner.checkpoint_dir, command.arg, model, optimizer)
        elif command.kind == PUBLISH:  # the same collectives, in the same order, as rank 0
            config: Any = getattr(model, "config", None)
            probe_logprobs(model, probe_tokens(int(config.vocab_size)))
            full_state_dict(model)
        elif command.kind == GATHER:
            full_state_dict(model)
    return steps
