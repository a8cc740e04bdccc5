"""Held-out evaluation: greedy pass@1 and sampled pass@k over a task's test split.

Generation and verification are passed in as callables, so the same code scores the
vLLM engine (``asympo eval``), the learner's own transformers model (the accuracy in
metrics.jsonl) or anything else that maps prompts to completions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from math import comb

import torch

from asympo.tasks import Problem, Task

# prompts, samples per prompt, temperature -> completions[prompt][sample]
GenerateFn = Callable[[list[str], int, float], list[list[str]]]
# completion, reference answer -> reward (1.0 = correct)
VerifyFn = Callable[[str, str], float]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` are correct (Chen et al., 2021)."""
    if not 0 <= c <= n or k < 1:
        raise ValueError(f"need 0 <= c <= n and k >= 1, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


@dataclass(frozen=True)
class EvalResult:
    """pass@1 (greedy) and pass@k (sampled) over ``n_problems`` held-out problems."""

    n_problems: int
    pass_at_1: float
    k: int
    pass_at_k: float | None


def evaluate(
    task: Task,
    problems: Sequence[Problem],
    generate: GenerateFn,
    verify: VerifyFn,
    k: int = 0,
    temperature: float = 1.0,
) -> EvalResult:
    """Greedy pass@1 and, when ``k > 0``, pass@k from ``k`` samples at ``temperature``."""
    if not problems:
        raise ValueError("no problems to evaluate")
    prompts = [task.render(p) for p in problems]
    greedy = generate(prompts, 1, 0.0)
    correct = sum(verify(out[0], p.answer) >= 1.0 for out, p in zip(greedy, problems, strict=True))
    at_k: float | None = None
    if k > 0:
        sampled = generate(prompts, k, temperature)
        scores = []
        for outs, p in zip(sampled, problems, strict=True):
            c = sum(verify(o, p.answer) >= 1.0 for o in outs)
            scores.append(pass_at_k(len(outs), c, k))
        at_k = sum(scores) / len(scores)
    return EvalResult(len(problems), correct / len(problems), k, at_k)


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` up to (not including) the first stop string."""
    end = len(text)
    for s in stop:
        i = text.find(s)
        if s and i != -1:
            end = min(end, i)
    return text[:end]


@torch.no_grad()
def hf_greedy(
    model: torch.nn.Module,
    tokenizer: object,
    prompts: list[str],
    max_tokens: int,
    stop: Sequence[str],
    batch_size: int = 64,
) -> list[str]:
    """Greedy completions from a transformers causal LM, left-padded batches, cut at stop."""
    was_training = model.training
    model.eval()
    outs: list[str] = []
    tok = tokenizer
    try:
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i : i + batch_size]
            ids = [tok.encode(p, add_special_tokens=False) for p in chunk]  # type: ignore[attr-defined]
            width = max(len(x) for x in ids)
            pad = tok.pad_token_id if tok.pad_token_id is not None else 0  # type: ignore[attr-defined]
            input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids])
            attn = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
            device = next(model.parameters()).device
            gen = model.generate(  # type: ignore[operator]
                input_ids=input_ids.to(device),
                attention_mask=attn.to(device),
                max_new_tokens=max_tokens,
                do_sample=False,
                pad_token_id=pad,
            )
            for row in gen[:, width:]:
                text = tok.decode(row.tolist(), skip_special_tokens=True)  # type: ignore[attr-defined]
                outs.append(cut_at_stop(text, stop))
    finally:
        model.train(was_training)
    return outs
