"""MATH (competition mathematics): the solution holds the final answer in ``\\boxed{...}``.

Schema (the Hendrycks MATH one): ``problem`` and ``solution`` strings.
"""

from __future__ import annotations

from asympo.tasks.base import Problem, Task, TaskError
from asympo.tasks.sources import load_problems

MATH_DEFAULT_SOURCE = "EleutherAI/hendrycks_math:algebra"
MATH_TEMPLATE = "Problem: {question}\nSolution:"


def last_boxed(text: str) -> str | None:
    """The contents of the last ``\\boxed{...}`` or ``\\fbox{...}`` (braces balanced), or None."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    brace = text.find("{", start)
    if brace < 0:
        return None
    depth = 0
    for index in range(brace, len(text)):
        if text[index] == "{":
            depth += 1
        elif text[index] == "}":
            depth -= 1
            if depth == 0:
                return text[brace + 1 : index]
    return None


def _to_problem(row: dict[str, object], prompt_id: str) -> Problem:
    solution = str(row["solution"])
    boxed = last_boxed(solution)
    if boxed is None:
        raise TaskError(f"math row {prompt_id}: solution has no \\boxed{{...}} final answer")
    return Problem(
        prompt_id=prompt_id,
        question=str(row["problem"]),
        answer=f"\\boxed{{{boxed}}}",
        solution=" " + solution.strip(),
    )


def load_math(path: str = "", seed: int = 0, train_size: int = 0, eval_size: int = 200) -> Task:
    """MATH from ``path`` (local .jsonl/.json/.parquet, a train/test directory, or a HF id)."""
    source = path or MATH_DEFAULT_SOURCE
    train, test, where = load_problems(
        source,
        seed,
        eval_size,
        ("problem", "solution"),
        "math",
        lambda row, split, i: _to_problem(row, f"{split}:{i}"),
    )
    return Task(
        name="math",
        train=train[:train_size] if train_size else train,
        test=test[:eval_size],
        verifier="math",
        template=MATH_TEMPLATE,
        metadata={"source": where},
    )
