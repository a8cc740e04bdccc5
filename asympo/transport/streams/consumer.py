"""Reading a stream through a consumer group: leases, reclaims, dead letters, acks."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, NamedTuple, cast

import redis
from prometheus_client import CollectorRegistry

from asympo.transport.stream_trim import trim_acknowledged
from asympo.transport.streams.codec import (
    FIELD_MSG,
    FIELD_TYPE,
    REASON_MAX_DELIVERIES,
    REASON_TOO_LARGE,
    DecodeFailure,
    M,
    as_str,
    decode,
    encode,
    wire,
)
from asympo.transport.streams.metrics import lag, stream_metrics
from asympo.transport.streams.producer import DEFAULT_MAXLEN
from asympo.v1 import records_pb2

if TYPE_CHECKING:
    from redis.commands.core import Script

    from asympo.config import StreamSettings

log = logging.getLogger(__name__)

DEAD_LETTER_PAYLOAD_KEPT = 64 * 1024
# Leases are renewed this many times per reclaim_idle_ms, so a couple of late or failed
# renewals still leave the entry looking alive.
RENEWALS_PER_IDLE = 4


@dataclass(frozen=True)
class Delivery(Generic[M]):
    """One decoded entry handed to the caller; ack it once its effect is durable."""

    entry_id: str
    msg: M
    deliveries: int  # how many times the group has delivered this entry (1 = first time)
    stream: str


class _Raw(NamedTuple):
    entry_id: str
    fields: dict[bytes, bytes]
    deliveries: int


class Consumer(Generic[M]):
    """Reads ``msg_cls`` messages from ``stream_key`` as ``consumer`` of ``group``.

    ``read`` first reclaims entries other consumers left pending for ``reclaim_idle_ms``
    (at most every ``reclaim_every_ms``), then reads new ones. Undecodable entries (and
    payloads over ``max_entry_bytes``) and entries delivered more than ``max_deliveries``
    times are dead-lettered (to ``dead_letter_key``) inside ``read`` and never returned.

    ``reclaim_idle_ms`` must exceed the longest time the caller holds an entry before
    acking it: past that, the entry is taken to belong to a dead consumer and is
    delivered again (possibly to this same consumer), so effects must be idempotent.
    A caller that may hold entries longer keeps their leases: :meth:`holding` renews them
    in the background while a body of work runs, :meth:`renew_due` from the caller's own
    loop; both renew every ``renew_every_s`` (a quarter of ``reclaim_idle_ms``).

    A consumer is not thread-safe; give each thread its own (with its own name).
    """

    def __init__(
        self,
        redis_client: redis.Redis,
        stream_key: str,
        group: str,
        consumer: str,
        msg_cls: type[M],
        dead_letter_key: str,
        max_deliveries: int = 5,
        reclaim_idle_ms: int = 30_000,
        *,
        registry: CollectorRegistry | None = None,
        reclaim_every_ms: int | None = None,
        dead_letter_maxlen: int | None = DEFAULT_MAXLEN,
        max_entry_bytes: int | None = None,
        lag_refresh_s: float = 5.0,
        trim_every_s: float | None = 10.0,
    ) -> None:
        if max_deliveries < 1:
            raise ValueError(f"max_deliveries must be >= 1, got {max_deliveries}")
        if reclaim_idle_ms < 1:
            raise ValueError(f"reclaim_idle_ms must be >= 1, got {reclaim_idle_ms}")
        self.redis = redis_client
        self.stream_key = stream_key
        self.group = group
        self.consumer = consumer
        self.msg_cls = msg_cls
        self.dead_letter_key = dead_letter_key
        self.max_deliveries = max_deliveries
        self.reclaim_idle_ms = reclaim_idle_ms
        self.reclaim_every_ms = (
            reclaim_every_ms if reclaim_every_ms is not None else max(reclaim_idle_ms // 4, 1)
        )
        self.dead_letter_maxlen = dead_letter_maxlen
        self.max_entry_bytes = max_entry_bytes
        self.lag_refresh_s = lag_refresh_s
        self.metrics = stream_metrics(registry) if registry is not None else None
        self._next_reclaim_at = 0.0
        self._reclaim_cursor = "0-0"
        self._next_lag_at = 0.0
        # Acknowledged entries are trimmed (asympo.transport.stream_trim) at most this often.
        self.trim_every_s = trim_every_s
        self._next_trim_at = 0.0
        self.renew_every_s = reclaim_idle_ms / 1000.0 / RENEWALS_PER_IDLE
        self._next_renew_at = 0.0
        self._produce_and_ack: Script | None = None
        self.ensure_group()

    @classmethod
    def from_settings(
        cls,
        redis_client: redis.Redis,
        streams: StreamSettings,
        name: str,
        group: str,
        consumer: str,
        msg_cls: type[M],
        registry: CollectorRegistry | None = None,
    ) -> Consumer[M]:
        """A consumer of stream ``name`` of this run, with the run's delivery policy."""
        return cls(
            redis_client,
            streams.key(name),
            group,
            consumer,
            msg_cls,
            dead_letter_key=streams.key(streams.dead_letter),
            max_deliveries=streams.max_deliveries,
            reclaim_idle_ms=streams.reclaim_idle_ms,
            registry=registry,
            dead_letter_maxlen=streams.maxlen,
            max_entry_bytes=streams.max_entry_bytes,
            trim_every_s=streams.trim_acked_every_s or None,
        )

    def ensure_group(self) -> None:
        """Create the consumer group (and the stream) if missing, reading from the start."""
        try:
            self.redis.xgroup_create(self.stream_key, self.group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    # -- reading

    def read(self, count: int = 16, block_ms: int | None = None) -> list[Delivery[M]]:
        """Up to ``count`` deliveries: reclaimed ones first, then new entries.

        Blocks up to ``block_ms`` (if > 0) only when nothing was reclaimed and nothing is
        new; ``None`` or 0 returns at once. Entries that are dead-lettered on the way are
        not returned, so the list can be shorter than the entries read.
        """
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count}")
        raws: list[_Raw] = []
        now = time.monotonic()
        if now >= self._next_reclaim_at:
            self._next_reclaim_at = now + self.reclaim_every_ms / 1000.0
            raws.extend(self._reclaim(count))
        if len(raws) < count:
            block = block_ms if (block_ms and not raws) else None
            raws.extend(self._read_new(count - len(raws), block))
        deliveries = self._deliver(raws)
        self._maybe_refresh_lag()
        self.maybe_trim()
        return deliveries

    def _read_new(self, count: int, block_ms: int | None) -> list[_Raw]:
        try:
            reply = self.redis.xreadgroup(
                self.group, self.consumer, {self.stream_key: ">"}, count=count, block=block_ms
            )
        except redis.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            # The stream was deleted (and with it the group): start again from scratch.
            self.ensure_group()
            return []
        raws: list[_Raw] = []
        for _key, entries in cast("list[Any]", reply or []):
            for entry_id, fields in entries:
                raws.append(_Raw(as_str(entry_id), fields or {}, 1))
        return raws

    def _reclaim(self, count: int) -> list[_Raw]:
        """XAUTOCLAIM idle pending entries, with their delivery counts."""
        try:
            reply = self.redis.xautoclaim(
                self.stream_key,
                self.group,
                self.consumer,
                min_idle_time=self.reclaim_idle_ms,
                start_id=self._reclaim_cursor,
                count=count,
            )
        except redis.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            self.ensure_group()
            return []
        scan_start = self._reclaim_cursor
        cursor, entries = reply[0], reply[1]
        self._reclaim_cursor = as_str(cursor)
        claimed: list[tuple[str, dict[bytes, bytes]]] = []
        unknown_trimmed = 0
        for entry_id, fields in entries:
            if entry_id is None or fields is None:
                unknown_trimmed += 1
            else:
                claimed.append((as_str(entry_id), fields))
        trimmed = len(reply[2]) if len(reply) > 2 else 0  # Redis >= 7 drops them itself
        if unknown_trimmed:
            trimmed += self._ack_trimmed(scan_start, self._reclaim_cursor)
        if trimmed:
            # MAXLEN removed them before anyone finished them: the stream bound is too small
            # for the consumers' pace. Nothing is left to process or to dead-letter.
            log.warning(
                "%d pending entries of %s (group %s) were trimmed before being acked",
                trimmed,
                self.stream_key,
                self.group,
            )
        if not claimed:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for entry_id, _fields in claimed:
            pipe.xpending_range(
                self.stream_key, self.group, entry_id, entry_id, 1, consumername=self.consumer
            )
        counts = pipe.execute()
        raws = []
        for (entry_id, fields), pending in zip(claimed, counts, strict=True):
            if not pending:  # acked by its old owner between our claim and now
                continue
            raws.append(_Raw(entry_id, fields, int(pending[0]["times_delivered"])))
        if raws:
            log.info(
                "reclaimed %d entries of %s for %s/%s",
                len(raws),
                self.stream_key,
                self.group,
                self.consumer,
            )
        return raws

    def _ack_trimmed(self, start: str, end: str) -> int:
        """Ack our pending entries in [start, end] that no longer exist; returns how many.

        Redis 6.2 keeps trimmed entries pending forever and XAUTOCLAIM returns them as nil
        (redis-py then loses their ids), so they are found by checking existence.
        """
        pending: list[Any] = cast(
            "list[Any]",
            self.redis.xpending_range(
                self.stream_key,
                self.group,
                start,
                "+" if end == "0-0" else end,
                1000,
                consumername=self.consumer,
            ),
        )
        if not pending:
            return 0
        ids = [as_str(p["message_id"]) for p in pending]
        pipe = self.redis.pipeline(transaction=False)
        for entry_id in ids:
            pipe.xrange(self.stream_key, min=entry_id, max=entry_id, count=1)
        gone = [entry_id for entry_id, found in zip(ids, pipe.execute(), strict=True) if not found]
        if gone:
            self.redis.xack(self.stream_key, self.group, *gone)
        return len(gone)

    def read_pending(self, count: int = 256) -> list[Delivery[M]]:
        """Every entry this consumer was delivered and has not acked, in stream order.

        How a consumer takes back its own work after a restart (nothing waits for
        ``reclaim_idle_ms``). Entries are decoded as :meth:`read` decodes them: one that no
        longer decodes, or is over ``max_entry_bytes``, is dead-lettered and not returned;
        one trimmed away while pending is acked (nothing is left of it). ``max_deliveries``
        is not applied: this is the owner resuming its own work, not a redelivery to a new
        consumer, and an owner restarted many times before finishing still owns it.
        ``count`` is the page size of the underlying reads.
        """
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count}")
        deliveries: list[Delivery[M]] = []
        start = "0"
        while True:
            try:
                reply = self.redis.xreadgroup(
                    self.group, self.consumer, {self.stream_key: start}, count=count
                )
            except redis.ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                self.ensure_group()  # the stream was deleted: nothing is pending any more
                return deliveries
            streams = cast("list[Any]", reply or [])
            rows = streams[0][1] if streams else []
            if not rows:
                return deliveries
            start = as_str(rows[-1][0])
            times = self._times_delivered(as_str(rows[0][0]), start, len(rows))
            raws: list[_Raw] = []
            gone: list[str] = []
            for raw_id, fields in rows:
                entry_id = as_str(raw_id)
                if fields:
                    raws.append(_Raw(entry_id, fields, times.get(entry_id, 1)))
                else:
                    gone.append(entry_id)
            if gone:
                self.redis.xack(self.stream_key, self.group, *gone)
                log.warning(
                    "%d pending entries of %s (group %s) were trimmed before being acked",
                    len(gone),
                    self.stream_key,
                    self.group,
                )
            deliveries.extend(self._deliver(raws, bounded=False))

    def _times_delivered(self, first: str, last: str, count: int) -> dict[str, int]:
        """Delivery counts of this consumer's pending entries in [first, last]."""
        pending = cast(
            "list[Any]",
            self.redis.xpending_range(
                self.stream_key, self.group, first, last, count, consumername=self.consumer
            ),
        )
        return {as_str(p["message_id"]): int(p["times_delivered"]) for p in pending}

    def _deliver(self, raws: Sequence[_Raw], bounded: bool = True) -> list[Delivery[M]]:
        """Decode ``raws``; dead-letter those that fail, or (``bounded``) are redelivered
        more than ``max_deliveries`` times."""
        deliveries: list[Delivery[M]] = []
        for raw in raws:
            if bounded and raw.deliveries > self.max_deliveries:
                self._dead_letter_raw(
                    raw,
                    REASON_MAX_DELIVERIES,
                    f"delivered {raw.deliveries} times (max {self.max_deliveries})",
                )
                continue
            try:
                msg = decode(raw.fields, self.msg_cls, self.max_entry_bytes)
            except DecodeFailure as failure:
                self._dead_letter_raw(raw, failure.reason, failure.detail)
                continue
            deliveries.append(Delivery(raw.entry_id, msg, raw.deliveries, self.stream_key))
        return deliveries

    # -- leases

    def renew(self, deliveries: Delivery[M] | str | Iterable[Delivery[M] | str]) -> list[str]:
        """Extend this consumer's lease on ``deliveries`` (or entry ids) now.

        XCLAIM with JUSTID to this same consumer resets each entry's idle time, so no
        reclaim takes it, without counting a delivery. Returns the ids now pending for this
        consumer; an entry acked meanwhile is left alone. An entry another consumer
        reclaimed after this one's lease lapsed is taken back: it is being processed twice,
        which effects are idempotent against.
        """
        ids = entry_ids(deliveries)
        if not ids:
            return []
        claimed = self.redis.xclaim(
            self.stream_key,
            self.group,
            self.consumer,
            min_idle_time=0,
            message_ids=cast("list[Any]", ids),
            justid=True,
        )
        return [as_str(entry_id) for entry_id in cast("list[Any]", claimed)]

    def renew_due(self, deliveries: Delivery[M] | str | Iterable[Delivery[M] | str]) -> bool:
        """:meth:`renew` ``deliveries`` if ``renew_every_s`` has passed since the last time.

        For a caller that holds a changing set of entries across its own loop (call it
        every iteration). Returns whether it renewed.
        """
        ids = entry_ids(deliveries)
        now = time.monotonic()
        if not ids or now < self._next_renew_at:
            return False
        self._next_renew_at = now + self.renew_every_s
        self.renew(ids)
        return True

    @contextlib.contextmanager
    def holding(
        self, deliveries: Delivery[M] | str | Iterable[Delivery[M] | str]
    ) -> Iterator[None]:
        """Keep the leases of ``deliveries`` while the body runs.

        A background thread renews them every ``renew_every_s``, for work that may outlast
        ``reclaim_idle_ms`` (e.g. verifying a large batch): without it, live work would be
        reclaimed and processed again by another consumer. A failed renewal is logged and
        retried at the next interval, never raised into the body. The thread only uses
        the (thread-safe) Redis client, so the body may go on using this consumer.
        """
        ids = entry_ids(deliveries)
        if not ids:
            yield
            return
        stop = threading.Event()

        def keep() -> None:
            while not stop.wait(self.renew_every_s):
                try:
                    self.renew(ids)
                except redis.RedisError as exc:
                    log.warning(
                        "could not renew %d leases on %s: %s", len(ids), self.stream_key, exc
                    )

        keeper = threading.Thread(target=keep, name=f"lease-{self.consumer}", daemon=True)
        keeper.start()
        try:
            yield
        finally:
            stop.set()
            keeper.join()

    # -- acknowledging

    def ack(
        self,
        deliveries: Delivery[M] | str | Iterable[Delivery[M] | str],
        pipeline: redis.client.Pipeline | None = None,
    ) -> int:
        """Ack deliveries (or entry ids); returns how many were still pending.

        With ``pipeline`` the XACK is only queued there (e.g. in a MULTI that also writes
        the effect) and 0 is returned.
        """
        ids = entry_ids(deliveries)
        if not ids:
            return 0
        if pipeline is not None:
            pipeline.xack(self.stream_key, self.group, *ids)
            return 0
        acked = int(self.redis.xack(self.stream_key, self.group, *ids))
        self.maybe_trim()
        return acked

    def maybe_trim(self) -> int:
        """Trim what every group has acknowledged, at most every ``trim_every_s``."""
        if self.trim_every_s is None:
            return 0
        now = time.monotonic()
        if now < self._next_trim_at:
            return 0
        self._next_trim_at = now + self.trim_every_s
        return trim_acknowledged(self.redis, self.stream_key).removed

    def dead_letter(self, delivery: Delivery[M], reason: str, detail: str = "") -> None:
        """Move ``delivery`` to the dead-letter stream (and ack it): it can never succeed.

        ``reason`` is a short label (it becomes a metric label); ``detail`` is free text.
        """
        fields = {FIELD_MSG: delivery.msg.SerializeToString(), FIELD_TYPE: b""}
        self._dead_letter_raw(_Raw(delivery.entry_id, fields, delivery.deliveries), reason, detail)

    def _dead_letter_raw(self, raw: _Raw, reason: str, detail: str) -> None:
        payload = raw.fields.get(FIELD_MSG, b"")
        if reason == REASON_TOO_LARGE and len(payload) > DEAD_LETTER_PAYLOAD_KEPT:
            # Keep evidence, but do not copy a hostile giant into a second stream.
            payload = payload[:DEAD_LETTER_PAYLOAD_KEPT]
            detail += f" (payload cut to its first {DEAD_LETTER_PAYLOAD_KEPT} bytes)"
        letter = records_pb2.DeadLetter(
            origin_stream=self.stream_key,
            origin_id=raw.entry_id,
            consumer_group=self.group,
            consumer=self.consumer,
            reason=f"{reason}: {detail}" if detail else reason,
            deliveries=raw.deliveries,
            payload=payload,
            dead_at=time.time(),
        )
        pipe = self.redis.pipeline(transaction=True)
        pipe.xadd(
            self.dead_letter_key,
            wire(encode(letter)),
            maxlen=self.dead_letter_maxlen,
            approximate=True,
        )
        pipe.xack(self.stream_key, self.group, raw.entry_id)
        pipe.execute()
        log.warning(
            "dead-lettered %s %s (group %s, %d deliveries): %s",
            self.stream_key,
            raw.entry_id,
            self.group,
            raw.deliveries,
            letter.reason,
        )
        if self.metrics is not None:
            self.metrics.dead_letters.labels(stream=self.stream_key, reason=reason).inc()

    # -- lag

    def lag(self) -> int:
        """Entries of the stream not yet delivered to this group."""
        return lag(self.redis, self.stream_key, self.group)

    def refresh_lag_metric(self) -> int:
        """Read the lag and set ``asympo_stream_lag_entries`` (if a registry was given)."""
        value = self.lag()
        if self.metrics is not None:
            self.metrics.lag.labels(stream=self.stream_key, group=self.group).set(value)
        return value

    def _maybe_refresh_lag(self) -> None:
        if self.metrics is None:
            return
        now = time.monotonic()
        if now >= self._next_lag_at:
            self._next_lag_at = now + self.lag_refresh_s
            self.refresh_lag_metric()


def entry_ids(deliveries: Delivery[Any] | str | Iterable[Delivery[Any] | str]) -> list[str]:
    """The entry ids of one delivery, one id, or several of either."""
    if isinstance(deliveries, Delivery | str):
        deliveries = [deliveries]
    return [d if isinstance(d, str) else d.entry_id for d in deliveries]
