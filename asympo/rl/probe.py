"""The weight-sync probe: log-probs of a fixed token sequence under one set of weights.

The learner records them when it publishes a version; a rollout replica recomputes
them after it swaps that version in. Equal values (within a tolerance) prove that the
weights the replica serves are the ones the learner trained.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from asympo.eval_mode import eval_mode
from asympo.rl.training import token_logprobs
from asympo.v1 import records_pb2

DEFAULT_PROBE_LENGTH = 32
DEFAULT_PROBE_SEED = 20240601


def probe_tokens(
    vocab_size: int, length: int = DEFAULT_PROBE_LENGTH, seed: int = DEFAULT_PROBE_SEED
) -> list[int]:
    """A fixed pseudo-random token sequence of ``length`` ids in ``[0, vocab_size)``."""
    if vocab_size < 2 or length < 2:
        raise ValueError(f"need vocab_size >= 2 and length >= 2, got {vocab_size}, {length}")
    gen = torch.Generator().manual_seed(seed)
    return [int(t) for t in torch.randint(0, vocab_size, (length,), generator=gen)]


@torch.no_grad()
def probe_logprobs(model: torch.nn.Module, tokens: Sequence[int]) -> list[float]:
    """``log p(tokens[i+1] | tokens[:i+1])`` for i in 0..len-2, softmax in float32.

    The model runs in eval mode (no dropout) on its own device and dtype; its
    training/eval mode is restored afterwards.
    """
    if len(tokens) < 2:
        raise ValueError("a probe needs at least 2 tokens")
    with eval_mode(model):
        device = next(model.parameters()).device
        ids = torch.tensor([list(tokens)], dtype=torch.long, device=device)
        # The learner's own next-token log-probs: the probe checks what training computes.
        picked = token_logprobs(model, ids, torch.ones_like(ids))[0, 1:]
        return [float(x) for x in picked.cpu()]


def make_probe(
    model: torch.nn.Module, tokens: Sequence[int], tolerance: float
) -> records_pb2.Probe:
    """The ``Probe`` record of ``model`` on ``tokens`` (for a weights manifest)."""
    return records_pb2.Probe(
        tokens=list(tokens), logprobs=probe_logprobs(model, tokens), tolerance=tolerance
    )
