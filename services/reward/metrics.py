"""Prometheus metrics of the reward service, on its own registry.

The stream metrics (``asympo_stream_lag_entries``, ``asympo_dead_letters_total``) are
registered on the same REGISTRY by the rollouts consumer (see asympo.transport.streams).
"""

from __future__ import annotations

from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry()

GROUPS = Counter(
    "asympo_reward_groups_total",
    "Rollout groups scored and produced to the scored stream, by task",
    ["task"],
    registry=REGISTRY,
)
DUPLICATES = Counter(
    "asympo_reward_duplicate_groups_total",
    "Groups delivered again after they had been scored (acked without a second score)",
    registry=REGISTRY,
)
SAMPLES = Counter(
    "asympo_reward_samples_total",
    "Samples verified, by outcome: correct (Verdict.correct), wrong, timeout, failed",
    ["outcome"],
    registry=REGISTRY,
)
VERIFIER_SECONDS = Histogram(
    "asympo_verifier_seconds",
    "Wall time of one verifier call in the pool, by verifier",
    ["verifier"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    registry=REGISTRY,
)
VERIFIER_TIMEOUTS = Counter(
    "asympo_verifier_timeouts_total",
    "Verifier calls cut off at the time limit, by verifier",
    ["verifier"],
    registry=REGISTRY,
)
REWARD_MEAN = Gauge(
    "asympo_reward_mean_by_task",
    f"Mean sample reward over the last {100} scored groups of each task",
    ["task"],
    registry=REGISTRY,
)
SCORE_REQUESTS = Counter(
    "asympo_reward_score_requests_total",
    "gRPC Score requests served",
    registry=REGISTRY,
)

_WINDOW = 100
_recent: dict[str, deque[float]] = {}


def observe_group_reward(task: str, mean_reward: float) -> None:
    """Fold one group's mean reward into the task's sliding-window gauge."""
    window = _recent.setdefault(task, deque(maxlen=_WINDOW))
    window.append(mean_reward)
    REWARD_MEAN.labels(task=task).set(sum(window) / len(window))
