"""Reading a broadcast stream: every reader sees every entry, nothing is acked."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, cast

import redis

from asympo.transport.streams.codec import DecodeFailure, M, as_str, decode

if TYPE_CHECKING:
    from asympo.config import StreamSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Entry(Generic[M]):
    """One decoded entry of a broadcast stream."""

    entry_id: str
    msg: M


class Subscriber(Generic[M]):
    """Reads every ``msg_cls`` entry of ``stream_key`` from its start, in order.

    A plain XREAD with no consumer group: each entry is meant for every reader (e.g. a
    weights announcement for every rollout replica), so there is nothing to ack, claim or
    dead-letter. An entry that does not decode (or is over ``max_entry_bytes``) is logged
    and skipped. Not thread-safe; give each thread its own.
    """

    def __init__(
        self,
        redis_client: redis.Redis,
        stream_key: str,
        msg_cls: type[M],
        max_entry_bytes: int | None = None,
    ) -> None:
        self.redis = redis_client
        self.stream_key = stream_key
        self.msg_cls = msg_cls
        self.max_entry_bytes = max_entry_bytes
        self.last_id = "0-0"  # the newest entry read so far

    @classmethod
    def from_settings(
        cls, redis_client: redis.Redis, streams: StreamSettings, name: str, msg_cls: type[M]
    ) -> Subscriber[M]:
        """A subscriber to stream ``name`` (e.g. ``streams.weights``) of this run."""
        return cls(
            redis_client, streams.key(name), msg_cls, max_entry_bytes=streams.max_entry_bytes
        )

    def read(self, count: int = 64, block_ms: int | None = None) -> list[Entry[M]]:
        """Up to ``count`` entries after the last one read.

        Blocks up to ``block_ms`` (if > 0) when there is none yet; ``None`` or 0 returns
        at once. Undecodable entries are skipped, so the list can be shorter than the
        entries read. Redis errors propagate.
        """
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count}")
        reply = self.redis.xread(
            {self.stream_key: self.last_id}, count=count, block=block_ms or None
        )
        entries: list[Entry[M]] = []
        for _key, rows in cast("list[Any]", reply or []):
            for raw_id, fields in rows:
                self.last_id = as_str(raw_id)
                try:
                    msg = decode(dict(fields or {}), self.msg_cls, self.max_entry_bytes)
                except DecodeFailure as exc:
                    log.error("undecodable entry %s of %s: %s", self.last_id, self.stream_key, exc)
                    continue
                entries.append(Entry(self.last_id, msg))
        return entries
