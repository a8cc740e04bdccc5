"""The answer of a response as a verifier reads it, normalised, for majority voting (maj@k).

Two samples vote for the same answer when their keys are equal: numbers compare as
decimals (``"1,000"``, ``"1000.0"`` and ``"$1000"`` are one answer), other answers by their
text with whitespace removed. This is string work only (no parsing into sympy), so it is
safe to run on untrusted model output outside the verifier pool.
"""

from __future__ import annotations

from asympo.verifiers.boxed import last_boxed
from asympo.verifiers.gsm8k import extract_answer
from asympo.verifiers.numbers import parse_number


def _normalise(text: str) -> str | None:
    number = parse_number(text)
    if number is not None:
        return format(number.normalize(), "f")
    key = "".join(text.split())
    return key or None


def answer_key(verifier: str, response: str) -> str | None:
    """The normalised answer of ``response`` under ``verifier`` (None: the response has none).

    ``gsm8k``: the number after the last ``####``, else the last number; ``boxed``: the last
    ``\\boxed{}``; ``math``: the last ``\\boxed{}``, else the whole response; any other
    verifier (``exact``, plug-ins): the whole response.
    """
    if verifier == "gsm8k":
        found = extract_answer(response)
    elif verifier == "boxed":
        found = last_boxed(response)
    elif verifier == "math":
        found = last_boxed(response) or response
    else:
        found = response
    return None if found is None else _normalise(found)
