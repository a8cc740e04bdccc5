"""Any prompt/answer file: each row has a ``prompt`` (shown verbatim) and an ``answer``.

An optional ``id`` field becomes the prompt id. The verifier defaults to ``math``
(answer equivalence, which also accepts exact matches of plain numbers and LaTeX).
"""

from __future__ import annotations

from asympo.tasks.base import Problem, Task, TaskError
from asympo.tasks.sources import load_problems


def load_jsonl(path: str, seed: int = 0, train_size: int = 0, eval_size: int = 200) -> Task:
    """A task from a local file (or train/test directory) of ``{"prompt", "answer"}`` rows."""
    if not path:
        raise TaskError("task 'jsonl' needs task.path: a .jsonl/.json/.parquet file")

    def to_problem(row: dict[str, object], split: str, i: int) -> Problem:
        return Problem(
            prompt_id=f"{split}:{row.get('id', i)}",
            question=str(row["prompt"]),
            answer=str(row["answer"]),
        )

    train, test, where = load_problems(
        path, seed, eval_size, ("prompt", "answer"), "jsonl (prompt/answer)", to_problem
    )
    return Task(
        name="jsonl",
        train=train[:train_size] if train_size else train,
        test=test[:eval_size],
        verifier="math",
        target_kind="answer",
        metadata={"source": where},
    )
