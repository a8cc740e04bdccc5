"""Data-parallel learner step: gloo with world size 2 gives the update of world size 1."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from asympo.rl.training import StepConfig, TrainGroup, train_step
from services.learner.distributed import DistInfo, wrap_ddp
from tests.unit.test_learner_step import fixed_groups, tiny_model

CFG = StepConfig(micro_batch=2, grad_clip=0.1)
LR = 0.05


def batches() -> dict[str, list[TrainGroup]]:
    """Uneven shards (2 + 1 groups) and a rank with no data at all (1 + 0)."""
    groups = fixed_groups()
    return {"uneven": groups, "empty_rank": groups[:1]}


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for name, groups in batches().items():
            _train_one(rank, world, name, groups, out_dir)
        # Leave together: a rank that destroys its group while the other still uses the
        # pairs can abort in the destructor (services/learner/distributed.leave_distributed).
        dist.barrier()
    finally:
        # Every DDP wrapper is gone by now (it lived in _train_one): freeing one after the
        # group is destroyed makes its Reducer drop the last reference to the gloo group,
        # whose destructor joins a thread that needs the GIL — a teardown deadlock.
        dist.destroy_process_group()


def _train_one(rank: int, world: int, name: str, groups: list[TrainGroup], out_dir: str) -> None:
    model = tiny_model()
    ddp = wrap_ddp(model, DistInfo(rank, world, torch.device("cpu")))
    opt = torch.optim.SGD(ddp.parameters(), lr=LR)
    stats = train_step(ddp, opt, groups[rank::world], CFG)
    params = {n: p.detach().contiguous() for n, p in model.named_parameters()}
    save_file(params, os.path.join(out_dir, f"{name}-{rank}.safetensors"))
    Path(out_dir, f"{name}-{rank}.json").write_text(json.dumps(stats))


@pytest.mark.timeout(300)
def test_gloo_world_size_2_equals_world_size_1(tmp_path: Path) -> None:
    init_file = tmp_path / "rendezvous"
    mp.start_processes(
        _worker, args=(2, str(init_file), str(tmp_path)), nprocs=2, start_method="spawn"
    )
    for name, groups in batches().items():
        model = tiny_model()
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        expected_stats = train_step(model, opt, groups, CFG)
        expected = dict(model.named_parameters())
        for rank in range(2):
            got = load_file(str(tmp_path / f"{name}-{rank}.safetensors"))
            assert set(got) == set(expected)
            for key, value in got.items():
                torch.testing.assert_close(value, expected[key].detach(), rtol=1e-5, atol=1e-6)
            stats = json.loads((tmp_path / f"{name}-{rank}.json").read_text())
            for key in ("loss", "loss_balance", "grad_norm", "samples", "tokens", "entropy"):
                assert stats[key] == pytest.approx(expected_stats[key], rel=1e-5, abs=1e-7), key
        # The update is real: weights moved.
        assert not torch.equal(
            torch.cat([p.flatten() for p in tiny_model().parameters()]),
            torch.cat([p.detach().flatten() for p in model.parameters()]),
        )
