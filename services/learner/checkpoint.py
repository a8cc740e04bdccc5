"""Learner checkpoints without pickle: tensors in safetensors, everything else in JSON.

A checkpoint is a directory ``<checkpoint_dir>/step-<version>/`` holding
``model.safetensors``, ``optimizer.safetensors`` (per-parameter optimiser tensors),
``rng.safetensors`` and ``state.json`` (version, optimiser hyper-parameters, scheduler,
Python RNG, stream positions, counters). It is written under a temporary name and
renamed, then ``LATEST`` is replaced atomically, so a crash never leaves a half
checkpoint that a restart would load.

A sharded (FSDP) model's checkpoint holds ``dcp/`` instead of the two model and optimiser
files: a ``torch.distributed.checkpoint`` directory to which every rank writes its own
shards of the weights and the AdamW state (no rank gathers the full model). Writing and
loading it are collective: rank 0 calls :func:`save_checkpoint` / :func:`load_checkpoint`
while the other ranks call :func:`save_checkpoint_shards` / :func:`load_checkpoint`.
The rest of the protocol (rename, ``LATEST``, state.json) is rank 0's alone.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, load_model, save_file, save_model
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from services.learner.sharding import is_sharded

LATEST = "LATEST"
STATE = "state.json"
SHARDS = "dcp"


@dataclass
class LearnerState:
    """What a resumed learner needs besides tensors."""

    version: int = 0
    published_version: int = -1
    unacked_entry_ids: list[str] = field(default_factory=list)  # trained/dropped, to ack
    trained_group_ids: list[str] = field(default_factory=list)  # recent, for de-duplication
    counters: dict[str, float] = field(default_factory=dict)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    inner = getattr(model, "module", model)
    return inner if isinstance(inner, torch.nn.Module) else model


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], Any]:
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _load_optimizer(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: Any
) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, tensor in tensors.items():
        idx, _, key = name.partition(".")
        state.setdefault(int(idx), {})[key] = tensor
    for idx, values in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(values)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def _python_rng_to_json(rng_state: tuple[Any, ...]) -> list[Any]:
    version, internal, gauss = rng_state
    return [version, list(internal), gauss]


def _python_rng_from_json(data: list[Any]) -> tuple[Any, ...]:
    return (data[0], tuple(data[1]), data[2])


def save_checkpoint(
    directory: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    state: LearnerState,
    keep: int = 2,
) -> Path:
    """Write a checkpoint of version ``state.version``; returns its directory."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{state.version:08d}"
    if is_sharded(model):
        tmp = _sharded_tmp(root, state.version)
        opt_meta = _save_shards(tmp, model, optimizer)
    else:
        tmp = root / f".tmp-step-{state.version:08d}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_model(_unwrap(model), str(tmp / "model.safetensors"))
        opt_tensors, opt_meta = _optimizer_tensors(optimizer)
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            rng[f"cuda.{i}"] = s
    save_file(rng, str(tmp / "rng.safetensors"))
    meta = {
        "version": state.version,
        "published_version": state.published_version,
        "unacked_entry_ids": state.unacked_entry_ids,
        "trained_group_ids": state.trained_group_ids,
        "counters": state.counters,
        "optimizer": opt_meta,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "python_rng": _python_rng_to_json(random.getstate()),
    }
    (tmp / STATE).write_text(json.dumps(meta))
    for f in tmp.iterdir():
        if f.is_file():  # the dcp/ directory's files are synced by its writer
            with f.open("rb") as fh:
                os.fsync(fh.fileno())
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    pointer = root / f".{LATEST}.tmp"
    pointer.write_text(final.name)
    os.replace(pointer, root / LATEST)
    _prune(root, keep, final.name)
    return final


def _sharded_tmp(root: Path, version: int) -> Path:
    # One name all ranks can compute (not per process): they all write into it.
    return root / f".tmp-step-{version:08d}-sharded"


def _save_shards(tmp: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Any:
    """Every rank writes its shards of weights and optimiser state under ``tmp/dcp``."""
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()  # nobody writes into tmp before rank 0 has (re)created it
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp / SHARDS))
    return {"sharded": True}


def save_checkpoint_shards(
    directory: str | Path, version: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> None:
    """Ranks > 0 of a sharded model: join rank 0's :func:`save_checkpoint` of ``version``."""
    _save_shards(_sharded_tmp(Path(directory), version), model, optimizer)


def _load_shards(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    if not is_sharded(model):
        raise ValueError(
            f"{path} is a sharded (FSDP) checkpoint; resume it with learner.strategy=fsdp"
        )
    model_sd, optim_sd = get_state_dict(model, optimizer)
    # dcp.load fills the tensors of these dicts in place, from every rank's shards.
    dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path / SHARDS))
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)


def _prune(root: Path, keep: int, current: str) -> None:
    steps = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in steps[:-keep] if keep > 0 else []:
        if old.name != current:
            shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The directory of the newest complete checkpoint, or None."""
    pointer = Path(directory) / LATEST
    if not pointer.is_file():
        return None
    path = Path(directory) / pointer.read_text().strip()
    return path if (path / STATE).is_file() else None


def load_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
) -> LearnerState:
    """Restore model, optimiser, scheduler and RNGs from ``path``; returns the learner state.

    Collective for a sharded checkpoint: every rank calls it with the same ``path``.
    """
    path = Path(path)
    meta = json.loads((path / STATE).read_text())
    if (path / SHARDS).is_dir():
        _load_shards(path, model, optimizer)
    elif is_sharded(model):
        raise ValueError(f"{path} is not a sharded checkpoint; resume it with learner.strategy=ddp")
    else:
        load_model(_unwrap(model), str(path / "model.safetensors"))
        # Optimizer.load_state_dict moves state to each parameter's device ("step" on CPU).
        opt_tensors = load_file(str(path / "optimizer.safetensors"))
        _load_optimizer(optimizer, opt_tensors, meta["optimizer"])
    if scheduler is not None and meta["scheduler"] is not None:
        scheduler.load_state_dict(meta["scheduler"])
    rng = load_file(str(path / "rng.safetensors"))
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available():
        cuda = [rng[k] for k in sorted(k for k in rng if k.startswith("cuda."))]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
    random.setstate(_python_rng_from_json(meta["python_rng"]))
    return LearnerState(
        version=int(meta["version"]),
        published_version=int(meta["published_version"]),
        unacked_entry_ids=list(meta["unacked_entry_ids"]),
        trained_group_ids=list(meta["trained_group_ids"]),
        counters={k: float(v) for k, v in meta["counters"].items()},
    )
