"""Running a model in eval mode for a while, whatever mode its owner left it in."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``model`` in eval mode (no dropout) inside the block; its own mode restored after.

    The learner's model is in training mode between steps, and probes, evaluation and
    behaviour log-probs must not switch it for good (nor leave it in eval on an error).
    """
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
