"""Any prompt/answer file: each row has a ``prompt`` (shown verbatim) and an ``answer``.

An optional ``id`` field becomes the prompt id. The verifier defaults to ``math``
(answer equivalence, which also accepts exact matches of plain numbers and LaTeX).
"""

from __future__ import annotations

from asympo.tasks.base import Problem, Task, TaskError
from asympo.tasks.sources import load_rows, require_fields


def load_jsonl(path: str, seed: int = 0, train_size: int = 0, eval_size: int = 200) -> Task:
    """A task from a local file (or train/test directory) of ``{"prompt", "answer"}`` rows."""
    if not path:
        raise TaskError("task 'jsonl' needs task.path: a .jsonl/.json/.parquet file")
    train_rows, test_rows, where = load_rows(path, seed, eval_size)
    for rows, split in ((train_rows, "train"), (test_rows, "test")):
        require_fields(rows, ("prompt", "answer"), f"{where} ({split})", "jsonl (prompt/answer)")

    def problems(rows: list[dict[str, object]], split: str) -> list[Problem]:
        return [
            Problem(
                prompt_id=f"{split}:{row.get('id', i)}",
                question=str(row["prompt"]),
                answer=str(row["answer"]),
            )
            for i, row in enumerate(rows)
        ]

    train = problems(train_rows, "train")
    return Task(
        name="jsonl",
        train=train[:train_size] if train_size else train,
        test=problems(test_rows, "test")[:eval_size],
        verifier="math",
        target_kind="answer",
        metadata={"source": where},
    )
