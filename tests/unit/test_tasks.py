"""Tasks: arith determinism and split disjointness; gsm8k/math/jsonl loaders on local files."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from asympo.tasks import ARITH_ALPHABET, PRINTABLE_ALPHABET, TaskError, load_task
from asympo.verifiers.gsm8k import verify_gsm8k
from asympo.verifiers.math_equiv import verify_math


def _key(problem: object) -> str:
    return problem.question  # type: ignore[attr-defined,no-any-return]


def test_arith_is_deterministic_by_seed() -> None:
    a = load_task("arith", seed=3, train_size=500, eval_size=50)
    b = load_task("arith", seed=3, train_size=500, eval_size=50)
    c = load_task("arith", seed=4, train_size=500, eval_size=50)
    assert a.train == b.train and a.test == b.test
    assert [_key(p) for p in a.test] != [_key(p) for p in c.test]


@pytest.mark.parametrize("name", ["arith", "arith:digits=1,ops=+-*", "arith:digits=3,ops=*"])
def test_arith_splits_do_not_overlap(name: str) -> None:
    task = load_task(name, seed=0, train_size=3000, eval_size=20)
    held_out = {_key(p) for p in task.test}
    assert len(held_out) == 20
    assert held_out.isdisjoint(_key(p) for p in task.train)
    assert len({p.prompt_id for p in task.train + task.test}) == 3020


def test_arith_answers_are_correct_and_targets_verify() -> None:
    task = load_task("arith:digits=2,ops=+-*,negative=1", train_size=300, eval_size=30)
    for problem in task.train + task.test:
        a, op, b = _split_expression(problem.question)
        expected = {"+": a + b, "-": a - b, "*": a * b}[op]
        assert problem.answer == f"#### {expected}"
        target = task.sft_target(problem)
        assert target == str(expected) and not target.endswith("\n")
        assert verify_gsm8k(target, problem.answer).reward == 1.0
        assert set(task.render(problem) + target + problem.answer) <= set(ARITH_ALPHABET)
    assert set(ARITH_ALPHABET) <= set(PRINTABLE_ALPHABET)


def _split_expression(question: str) -> tuple[int, str, int]:
    for index, char in enumerate(question):
        if index > 0 and char in "+-*":
            return int(question[:index]), char, int(question[index + 1 :])
    raise AssertionError(question)


def test_arith_default_is_small_and_non_negative() -> None:
    task = load_task("arith", train_size=200, eval_size=20)
    assert task.verifier == "gsm8k"
    assert task.render(task.test[0]).endswith("=")
    assert all(not p.answer.startswith("#### -") for p in task.train)
    assert all(len(task.render(p)) <= 6 for p in task.train)


@pytest.mark.parametrize(
    "name", ["arith:digits=0", "arith:ops=/", "arith:bogus=1", "arith:digits=x", "nope", "gsm8k:x"]
)
def test_bad_task_specs_are_clear_errors(name: str) -> None:
    with pytest.raises(TaskError):
        load_task(name, path="x.jsonl")


def test_arith_eval_size_too_large_for_universe() -> None:
    with pytest.raises(TaskError, match="too large"):
        load_task("arith:digits=1,ops=+", eval_size=80)


GSM8K_ROWS = [
    {
        "question": f"Tom has {i} apples and buys {i + 1} more. How many?",
        "answer": f"He has {i} + {i + 1} = {2 * i + 1} apples.\n#### {2 * i + 1:,}",
    }
    for i in range(998, 1010)
]
MATH_ROWS = [
    {
        "problem": f"What is $\\frac{{{i}}}{{{2 * i}}}$?",
        "solution": f"Cancel: $\\frac{{{i}}}{{{2 * i}}} = \\boxed{{\\frac{{1}}{{2}}}}$.",
        "level": "Level 1",
    }
    for i in range(1, 9)
]


def _write_jsonl(path: Path, rows: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_gsm8k_from_jsonl_and_parquet_agree(tmp_path: Path) -> None:
    jsonl = _write_jsonl(tmp_path / "gsm8k.jsonl", GSM8K_ROWS)
    parquet = tmp_path / "gsm8k.parquet"
    pq.write_table(pa.Table.from_pylist(GSM8K_ROWS), parquet)
    a = load_task("gsm8k", path=str(jsonl), seed=1, eval_size=4)
    b = load_task("gsm8k", path=str(parquet), seed=1, eval_size=4)
    assert a.train == b.train and a.test == b.test
    assert len(a.test) == 4 and len(a.train) == len(GSM8K_ROWS) - 4
    assert {p.question for p in a.test}.isdisjoint(p.question for p in a.train)
    problem = a.train[0]
    assert problem.answer.startswith("#### ") and "," in problem.answer
    assert a.render(problem).startswith("Question: ")
    assert verify_gsm8k(a.sft_target(problem), problem.answer).reward == 1.0


def test_gsm8k_directory_with_train_and_test(tmp_path: Path) -> None:
    _write_jsonl(tmp_path / "train.jsonl", GSM8K_ROWS[:8])
    _write_jsonl(tmp_path / "test.jsonl", GSM8K_ROWS[8:])
    task = load_task("gsm8k", path=str(tmp_path), train_size=5)
    assert len(task.train) == 5 and len(task.test) == 4
    assert task.test[0].question == GSM8K_ROWS[8]["question"]


def test_math_from_parquet(tmp_path: Path) -> None:
    path = tmp_path / "math.parquet"
    pq.write_table(pa.Table.from_pylist(MATH_ROWS), path)
    task = load_task("math", path=str(path), eval_size=2)
    assert task.verifier == "math" and len(task.test) == 2
    problem = task.test[0]
    assert problem.answer == "\\boxed{\\frac{1}{2}}"
    assert verify_math(task.sft_target(problem), problem.answer).reward == 1.0


def test_jsonl_prompt_answer(tmp_path: Path) -> None:
    rows = [{"prompt": f"Capital #{i}?", "answer": "Paris", "id": f"q{i}"} for i in range(6)]
    task = load_task("jsonl", path=str(_write_jsonl(tmp_path / "qa.jsonl", rows)), eval_size=2)
    assert task.render(task.train[0]) == task.train[0].question
    assert task.train[0].prompt_id.startswith("train:q")
    assert task.sft_target(task.train[0]) == "Paris"


def test_missing_file_and_wrong_schema_are_clear(tmp_path: Path) -> None:
    with pytest.raises(TaskError, match="not found"):
        load_task("gsm8k", path=str(tmp_path / "missing.jsonl"))
    wrong = _write_jsonl(tmp_path / "wrong.jsonl", MATH_ROWS)
    with pytest.raises(TaskError, match=r"gsm8k schema.*'question'"):
        load_task("gsm8k", path=str(wrong))
    with pytest.raises(TaskError, match="math schema"):
        load_task("math", path=str(_write_jsonl(tmp_path / "g.jsonl", GSM8K_ROWS)))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "a", "answer": "#### 1"}\nnot json\n')
    with pytest.raises(TaskError, match=r"bad.jsonl:2"):
        load_task("gsm8k", path=str(bad))
    with pytest.raises(TaskError, match=r"needs task\.path"):
        load_task("jsonl")
