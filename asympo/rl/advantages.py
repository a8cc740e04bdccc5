"""Group-relative advantages: every estimator is zero-sum within a group.

Input rewards are ``[N, G]`` (N groups of G responses to the same prompt); output
advantages have the same shape. A group whose rewards are all equal carries no
learning signal: it gets exactly zero advantage and is counted, so the learner can
report how much of a batch was wasted.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

AdvantageFn = Callable[[Tensor, float], Tensor]


def grpo_advantages(rewards: Tensor, eps: float = 1e-6) -> Tensor:
    """GRPO: ``(r - mean_g r) / (std_g r + eps)`` with the population std; ``[N, G] -> [N, G]``."""
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, keepdim=True, correction=0)
    return (rewards - mean) / (std + eps)


def drgrpo_advantages(rewards: Tensor, eps: float = 1e-6) -> Tensor:
    """Dr.GRPO: mean-only ``r - mean_g r`` (no std division, so no difficulty bias)."""
    return rewards - rewards.mean(dim=1, keepdim=True)


def rloo_advantages(rewards: Tensor, eps: float = 1e-6) -> Tensor:
    """RLOO: ``r_i - mean_{j != i} r_j = G/(G-1) * (r_i - mean_g r)``; needs G >= 2."""
    g = rewards.shape[1]
    if g < 2:
        raise ValueError(f"rloo needs at least 2 responses per group, got {g}")
    loo_mean = (rewards.sum(dim=1, keepdim=True) - rewards) / (g - 1)
    return rewards - loo_mean


ADVANTAGES: dict[str, AdvantageFn] = {
    "grpo": grpo_advantages,
    "drgrpo": drgrpo_advantages,
    "rloo": rloo_advantages,
}


def compute_advantages(name: str, rewards: Tensor, eps: float = 1e-6) -> tuple[Tensor, int]:
    """Advantages ``[N, G]`` of rewards ``[N, G]`` and the number of all-equal-reward groups.

    Groups whose rewards are all equal get exactly 0 (not a float-rounding residue).
    """
    if name not in ADVANTAGES:
        raise ValueError(
            f"unknown advantage estimator {name!r}; known: {', '.join(sorted(ADVANTAGES))}"
        )
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [N_groups, G], got shape {tuple(rewards.shape)}")
    rewards = rewards.to(torch.float32) if not rewards.is_floating_point() else rewards
    if rewards.shape[0] == 0:
        return torch.zeros_like(rewards), 0
    flat = (rewards == rewards[:, :1]).all(dim=1)  # [N]
    adv = ADVANTAGES[name](rewards, eps)
    adv = torch.where(flat[:, None], torch.zeros_like(adv), adv)
    return adv, int(flat.sum().item())
