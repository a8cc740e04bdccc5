"""learner.strategy=fsdp without torchrun (e.g. `asympo up`): one process, its own group."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from asympo.rl.training import StepConfig, train_step
from services.learner.checkpoint import (
    LearnerState,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from services.learner.distributed import DistInfo
from services.learner.sharding import full_state_dict, is_sharded, wrap_model
from tests.unit.test_learner_step import fixed_groups, tiny_model

CFG = StepConfig(micro_batch=2, grad_clip=0.1)


def test_fsdp_alone_trains_like_single_and_round_trips_a_sharded_checkpoint(
    tmp_path: Path,
) -> None:
    assert not dist.is_initialized()
    info = DistInfo(0, 1, torch.device("cpu"))
    try:
        model = wrap_model(tiny_model(), info, "fsdp", "fp32", activation_checkpointing=True)
        assert is_sharded(model)
        opt = torch.optim.AdamW(model.parameters(), lr=0.01)
        stats = train_step(model, opt, fixed_groups(), CFG)
        plain = tiny_model()
        plain_opt = torch.optim.AdamW(plain.parameters(), lr=0.01)
        expected = train_step(plain, plain_opt, fixed_groups(), CFG)
        assert abs(stats["grad_norm"] - expected["grad_norm"]) < 1e-5
        save_checkpoint(tmp_path, model, opt, None, LearnerState(version=1))
        path = latest_checkpoint(tmp_path)
        assert path is not None and (path / "dcp").is_dir()
        again = wrap_model(tiny_model(seed=3), info, "fsdp", "fp32")
        again_opt = torch.optim.AdamW(again.parameters(), lr=0.01)
        assert load_checkpoint(path, again, again_opt, None).version == 1
        got, want = full_state_dict(again), full_state_dict(model)
        reference = plain.state_dict()
        for key, value in want.items():
            assert torch.equal(got[key], value), key
            torch.testing.assert_close(value, reference[key], rtol=1e-5, atol=1e-5)
        del model, opt, again, again_opt
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
