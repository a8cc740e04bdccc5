"""How the learner's model is laid out over ranks: single, DDP or FSDP2.

``learner.strategy``:

* ``single`` — one process holds everything (world size 1).
* ``ddp`` — every rank holds the full model, gradients and AdamW state (16 bytes per
  parameter in float32); gradients are all-reduced. Right for small models.
* ``fsdp`` — FSDP2 (``torch.distributed.fsdp.fully_shard``) per decoder layer, then the
  root: parameters, gradients and optimiser state are sharded over the ranks and each
  layer is all-gathered just for its forward/backward. ``learner.mixed_precision``
  ``bf16`` computes in bfloat16 with float32 master weights, float32 gradient reduction
  and float32 AdamW state; ``fp32`` computes in float32 (equal to DDP within rounding).
  ``learner.cpu_offload`` keeps the shards and optimiser state in host memory.
* ``auto`` — ``fsdp`` under torchrun on CUDA, ``ddp`` under torchrun on CPU, else
  ``single``.

``learner.activation_checkpointing`` recomputes each decoder layer in the backward pass
instead of keeping its activations (any strategy).

Under FSDP every forward is collective (each layer's all-gather), so anything that runs
the model or reads its full weights — the probe and the weight gather of a publication,
a checkpoint — is done by all ranks together; rank 0 tells the others when
(``services.learner.distributed`` commands). Checkpoints of a sharded model are written
with ``torch.distributed.checkpoint`` (each rank its shard).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    FSDPModule,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
)

from services.learner.distributed import DistInfo, wrap_ddp

Strategy = Literal["auto", "single", "ddp", "fsdp"]
Precision = Literal["bf16", "fp32"]


class ShardingError(ValueError):
    """The strategy cannot apply to this model or process layout."""


def resolve_strategy(strategy: Strategy, info: DistInfo) -> Literal["single", "ddp", "fsdp"]:
    """The concrete strategy of ``strategy`` for this process layout."""
    if strategy == "auto":
        if not info.active:
            return "single"
        return "fsdp" if info.device.type == "cuda" else "ddp"
    if strategy == "single" and info.active:
        raise ShardingError(
            f"learner.strategy=single but {info.world} processes run; use ddp or fsdp"
        )
    return strategy


def mixed_precision_policy(precision: Precision) -> MixedPrecisionPolicy:
    """bf16: bfloat16 parameters and compute, float32 gradient reduction; fp32: all float32."""
    if precision == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's transformer blocks: modules of the classes HF never splits across devices."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ShardingError(
            f"cannot find the decoder layers of {type(model).__name__} "
            "(no _no_split_modules); use learner.strategy=ddp"
        )
    return layers


def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each decoder layer's activations in the backward pass (non-reentrant)."""
    enable = getattr(model, "gradient_checkpointing_enable", None)
    if enable is None:
        raise ShardingError(f"{type(model).__name__} does not support activation checkpointing")
    enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "use_cache"):
        config.use_cache = False  # a KV cache is useless in training and clashes with it


def apply_fsdp(
    model: torch.nn.Module,
    info: DistInfo,
    precision: Precision = "bf16",
    cpu_offload: bool = False,
) -> torch.nn.Module:
    """Shard ``model`` in place with FSDP2: each decoder layer, then the root.

    The model's parameters stay in their loaded dtype (float32 = the master weights);
    ``precision`` only sets the compute and reduction dtypes.
    """
    if not dist.is_initialized():
        if info.active:
            raise ShardingError("learner.strategy=fsdp with several ranks needs torchrun")
        # One process without torchrun (e.g. `asympo up`): FSDP and DCP still need a group.
        backend = "nccl" if info.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    mesh = init_device_mesh(info.device.type, (info.world,))
    policy = mixed_precision_policy(precision)
    offload = CPUOffloadPolicy() if cpu_offload else OffloadPolicy()
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=policy, offload_policy=offload)
    # The root holds embeddings, final norm and head; it need not reshard after forward
    # because backward needs it first.
    fully_shard(
        model, mesh=mesh, mp_policy=policy, offload_policy=offload, reshard_after_forward=False
    )
    return model


def wrap_model(
    model: torch.nn.Module,
    info: DistInfo,
    strategy: Strategy = "auto",
    precision: Precision = "bf16",
    cpu_offload: bool = False,
    activation_checkpointing: bool = False,
) -> torch.nn.Module:
    """``model`` laid out for training by the resolved ``strategy`` (see module docstring)."""
    resolved = resolve_strategy(strategy, info)
    if cpu_offload and resolved != "fsdp":
        raise ShardingError("learner.cpu_offload needs learner.strategy=fsdp")
    if activation_checkpointing:
        enable_activation_checkpointing(model)
    if resolved == "fsdp":
        return apply_fsdp(model, info, precision, cpu_offload)
    return wrap_ddp(model, info) if resolved == "ddp" else model


def is_sharded(model: torch.nn.Module) -> bool:
    """``model`` is an FSDP2 module: its forward and state gathering are collective."""
    return isinstance(model, FSDPModule)


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full, unsharded weights on the CPU (for publishing and HF export).

    Under FSDP this is collective: every rank must call it; each parameter is
    all-gathered and moved to host memory one at a time, and only rank 0 keeps the
    result (others get ``{}``), so host memory never holds more than one full copy.
    Otherwise the (DDP-unwrapped) module's own tensors, detached.
    """
    if is_sharded(model):
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        gathered: dict[str, Any] = get_model_state_dict(model, options=options)
        return gathered
    inner = getattr(model, "module", model)
    return {k: v.detach() for k, v in inner.state_dict().items()}
