"""Group-relative advantage estimators."""

from __future__ import annotations

import pytest
import torch

from asympo.rl.advantages import ADVANTAGES, compute_advantages


@pytest.mark.parametrize("name", sorted(ADVANTAGES))
def test_advantages_are_zero_sum_per_group(name: str) -> None:
    rewards = torch.rand(7, 5, generator=torch.Generator().manual_seed(0))
    adv, flat = compute_advantages(name, rewards)
    assert adv.shape == rewards.shape
    assert flat == 0
    torch.testing.assert_close(adv.sum(dim=1), torch.zeros(7), atol=1e-5, rtol=0)


def test_grpo_normalises_by_the_group_std() -> None:
    rewards = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    adv, _ = compute_advantages("grpo", rewards, eps=0.0)
    mean, std = 0.25, (0.25 * 0.75) ** 0.5
    torch.testing.assert_close(adv, (rewards - mean) / std)


def test_drgrpo_is_mean_only() -> None:
    rewards = torch.tensor([[2.0, 0.0, 1.0]])
    adv, _ = compute_advantages("drgrpo", rewards)
    torch.testing.assert_close(adv, torch.tensor([[1.0, -1.0, 0.0]]))


def test_rloo_leaves_one_out() -> None:
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    adv, _ = compute_advantages("rloo", rewards)
    expected = torch.tensor([[1 - 1 / 3, 0 - 2 / 3, 0 - 2 / 3, 1 - 1 / 3]])
    torch.testing.assert_close(adv, expected)
    with pytest.raises(ValueError, match="at least 2"):
        compute_advantages("rloo", torch.ones(2, 1) * torch.tensor([[0.3], [0.1]]))


@pytest.mark.parametrize("name", sorted(ADVANTAGES))
def test_all_equal_groups_get_exactly_zero_and_are_counted(name: str) -> None:
    rewards = torch.tensor([[0.1, 0.1, 0.1], [1.0, 0.0, 1.0], [0.0, 0.0, 0.0], [0.7, 0.7, 0.7]])
    adv, flat = compute_advantages(name, rewards)
    assert flat == 3
    assert torch.all(adv[[0, 2, 3]] == 0)
    assert adv[1].abs().sum() > 0


def test_unknown_estimator_and_bad_shape_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="known: drgrpo, grpo, rloo"):
        compute_advantages("ppo", torch.zeros(1, 2))
    with pytest.raises(ValueError, match=r"\[N_groups, G\]"):
        compute_advantages("grpo", torch.zeros(4))
    adv, flat = compute_advantages("grpo", torch.zeros(0, 4))
    assert adv.shape == (0, 4) and flat == 0
