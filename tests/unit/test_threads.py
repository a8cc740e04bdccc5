"""Thread budgets: `asympo serve` gives each service the torch/OpenMP threads configured."""

from __future__ import annotations

import os

import pytest
import torch

from asympo import threads
from asympo.config import load_settings


@pytest.fixture
def restore_threads(monkeypatch: pytest.MonkeyPatch) -> object:
    before = torch.get_num_threads()
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.setenv(name, os.environ.get(name, ""))
    yield
    torch.set_num_threads(before)


def test_budget_sets_torch_and_openmp_threads(restore_threads: object) -> None:
    settings = load_settings(None, ["threads.learner=1", "threads.rollout=2"])
    assert threads.apply("learner", settings) == 1
    assert torch.get_num_threads() == 1
    assert os.environ["OMP_NUM_THREADS"] == "1"
    assert threads.budget("rollout", settings) == 2


def test_zero_leaves_the_process_alone(restore_threads: object) -> None:
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "7"
    settings = load_settings(None, ["threads.learner=0"])
    assert threads.apply("learner", settings) == 1
    assert os.environ["OMP_NUM_THREADS"] == "7"


def test_shared_core_defaults_are_one_thread_per_service() -> None:
    settings = load_settings(None, [])
    assert {
        s: threads.budget(s, settings) for s in ("learner", "rollout", "reward", "weights")
    } == {
        "learner": 1,
        "rollout": 1,
        "reward": 1,
        "weights": 1,
    }
    assert threads.budget("unknown-service", settings) == 0
