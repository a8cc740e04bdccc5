"""One learner step: advantages, current-policy log-probs, the registered loss, an update.

Used by the learner service and by offline experiments alike. The step is a function of
(model, optimiser, batch of groups, config); its only side effects are the parameter
update and, under torch.distributed, the gradient all-reduce.

Empty responses (no completion token) are dropped before the advantages are computed:
a row without tokens has no loss, so keeping its reward in the others' advantages would
leave the group summing to ``-A_empty`` instead of zero.

Sequences are ``prompt + completion`` right-padded to the micro-batch's longest; the loss
mask covers completion tokens only. Each micro-batch's loss sum is divided by the count
the loss averages over — the batch's responses (seq-mean) or tokens (token-mean), counted
over all ranks — so the accumulated gradient equals the gradient of the full-batch loss.
Statistics stay on the device as sums until the step's end: one reduction, one read.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from asympo.rl.advantages import compute_advantages
from asympo.rl.collectives import all_reduce, world_size
from asympo.rl.losses import (
    SUM_KEYS,
    AsympoLoss,
    LossSettings,
    MissingBehaviourLogprobs,
    logit_grad_norms,
    loss_metrics,
    loss_spec,
    loss_terms,
)


@dataclass(frozen=True)
class TrainGroup:
    """One prompt's group as the learner trains on it.

    ``completions[i]`` are sample i's token ids, ``rewards[i]`` its reward, ``versions[i]``
    the policy version that started generating it, ``behaviour_logprobs[i]`` (optional,
    one per completion token) its log-probs under the sampling policy.
    """

    group_id: str
    prompt_tokens: list[int]
    completions: list[list[int]]
    rewards: list[float]
    versions: list[int]
    behaviour_logprobs: list[list[float]] | None = None

    def __post_init__(self) -> None:
        n = len(self.completions)
        if n == 0:
            raise ValueError(f"group {self.group_id!r} has no samples")
        if len(self.rewards) != n or len(self.versions) != n:
            raise ValueError(
                f"group {self.group_id!r}: {n} completions but {len(self.rewards)} rewards "
                f"and {len(self.versions)} versions"
            )
        if not self.prompt_tokens:
            raise ValueError(f"group {self.group_id!r} has no prompt tokens")
        if self.behaviour_logprobs is not None and [len(b) for b in self.behaviour_logprobs] != [
            len(c) for c in self.completions
        ]:
            raise ValueError(
                f"group {self.group_id!r}: behaviour log-probs do not match completion lengths"
            )

    @property
    def oldest_version(self) -> int:
        """The oldest policy version that generated any of its samples."""
        return min(self.versions)


@dataclass(frozen=True)
class StepConfig:
    """How a step trains: loss, advantage estimator, micro-batch budget, clipping, bonus.

    A micro-batch holds at most ``micro_batch`` sequences and at most
    ``max_tokens_per_micro_batch`` padded tokens (sequences x longest); 0 = no token cap.
    """

    loss: LossSettings = field(default_factory=AsympoLoss)  # the loss and its settings
    advantage: str = "grpo"
    advantage_eps: float = 1e-6
    micro_batch: int = 32
    max_tokens_per_micro_batch: int = 0
    grad_clip: float = 1.0  # max gradient norm; 0 = no clipping
    temperature: float = 1.0  # logits are divided by it, as the sampler did
    # An entropy bonus: minus this times the mean entropy over the batch's completion tokens.
    entropy_coef: float = 0.0
    # A KL penalty towards a frozen reference policy: this times the mean k3 estimate of
    # KL(policy || reference) over the batch's completion tokens (needs ``reference``).
    kl_coef: float = 0.0

    def __post_init__(self) -> None:
        if self.micro_batch < 1:
            raise ValueError(f"micro_batch must be >= 1, got {self.micro_batch}")
        if self.grad_clip < 0:
            raise ValueError(f"grad_clip must be >= 0 (0 = no clipping), got {self.grad_clip}")
        if self.entropy_coef < 0:
            raise ValueError(f"entropy_coef must be >= 0 (0 = off), got {self.entropy_coef}")
        if self.kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0 (0 = off), got {self.kl_coef}")


# Why a group cannot be trained (the ``reason`` label of asympo_dead_letters_total).
REASON_NO_BEHAVIOUR = "missing_behaviour_logprobs"
REASON_BAD_BEHAVIOUR = "non_finite_behaviour_logprobs"
REASON_NO_TOKENS = "no_completion_tokens"
REASON_TOO_FEW = "too_few_responses"
REASON_BAD_REWARD = "non_finite_reward"
REASON_BAD_TOKEN = "token_out_of_vocabulary"


def untrainable_reason(
    group: TrainGroup, cfg: StepConfig, vocab_size: int | None = None
) -> tuple[str, str] | None:
    """``(reason, detail)`` if :func:`train_step` cannot train ``group`` under ``cfg``, else None.

    The learner asks at intake, so such a group is dead-lettered instead of failing a step
    (and, after a restart, failing the same step again forever).
    """
    gid = group.group_id
    if loss_spec(cfg.loss.name).needs_behaviour:
        if group.behaviour_logprobs is None:
            return REASON_NO_BEHAVIOUR, f"group {gid!r}: loss {cfg.loss.name!r} needs them"
        if not all(math.isfinite(x) for row in group.behaviour_logprobs for x in row):
            return REASON_BAD_BEHAVIOUR, f"group {gid!r}"
    if not all(math.isfinite(r) for r in group.rewards):
        return REASON_BAD_REWARD, f"group {gid!r}: rewards {group.rewards}"
    nonempty = sum(1 for c in group.completions if c)
    if nonempty == 0:
        return REASON_NO_TOKENS, f"group {gid!r}: every response is empty"
    if cfg.advantage == "rloo" and nonempty < 2:
        return REASON_TOO_FEW, f"group {gid!r}: rloo needs >= 2 non-empty responses"
    if vocab_size is not None:
        ids = group.prompt_tokens + [t for c in group.completions for t in c]
        if min(ids) < 0 or max(ids) >= vocab_size:
            return REASON_BAD_TOKEN, f"group {gid!r}: ids outside [0, {vocab_size})"
    return None


@dataclass(frozen=True)
class _Sequence:
    tokens: list[int]
    prompt_len: int
    advantage: float
    behaviour: list[float] | None


def flatten_groups(groups: Sequence[TrainGroup], cfg: StepConfig) -> tuple[list[_Sequence], int]:
    """One sequence per non-empty sample with its advantage, and the number of flat groups.

    Empty samples are dropped before the advantages, so every group stays zero-sum.
    """
    seqs: list[_Sequence] = []
    flat_groups = 0
    for g in groups:
        keep = [i for i, c in enumerate(g.completions) if c]
        if not keep:
            continue
        rewards = torch.tensor([[g.rewards[i] for i in keep]], dtype=torch.float64)
        adv, flat = compute_advantages(cfg.advantage, rewards, cfg.advantage_eps)
        flat_groups += flat
        for j, i in enumerate(keep):
            completion = g.completions[i]
            seqs.append(
                _Sequence(
                    tokens=g.prompt_tokens + completion,
                    prompt_len=len(g.prompt_tokens),
                    advantage=float(adv[0, j]),
                    behaviour=g.behaviour_logprobs[i] if g.behaviour_logprobs else None,
                )
            )
    return seqs, flat_groups


@dataclass(frozen=True)
class MicroBatch:
    """Right-padded tensors of a few sequences, all ``[b, L]`` except ``advantages [b]``."""

    input_ids: Tensor
    attention_mask: Tensor
    completion_mask: Tensor  # bool: position t holds a completion token
    advantages: Tensor
    behaviour_logprobs: Tensor | None  # aligned with input_ids (log p of token t)


def collate(seqs: Sequence[_Sequence], pad_id: int, device: torch.device) -> MicroBatch:
    """Right-pad ``seqs`` into a :class:`MicroBatch` on ``device``."""
    width = max(len(s.tokens) for s in seqs)
    b = len(seqs)
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    attn = torch.zeros((b, width), dtype=torch.long)
    comp = torch.zeros((b, width), dtype=torch.bool)
    have_behaviour = all(s.behaviour is not None for s in seqs)
    beh = torch.zeros((b, width), dtype=torch.float32) if have_behaviour else None
    for row, s in enumerate(seqs):
        n = len(s.tokens)
        ids[row, :n] = torch.tensor(s.tokens, dtype=torch.long)
        attn[row, :n] = 1
        comp[row, s.prompt_len : n] = True
        if beh is not None and s.behaviour is not None and n > s.prompt_len:
            beh[row, s.prompt_len : n] = torch.tensor(s.behaviour, dtype=torch.float32)
    adv = torch.tensor([s.advantage for s in seqs], dtype=torch.float32)
    return MicroBatch(
        ids.to(device),
        attn.to(device),
        comp.to(device),
        adv.to(device),
        beh.to(device) if beh is not None else None,
    )


def _logprobs_and_entropy(
    model: torch.nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    temperature: float = 1.0,
    with_entropy: bool = False,
    entropy_grad: bool = False,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Token log-probs ``[B, L]`` and, ``with_entropy``, entropy and ``sum_v p_v^2`` ``[B, L]``.

    ``entropy_grad``: the entropy is differentiable (an entropy bonus trains on it), at the
    cost of a ``[B, L, V]`` softmax kept for the backward.
    """
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
    if temperature != 1.0:
        logits = logits / temperature
    lse = torch.logsumexp(logits, dim=-1)  # [B, L-1]
    picked = logits.gather(-1, input_ids[:, 1:, None]).squeeze(-1) - lse
    # Position 0 has no prediction; a zero column keeps the result aligned with input_ids.
    zero = torch.zeros_like(picked[:, :1])
    logprobs = torch.cat([zero, picked], dim=1)
    entropy = sum_p2 = None
    if with_entropy and entropy_grad:
        probs = torch.softmax(logits, dim=-1)
        entropy = torch.cat([zero, lse - (probs * logits).sum(dim=-1)], dim=1)
        with torch.no_grad():
            sum_p2 = torch.cat([zero.detach(), (probs * probs).sum(dim=-1)], dim=1)
    elif with_entropy:
        # One row at a time: a [B, L, V] float32 softmax is the largest tensor otherwise.
        # sum p^2 rides along (one more reduction): it gives the logit-gradient norms.
        with torch.no_grad():
            rows, sq = [], []
            for row_logits, row_lse in zip(logits.detach(), lse.detach(), strict=True):
                probs = torch.softmax(row_logits, dim=-1)
                rows.append(row_lse - (probs * row_logits).sum(dim=-1))
                sq.append((probs * probs).sum(dim=-1))
            entropy = torch.cat([zero.detach(), torch.stack(rows)], dim=1)
            sum_p2 = torch.cat([zero.detach(), torch.stack(sq)], dim=1)
    return logprobs, entropy, sum_p2


def token_logprobs(
    model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor, temperature: float = 1.0
) -> Tensor:
    """``[B, L]``: entry t is ``log p(input_ids[:, t] | input_ids[:, :t])``; entry 0 is 0.

    Computed in float32 from the model's logits (divided by ``temperature``);
    differentiable. ``attention_mask`` ``[B, L]`` marks real tokens (right padding).
    """
    return _logprobs_and_entropy(model, input_ids, attention_mask, temperature)[0]


def plan_micro_batches(lengths: Sequence[int], max_tokens: int, max_seqs: int) -> list[list[int]]:
    """Indices of ``lengths`` grouped into micro-batches under a padded-token budget.

    A micro-batch costs ``len(batch) * max(length in batch)`` tokens (right padding), so
    sequences are taken longest first: neighbours have similar lengths and little padding,
    and the first micro-batch is the largest, so an out-of-memory shows on the first one.
    Each micro-batch holds at most ``max_seqs`` sequences and at most ``max_tokens``
    padded tokens (``max_tokens <= 0``: no token cap); a sequence longer than the budget
    gets a micro-batch of its own. Every index appears exactly once.
    """
    if max_seqs < 1:
        raise ValueError(f"micro_batch must be >= 1, got {max_seqs}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable: ties keep order
    plan: list[list[int]] = []
    current: list[int] = []
    widest = 0
    for i in order:
        width = max(widest, lengths[i])
        over_tokens = max_tokens > 0 and (len(current) + 1) * width > max_tokens
        if current and (len(current) >= max_seqs or over_tokens):
            plan.append(current)
            current, width = [], lengths[i]
        current.append(i)
        widest = width
    if current:
        plan.append(current)
    return plan


def _micro_batches(seqs: list[_Sequence], cfg: StepConfig) -> Iterator[list[_Sequence]]:
    plan = plan_micro_batches(
        [len(s.tokens) for s in seqs], cfg.max_tokens_per_micro_batch, cfg.micro_batch
    )
    for indices in plan:
        yield [seqs[i] for i in indices]


# What the step adds up besides the loss's SUM_KEYS, in this order: on the device, per
# micro-batch ...
_DEVICE_KEYS = ("entropy", "kl", "update_norm_positive", "update_norm_negative")
# ... and known on the host before the step.
_HOST_KEYS = ("tokens", "samples", "zero_adv_groups", "groups", "reward_sum")


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    groups: Sequence[TrainGroup],
    cfg: StepConfig,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    pad_id: int = 0,
    reference: torch.nn.Module | None = None,
) -> dict[str, float]:
    """Train one optimiser step on ``groups`` (this rank's share under torch.distributed).

    ``reference``: the frozen policy the KL penalty (``cfg.kl_coef`` > 0) pulls towards;
    required then, unused otherwise.

    ``model`` may be wrapped in DistributedDataParallel; micro-batches other than the
    last skip the gradient sync. Returns statistics over the whole batch (all ranks):
    loss, loss_positive, loss_negative, loss_balance, nll_positive, nll_negative,
    entropy (mean over completion tokens, nats), grad_norm (before clipping),
    update_norm_positive / update_norm_negative / update_share_positive (the update split
    at the logits, see :func:`asympo.rl.losses.logit_grad_norms`), zero_adv_groups, groups,
    samples, tokens, reward_mean, clip_fraction / ratio_mean / ratio_max for
    behaviour-corrected losses, and kl (the mean k3 estimate per completion token) when
    ``cfg.kl_coef`` > 0. loss and the update split are the policy loss's alone, without the
    entropy bonus or the KL penalty.

    Every micro-batch's loss is its sum divided by the *global* count the loss averages
    over (responses or tokens, all ranks), so the accumulated gradient is the full-batch
    one; statistics stay on the device as sums and are reduced, and read, once per step.
    Raises MissingBehaviourLogprobs if the loss needs behaviour log-probs that are absent,
    ValueError for any other group :func:`untrainable_reason` rejects.
    """
    needs_behaviour = loss_spec(cfg.loss.name).needs_behaviour
    with_kl = cfg.kl_coef > 0
    if with_kl and reference is None:
        raise ValueError("kl_coef > 0 needs the reference policy (train_step(reference=...))")
    for g in groups:
        bad = untrainable_reason(g, cfg)
        if bad is not None and bad[0] == REASON_NO_BEHAVIOUR:
            raise MissingBehaviourLogprobs(
                f"loss {cfg.loss.name!r} needs behaviour log-probs but some groups have none "
                "(set want_behaviour_logprobs on admitted prompts)"
            )
        if bad is not None:
            raise ValueError(f"untrainable group ({bad[0]}): {bad[1]}")
    world = world_size()
    device = next(model.parameters()).device
    seqs, flat_groups = flatten_groups(groups, cfg)
    lengths = [len(s.tokens) - s.prompt_len for s in seqs]
    units_local = (
        sum(1 for n in lengths if n > 0) if cfg.loss.aggregation == "seq-mean" else sum(lengths)
    )
    counts = all_reduce(
        torch.tensor([float(units_local), float(sum(lengths))], dtype=torch.float64, device=device)
    )
    units = counts[0]
    # DDP averages gradients over ranks; the factor world undoes that.
    scale = (world / units.clamp(min=1.0)).float()
    # The entropy bonus is a mean over every completion token of the batch (all ranks).
    entropy_scale = (cfg.entropy_coef * world / counts[1].clamp(min=1.0)).float()
    kl_scale = (cfg.kl_coef * world / counts[1].clamp(min=1.0)).float()
    with_bonus = cfg.entropy_coef > 0
    host = torch.tensor(
        [
            float(sum(lengths)),
            float(len(seqs)),
            float(flat_groups),
            float(len(groups)),
            sum(r for g in groups for r, c in zip(g.rewards, g.completions, strict=True) if c),
        ],
        dtype=torch.float64,
    )
    sums = torch.zeros(len(SUM_KEYS) + len(_DEVICE_KEYS), dtype=torch.float64, device=device)
    ratio_max = torch.zeros((), dtype=torch.float64, device=device)

    model.train()
    optimizer.zero_grad(set_to_none=True)
    batches = list(_micro_batches(seqs, cfg))
    for _ in range(_empty_passes(model, len(batches))):
        _backward_nothing(model, pad_id, device)
    for index, part in enumerate(batches):
        mb = collate(part, pad_id, device)
        sync = index == len(batches) - 1
        ctx = (
            model.no_sync()
            if isinstance(model, DistributedDataParallel) and not sync
            else contextlib.nullcontext()
        )
        with ctx:
            logprobs, entropy, sum_p2 = _logprobs_and_entropy(
                model,
                mb.input_ids,
                mb.attention_mask,
                cfg.temperature,
                with_entropy=True,
                entropy_grad=with_bonus,
            )
            # The loss sees a detached copy, so its backward yields w = dL/dlog p per token
            # (the token weight of every loss, ratio-weighted ones included) before the model.
            lp = logprobs.detach().requires_grad_(True)
            terms = loss_terms(
                cfg.loss,
                lp,
                mb.completion_mask,
                mb.advantages,
                mb.behaviour_logprobs if needs_behaviour else None,
            )
            (terms.total * scale).backward()
            assert lp.grad is not None and entropy is not None and sum_p2 is not None
            policy_weight = lp.grad
            kl_sum = lp.new_zeros(())
            if with_kl:
                assert reference is not None
                with torch.no_grad():
                    ref = token_logprobs(
                        reference, mb.input_ids, mb.attention_mask, cfg.temperature
                    )
                    # k3 = exp(d) - d - 1 with d = log ref - log pi: >= 0, unbiased for the
                    # KL(pi || ref) of samples drawn from pi; its gradient in log pi is
                    # 1 - exp(d) (the penalty's token weight, added to the loss's).
                    d = torch.where(mb.completion_mask, ref - lp.detach(), torch.zeros_like(lp))
                    kl_sum = ((torch.exp(d) - d - 1.0) * mb.completion_mask).sum()
                    lp.grad = lp.grad + kl_scale * (1.0 - torch.exp(d)) * mb.completion_mask
            if with_bonus:
                # One backward through the model for both: the loss's token weights into
                # the log-probs, and the bonus (maximised, so subtracted) into the logits.
                bonus = -(entropy * mb.completion_mask).sum() * entropy_scale
                torch.autograd.backward([logprobs, bonus], [lp.grad, None])
                entropy = entropy.detach()
            else:
                logprobs.backward(lp.grad)
        # The full-batch token weight is the loss's share of lp.grad / world (the DDP factor
        # is not part of L): the update split measures the policy loss alone.
        norms = logit_grad_norms(policy_weight / world, lp.detach(), sum_p2) * mb.completion_mask
        per_row = norms.sum(dim=1)
        zero = torch.zeros_like(per_row)
        sums += torch.cat(
            [
                terms.sums,
                torch.stack(
                    [
                        (entropy * mb.completion_mask).sum(),
                        kl_sum,
                        torch.where(mb.advantages > 0, per_row, zero).sum(),
                        torch.where(mb.advantages < 0, per_row, zero).sum(),
                    ]
                ).to(torch.float64),
            ]
        )
        ratio_max = torch.maximum(ratio_max, terms.ratio_max.to(torch.float64))

    params = [p for p in model.parameters() if p.grad is not None]
    max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if isinstance(grad_norm, DTensor):  # FSDP: the norm is already reduced over shards
        grad_norm = grad_norm.full_tensor()
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)

    totals = all_reduce(torch.cat([sums, host.to(device)]))
    ratio_max = all_reduce(ratio_max.reshape(1), dist.ReduceOp.MAX)
    # The step's one read of the device.
    values = torch.cat([totals, ratio_max, grad_norm.reshape(1).to(totals), units.reshape(1)])
    keys = (*SUM_KEYS, *_DEVICE_KEYS, *_HOST_KEYS, "ratio_max", "grad_norm", "units")
    t = dict(zip(keys, values.tolist(), strict=True))
    out = _step_metrics(t, needs_behaviour)
    if with_kl:
        out["kl"] = t["kl"] / t["tokens"] if t["tokens"] > 0 else 0.0
    return out


def _empty_passes(model: torch.nn.Module, n_batches: int) -> int:
    """Forward/backward passes without data this rank must add to join the collectives.

    DDP all-reduces once, in the last backward: a rank without data joins with one empty
    pass. FSDP all-gathers in every forward, so every rank runs as many passes as the
    rank with the most micro-batches.
    """
    if isinstance(model, FSDPModule):
        most = all_reduce(torch.tensor([n_batches], dtype=torch.long), dist.ReduceOp.MAX)
        return int(most.item()) - n_batches
    return 1 if n_batches == 0 else 0


def _backward_nothing(model: torch.nn.Module, pad_id: int, device: torch.device) -> None:
    ids = torch.full((1, 1), pad_id, dtype=torch.long, device=device)
    logits = model(input_ids=ids).logits
    (logits.sum() * 0.0).backward()


def _step_metrics(t: dict[str, float], with_ratio: bool) -> dict[str, float]:
    """The step's reported statistics from its reduced sums ``t``."""
    moved = t["update_norm_positive"] + t["update_norm_negative"]
    return {
        **loss_metrics(t, t["units"], t["ratio_max"], with_ratio),
        "entropy": t["entropy"] / t["tokens"] if t["tokens"] > 0 else 0.0,
        "grad_norm": t["grad_norm"] if math.isfinite(t["grad_norm"]) else float("nan"),
        "zero_adv_groups": t["zero_adv_groups"],
        "groups": t["groups"],
        "samples": t["samples"],
        "tokens": t["tokens"],
        "reward_mean": t["reward_sum"] / t["samples"] if t["samples"] > 0 else 0.0,
        "update_norm_positive": t["update_norm_positive"],
        "update_norm_negative": t["update_norm_negative"],
        # 0.5 when nothing moves: no side dominates an empty update.
        "update_share_positive": t["update_norm_positive"] / moved if moved > 0 else 0.5,
    }
