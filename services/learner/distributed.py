"""Data-parallel learner under torchrun: rank 0 does all I/O, every rank trains a shard.

Rank 0 reads the scored stream, forms the batch and broadcasts it as serialized
``ScoredGroup`` protobufs (never pickle); rank r trains ``groups[r::world]``; the
training step (``asympo.rl.training.train_step``) weights every micro-batch by its share of
the *global* batch, so the DDP-averaged gradient equals the single-process one.

Rank 0 also sends commands the other ranks must join when the model is sharded (FSDP),
because the work is collective: ``CHECKPOINT`` (write this rank's shards for a version),
``PUBLISH`` (the probe forward, then the full-weight gather), ``GATHER`` (the gather
alone), and ``STOP``.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from asympo.rl.collectives import comm_device
from asympo.rl.training import TrainGroup
from asympo.v1 import records_pb2
from services.learner.records import group_from_scored

STOP = -1
CHECKPOINT = -2
PUBLISH = -3
GATHER = -4
BATCH = 0


@dataclass(frozen=True)
class Command:
    """What rank 0 told the other ranks: a batch to train, or a collective to join."""

    kind: int  # BATCH, STOP, CHECKPOINT, PUBLISH or GATHER
    arg: int = 0  # CHECKPOINT: the version
    payload: list[bytes] | None = None  # BATCH: serialized ScoredGroups


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: rank, world size and its device."""

    rank: int
    world: int
    device: torch.device

    @property
    def active(self) -> bool:
        """More than one process takes part."""
        return self.world > 1


def init_distributed(device_setting: str) -> DistInfo:
    """Join the torchrun process group when WORLD_SIZE > 1 (nccl on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_setting in ("auto", "cuda")
    if device_setting not in ("auto", "cuda"):
        device = torch.device(device_setting)
    elif use_cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank, world, device)


def leave_distributed() -> None:
    """Leave the process group together at a clean end: a barrier, then destroy it.

    Without it a rank that finishes first tears down its end of the gloo pairs while
    another is still exiting, and that one aborts in the group's destructor ("terminate
    called without an active exception", exit -6), failing a run that trained fine.
    Only for the clean path: after a failure the others may never reach the barrier.
    """
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def wrap_ddp(model: torch.nn.Module, info: DistInfo) -> torch.nn.Module:
    """``model`` in DistributedDataParallel when several ranks take part, else as it is.

    Buffers are not broadcast: the policy's buffers (rotary frequencies) are identical on
    every rank, and a per-forward broadcast would pair up wrongly when ranks run different
    numbers of micro-batches.
    """
    if not info.active:
        return model
    ids = [info.device.index] if info.device.type == "cuda" else None
    # Newer torch renamed the switch (and deprecates the old name); older torch lacks it.
    params = inspect.signature(DistributedDataParallel.__init__).parameters
    key = "forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"
    no_buffer_sync: dict[str, Any] = {key: False}
    return DistributedDataParallel(model, device_ids=ids, **no_buffer_sync)


def _send_header(kind_or_len: int, arg: int) -> tuple[int, int]:
    header = torch.zeros(2, dtype=torch.long, device=comm_device())
    if dist.get_rank() == 0:
        header[0], header[1] = kind_or_len, arg
    dist.broadcast(header, 0)
    first, second = (int(x) for x in header.tolist())
    return first, second


def send_command(kind: int, arg: int = 0) -> None:
    """Rank 0: tell the other ranks to join ``kind`` (STOP, CHECKPOINT, PUBLISH, GATHER)."""
    if kind >= 0:
        raise ValueError(f"not a command: {kind}")
    _send_header(kind, arg)


def receive_command() -> Command:
    """Ranks > 0: wait for rank 0's next batch or command."""
    first, arg = _send_header(0, 0)
    if first < 0:
        return Command(first, arg)
    return Command(BATCH, 0, _receive_payload(first, None))


def broadcast_batch(payload: list[bytes] | None) -> list[bytes] | None:
    """Rank 0 sends ``payload`` (None = stop); every rank returns what rank 0 sent."""
    if dist.get_rank() == 0:
        n, _ = _send_header(STOP if payload is None else len(payload), 0)
    else:
        n, _ = _send_header(0, 0)
    if n < 0:
        return None
    return _receive_payload(n, payload)


def _receive_payload(n: int, payload: list[bytes] | None) -> list[bytes]:
    device = comm_device()
    lengths = torch.zeros(n, dtype=torch.long, device=device)
    if dist.get_rank() == 0 and payload is not None:
        lengths = torch.tensor([len(p) for p in payload], dtype=torch.long, device=device)
    dist.broadcast(lengths, 0)
    total = int(lengths.sum().item())
    blob = torch.zeros(total, dtype=torch.uint8, device=device)
    if dist.get_rank() == 0 and payload is not None and total:
        blob = torch.frombuffer(bytearray(b"".join(payload)), dtype=torch.uint8).to(device)
    dist.broadcast(blob, 0)
    data = blob.cpu().numpy().tobytes()
    out, offset = [], 0
    for length in lengths.tolist():
        out.append(data[offset : offset + length])
        offset += length
    return out


def decode_batch(payload: list[bytes]) -> list[TrainGroup]:
    """The training groups of a broadcast batch."""
    groups = []
    for raw in payload:
        msg = records_pb2.ScoredGroup()
        msg.ParseFromString(raw)
        groups.append(group_from_scored(msg))
    return groups


def shard(groups: list[TrainGroup], info: DistInfo) -> list[TrainGroup]:
    """This rank's share of the batch."""
    return groups[info.rank :: info.world]
