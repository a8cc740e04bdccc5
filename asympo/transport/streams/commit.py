"""The exactly-once commit: outputs written and inputs acked in one server-side script.

At-least-once delivery means an entry can be processed twice (its first consumer was
slow, not dead). :func:`produce_and_ack` makes the effect happen once anyway: it records
the input's idempotency key, writes the outputs and acks the input atomically, and skips
the outputs when the key was already recorded.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, cast

from google.protobuf.message import Message
from redis.exceptions import NoScriptError

from asympo.transport.streams.codec import FIELD_MSG, FIELD_TYPE, as_str
from asympo.transport.streams.consumer import Consumer, Delivery, entry_ids
from asympo.transport.streams.producer import Producer

if TYPE_CHECKING:
    from redis.commands.core import Script


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
    ids = entry_ids(deliveries)
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
    return Committed([as_str(i) for i in new_ids], duplicate=not bool(fresh))


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
    calls = [
        _produce_and_ack_call(outputs, consumer, deliveries, once_key, once_ttl_s)
        for outputs, deliveries, once_key in items
    ]

    def send() -> list[list[Any]]:
        pipe = consumer.redis.pipeline(transaction=False)
        for keys, args in calls:
            script(keys=keys, args=args, client=pipe)
        return cast("list[list[Any]]", pipe.execute())

    try:
        results = send()
    except NoScriptError:
        # Redis restarted between the pipeline's script check and its commands (the
        # pipeline's reconnect re-sent EVALSHA to a server whose script cache is empty).
        # Every call was refused before running, and each is idempotent by its once-key:
        # load the script and send the batch again.
        consumer.redis.script_load(_PRODUCE_AND_ACK)
        results = send()
    return [
        Committed([as_str(i) for i in ids], duplicate=not bool(fresh)) for fresh, ids in results
    ]
