"""GSM8K: grade-school word problems; the answer ends with ``#### N``.

Schema (the Hugging Face ``openai/gsm8k`` one): ``question`` and ``answer`` strings.
"""

from __future__ import annotations

from asympo.tasks.base import Problem, Task, TaskError, final_number
from asympo.tasks.sources import load_problems

GSM8K_DEFAULT_SOURCE = "openai/gsm8k"
GSM8K_TEMPLATE = "Question: {question}\nAnswer:"


def _to_problem(row: dict[str, object], prompt_id: str) -> Problem:
    answer = str(row["answer"])
    if "####" not in answer:
        raise TaskError(f"gsm8k row {prompt_id}: answer has no '#### N' final answer")
    return Problem(
        prompt_id=prompt_id,
        question=str(row["question"]),
        answer=f"#### {final_number(answer)}",
        solution=" " + answer.strip(),
    )


def load_gsm8k(path: str = "", seed: int = 0, train_size: int = 0, eval_size: int = 200) -> Task:
    """GSM8K from ``path`` (local .jsonl/.json/.parquet, a train/test directory, or a HF id).

    ``train_size``/``eval_size`` cap each split (0 = no cap on train).
    """
    source = path or GSM8K_DEFAULT_SOURCE
    train, test, where = load_problems(
        source,
        seed,
        eval_size,
        ("question", "answer"),
        "gsm8k",
        lambda row, split, i: _to_problem(row, f"{split}:{i}"),
        hf_config="main",
    )
    return Task(
        name="gsm8k",
        train=train[:train_size] if train_size else train,
        test=test[:eval_size],
        verifier="gsm8k",
        template=GSM8K_TEMPLATE,
        metadata={"source": where},
    )
