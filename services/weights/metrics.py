"""Prometheus metrics of the weights service, on its own registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry()

LATEST_VERSION = Gauge(
    "asympo_weights_latest_version",
    "Newest version visible in the store (-1 = none)",
    registry=REGISTRY,
)
LATEST_VERSION.set(-1)
VERSIONS_STORED = Gauge(
    "asympo_weights_versions_stored", "Versions currently kept in the store", registry=REGISTRY
)
PUBLISHED = Counter(
    "asympo_weights_published_total", "Versions published and made visible", registry=REGISTRY
)
PUBLISH_REJECTED = Counter(
    "asympo_weights_publish_rejected_total",
    "Publishes refused, by gRPC status",
    ["reason"],
    registry=REGISTRY,
)
PUBLISH_SECONDS = Histogram(
    "asympo_weights_publish_seconds",
    "Time from the first Publish message to the version being visible",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
    registry=REGISTRY,
)
PUBLISH_BYTES = Counter(
    "asympo_weights_publish_bytes_total", "Shard bytes received by Publish", registry=REGISTRY
)
FETCH_BYTES = Counter(
    "asympo_weights_fetch_bytes_total", "Shard bytes sent by Fetch", registry=REGISTRY
)
FETCH_ERRORS = Counter(
    "asympo_weights_fetch_errors_total",
    "Fetches that failed, by gRPC status",
    ["reason"],
    registry=REGISTRY,
)
INTEGRITY_ERRORS = Counter(
    "asympo_weights_integrity_errors_total",
    "Stored shards found not to match their manifest when read",
    registry=REGISTRY,
)
WATCHERS = Gauge("asympo_weights_watchers", "Open Watch streams", registry=REGISTRY)
ANNOUNCE_FAILURES = Counter(
    "asympo_weights_announce_failures_total",
    "Version announcements that could not be written to the weights stream",
    registry=REGISTRY,
)
