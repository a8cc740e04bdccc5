"""Typed producer/consumer over Redis streams: one protobuf message per entry.

Entry format (agreed by every service): field ``msg`` = ``SerializeToString()`` bytes,
field ``type`` = the message's full name (e.g. ``asympo.v1.RolloutGroup``).

Delivery guarantees, and how a service gets "each entry's effect once":

* :class:`Consumer` reads through a consumer group (created if missing, from the start of
  the stream). An entry stays pending until the caller acks it, which it must do only once
  the entry's effect is durable. Entries left pending by a dead consumer for
  ``reclaim_idle_ms`` are reclaimed (XAUTOCLAIM) by the next :meth:`Consumer.read` of any
  consumer of the group, so nothing is lost: delivery is *at least once*.
* At-least-once means an entry can be processed twice (its first consumer was slow, not
  dead). Effects are made idempotent with a key per entry (e.g. ``RolloutGroup.group_id``):
  :func:`produce_and_ack` writes the outputs, records the key and acks the input in one
  atomic server-side script, and skips the outputs if the key was already recorded;
  :func:`claim_once` (SET NX) guards effects that live outside Redis.
* An entry that does not decode (missing field, wrong ``type``, bad bytes) or that was
  delivered more than ``max_deliveries`` times goes to the dead-letter stream as a
  :class:`asympo.v1.records_pb2.DeadLetter` with its reason and origin, and is acked from
  the origin; later entries keep flowing. Callers may dead-letter an entry themselves
  (:meth:`Consumer.dead_letter`) when it can never be processed.
* Streams are bounded by an approximate MAXLEN on every XADD, and consumers trim what
  every group has acknowledged (asympo.stream_trim) every ``trim_every_s``.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, NamedTuple, TypeVar, cast

import redis
from google.protobuf.message import DecodeError, Message
from prometheus_client import REGISTRY as DEFAULT_REGISTRY
from prometheus_client import CollectorRegistry, Counter, Gauge

from asympo.stream_trim import trim_acknowledged
from asympo.v1 import records_pb2

if TYPE_CHECKING:
    from redis.commands.core import Script

    from asympo.config import StreamSettings

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)

FIELD_MSG = b"msg"
FIELD_TYPE = b"type"
DEFAULT_MAXLEN = 100_000
DEAD_LETTER_PAYLOAD_KEPT = 64 * 1024

# Dead-letter reasons (the ``reason`` label of asympo_dead_letters_total).
REASON_MISSING_FIELD = "missing_field"
REASON_WRONG_TYPE = "wrong_type"
REASON_DECODE_ERROR = "decode_error"
REASON_MAX_DELIVERIES = "max_deliveries"
REASON_TOO_LARGE = "too_large"


class StreamError(RuntimeError):
    """A stream operation failed in a way the caller should report (not a bug)."""


class DecodeFailure(ValueError):
    """An entry could not be turned into the expected message; ``reason`` is its label."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _str(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def encode(msg: Message) -> dict[bytes, bytes]:
    """The stream entry fields of ``msg``: ``{b"msg": bytes, b"type": full name}``."""
    return {FIELD_MSG: msg.SerializeToString(), FIELD_TYPE: msg.DESCRIPTOR.full_name.encode()}


def _wire(fields: dict[bytes, bytes]) -> dict[Any, Any]:
    """``fields`` typed as redis-py's XADD wants them (its stubs reject dict[bytes, bytes])."""
    return cast("dict[Any, Any]", fields)


def decode(fields: dict[bytes, bytes], msg_cls: type[M], max_entry_bytes: int | None = None) -> M:
    """Parse stream entry ``fields`` as ``msg_cls``; raises :class:`DecodeFailure`.

    A payload over ``max_entry_bytes`` is refused before parsing (hostile input).
    """
    payload = fields.get(FIELD_MSG)
    type_name = fields.get(FIELD_TYPE)
    if payload is None or type_name is None:
        missing = [f.decode() for f in (FIELD_MSG, FIELD_TYPE) if f not in fields]
        raise DecodeFailure(REASON_MISSING_FIELD, f"entry has no field(s) {', '.join(missing)}")
    expected = msg_cls.DESCRIPTOR.full_name
    if type_name != expected.encode():
        raise DecodeFailure(
            REASON_WRONG_TYPE, f"type {type_name.decode(errors='replace')!r}, expected {expected!r}"
        )
    if max_entry_bytes is not None and len(payload) > max_entry_bytes:
        raise DecodeFailure(
            REASON_TOO_LARGE, f"{len(payload)} bytes exceeds max_entry_bytes={max_entry_bytes}"
        )
    msg = msg_cls()
    try:
        msg.ParseFromString(payload)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise DecodeFailure(REASON_DECODE_ERROR, f"{expected}: {exc}") from exc
    return msg


# --------------------------------------------------------------------------- metrics


class StreamMetrics:
    """The stream metrics every consumer exports, registered once per registry.

    ``asympo_dead_letters_total{stream,reason}`` counts dead-lettered entries;
    ``asympo_stream_lag_entries{stream,group}`` is the group's lag (entries not yet
    delivered to it). Get the instance for a registry with :func:`stream_metrics`.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.dead_letters = _collector(
            registry,
            Counter,
            "asympo_dead_letters_total",
            "Stream entries moved to the dead-letter stream, by origin stream and reason",
            ("stream", "reason"),
        )
        self.lag = _collector(
            registry,
            Gauge,
            "asympo_stream_lag_entries",
            "Entries of a stream not yet delivered to a consumer group",
            ("stream", "group"),
        )


C = TypeVar("C", Counter, Gauge)


def _collector(
    registry: CollectorRegistry, kind: type[C], name: str, doc: str, labels: tuple[str, ...]
) -> C:
    """Register ``name`` on ``registry``, or reuse it if the service already defined it."""
    try:
        return kind(name, doc, labels, registry=registry)
    except ValueError:  # "Duplicated timeseries": the service's metrics.py declared it
        existing = getattr(registry, "_names_to_collectors", {}).get(
            name.removesuffix("_total") if kind is Counter else name
        )
        if not isinstance(existing, kind) or tuple(existing._labelnames) != labels:
            raise ValueError(
                f"{name} is already registered with another type or labels; "
                f"it must be a {kind.__name__} with labels {list(labels)}"
            ) from None
        return existing


_metrics_by_registry: weakref.WeakKeyDictionary[CollectorRegistry, StreamMetrics] = (
    weakref.WeakKeyDictionary()
)
_metrics_lock = threading.Lock()


def stream_metrics(registry: CollectorRegistry | None = None) -> StreamMetrics:
    """The :class:`StreamMetrics` of ``registry`` (default: prometheus' global registry).

    Idempotent: every consumer of a service passes the service's ``REGISTRY`` and they all
    share one set of collectors.
    """
    registry = registry if registry is not None else DEFAULT_REGISTRY
    with _metrics_lock:
        metrics = _metrics_by_registry.get(registry)
        if metrics is None:
            metrics = StreamMetrics(registry)
            _metrics_by_registry[registry] = metrics
        return metrics


# --------------------------------------------------------------------------- producer


class Producer(Generic[M]):
    """Appends ``msg_cls`` messages to one stream, bounded by an approximate ``maxlen``."""

    def __init__(
        self,
        redis_client: redis.Redis,
        stream_key: str,
        msg_cls: type[M],
        maxlen: int | None = DEFAULT_MAXLEN,
        max_entry_bytes: int | None = None,
    ) -> None:
        self.redis = redis_client
        self.stream_key = stream_key
        self.msg_cls = msg_cls
        self.maxlen = maxlen
        self.max_entry_bytes = max_entry_bytes
        self.type_name = msg_cls.DESCRIPTOR.full_name

    @classmethod
    def from_settings(
        cls, redis_client: redis.Redis, streams: StreamSettings, name: str, msg_cls: type[M]
    ) -> Producer[M]:
        """A producer on stream ``name`` (e.g. ``streams.rollouts``) of this run."""
        return cls(
            redis_client,
            streams.key(name),
            msg_cls,
            maxlen=streams.maxlen,
            max_entry_bytes=streams.max_entry_bytes,
        )

    def fields(self, msg: M) -> dict[bytes, bytes]:
        """The entry fields for ``msg``, after checking its type and size."""
        if not isinstance(msg, self.msg_cls):
            raise TypeError(
                f"producer of {self.type_name} on {self.stream_key} got {type(msg).__name__}"
            )
        fields = encode(msg)
        size = len(fields[FIELD_MSG])
        if self.max_entry_bytes is not None and size > self.max_entry_bytes:
            raise StreamError(
                f"{self.type_name} of {size} bytes exceeds max_entry_bytes="
                f"{self.max_entry_bytes} on {self.stream_key}"
            )
        return fields

    def send(self, msg: M) -> str:
        """Append ``msg``; returns the new entry id."""
        entry_id = self.redis.xadd(
            self.stream_key, _wire(self.fields(msg)), maxlen=self.maxlen, approximate=True
        )
        return _str(entry_id)

    def send_many(self, msgs: Iterable[M]) -> list[str]:
        """Append several messages in one round trip; returns their ids in order."""
        pipe = self.redis.pipeline(transaction=False)
        self.queue(pipe, msgs)
        return [_str(entry_id) for entry_id in pipe.execute()]

    def queue(self, pipe: redis.client.Pipeline, msgs: Iterable[M]) -> None:
        """Queue XADDs of ``msgs`` on ``pipe`` (e.g. inside a MULTI with other commands)."""
        for msg in msgs:
            pipe.xadd(
                self.stream_key, _wire(self.fields(msg)), maxlen=self.maxlen, approximate=True
            )


# --------------------------------------------------------------------------- consumer


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
        # Acknowledged entries are trimmed (asympo.stream_trim) at most this often.
        self.trim_every_s = trim_every_s
        self._next_trim_at = 0.0
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
                raws.append(_Raw(_str(entry_id), fields or {}, 1))
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
        self._reclaim_cursor = _str(cursor)
        claimed: list[tuple[str, dict[bytes, bytes]]] = []
        unknown_trimmed = 0
        for entry_id, fields in entries:
            if entry_id is None or fields is None:
                unknown_trimmed += 1
            else:
                claimed.append((_str(entry_id), fields))
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
        ids = [_str(p["message_id"]) for p in pending]
        pipe = self.redis.pipeline(transaction=False)
        for entry_id in ids:
            pipe.xrange(self.stream_key, min=entry_id, max=entry_id, count=1)
        gone = [entry_id for entry_id, found in zip(ids, pipe.execute(), strict=True) if not found]
        if gone:
            self.redis.xack(self.stream_key, self.group, *gone)
        return len(gone)

    def _deliver(self, raws: Sequence[_Raw]) -> list[Delivery[M]]:
        deliveries: list[Delivery[M]] = []
        for raw in raws:
            if raw.deliveries > self.max_deliveries:
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
        ids = _entry_ids(deliveries)
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
            _wire(encode(letter)),
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


def _entry_ids(deliveries: Delivery[Any] | str | Iterable[Delivery[Any] | str]) -> list[str]:
    if isinstance(deliveries, Delivery | str):
        deliveries = [deliveries]
    return [d if isinstance(d, str) else d.entry_id for d in deliveries]


# --------------------------------------------------------------------------- lag


def lag(redis_client: redis.Redis, stream_key: str, group: str) -> int:
    """Entries of ``stream_key`` not yet delivered to ``group`` (0 if neither exists).

    Uses the ``lag`` of XINFO GROUPS (Redis >= 7) and counts entries after the group's
    last delivered id when the server cannot say (older servers, or after deletions).
    """
    try:
        groups = redis_client.xinfo_groups(stream_key)
    except redis.ResponseError as exc:
        if "no such key" in str(exc).lower():
            return 0
        raise
    info = next((g for g in groups if _str(g["name"]) == group), None)
    if info is None:
        return 0
    reported = info.get("lag")
    if reported is not None:
        return int(reported)
    return _count_after(redis_client, stream_key, _str(info["last-delivered-id"]))


def _count_after(
    redis_client: redis.Redis, stream_key: str, last_id: str, chunk: int = 1000
) -> int:
    """Number of entries with id > ``last_id`` (walks the stream in chunks)."""
    total = 0
    start = f"({last_id}"
    while True:
        entries: list[Any] = cast(
            "list[Any]", redis_client.xrange(stream_key, min=start, max="+", count=chunk)
        )
        total += len(entries)
        if len(entries) < chunk:
            return total
        start = f"({_str(entries[-1][0])}"


# --------------------------------------------------------------------------- once


def claim_once(redis_client: redis.Redis, key: str, ttl_s: float) -> bool:
    """True the first time ``key`` is claimed within ``ttl_s`` seconds (SET NX PX).

    The way to apply an effect outside Redis once per entry: claim the entry's
    idempotency key (e.g. ``f"{run}:once:reward:{group_id}"``) before applying the
    effect; if the claim fails, the effect was already applied by someone else, so just
    ack. Pair it with a TTL longer than any entry can stay in flight.
    """
    return bool(redis_client.set(key, b"1", nx=True, px=max(int(ttl_s * 1000), 1)))


class Committed(NamedTuple):
    """What :func:`produce_and_ack` did: the new entry ids, or ``duplicate`` (nothing)."""

    ids: list[str]
    duplicate: bool


# KEYS: [once_key or "", input stream, output stream 1..n]
# ARGV: [ttl_ms, group, n_ids, id..., then per output: maxlen (or ""), type, msg]
_PRODUCE_AND_ACK = """
local once = KEYS[1]
local ttl = tonumber(ARGV[1])
local group = ARGV[2]
local n_ids = tonumber(ARGV[3])
local fresh = 1
if once ~= "" then
  if not redis.call("SET", once, "1", "NX", "PX", ttl) then fresh = 0 end
end
local ids = {}
if fresh == 1 then
  local a = 4 + n_ids
  for k = 3, #KEYS do
    local maxlen = ARGV[a]
    local id
    if maxlen == "" then
      id = redis.call("XADD", KEYS[k], "*", "msg", ARGV[a + 2], "type", ARGV[a + 1])
    else
      id = redis.call("XADD", KEYS[k], "MAXLEN", "~", maxlen, "*",
                      "msg", ARGV[a + 2], "type", ARGV[a + 1])
    end
    ids[#ids + 1] = id
    a = a + 3
  end
end
if n_ids > 0 then
  redis.call("XACK", KEYS[2], group, unpack(ARGV, 4, 3 + n_ids))
end
return {fresh, ids}
"""


def _produce_and_ack_call(
    outputs: Sequence[tuple[Producer[Any], Message]],
    consumer: Consumer[Any],
    deliveries: Delivery[Any] | str | Iterable[Delivery[Any] | str],
    once_key: str | None,
    once_ttl_s: float,
) -> tuple[list[str], list[bytes | str | int]]:
    """KEYS and ARGV of the produce-and-ack script for one input."""
    ids = _entry_ids(deliveries)
    keys = [once_key or "", consumer.stream_key]
    args: list[bytes | str | int] = [
        max(int(once_ttl_s * 1000), 1),
        consumer.group,
        len(ids),
        *ids,
    ]
    for producer, msg in outputs:
        fields = producer.fields(msg)
        keys.append(producer.stream_key)
        args += [
            "" if producer.maxlen is None else producer.maxlen,
            fields[FIELD_TYPE],
            fields[FIELD_MSG],
        ]
    return keys, args


def _script(consumer: Consumer[Any]) -> Script:
    if consumer._produce_and_ack is None:  # EVALSHA after the first call, not the source
        consumer._produce_and_ack = cast("Script", consumer.redis.register_script(_PRODUCE_AND_ACK))
    return consumer._produce_and_ack


def produce_and_ack(
    outputs: Sequence[tuple[Producer[Any], Message]],
    consumer: Consumer[Any],
    deliveries: Delivery[Any] | str | Iterable[Delivery[Any] | str],
    once_key: str | None = None,
    once_ttl_s: float = 7 * 24 * 3600.0,
) -> Committed:
    """Atomically append ``outputs`` and ack ``deliveries`` of ``consumer`` (one script).

    With ``once_key`` (the input's idempotency key, e.g. ``group_id``) the outputs are
    only written if the key was not recorded yet; a duplicate is still acked and returns
    ``Committed([], duplicate=True)``. Either everything happens or nothing does, so a
    crash never leaves an output without its ack, or an ack without its output.
    """
    keys, args = _produce_and_ack_call(outputs, consumer, deliveries, once_key, once_ttl_s)
    fresh, new_ids = cast("list[Any]", _script(consumer)(keys=keys, args=args))
    return Committed([_str(i) for i in new_ids], duplicate=not bool(fresh))


def produce_and_ack_many(
    items: Sequence[
        tuple[
            Sequence[tuple[Producer[Any], Message]],
            Delivery[Any] | str | Iterable[Delivery[Any] | str],
            str | None,
        ]
    ],
    consumer: Consumer[Any],
    once_ttl_s: float = 7 * 24 * 3600.0,
) -> list[Committed]:
    """:func:`produce_and_ack` for many inputs in one round trip (``(outputs, deliveries,
    once_key)`` each). Each input stays atomic on its own; the batch is not a transaction."""
    if not items:
        return []
    script = _script(consumer)
    pipe = consumer.redis.pipeline(transaction=False)
    for outputs, deliveries, once_key in items:
        keys, args = _produce_and_ack_call(outputs, consumer, deliveries, once_key, once_ttl_s)
        script(keys=keys, args=args, client=pipe)
    results = cast("list[list[Any]]", pipe.execute())
    return [Committed([_str(i) for i in ids], duplicate=not bool(fresh)) for fresh, ids in results]
