"""Held-out evaluation: greedy pass@1 and, from k samples, pass@k, mean@k and maj@k.

Generation and verification are passed in as callables, so the same code scores the
vLLM engine (``asympo eval``), the learner's own transformers model (the accuracy in
metrics.jsonl) or anything else that maps prompts to completions.

* pass@1: greedy, one completion per problem.
* pass@k: unbiased estimator (Chen et al., 2021) from the k samples.
* mean@k: the share of the k samples that are correct, averaged over problems.
* maj@k: majority vote over the k samples' *normalised* answers (the answer as the
  task's verifier reads it, :func:`asympo.verifiers.answer_key`: ``"1,000"`` and
  ``"1000.0"`` vote together); the problem counts as solved when the winning answer's
  samples are correct. Ties go to the answer seen first; samples without an answer do
  not vote.

Every metric comes with a 95% confidence interval over problems: the Wilson score
interval for the 0/1 per-problem metrics (pass@1, maj@k), a percentile bootstrap
(2000 resamples of the problems, fixed seed) for the fractional ones (pass@k, mean@k).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from math import comb, sqrt

import torch

from asympo.engines.base import cut_at_stop
from asympo.eval_mode import eval_mode
from asympo.tasks import Problem, Task

# prompts, samples per prompt, temperature -> completions[prompt][sample]
GenerateFn = Callable[[list[str], int, float], list[list[str]]]
# completion, reference answer -> reward (1.0 = correct)
VerifyFn = Callable[[str, str], float]
# completion -> the answer as the verifier reads it (None: no answer), for majority votes
AnswerKeyFn = Callable[[str], str | None]
Z95 = 1.959963984540054
BOOTSTRAP_RESAMPLES = 2000


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` are correct (Chen et al., 2021)."""
    if not 0 <= c <= n or k < 1:
        raise ValueError(f"need 0 <= c <= n and k >= 1, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (95% by default); (0, 1) for n = 0."""
    if n <= 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # exact ends at 0 and n successes (rounding would leave e.g. 3e-17 above 0)
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return (low, high)


def bootstrap_interval(
    values: Sequence[float], resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0
) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the mean of ``values`` (resampled, fixed seed)."""
    if not values:
        return (0.0, 1.0)
    data = torch.tensor(list(values), dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(values), (resamples, len(values)), generator=gen)
    means = data[idx].mean(dim=1)
    low, high = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64))
    return (float(low), float(high))


def majority_correct(keys: Sequence[str | None], correct: Sequence[bool]) -> bool:
    """Whether the majority answer among ``keys`` is correct (ties: the first seen wins).

    Samples whose key is None (no answer) do not vote; no vote at all counts as wrong.
    """
    votes: dict[str, int] = {}
    verdict: dict[str, bool] = {}
    for key, ok in zip(keys, correct, strict=True):
        if key is None:
            continue
        votes[key] = votes.get(key, 0) + 1
        verdict[key] = verdict.get(key, False) or ok
    if not votes:
        return False
    winner = max(votes, key=lambda k: votes[k])  # max keeps the first of equal counts
    return verdict[winner]


@dataclass(frozen=True)
class Metric:
    """A metric's value over problems and its 95% confidence interval."""

    value: float
    low: float
    high: float


@dataclass(frozen=True)
class EvalResult:
    """pass@1 (greedy) and, from ``k`` samples, pass@k, mean@k and maj@k over the problems."""

    n_problems: int
    pass_at_1: float
    k: int
    pass_at_k: float | None
    pass_at_1_ci: tuple[float, float] = (0.0, 1.0)
    pass_at_k_ci: tuple[float, float] | None = None
    mean_at_k: Metric | None = None
    maj_at_k: Metric | None = None


def evaluate(
    task: Task,
    problems: Sequence[Problem],
    generate: GenerateFn,
    verify: VerifyFn,
    k: int = 0,
    temperature: float = 1.0,
    answer_key: AnswerKeyFn | None = None,
) -> EvalResult:
    """Greedy pass@1 and, when ``k > 0``, pass@k, mean@k and maj@k from ``k`` samples.

    maj@k needs ``answer_key`` (the verifier's answer normalisation); without it maj@k
    is not reported.
    """
    if not problems:
        raise ValueError("no problems to evaluate")
    prompts = [task.render(p) for p in problems]
    greedy = generate(prompts, 1, 0.0)
    correct = sum(verify(out[0], p.answer) >= 1.0 for out, p in zip(greedy, problems, strict=True))
    n = len(problems)
    if k <= 0:
        return EvalResult(n, correct / n, k, None, wilson_interval(correct, n))
    sampled = generate(prompts, k, temperature)
    at_k, means, majority = [], [], []
    for outs, p in zip(sampled, problems, strict=True):
        oks = [verify(o, p.answer) >= 1.0 for o in outs]
        at_k.append(pass_at_k(len(outs), sum(oks), k))
        means.append(sum(oks) / len(outs))
        if answer_key is not None:
            majority.append(majority_correct([answer_key(o) for o in outs], oks))
    maj = None
    if answer_key is not None:
        wins = sum(majority)
        maj = Metric(wins / n, *wilson_interval(wins, n))
    return EvalResult(
        n,
        correct / n,
        k,
        sum(at_k) / n,
        wilson_interval(correct, n),
        bootstrap_interval(at_k),
        Metric(sum(means) / n, *bootstrap_interval(means)),
        maj,
    )


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
    outs: list[str] = []
    tok = tokenizer
    with eval_mode(model):
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
                outs.append(cut_at_stop(text, stop)[0])
    return outs
