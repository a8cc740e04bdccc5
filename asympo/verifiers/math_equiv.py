"""Mathematical answer equivalence through math-verify (LaTeX, fractions, ``\\boxed{}``).

math-verify parses with its own grammar into sympy objects; model output is never
evaluated as Python. Its internal signal-based timeouts are switched off: the hard
time limit is the VerifierPool's, which works in any thread of a long-lived process.
"""

from __future__ import annotations

import logging

from math_verify import parse, verify

from asympo.verifiers.verdict import CORRECT, NO_ANSWER, WRONG, Verdict

# math-verify warns on every call that its own timeouts are off; the pool enforces ours.
logging.getLogger("math_verify").setLevel(logging.ERROR)
LATEX_MARKS = "\\^{}()[]"


def _normalise_text(text: str) -> str:
    return " ".join(text.replace("$", "").split()).strip().lower()


def _parse(text: str) -> list[object]:
    """math-verify's parse; bare LaTeX (``\\frac12``, ``x^2``) is retried inside ``$...$``."""
    parsed: list[object] = parse(text, parsing_timeout=None)  # type: ignore[arg-type]
    if not parsed and "$" not in text and any(c in text for c in LATEX_MARKS):
        parsed = parse(f"${text}$", parsing_timeout=None)  # type: ignore[arg-type]
    return parsed


def verify_math(response: str, reference: str) -> Verdict:
    """Reward 1 when the response's final answer is mathematically equal to the reference.

    When the reference is not mathematics (e.g. a word), a trimmed, case-folded
    string comparison decides.
    """
    gold = _parse(reference)
    if not gold:
        if not response.strip():
            return Verdict(0.0, NO_ANSWER)
        same = _normalise_text(response) == _normalise_text(reference)
        return Verdict(1.0, CORRECT) if same else Verdict(0.0, WRONG)
    answer = _parse(response)
    if not answer:
        return Verdict(0.0, NO_ANSWER)
    if verify(gold, answer, timeout_seconds=None):
        return Verdict(1.0, CORRECT)
    return Verdict(0.0, WRONG)


def has_boxed_format(response: str) -> bool:
    """True when the response puts a final answer in ``\\boxed{...}``."""
    return "\\boxed{" in response
