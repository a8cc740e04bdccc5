"""The policy model: the tiny default (character tokenizer, Qwen2 architecture) and loading.

``ensure_default_model(settings)`` gives the tiny default's directory, building and
warm-starting it on first use (what ``asympo init-model`` does); ``resolve_model_path``
gives whatever the settings point at (local directory or Hugging Face id).
"""

from __future__ import annotations

from pathlib import Path

from asympo.config import Settings
from asympo.model.loading import (
    ModelLoadError,
    load_causal_lm,
    load_tokenizer,
    resolve_model_path,
)
from asympo.model.tiny import TinyModelResult, ensure_tiny_model, tiny_model_dir

__all__ = [
    "ModelLoadError",
    "TinyModelResult",
    "ensure_default_model",
    "ensure_tiny_model",
    "load_causal_lm",
    "load_tokenizer",
    "resolve_model_path",
    "tiny_model_dir",
]


def ensure_default_model(settings: Settings) -> Path:
    """Directory of the tiny default model for ``settings``, built first if not cached."""
    return ensure_tiny_model(settings).path
