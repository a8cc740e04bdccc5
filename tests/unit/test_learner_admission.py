"""Admission bound and the deterministic epoch schedule over a task's train split."""

from __future__ import annotations

import pytest

from asympo.tasks import Problem
from services.learner.admission import EpochSchedule, admission_bound


def problems(n: int) -> list[Problem]:
    return [Problem(f"p{i}", f"q{i}", str(i)) for i in range(n)]


def test_bound_is_version_plus_staleness_plus_one_steps_of_groups() -> None:
    assert admission_bound(0, 0, 8) == 8  # synchronous: one step's worth
    assert admission_bound(3, 2, 4) == 24
    assert admission_bound(5, 0, 1) == 6


def test_each_epoch_is_a_permutation_fixed_by_the_seed() -> None:
    n = 17
    a = EpochSchedule(problems(n), seed=3)
    slots = [a.slot(seq) for seq in range(3 * n)]
    for epoch in range(3):
        block = slots[epoch * n : (epoch + 1) * n]
        assert sorted(s.index for s in block) == list(range(n))
        assert {s.epoch for s in block} == {epoch}
        assert all(s.problem.prompt_id == f"p{s.index}" for s in block)
    assert [s.index for s in slots[:n]] != [s.index for s in slots[n : 2 * n]]
    assert len({s.prompt_id for s in slots}) == 3 * n

    # Same seed, any access order (as after a restart): the same prompts.
    b = EpochSchedule(problems(n), seed=3)
    assert [b.slot(seq).prompt_id for seq in reversed(range(3 * n))] == [
        s.prompt_id for s in reversed(slots)
    ]
    other = EpochSchedule(problems(n), seed=4)
    assert [other.slot(i).index for i in range(n)] != [s.index for s in slots[:n]]


def test_an_empty_train_split_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="train split is empty"):
        EpochSchedule([], seed=0)
