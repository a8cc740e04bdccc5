"""eval_mode: eval inside the block, the owner's mode restored after, errors included."""

from __future__ import annotations

import pytest
import torch

from asympo.eval_mode import eval_mode


@pytest.mark.parametrize("training", [True, False])
def test_eval_inside_and_own_mode_restored_even_on_error(training: bool) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5))
    model.train(training)
    with eval_mode(model) as m:
        assert m is model and not model.training and not model[1].training
    assert model.training is training and model[1].training is training
    with pytest.raises(RuntimeError), eval_mode(model):
        raise RuntimeError("probe failed")
    assert model.training is training
