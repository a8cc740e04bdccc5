"""Follow the weights stream and swap each newer version into the engine.

Every replica reads the whole weights stream (a :class:`asympo.transport.streams.Subscriber`: no
consumer group, each announcement is for everyone). A version is fetched and verified
(BLAKE3) by the weights client — or, with ``rollout.shared_store_dir`` set, opened in
place in the store (see :func:`asympo.transport.weights_client.open_shared`) — then offered to the
swapper, which proves it with the probe or refuses it.

With ``weights.transport=broadcast`` (:class:`BroadcastLink`) the engine's workers are
also members of the learner's broadcast group: a version they received is offered
first, loaded straight from their receive buffers, and proven by the same probe. Any
failure there (the group lost, a load that did not land, a probe mismatch) falls back
to the store path for that version; versions broadcast before the replica joined (a
late joiner) come from the store, as without broadcast.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Protocol

import redis

from asympo.config import Settings
from asympo.transport.streams import Subscriber
from asympo.transport.weight_broadcast import BroadcastState
from asympo.transport.weights_client import (
    FetchResult,
    WeightsClient,
    WeightsClientError,
    link_shared,
    open_shared,
    prune_local,
)
from asympo.v1 import records_pb2
from services.rollout import metrics
from services.rollout.swap import SwapOutcome, WeightSwapper

log = logging.getLogger(__name__)

# How often a broadcast member looks for a received version (one engine RPC each time).
BROADCAST_POLL_MS = 50


class BroadcastEngine(Protocol):
    """What the broadcast path needs of an engine (the vLLM engine has it)."""

    def join_broadcast(self, host: str, port: int, timeout_s: float) -> None:
        """Join the learner's group at ``host:port`` (completes in the background)."""

    def broadcast_state(self) -> BroadcastState:
        """The membership and the version staged in the workers."""

    def load_broadcast(self, version: int) -> None:
        """Swap to the staged ``version``."""


class BroadcastLink:
    """This replica's membership in the learner's broadcast group.

    Joins through the endpoint the learner registered with the weights service, and joins
    again (at most every ``rejoin_s``) whenever the membership ended: the learner
    restarted, dropped this member after a failed send, or is not up yet.
    """

    def __init__(
        self,
        engine: BroadcastEngine,
        weights: WeightsClient,
        timeout_s: float,
        rejoin_s: float = 2.0,
    ) -> None:
        self.engine = engine
        self.weights = weights
        self.timeout_s = timeout_s
        self.rejoin_s = rejoin_s
        self.joins = 0
        self._last_join = -float("inf")

    def poll(self) -> BroadcastState:
        """The current membership, after (re)joining if it had ended."""
        state = self.engine.broadcast_state()
        if state.alive or time.monotonic() - self._last_join < self.rejoin_s:
            return state
        self._last_join = time.monotonic()
        try:
            endpoint = self.weights.broadcast_endpoint()
        except WeightsClientError as exc:
            log.warning("weights service not answering GetBroadcast: %s", exc)
            return state
        if endpoint is None:
            return state
        if state.error:
            log.warning("broadcast membership ended (%s); joining again", state.error)
        self.engine.join_broadcast(endpoint.host, endpoint.port, self.timeout_s)
        self.joins += 1
        return self.engine.broadcast_state()


class VersionFollower:
    """Applies the newest announced version; runs on its own thread."""

    def __init__(
        self,
        client: redis.Redis,
        stream_key: str,
        weights: WeightsClient,
        swapper: WeightSwapper,
        work_dir: Path,
        tolerance: float,
        shared_store_dir: Path | None = None,
        broadcast: BroadcastLink | None = None,
        max_entry_bytes: int | None = None,
    ) -> None:
        self.announcements = Subscriber(
            client, stream_key, records_pb2.VersionAnnouncement, max_entry_bytes
        )
        self.weights = weights
        self.swapper = swapper
        self.work_dir = work_dir
        self.tolerance = tolerance
        self.shared_store_dir = shared_store_dir
        self.broadcast = broadcast
        self.broadcast_failed: set[int] = set()  # versions the store path must bring
        self.refused: set[int] = set()
        self.stop_event = threading.Event()
        self.outcomes: list[SwapOutcome] = []
        self._caught_up = False

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        client: redis.Redis,
        weights: WeightsClient,
        swapper: WeightSwapper,
        broadcast: BroadcastLink | None = None,
    ) -> VersionFollower:
        """A follower of this run's weights stream, fetching into ``rollout.work_dir``."""
        return cls(
            client,
            settings.streams.key(settings.streams.weights),
            weights,
            swapper,
            Path(settings.rollout.work_dir) / "weights",
            settings.rollout.probe_tolerance,
            Path(settings.rollout.shared_store_dir) if settings.rollout.shared_store_dir else None,
            broadcast,
            settings.streams.max_entry_bytes,
        )

    def _open_shared(self, version: int) -> FetchResult | None:
        """``version`` in the shared store, hard-linked into the work directory when it can
        be (so retention cannot take the files of the version being served)."""
        if not self.shared_store_dir:
            return None
        shared = open_shared(self.shared_store_dir, version)
        if shared is None:
            return None
        return link_shared(shared, self.work_dir) or shared

    def _files(self, version: int) -> FetchResult:
        """``version``'s verified files: in place in a shared store, else fetched."""
        return self._open_shared(version) or self.weights.fetch_into(version, self.work_dir)

    def fetch(self, version: int) -> Path:
        """``version``'s verified files (in place in a shared store, else fetched)."""
        return self._files(version).path

    def apply_broadcast(self) -> SwapOutcome | None:
        """Offer the version the workers received over the broadcast, if it is newer; on
        any failure, the store path for that version (now, or when it is announced)."""
        if self.broadcast is None:
            return None
        state = self.broadcast.poll()
        version = state.version
        if version <= self.swapper.version or version in self.broadcast_failed:
            return None
        start = time.monotonic()
        engine = self.broadcast.engine
        outcome = self.swapper.offer_loaded(
            version,
            state.probe,
            self.tolerance,
            lambda: engine.load_broadcast(version),
            source="broadcast",
        )
        self.outcomes.append(outcome)
        if outcome.accepted:
            metrics.SWAP_SECONDS.observe(time.monotonic() - start)
            return outcome
        self.broadcast_failed.add(version)
        log.warning(
            "broadcast of version %d refused (%s); falling back to the store",
            *(version, outcome.reason),
        )
        self.catch_up()  # the store path, if the store has it already (else its announcement)
        return outcome

    def apply(self, version: int) -> SwapOutcome | None:
        """Fetch, verify and offer ``version``; None when it is not newer or was refused."""
        if version <= self.swapper.version or version in self.refused:
            return None
        start = time.monotonic()
        try:
            result = self._files(version)
        except WeightsClientError as exc:
            log.error("cannot fetch version %d: %s", version, exc)
            return None
        outcome = self.swapper.offer(result.manifest, result.path, self.tolerance)
        seconds = time.monotonic() - start
        if outcome.accepted:
            metrics.SWAP_SECONDS.observe(seconds)
            prune_local(self.work_dir, keep={outcome.version})
        else:
            self.refused.add(version)
        self.outcomes.append(outcome)
        return outcome

    def catch_up(self) -> None:
        """Apply the latest published version, if any and newer."""
        try:
            latest = self.weights.latest()
        except WeightsClientError as exc:
            log.warning("weights service not answering Latest: %s", exc)
            return
        if latest is not None:
            self.apply(latest.version)

    def step(self, block_ms: int = 1000) -> None:
        """Catch up once, then: block on the weights stream, apply the newest announcement.

        Redis errors propagate: the service's supervised loop retries them.
        """
        if not self._caught_up:
            self.catch_up()
            self._caught_up = True
        if self.broadcast is not None:
            self.apply_broadcast()
            block_ms = min(block_ms, BROADCAST_POLL_MS)
        announced = self.announcements.read(count=64, block_ms=block_ms)
        newest = max((entry.msg.version for entry in announced), default=-1)
        if newest > self.swapper.version:
            if self.broadcast is not None:
                self.apply_broadcast()  # the broadcast usually brought it already
            self.apply(newest)

    def run(self) -> None:
        """Until stopped: ``step`` over and over, riding out Redis errors."""
        while not self.stop_event.is_set():
            try:
                self.step()
            except redis.RedisError as exc:
                log.warning("weights stream read failed: %s", exc)
                time.sleep(1.0)
