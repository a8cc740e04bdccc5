"""Warm start: supervised fine-tuning of the tiny model on a task's reference completions.

Trains on ``render(p) + sft_target(p) + <eos>`` with the loss on the completion only,
and stops as soon as held-out greedy accuracy reaches a modest target (RL must have
room to improve) or the time budget runs out.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from asympo.evaluation import hf_greedy

IGNORE = -100


@dataclass(frozen=True)
class SftSchedule:
    """How long and how hard the warm start trains."""

    # Measured on 2-digit +/- arith: lr 1e-3 reaches ~10% greedy in ~600 steps of 64,
    # while 3e-3 and 6e-3 stall near 1-3% (loss ~1.5) over the same steps.
    lr: float = 1e-3
    batch_size: int = 64
    # Steps, not seconds, decide when to stop: the model (and its cache entry) is then the
    # same on a fast or a busy machine. ~2000 steps take ~150 s on 2 idle cores.
    max_steps: int = 2000
    target_accuracy: float = 0.3  # stop early at the first evaluation reaching this
    eval_every: int = 50  # the skill arrives in a jump (~15% -> ~70% in 250 steps)
    eval_size: int = 200
    hard_max_seconds: float = 3600.0  # a safety net only; hitting it is logged
    max_new_tokens: int = 0  # 0 = longest training completion with its EOS, plus one
    seed: int = 0


@dataclass(frozen=True)
class SftResult:
    """Outcome of the warm start: accuracy at the last evaluation and the work done."""

    accuracy: float
    steps: int
    seconds: float
    final_loss: float


def encode_example(
    tokenizer: PreTrainedTokenizerBase, prompt: str, completion: str
) -> tuple[list[int], list[int]]:
    """Token ids of ``prompt + completion + eos`` and labels masking the prompt with -100."""
    p = tokenizer.encode(prompt, add_special_tokens=False)
    c = [*tokenizer.encode(completion, add_special_tokens=False), tokenizer.eos_token_id]
    return p + c, [IGNORE] * len(p) + c


def collate(
    examples: Sequence[tuple[list[int], list[int]]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels``, each ``[B, T_max]``."""
    width = max(len(ids) for ids, _ in examples)
    ids = [x + [pad_id] * (width - len(x)) for x, _ in examples]
    mask = [[1] * len(x) + [0] * (width - len(x)) for x, _ in examples]
    labels = [y + [IGNORE] * (width - len(y)) for _, y in examples]
    return torch.tensor(ids), torch.tensor(mask), torch.tensor(labels)


def greedy_accuracy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    answers: Sequence[str],
    verify: Callable[[str, str], float],
    max_new_tokens: int,
    stop: Sequence[str],
) -> float:
    """Share of ``prompts`` whose greedy completion (cut at ``stop``) ``verify`` scores >= 1."""
    outs = hf_greedy(model, tokenizer, list(prompts), max_new_tokens, stop)
    return sum(verify(o, a) >= 1.0 for o, a in zip(outs, answers, strict=True)) / len(prompts)


def supervised_warm_start(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    train: Sequence[tuple[str, str]],
    held_out: Sequence[tuple[str, str]],
    verify: Callable[[str, str], float],
    stop: Sequence[str],
    schedule: SftSchedule,
    log: Callable[[str], None] = print,
) -> SftResult:
    """Fine-tune ``model`` in place on ``train`` (prompt, completion) pairs.

    ``held_out`` holds (prompt, reference answer) pairs scored by ``verify``; training
    stops at the first evaluation reaching ``schedule.target_accuracy`` or after
    ``max_steps`` (``hard_max_seconds`` is only a safety net).
    """
    rng = random.Random(schedule.seed)
    torch.manual_seed(schedule.seed)
    encoded = [encode_example(tokenizer, p, c) for p, c in train]
    prompts = [p for p, _ in held_out[: schedule.eval_size]]
    answers = [a for _, a in held_out[: schedule.eval_size]]
    # Completion length in tokens, EOS included: the labels that are not masked.
    longest = max(sum(1 for y in labels if y != IGNORE) for _, labels in encoded)
    max_new = schedule.max_new_tokens or longest + 1
    optim = torch.optim.AdamW(model.parameters(), lr=schedule.lr, weight_decay=0.0)
    warmup = 20
    start = time.monotonic()
    accuracy, loss_value, step = 0.0, float("nan"), 0
    model.train()
    while step < schedule.max_steps:
        step += 1
        for group in optim.param_groups:
            group["lr"] = schedule.lr * min(1.0, step / warmup)
        batch = rng.sample(encoded, schedule.batch_size)
        ids, mask, labels = collate(batch, tokenizer.pad_token_id)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        loss_value = float(loss.detach())
        hard_stop = time.monotonic() - start > schedule.hard_max_seconds
        if step % schedule.eval_every == 0 or step == schedule.max_steps or hard_stop:
            accuracy = greedy_accuracy(model, tokenizer, prompts, answers, verify, max_new, stop)
            log(
                f"warm start step {step}/{schedule.max_steps}: loss {loss_value:.3f}, "
                f"held-out greedy accuracy {accuracy:.1%} ({time.monotonic() - start:.0f}s)"
            )
            if accuracy >= schedule.target_accuracy:
                break
            if hard_stop:
                log(
                    f"warm start stopped by its {schedule.hard_max_seconds:.0f}s safety limit "
                    f"at step {step}: this model depends on the machine's speed"
                )
                break
    model.eval()
    return SftResult(accuracy, step, time.monotonic() - start, loss_value)
