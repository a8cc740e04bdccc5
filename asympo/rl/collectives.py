"""The torch.distributed primitives the library uses, in one place (no-ops in one process).

The learner's process-group set-up (``services/learner/distributed.py``) and the training
step both communicate through these, so which device a backend reduces on is decided once.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def world_size() -> int:
    """Processes in the default group; 1 when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def comm_device() -> torch.device:
    """Where the default group's collectives run: the current GPU for NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(values: Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> Tensor:
    """``values`` reduced over every rank, in place, on its own device (``op``: SUM or MAX).

    Alone it returns ``values`` untouched. A tensor not on the backend's device (a CPU
    tensor under NCCL) travels there and back.
    """
    if world_size() == 1:
        return values
    device = comm_device()
    if values.device == device:
        dist.all_reduce(values, op=op)
    else:
        moved = values.to(device)
        dist.all_reduce(moved, op=op)
        values.copy_(moved)
    return values
