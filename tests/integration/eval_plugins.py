"""A light verifier plug-in for the `asympo eval` test (stdlib only: it loads fast in a worker)."""

from __future__ import annotations


def leading_digit(response: str, reference: str) -> bool:
    """Correct when the response starts with the first character of the ``#### N`` number.

    Partial, discriminating credit: a weak model still scores strictly between 0 and 1,
    and the score depends on exactly what each completion is.
    """
    target = reference.rpartition("####")[2].strip()
    return bool(response) and bool(target) and response[:1] == target[:1]
