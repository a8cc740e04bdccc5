"""GSM8K-style verification: the final answer follows ``####``.

The response's answer is the first number after its last ``####``; a response
without ``####`` is judged by its last number (the usual lenient GSM8K reading,
which also lets a model answer arith with a bare ``"85"``). Numbers compare as
decimals, so ``"1,000"`` equals ``"1000"`` and ``"85.0"`` equals ``"85"``.
"""

from __future__ import annotations

from asympo.verifiers.numbers import first_number, last_number, parse_number
from asympo.verifiers.verdict import CORRECT, NO_ANSWER, WRONG, Verdict


def extract_answer(text: str) -> str | None:
    """The answer token of a GSM8K-style text: after the last ``####``, else its last number."""
    _, sep, tail = text.rpartition("####")
    return first_number(tail) if sep else last_number(text)


def has_gsm8k_format(response: str) -> bool:
    """True when the response states a final answer as ``#### <number>``."""
    _, sep, tail = response.rpartition("####")
    return bool(sep) and first_number(tail) is not None


def verify_gsm8k(response: str, reference: str) -> Verdict:
    """Reward 1 when the response's final number equals the reference's, else 0."""
    gold_text = extract_answer(reference)
    gold = parse_number(gold_text) if gold_text is not None else None
    if gold is None:
        return Verdict(0.0, "reference has no number")
    answer_text = extract_answer(response)
    if answer_text is None:
        return Verdict(0.0, NO_ANSWER)
    answer = parse_number(answer_text)
    if answer is None:
        return Verdict(0.0, NO_ANSWER)
    return Verdict(1.0, CORRECT) if answer == gold else Verdict(0.0, WRONG)
