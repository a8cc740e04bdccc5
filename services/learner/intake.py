"""The learner's side of the scored stream: what it holds, what awaits an ack, what it
has trained, and the filters a group passes before it may reach the step.

``Intake`` knows nothing of its owner (no model, no versions, no publishing): the learner
passes in the check that decides whether the step could train a group and, per batch,
which groups are too stale. Exactly-once training rests on three sets kept here:

* ``held_ids`` — entries read and not yet acked (their leases are renewed);
* ``unacked`` — entries whose effect (trained, dropped as stale, skipped as duplicate)
  the next checkpoint will contain; acked only after that checkpoint is written;
* ``trained_ids`` — group ids already trained (checkpointed), so a re-delivered group,
  e.g. after a crash between checkpoint and ack, is skipped rather than trained twice.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Iterable, MutableMapping
from dataclasses import dataclass

from asympo.rl.training import TrainGroup
from asympo.transport.streams import Consumer, Delivery
from asympo.v1 import records_pb2
from services.learner import metrics
from services.learner.records import group_from_scored

log = logging.getLogger("asympo.learner")

# Group ids remembered as trained (for dedupe after re-delivery); oldest forgotten first.
TRAINED_IDS_KEPT = 100_000

ScoredDelivery = Delivery[records_pb2.ScoredGroup]


@dataclass
class Held:
    """A scored group the learner holds (read, not yet acked)."""

    delivery: ScoredDelivery
    group: TrainGroup
    correct: int


class Intake:
    """Accepts deliveries into a buffer and hands out batches of fresh groups.

    ``untrainable(group)`` returns ``(reason, detail)`` for a group the step would reject
    (it is dead-lettered here, never reaching the step) or None. ``counters`` is the
    learner's checkpointed counter dict (``duplicates_skipped``, ``groups_dropped_stale``).
    """

    def __init__(
        self,
        consumer: Consumer[records_pb2.ScoredGroup],
        untrainable: Callable[[TrainGroup], tuple[str, str] | None],
        counters: MutableMapping[str, float],
    ) -> None:
        self.consumer = consumer
        self.untrainable = untrainable
        self.counters = counters
        self.buffer: list[Held] = []
        self.held_ids: set[str] = set()
        self.unacked: list[str] = []
        self.trained_ids: OrderedDict[str, None] = OrderedDict()

    def restore(self, trained_group_ids: Iterable[str]) -> None:
        """The trained group ids a checkpoint recorded."""
        self.trained_ids = OrderedDict.fromkeys(trained_group_ids)

    def accept(self, delivery: ScoredDelivery) -> None:
        """Hold ``delivery`` for training, or settle it now (duplicate, poison)."""
        if delivery.entry_id in self.held_ids:
            return  # a re-delivery of an entry we hold
        group_id = delivery.msg.rollout.group_id
        if group_id in self.trained_ids:
            self.counters["duplicates_skipped"] += 1
            self.held_ids.add(delivery.entry_id)
            self.unacked.append(delivery.entry_id)
            return
        try:
            group = group_from_scored(delivery.msg)
        except ValueError as exc:
            self.consumer.dead_letter(delivery, "invalid_group", str(exc))
            return
        # A group the step would reject must never reach it: it would fail every step,
        # and after a restart the same pending entry would fail it again, forever.
        bad = self.untrainable(group)
        if bad is not None:
            log.warning("dead-lettering untrainable group (%s): %s", *bad)
            self.consumer.dead_letter(delivery, *bad)
            return
        correct = sum(1 for s in delivery.msg.scores if s.correct)
        self.held_ids.add(delivery.entry_id)
        self.buffer.append(Held(delivery, group, correct))

    def take(self, n: int, stale: Callable[[TrainGroup], bool], batch: list[Held]) -> None:
        """Move held groups into ``batch`` until it has ``n``, dropping (and counting)
        the ``stale`` ones on the way, oldest first."""
        while self.buffer and len(batch) < n:
            item = self.buffer.pop(0)
            if stale(item.group):
                self.counters["groups_dropped_stale"] += 1
                metrics.GROUPS_DROPPED_STALE.inc()
                self.unacked.append(item.delivery.entry_id)
                continue
            batch.append(item)

    def put_back(self, batch: list[Held]) -> None:
        """Return an unfinished batch to the front, in order, for the next attempt."""
        self.buffer[:0] = batch

    def trained(self, batch: list[Held]) -> None:
        """Record that ``batch`` was trained: its entries await the next checkpoint's ack."""
        for h in batch:
            self.unacked.append(h.delivery.entry_id)
            self.trained_ids[h.group.group_id] = None
        while len(self.trained_ids) > TRAINED_IDS_KEPT:
            self.trained_ids.popitem(last=False)

    def renew_due(self) -> None:
        """Keep the leases of held entries so nobody reclaims them from us."""
        self.consumer.renew_due(self.held_ids)

    def ack_checkpointed(self) -> None:
        """Ack every entry whose effect the checkpoint just written contains."""
        if self.unacked:
            self.consumer.ack(self.unacked)
            self.held_ids.difference_update(self.unacked)
            self.unacked = []
