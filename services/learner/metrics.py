"""The learner's Prometheus metrics, on its own registry (tests inspect it directly)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry()

POLICY_VERSION = Gauge(
    "asympo_policy_version", "Optimiser steps taken (the version being trained)", registry=REGISTRY
)
PUBLISHED_VERSION = Gauge(
    "asympo_learner_published_version", "Latest version the learner published", registry=REGISTRY
)
STALENESS = Histogram(
    "asympo_staleness_versions",
    "Learner version minus the version that started generating each trained sample",
    buckets=(0, 1, 2, 3, 4, 6, 8, 12, 16, 32, 64),
    registry=REGISTRY,
)
LOSS = Gauge("asympo_loss", "Loss of the last step", registry=REGISTRY)
LOSS_BALANCE = Gauge(
    "asympo_loss_balance",
    "Summed loss values of positive plus negative responses (a value balance, not a force "
    "balance: zero by construction under ASymPO; see asympo_update_norm)",
    registry=REGISTRY,
)
UPDATE_NORM = Gauge(
    "asympo_update_norm",
    "Last step's ||dL/dlogits|| summed over the completion tokens of positive- or "
    "negative-advantage responses: how hard each side pulls the policy",
    ("side",),
    registry=REGISTRY,
)
UPDATE_SHARE_POSITIVE = Gauge(
    "asympo_update_share_positive_ratio",
    "Positive side's share of the last step's logit-gradient norm (0.5 = balanced; "
    "near 1 for long = one-sided, an early sign of entropy collapse)",
    registry=REGISTRY,
)
IMPORTANCE_RATIO_MEAN = Gauge(
    "asympo_importance_ratio_mean",
    "Mean ratio pi_current / pi_behaviour of the last step (behaviour-corrected losses; "
    "1 on fresh data)",
    registry=REGISTRY,
)
CLIP_FRACTION = Gauge(
    "asympo_clip_fraction_ratio",
    "Share of ratios (tokens, or responses under gspo) clipped or truncated in the last step",
    registry=REGISTRY,
)
LOSS_POSITIVE = Gauge(
    "asympo_loss_positive", "Summed loss of positive-advantage responses", registry=REGISTRY
)
LOSS_NEGATIVE = Gauge(
    "asympo_loss_negative", "Summed loss of negative-advantage responses", registry=REGISTRY
)
NLL_POSITIVE = Gauge(
    "asympo_nll_positive",
    "Mean token NLL of positive responses (current policy)",
    registry=REGISTRY,
)
NLL_NEGATIVE = Gauge(
    "asympo_nll_negative",
    "Mean token NLL of negative responses (current policy)",
    registry=REGISTRY,
)
ENTROPY = Gauge(
    "asympo_policy_entropy_nats", "Mean policy entropy over completion tokens", registry=REGISTRY
)
REWARD_MEAN = Gauge(
    "asympo_reward_mean", "Mean reward of the last step's samples", registry=REGISTRY
)
ACCURACY = Gauge(
    "asympo_accuracy_ratio", "Share of the last step's samples judged correct", registry=REGISTRY
)
GRAD_NORM = Gauge("asympo_grad_norm", "Gradient norm before clipping", registry=REGISTRY)
SAMPLES = Counter("asympo_learner_samples_total", "Samples trained on", registry=REGISTRY)
SAMPLES_PER_S = Gauge(
    "asympo_learner_samples_per_second", "Samples per second of the last step", registry=REGISTRY
)
GROUPS_TRAINED = Counter("asympo_groups_trained_total", "Groups trained on", registry=REGISTRY)
GROUPS_ZERO_ADV = Counter(
    "asympo_groups_zero_advantage_total",
    "Trained groups whose rewards were all equal (no signal)",
    registry=REGISTRY,
)
GROUPS_DROPPED_STALE = Counter(
    "asympo_groups_dropped_stale_total",
    "Groups dropped because their staleness exceeded max_staleness",
    registry=REGISTRY,
)
PROMPTS_ADMITTED = Counter(
    "asympo_prompts_admitted_total", "Prompts admitted to the prompts stream", registry=REGISTRY
)
PUBLISH_BLOCKED_SECONDS = Histogram(
    "asympo_learner_publish_blocked_seconds",
    "Time the training loop was blocked per publish (snapshot to host memory + probe)",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    registry=REGISTRY,
)
PUBLISH_LATENCY_SECONDS = Histogram(
    "asympo_learner_publish_latency_seconds",
    "From a version's snapshot until the store has it verified and announced",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
    registry=REGISTRY,
)
PUBLISH_REPLACED = Counter(
    "asympo_learner_publish_replaced_total",
    "Queued snapshots replaced by a newer one before they were published",
    registry=REGISTRY,
)
BUSY_SECONDS = Counter(
    "asympo_learner_busy_seconds_total",
    "Seconds spent in train_step (busy fraction = rate of this counter)",
    registry=REGISTRY,
)
WAIT_SECONDS = Counter(
    "asympo_learner_wait_seconds_total",
    "Seconds spent waiting for a full batch of fresh scored groups",
    registry=REGISTRY,
)
