"""The learning-rate schedule: linear warm-up, then an optional cosine decay to a floor.

One home for the learner service and the offline experiments, so a setting such as
``learner.lr_decay_steps`` means the same thing in ``asympo up`` and in
``asympo experiment staleness``.
"""

from __future__ import annotations

import functools
import math

import torch


def lr_factor(warmup: int, decay: int, floor: float, step: int) -> float:
    """The multiple of the base learning rate used at optimiser step ``step`` (0-based).

    A linear warm-up over ``warmup`` steps, then a cosine from 1 down to ``floor`` over
    ``decay`` steps, then ``floor`` (``decay`` = 0: constant 1 after the warm-up).
    """
    if step < warmup:
        return (step + 1) / warmup
    if decay <= 0:
        return 1.0
    t = min(step - warmup, decay) / decay
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * t))


def lr_scheduler(
    optimizer: torch.optim.Optimizer, warmup: int, decay: int, floor: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """A scheduler that multiplies each group's base rate by :func:`lr_factor` per step."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, functools.partial(lr_factor, warmup, decay, floor)
    )
