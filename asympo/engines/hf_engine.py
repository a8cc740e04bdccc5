"""The transformers backend: a fallback engine where vLLM is not installed.

Plain autoregressive decoding with a KV cache, one prompt at a time, sampling with
temperature and nucleus (top-p) filtering; stop strings are checked on the decoded
text after every token. Slow next to vLLM but exact and dependency-free. A lock makes
it thread-safe: generation and weight loads never interleave inside one call.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from asympo.engines.base import (
    Completion,
    EngineError,
    GenerationRequest,
    TokenizerText,
    WeightSource,
    cut_at_stop,
    safetensors_files,
    validate_request,
)
from asympo.model.loading import load_causal_lm, load_tokenizer
from asympo.rl.training import token_logprobs


def sampling_logprobs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """``[V]`` log-probs of the distribution a token is drawn from (what vLLM calls processed).

    Logits divided by ``temperature``, then restricted to the nucleus (the smallest prefix
    of the sorted probabilities whose mass reaches ``top_p``, always at least one token)
    and renormalised; ``-inf`` outside it. At temperature 0 (greedy) the raw model's.
    """
    logp = torch.log_softmax(logits.float() / (temperature or 1.0), dim=-1)
    if top_p < 1.0 and temperature != 0:
        sorted_logp, order = torch.sort(logp, descending=True)
        sorted_p = sorted_logp.exp()
        keep = torch.cumsum(sorted_p, dim=-1) - sorted_p < top_p
        kept = torch.full_like(logp, -math.inf)
        kept[order[keep]] = sorted_logp[keep]
        logp = kept - torch.logsumexp(kept, dim=-1)
    return logp


def sample_token(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None
) -> int:
    """One token id from ``logits`` ``[V]``: argmax at temperature 0, else nucleus sampling."""
    return sample_token_with_logprob(logits, temperature, top_p, generator)[0]


def sample_token_with_logprob(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None
) -> tuple[int, float]:
    """A token as :func:`sample_token` draws it, and its log-prob under that distribution."""
    logp = sampling_logprobs(logits, temperature, top_p)
    if temperature == 0:
        token = int(torch.argmax(logits))
    else:
        token = int(torch.multinomial(logp.exp(), 1, generator=generator))
    return token, float(logp[token])


class HFEngine(TokenizerText):
    """A transformers causal LM behind the ``Engine`` interface."""

    name = "transformers"

    def __init__(self, model: str, dtype: str = "float32", device: str = "cpu") -> None:
        """Load ``model`` (local directory or HF id) on ``device``."""
        self.model: Any = load_causal_lm(model, dtype, device)
        self.tokenizer: Any = load_tokenizer(model)
        self.device = torch.device(device)
        self.max_model_len = int(getattr(self.model.config, "max_position_embeddings", 2048))
        self._lock = threading.Lock()

    def generate(self, requests: Sequence[GenerationRequest]) -> list[list[Completion]]:
        """For each request, its ``n`` completions, generated one after another."""
        for request in requests:
            validate_request(request, self.max_model_len)
        with self._lock:
            return [self._generate_one(r) for r in requests]

    @torch.no_grad()
    def _generate_one(self, request: GenerationRequest) -> list[Completion]:
        generator = None
        if request.seed is not None:
            generator = torch.Generator().manual_seed(request.seed)
        room = self.max_model_len - len(request.prompt_tokens)
        return [
            self._sample(request, min(request.max_tokens, room), generator)
            for _ in range(request.n)
        ]

    def _sample(
        self, request: GenerationRequest, max_tokens: int, generator: torch.Generator | None
    ) -> Completion:
        eos = self.tokenizer.eos_token_id
        ids = torch.tensor([request.prompt_tokens], device=self.device)
        out = self.model(input_ids=ids, use_cache=True)
        tokens: list[int] = []
        logprobs: list[float] = []
        text, reason = "", "length"
        for _ in range(max_tokens):
            logits = out.logits[0, -1].float().cpu()
            token, logprob = sample_token_with_logprob(
                logits, request.temperature, request.top_p, generator
            )
            tokens.append(token)
            logprobs.append(logprob)
            text, stopped = cut_at_stop(self.decode(tokens), request.stop)
            if token == eos or stopped:
                reason = "stop"
                break
            step = torch.tensor([[token]], device=self.device)
            out = self.model(input_ids=step, past_key_values=out.past_key_values, use_cache=True)
        return Completion(tokens, text, reason, logprobs if request.logprobs else None)

    def load_weights(self, source: WeightSource) -> None:
        """Copy weights from a safetensors directory or a state dict (HF names) in place."""
        if isinstance(source, Mapping):
            state = dict(source)
        else:
            state = {}
            for file in safetensors_files(Path(source)):
                state.update(load_file(str(file)))
        # Check everything before copying anything: a refused load leaves the old weights.
        current = self.model.state_dict()
        missing = [k for k in current if k not in state and not self._is_tied(k)]
        unexpected = [k for k in state if k not in current]
        wrong = [k for k in state if k in current and state[k].shape != current[k].shape]
        if missing or unexpected or wrong:
            raise EngineError(
                f"weights do not fit the model: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}, wrong shape {wrong[:5]}"
            )
        with self._lock:
            self.model.load_state_dict(state, strict=False)

    def _is_tied(self, name: str) -> bool:
        return name == "lm_head.weight" and bool(
            getattr(self.model.config, "tie_word_embeddings", False)
        )

    @torch.no_grad()
    def probe_logprobs(self, tokens: Sequence[int]) -> list[float]:
        """``log p(tokens[i+1] | tokens[:i+1])`` under the loaded weights."""
        if len(tokens) < 2:
            raise EngineError("a probe needs at least 2 tokens")
        with self._lock:
            ids = torch.tensor([list(tokens)], device=self.device)
            picked = token_logprobs(self.model, ids, torch.ones_like(ids))[0, 1:]
        return [float(x) for x in picked.cpu()]

    def close(self) -> None:
        """Nothing to release beyond memory."""
