"""What a stream's consumers export: dead letters and lag (entries not yet delivered)."""

from __future__ import annotations

import threading
import weakref
from typing import Any, TypeVar, cast

import redis
from prometheus_client import REGISTRY as DEFAULT_REGISTRY
from prometheus_client import CollectorRegistry, Counter, Gauge

from asympo.transport.streams.codec import as_str


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
    info = next((g for g in groups if as_str(g["name"]) == group), None)
    if info is None:
        return 0
    reported = info.get("lag")
    if reported is not None:
        return int(reported)
    return _count_after(redis_client, stream_key, as_str(info["last-delivered-id"]))


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
        start = f"({as_str(entries[-1][0])}"
