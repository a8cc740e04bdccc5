"""Exact match after trimming surrounding whitespace (and a leading ``####`` on the reference)."""

from __future__ import annotations

from asympo.verifiers.verdict import CORRECT, NO_ANSWER, WRONG, Verdict


def verify_exact(response: str, reference: str) -> Verdict:
    """Reward 1 when the trimmed response equals the trimmed reference, else 0."""
    gold = reference.strip()
    if gold.startswith("####"):
        gold = gold[4:].strip()
    answer = response.strip()
    if not answer:
        return Verdict(0.0, NO_ANSWER)
    return Verdict(1.0, CORRECT) if answer == gold else Verdict(0.0, WRONG)
