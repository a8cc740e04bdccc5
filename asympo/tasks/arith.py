"""Synthetic arithmetic: small enough for a ~2M-parameter character model to learn on a CPU.

A problem is ``a<op>b`` with operands of at most ``digits`` digits, rendered as
``"37+48="``; the reference answer is GSM8K style (``"#### 85"``) and the
warm-start target is the bare number (``"85"``). Held-out problems are drawn
first, then training problems are drawn from everything else, so the two splits
never share a problem; both are a pure function of the seed and the spec.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass

from asympo.tasks.base import Problem, Task, TaskError

ARITH_OPERATORS = "+-*"
# Every character that an arith prompt, reference answer or target can contain.
ARITH_ALPHABET = "0123456789+-*=# \n"
# Printable ASCII (space to tilde) plus newline and tab: a character tokenizer covering
# this round-trips GSM8K/MATH-style English and LaTeX text as well as arith.
PRINTABLE_ALPHABET = "".join(ch for ch in string.printable if ch not in "\r\x0b\x0c")

ARITH_TEMPLATE = "{question}="


@dataclass(frozen=True)
class ArithSpec:
    """How hard the problems are.

    ``digits``: operands are drawn uniformly from ``0 .. 10**digits - 1``;
    ``operators``: any of ``+ - *``; ``allow_negative``: if false, ``a-b`` has ``a >= b``.
    """

    digits: int = 2
    operators: str = "+-"
    allow_negative: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.digits <= 9:
            raise TaskError(f"arith digits must be 1..9, got {self.digits}")
        if not self.operators or any(op not in ARITH_OPERATORS for op in self.operators):
            raise TaskError(
                f"arith operators must be a non-empty subset of {ARITH_OPERATORS!r}, "
                f"got {self.operators!r}"
            )

    def universe_size(self) -> int:
        """How many distinct problems exist (an upper bound when negatives are excluded)."""
        return (10**self.digits) ** 2 * len(set(self.operators))


def parse_arith_spec(text: str) -> ArithSpec:
    """Parse ``"digits=3,ops=+*,negative=1"`` (any subset, any order) into an ArithSpec."""
    values: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep:
            raise TaskError(f"arith option {part!r} must look like key=value")
        values[key.strip()] = value.strip()
    unknown = set(values) - {"digits", "ops", "negative"}
    if unknown:
        raise TaskError(f"unknown arith option(s) {sorted(unknown)}; known: digits, ops, negative")
    try:
        digits = int(values.get("digits", "2"))
    except ValueError as exc:
        raise TaskError(f"arith digits must be an integer, got {values['digits']!r}") from exc
    return ArithSpec(
        digits=digits,
        operators=values.get("ops", "+-"),
        allow_negative=values.get("negative", "0").lower() in {"1", "true", "yes"},
    )


def _apply(a: int, op: str, b: int) -> int:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    return a * b


def _draw(rng: random.Random, spec: ArithSpec) -> tuple[int, str, int]:
    high = 10**spec.digits - 1
    a, b = rng.randint(0, high), rng.randint(0, high)
    op = rng.choice(spec.operators)
    if op == "-" and not spec.allow_negative and a < b:
        a, b = b, a
    return a, op, b


def _problem(prompt_id: str, a: int, op: str, b: int) -> Problem:
    value = _apply(a, op, b)
    return Problem(prompt_id=prompt_id, question=f"{a}{op}{b}", answer=f"#### {value}")


def make_arith_task(
    spec: ArithSpec | None = None, seed: int = 0, train_size: int = 20_000, eval_size: int = 200
) -> Task:
    """Build the arith task: ``eval_size`` distinct held-out problems, ``train_size`` train ones.

    Train problems are distinct from each other while the universe allows it; once
    it is exhausted they repeat (never overlapping the held-out set).
    """
    spec = spec or ArithSpec()
    universe = spec.universe_size()
    if eval_size * 2 > universe:
        raise TaskError(
            f"arith eval_size={eval_size} is too large for {universe} possible problems; "
            "use more digits or a smaller eval_size"
        )
    rng = random.Random(f"arith:{seed}:{spec.digits}:{spec.operators}:{spec.allow_negative}")
    held_out: dict[tuple[int, str, int], None] = {}
    while len(held_out) < eval_size:
        held_out.setdefault(_draw(rng, spec), None)
    test = [_problem(f"test:{i}", *key) for i, key in enumerate(held_out)]

    seen: set[tuple[int, str, int]] = set()
    train: list[Problem] = []
    misses = 0
    while len(train) < train_size:
        key = _draw(rng, spec)
        if key in held_out:
            continue
        # Prefer unseen problems; after many consecutive repeats the universe is exhausted.
        if key in seen and misses < 50:
            misses += 1
            continue
        misses = 0
        seen.add(key)
        train.append(_problem(f"train:{len(train)}", *key))
    return Task(
        name="arith",
        train=train,
        test=test,
        verifier="gsm8k",
        template=ARITH_TEMPLATE,
        target_kind="number",
        metadata={
            "digits": str(spec.digits),
            "operators": spec.operators,
            "allow_negative": str(spec.allow_negative),
        },
    )
