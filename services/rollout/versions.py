"""Follow the weights stream and swap each newer version into the engine.

Every replica reads the whole weights stream (plain XREAD, no consumer group: each
announcement is for everyone). A version is fetched and verified (BLAKE3) by the
weights client — or, with ``rollout.shared_store_dir`` set, opened in place in the
store (see :func:`asympo.weights_client.open_shared`) — then offered to the swapper,
which proves it with the probe or refuses it.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any, cast

import redis

from asympo.config import Settings
from asympo.streams import DecodeFailure, decode
from asympo.v1 import records_pb2
from asympo.weights_client import WeightsClient, WeightsClientError, open_shared, prune_local
from services.rollout import metrics
from services.rollout.swap import SwapOutcome, WeightSwapper

log = logging.getLogger(__name__)


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
    ) -> None:
        self.redis = client
        self.stream_key = stream_key
        self.weights = weights
        self.swapper = swapper
        self.work_dir = work_dir
        self.tolerance = tolerance
        self.shared_store_dir = shared_store_dir
        self.refused: set[int] = set()
        self.stop_event = threading.Event()
        self.outcomes: list[SwapOutcome] = []
        self._caught_up = False
        self._last_id = "0-0"

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        client: redis.Redis,
        weights: WeightsClient,
        swapper: WeightSwapper,
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
        )

    def apply(self, version: int) -> SwapOutcome | None:
        """Fetch, verify and offer ``version``; None when it is not newer or was refused."""
        if version <= self.swapper.version or version in self.refused:
            return None
        start = time.monotonic()
        shared = open_shared(self.shared_store_dir, version) if self.shared_store_dir else None
        try:
            result = shared or self.weights.fetch_into(version, self.work_dir)
        except WeightsClientError as exc:
            log.error("cannot fetch version %d: %s", version, exc)
            return None
        outcome = self.swapper.offer(result.manifest, result.path, self.tolerance)
        seconds = time.monotonic() - start
        if outcome.accepted:
            metrics.SWAP_SECONDS.observe(seconds)
            if shared is None:
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
        reply = self.redis.xread({self.stream_key: self._last_id}, count=64, block=block_ms)
        newest = -1
        for _key, entries in cast(list[Any], reply or []):
            for entry_id, fields in entries:
                self._last_id = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
                try:
                    ann = decode(dict(fields), records_pb2.VersionAnnouncement)
                except DecodeFailure as exc:
                    log.error("undecodable weights announcement %s: %s", self._last_id, exc)
                    continue
                newest = max(newest, ann.version)
        if newest > self.swapper.version:
            self.apply(newest)

    def run(self) -> None:
        """Until stopped: ``step`` over and over, riding out Redis errors."""
        while not self.stop_event.is_set():
            try:
                self.step()
            except redis.RedisError as exc:
                log.warning("weights stream read failed: %s", exc)
                time.sleep(1.0)
