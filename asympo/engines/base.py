"""The inference-engine interface the rollout service programs against.

Two backends implement it: vLLM (``VLLMEngine``, the default) and plain transformers
(``HFEngine``, a fallback where vLLM is not installed). Both are thread-safe: the
rollout loop generates while the swap thread loads weights.

Conventions shared by both backends:

* ``Completion.tokens`` are the generated token ids, including the token that ended
  the sample (EOS, or the token that completed a stop string); ``Completion.text``
  is their decoding with special tokens skipped and cut *before* the stop string.
* ``finish_reason`` is ``"stop"`` (EOS or a stop string) or ``"length"`` (max tokens).
* ``Completion.logprobs`` (only when ``GenerationRequest.logprobs``) are the behaviour
  log-probs of each generated token under the distribution it was really drawn from:
  logits divided by the temperature, restricted to the top-p nucleus and renormalised
  (vLLM's ``processed_logprobs``); at temperature 0, the raw model's. One per entry of
  ``tokens``. The learner divides its logits by the same temperature, so on fresh data
  the importance ratio is exactly 1; it does not model top-p, so keep ``top_p = 1`` for
  the behaviour-corrected losses (with ``top_p < 1`` the ratio of a fresh token is the
  nucleus mass, <= 1).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

# A weight source: a directory of safetensors shards, or a state dict (name -> tensor)
# with Hugging Face checkpoint names.
WeightSource = str | Path | Mapping[str, torch.Tensor]


class EngineError(RuntimeError):
    """A request the engine cannot serve (bad parameters, prompt too long, bad weights)."""


@dataclass(frozen=True)
class GenerationRequest:
    """``n`` samples for one prompt (given as token ids)."""

    prompt_tokens: list[int]
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 16
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    logprobs: bool = False


@dataclass(frozen=True)
class Completion:
    """One generated sample."""

    tokens: list[int]
    text: str
    finish_reason: str
    logprobs: list[float] | None = None


class TokenizerText:
    """``encode``/``decode`` shared by the backends, over their Hugging Face ``tokenizer``."""

    tokenizer: Any

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no special tokens added)."""
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, tokens: Sequence[int]) -> str:
        """Text of ``tokens`` with special tokens skipped."""
        return str(self.tokenizer.decode(list(tokens), skip_special_tokens=True))


@runtime_checkable
class Engine(Protocol):
    """What rollout needs from an inference engine."""

    name: str
    max_model_len: int

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no special tokens added)."""
        ...

    def decode(self, tokens: Sequence[int]) -> str:
        """Text of ``tokens`` with special tokens skipped."""
        ...

    def generate(self, requests: Sequence[GenerationRequest]) -> list[list[Completion]]:
        """For each request, its ``n`` completions (in request order)."""
        ...

    def load_weights(self, source: WeightSource) -> None:
        """Replace the weights of the running engine (no restart)."""
        ...

    def probe_logprobs(self, tokens: Sequence[int]) -> list[float]:
        """``log p(tokens[i+1] | tokens[:i+1])`` for each i, computed by the engine itself.

        Proves which weights the engine really serves (len(tokens) - 1 values).
        """
        ...

    def close(self) -> None:
        """Release the engine (processes, memory)."""
        ...


def validate_request(request: GenerationRequest, max_model_len: int) -> None:
    """Raise EngineError for a request no backend can serve."""
    if not request.prompt_tokens:
        raise EngineError("empty prompt")
    if request.n < 1:
        raise EngineError(f"n must be >= 1, got {request.n}")
    if request.max_tokens < 1:
        raise EngineError(f"max_tokens must be >= 1, got {request.max_tokens}")
    if request.temperature < 0:
        raise EngineError(f"temperature must be >= 0, got {request.temperature}")
    if not 0 < request.top_p <= 1:
        raise EngineError(f"top_p must be in (0, 1], got {request.top_p}")
    if len(request.prompt_tokens) >= max_model_len:
        raise EngineError(
            f"prompt of {len(request.prompt_tokens)} tokens does not fit the context "
            f"of {max_model_len} tokens"
        )


def safetensors_files(directory: str | Path) -> list[Path]:
    """The ``*.safetensors`` shards of a weights directory (EngineError if none)."""
    path = Path(directory)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise EngineError(f"no .safetensors files in {path}")
    return files


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """``text`` before the earliest stop string, and whether one was found (empty
    stop strings are ignored)."""
    hits = [i for i in (text.find(s) for s in stop if s) if i != -1]
    return (text[: min(hits)], True) if hits else (text, False)
