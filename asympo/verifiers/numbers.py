"""Finding and normalising plain decimal numbers in free text (GSM8K answers)."""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

# Linear-time pattern: optional sign, digits with thousands commas, optional decimals.
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
MAX_NUMBER_CHARS = 200


def parse_number(text: str) -> Decimal | None:
    """``"1,000"``, ``"$85.0"``, ``"-3."`` -> Decimal; None if ``text`` is not one number."""
    cleaned = text.strip().replace(",", "").replace("$", "").rstrip(".")
    if not cleaned or len(cleaned) > MAX_NUMBER_CHARS:
        return None
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    return value if value.is_finite() else None


def last_number(text: str) -> str | None:
    """The last number-looking token in ``text``, or None."""
    found = None
    for match in NUMBER.finditer(text):
        found = match.group(0)
    return found


def first_number(text: str) -> str | None:
    """The first number-looking token in ``text``, or None."""
    match = NUMBER.search(text)
    return match.group(0) if match else None
