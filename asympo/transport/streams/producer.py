"""Appending typed messages to a stream, each checked for type and size."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Generic

import redis

from asympo.transport.streams.codec import FIELD_MSG, M, StreamError, as_str, encode, wire

if TYPE_CHECKING:
    from asympo.config import StreamSettings

DEFAULT_MAXLEN = 100_000


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
            self.stream_key, wire(self.fields(msg)), maxlen=self.maxlen, approximate=True
        )
        return as_str(entry_id)

    def send_many(self, msgs: Iterable[M]) -> list[str]:
        """Append several messages in one round trip; returns their ids in order."""
        pipe = self.redis.pipeline(transaction=False)
        self.queue(pipe, msgs)
        return [as_str(entry_id) for entry_id in pipe.execute()]

    def queue(self, pipe: redis.client.Pipeline, msgs: Iterable[M]) -> None:
        """Queue XADDs of ``msgs`` on ``pipe`` (e.g. inside a MULTI with other commands)."""
        for msg in msgs:
            pipe.xadd(self.stream_key, wire(self.fields(msg)), maxlen=self.maxlen, approximate=True)
