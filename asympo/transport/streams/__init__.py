"""Typed producer/consumer over Redis streams: one protobuf message per entry.

Entry format (agreed by every service): field ``msg`` = ``SerializeToString()`` bytes,
field ``type`` = the message's full name (e.g. ``asympo.v1.RolloutGroup``).

Delivery guarantees, and how a service gets "each entry's effect once":

* :class:`Consumer` reads through a consumer group (created if missing, from the start of
  the stream). An entry stays pending until the caller acks it, which it must do only once
  the entry's effect is durable. Entries left pending by a dead consumer for
  ``reclaim_idle_ms`` are reclaimed (XAUTOCLAIM) by the next :meth:`Consumer.read` of any
  consumer of the group, so nothing is lost: delivery is *at least once*.
* A live consumer keeps what it holds: its leases are renewed (XCLAIM JUSTID) every
  quarter of ``reclaim_idle_ms``, by :meth:`Consumer.holding` around a body of work or
  :meth:`Consumer.renew_due` from the caller's loop. After a restart a consumer takes its
  own pending entries back with :meth:`Consumer.read_pending`.
* At-least-once means an entry can be processed twice (its first consumer was slow, not
  dead). Effects are made idempotent with a key per entry (e.g. ``RolloutGroup.group_id``):
  :func:`produce_and_ack` writes the outputs, records the key and acks the input in one
  atomic server-side script, and skips the outputs if the key was already recorded.
* An entry that does not decode (missing field, wrong ``type``, bad bytes, over
  ``max_entry_bytes``) or that was delivered more than ``max_deliveries`` times goes to the
  dead-letter stream as a :class:`asympo.v1.records_pb2.DeadLetter` with its reason and
  origin, and is acked from the origin; later entries keep flowing. Callers may
  dead-letter an entry themselves (:meth:`Consumer.dead_letter`) when it can never be
  processed.
* Broadcast streams (each entry for every reader, e.g. weights announcements) are read
  with a :class:`Subscriber`: plain XREAD, no group, nothing acked.
* Streams are bounded by an approximate MAXLEN on every XADD, and consumers trim what
  every group has acknowledged (asympo.transport.stream_trim) every ``trim_every_s``.

Modules (under ``asympo.transport.streams``): ``codec`` (entry format, decode checks),
``producer``, ``consumer`` (groups, leases, dead letters), ``subscriber`` (broadcast),
``commit`` (the exactly-once commit), ``metrics`` (dead letters, lag).
"""

from asympo.transport.streams.codec import (
    FIELD_MSG,
    FIELD_TYPE,
    REASON_DECODE_ERROR,
    REASON_MAX_DELIVERIES,
    REASON_MISSING_FIELD,
    REASON_TOO_LARGE,
    REASON_WRONG_TYPE,
    DecodeFailure,
    StreamError,
    decode,
    encode,
)
from asympo.transport.streams.commit import Committed, produce_and_ack, produce_and_ack_many
from asympo.transport.streams.consumer import DEAD_LETTER_PAYLOAD_KEPT, Consumer, Delivery
from asympo.transport.streams.metrics import StreamMetrics, lag, stream_metrics
from asympo.transport.streams.producer import DEFAULT_MAXLEN, Producer
from asympo.transport.streams.subscriber import Entry, Subscriber

__all__ = [
    "DEAD_LETTER_PAYLOAD_KEPT",
    "DEFAULT_MAXLEN",
    "FIELD_MSG",
    "FIELD_TYPE",
    "REASON_DECODE_ERROR",
    "REASON_MAX_DELIVERIES",
    "REASON_MISSING_FIELD",
    "REASON_TOO_LARGE",
    "REASON_WRONG_TYPE",
    "Committed",
    "Consumer",
    "DecodeFailure",
    "Delivery",
    "Entry",
    "Producer",
    "StreamError",
    "StreamMetrics",
    "Subscriber",
    "decode",
    "encode",
    "lag",
    "produce_and_ack",
    "produce_and_ack_many",
    "stream_metrics",
]
