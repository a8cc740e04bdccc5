"""The learner's learning-rate schedule: warm-up, cosine decay to a floor, then held."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from asympo.config import load_settings
from asympo.rl.schedule import lr_factor
from services.learner.learner import make_optimizer


def test_warmup_then_cosine_to_the_floor_then_held() -> None:
    f = [lr_factor(4, 10, 0.1, s) for s in range(20)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0]
    assert f[4] == 1.0  # the decay starts from the full rate
    assert f[9] == pytest.approx(0.55)  # halfway: (1 + floor) / 2
    assert f[14] == pytest.approx(0.1) and f[19] == pytest.approx(0.1)
    assert all(a >= b for a, b in itertools.pairwise(f[4:]))  # never rises again
    assert [lr_factor(0, 0, 0.1, s) for s in (0, 5, 500)] == [1.0, 1.0, 1.0]
    assert lr_factor(0, 8, 0.0, 4) == pytest.approx(0.5 * (1 + math.cos(math.pi / 2)))


def test_the_optimizer_steps_along_the_schedule() -> None:
    settings = load_settings(
        None,
        ["learner.lr=0.01", "learner.warmup_steps=2", "learner.lr_decay_steps=4",
         "learner.min_lr_ratio=0.5"],
    )  # fmt: skip
    model = torch.nn.Linear(2, 1)
    optimizer, scheduler = make_optimizer(model, settings)
    seen = []
    for _ in range(8):
        seen.append(optimizer.param_groups[0]["lr"])
        model(torch.ones(1, 2)).sum().backward()
        optimizer.step()
        scheduler.step()
    expected = [0.01 * lr_factor(2, 4, 0.5, s) for s in range(8)]
    assert seen == pytest.approx(expected)
    assert seen[-1] == pytest.approx(0.005)


def test_a_floor_outside_zero_to_one_is_refused() -> None:
    with pytest.raises(ValueError, match="min_lr_ratio"):
        load_settings(None, ["learner.min_lr_ratio=1.5"])
