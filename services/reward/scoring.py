"""Scoring samples in the verifier pool, with the per-call metrics of the reward service."""

from __future__ import annotations

from collections.abc import Sequence

from asympo.verifiers import Verdict, VerifierPool
from services.reward import metrics


def outcome(verdict: Verdict) -> str:
    """The ``outcome`` label of a verdict: failed, timeout, correct or wrong."""
    if verdict.failed:
        return "failed"
    if verdict.timed_out:
        return "timeout"
    return "correct" if verdict.correct else "wrong"


def score_items(pool: VerifierPool, items: Sequence[tuple[str, str, str]]) -> list[Verdict]:
    """Verify ``(verifier, response, reference)`` items in parallel and record metrics."""
    verdicts = pool.score_many(items)
    for (name, _, _), verdict in zip(items, verdicts, strict=True):
        # A plug-in spec can be any string; keep the label set small and stable.
        label = name if len(name) <= 64 else name[:61] + "..."
        metrics.VERIFIER_SECONDS.labels(verifier=label).observe(verdict.elapsed_s)
        if verdict.timed_out:
            metrics.VERIFIER_TIMEOUTS.labels(verifier=label).inc()
        metrics.SAMPLES.labels(outcome=outcome(verdict)).inc()
    return verdicts
