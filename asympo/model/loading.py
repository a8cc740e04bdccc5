"""Resolve and load the policy model: the tiny default, a local directory, or a HF model id."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from asympo.config import Settings

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(RuntimeError):
    """The configured model cannot be found or loaded; the message says what to do."""


def resolve_model_path(
    settings: Settings, build_if_missing: bool = True, say: Callable[[str], None] = log.info
) -> str:
    """Local directory or HF id of the policy model.

    ``model.path`` empty means the tiny default: its cache directory, built and
    warm-started first when ``build_if_missing`` (else ModelLoadError), with progress
    told through ``say``. Call it once, at an entry point: what it may do is heavy.
    """
    if settings.model.path:
        return settings.model.path
    from asympo.model.tiny import ensure_tiny_model, read_manifest, tiny_model_dir

    path = tiny_model_dir(settings)
    if read_manifest(path) is not None:
        return str(path)
    if not build_if_missing:
        raise ModelLoadError(
            f"the tiny default model is not built yet ({path}); run `asympo init-model`"
        )
    say(f"model.path is empty: building the tiny default model in {path} (asympo init-model)")
    return str(ensure_tiny_model(settings, log=say).path)


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """The tokenizer of a local model directory or HF model id, with a pad token set."""
    _check_local_path(name_or_path)
    try:
        tok = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load tokenizer from {name_or_path!r}: {exc}") from exc
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(name_or_path: str, dtype: str = "float32", device: str = "cpu") -> Any:
    """A transformers causal LM in eval mode on ``device`` with weights in ``dtype``."""
    _check_local_path(name_or_path)
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    try:
        model: Any = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=DTYPES[dtype])
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load model from {name_or_path!r}: {exc}") from exc
    return model.to(device).eval()


def is_local_model(name_or_path: str) -> bool:
    """True when ``name_or_path`` is a directory holding a config.json."""
    return (Path(name_or_path) / "config.json").is_file()


def _check_local_path(name_or_path: str) -> None:
    """A clear error for a path-looking name that is not a model directory."""
    looks_local = name_or_path.startswith(("/", "./", "../", "~")) or Path(name_or_path).exists()
    if looks_local and not is_local_model(str(Path(name_or_path).expanduser())):
        raise ModelLoadError(f"no model directory (with config.json) at {name_or_path}")
