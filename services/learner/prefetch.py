"""Reading the scored stream while the learner trains, so a step never waits on a read.

``Prefetcher.step`` is a supervised loop (asympo.service): it reads and decodes the next
scored groups from the learner's consumer into a bounded queue while the training loop
runs ``train_step``; ``Learner.collect`` takes them from the queue instead of blocking on
Redis itself. Everything the learner decides about a delivery (dedupe, poison checks,
staleness, acks) stays on the training thread: this thread only reads.

Nothing is lost on a stop or crash: a queued delivery is an entry pending to the learner's
consumer, re-read on restart (``Consumer.read_pending``); one re-delivered while queued is
a duplicate the learner already skips by entry id.
"""

from __future__ import annotations

import queue
import time

from asympo.transport.streams import Consumer, Delivery
from asympo.v1 import records_pb2

ScoredDelivery = Delivery[records_pb2.ScoredGroup]


class Prefetcher:
    """Keeps up to ``max_queued`` decoded deliveries ready, read ``count`` at a time."""

    def __init__(
        self, consumer: Consumer[records_pb2.ScoredGroup], count: int, max_queued: int
    ) -> None:
        if count < 1 or max_queued < count:
            raise ValueError(f"need 1 <= count <= max_queued, got {count}, {max_queued}")
        self.consumer = consumer
        self.count = count
        self.max_queued = max_queued
        self._queue: queue.Queue[ScoredDelivery] = queue.Queue()
        self.reads = 0  # stream reads made on this thread (what the training thread saved)

    def step(self) -> None:
        """One read into the queue (blocking up to 200 ms); a short pause when it is full."""
        room = self.max_queued - self._queue.qsize()
        if room <= 0:
            time.sleep(0.01)
            return
        deliveries = self.consumer.read(count=min(self.count, room), block_ms=200)
        self.reads += 1
        for delivery in deliveries:
            self._queue.put(delivery)

    def take(self, timeout_s: float) -> list[ScoredDelivery]:
        """Everything queued now; if nothing is, what arrives within ``timeout_s``."""
        try:
            taken = [self._queue.get(timeout=timeout_s)]
        except queue.Empty:
            return []
        while True:
            try:
                taken.append(self._queue.get_nowait())
            except queue.Empty:
                return taken

    def queued(self) -> int:
        """Deliveries read and not yet taken."""
        return self._queue.qsize()
