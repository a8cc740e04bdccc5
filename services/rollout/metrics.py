"""Prometheus metrics of a rollout replica, on the replica's own registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from asympo.transport.streams import stream_metrics

REGISTRY = CollectorRegistry()

POLICY_VERSION = Gauge(
    "asympo_policy_version", "Policy version loaded in the engine", registry=REGISTRY
)
GENERATED_TOKENS = Counter(
    "asympo_generated_tokens_total", "Completion tokens generated", registry=REGISTRY
)
ROLLOUT_GROUPS = Counter(
    "asympo_rollout_groups_total", "Rollout groups produced to the stream", registry=REGISTRY
)
SWAP_SECONDS = Histogram(
    "asympo_weight_swap_seconds",
    "Fetch + load + probe time of a weight swap",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
    registry=REGISTRY,
)
PROBE_MISMATCH = Counter(
    "asympo_probe_mismatch_total",
    "Versions refused because the engine's probe log-probs differed from the learner's",
    registry=REGISTRY,
)
PROBE_MAX_ABS_DIFF = Gauge(
    "asympo_probe_max_abs_diff",
    "Largest |engine - learner| probe log-prob difference at the last swap",
    registry=REGISTRY,
)
BUSY_SECONDS = Counter(
    "asympo_rollout_busy_seconds_total",
    "Seconds the engine spent generating (busy fraction = rate of this counter)",
    registry=REGISTRY,
)
STREAMS = stream_metrics(REGISTRY)
