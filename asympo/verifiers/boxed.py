"""The reasoning presets' verifier: the answer is the content of the response's last ``\\boxed{}``.

Strict about the format (no box, no answer: the instruction asked for one) and lenient
about the reference: a GSM8K-style ``#### N`` compares as a decimal number, anything else
(``\\boxed{...}`` of MATH, a bare expression) by mathematical equivalence.
"""

from __future__ import annotations

from asympo.verifiers.gsm8k import verify_gsm8k
from asympo.verifiers.math_equiv import verify_math
from asympo.verifiers.verdict import NO_ANSWER, Verdict

BOX = "\\boxed{"


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` in ``text`` (braces balanced), else None."""
    start = text.rfind(BOX)
    if start == -1:
        return None
    depth, i = 1, start + len(BOX)
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j].strip()
    return None


def verify_boxed(response: str, reference: str) -> Verdict:
    """Reward 1 when the last boxed answer of ``response`` equals the reference's answer."""
    answer = last_boxed(response)
    if not answer:
        return Verdict(0.0, NO_ANSWER)
    if "####" in reference:
        return verify_gsm8k(f"#### {answer}", reference)
    return verify_math(f"${answer}$", reference)
