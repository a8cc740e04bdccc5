"""pass@k arithmetic and the evaluation loop on the real arith task."""

from __future__ import annotations

import itertools

import pytest

from asympo.engines.base import cut_at_stop
from asympo.evaluation import evaluate, pass_at_k
from asympo.tasks import load_task
from asympo.tasks.base import final_number


def brute_pass_at_k(n: int, c: int, k: int) -> float:
    """Fraction of k-subsets of n samples (c correct) that hold at least one correct one."""
    samples = [1] * c + [0] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize(("n", "c", "k"), [(5, 0, 1), (5, 1, 1), (6, 2, 3), (8, 3, 8), (7, 7, 2)])
def test_pass_at_k_matches_enumeration(n: int, c: int, k: int) -> None:
    assert pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(n, c, k))


def test_pass_at_k_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)


def test_evaluate_scores_an_oracle_and_a_half_oracle() -> None:
    task = load_task("arith", seed=3, eval_size=20)
    answers = {task.render(p): final_number(p.answer) for p in task.test}

    def oracle(prompts: list[str], n: int, temperature: float) -> list[list[str]]:
        return [[answers[p]] * n for p in prompts]

    def exact(out: str, ref: str) -> float:
        return float(out.strip() == final_number(ref))

    res = evaluate(task, task.test, oracle, exact, k=4)
    assert (res.pass_at_1, res.pass_at_k, res.n_problems) == (1.0, 1.0, 20)

    def half(prompts: list[str], n: int, temperature: float) -> list[list[str]]:
        return [[answers[p] if i % 2 else "x" for i in range(n)] for p in prompts]

    res = evaluate(task, task.test, half, exact, k=2)
    assert res.pass_at_1 == 0.0  # the greedy (first) sample is the wrong one
    assert res.pass_at_k == pytest.approx(pass_at_k(2, 1, 2))


def test_cut_at_stop() -> None:
    assert cut_at_stop("12\nQ: 3", ["\n"]) == ("12", True)
    assert cut_at_stop("12", ["\n", ""]) == ("12", False)
    assert cut_at_stop("1 Q:2\n", ["\n", "Q:"]) == ("1 ", True)  # the earliest, not the first
