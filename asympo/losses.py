"""Policy losses: ASymPO, SPO and the baselines, one registry of pure tensor functions.

Every loss has the signature::

    loss_fn(logprobs, mask, advantages, behaviour_logprobs, cfg) -> (loss, stats)

* ``logprobs``  ``[B, T]`` float: current-policy log-prob of each response token
  (differentiable; values at masked-out positions are ignored, may be anything finite or not).
* ``mask``      ``[B, T]`` bool or {0, 1}: 1 where the position is a response token.
* ``advantages`` ``[B]`` float: one advantage per response (constant for the gradient).
* ``behaviour_logprobs`` ``[B, T]`` or ``None``: log-probs under the policy that sampled
  the response; only the behaviour-corrected baselines need them.
* ``cfg`` a :class:`LossConfig`.

It returns the scalar loss to minimise and a dict of float statistics. The math,
and why ASymPO's loss balance is zero, is written out in ``docs/losses.md``.

Each loss is defined by a token loss ``ell[i, t]``; the *per-response loss* is its
mean over the response's tokens under sequence-mean aggregation (so under ``asympo``
it equals ``A_i``) and its sum under token-mean aggregation. The batch loss is the
mean of per-response losses over non-empty responses (``seq-mean``) or the sum of all
token losses over the number of response tokens (``token-mean``). Rows whose mask is
all zero contribute nothing and are not counted, so padding never changes a loss.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

Aggregation = Literal["seq-mean", "token-mean"]
LossFn = Callable[
    [Tensor, Tensor, Tensor, Tensor | None, "LossConfig"], tuple[Tensor, dict[str, float]]
]

# exp() of a log-ratio beyond this overflows fp32 (e^88); ratios this far off are clipped
# or truncated by every loss that uses them anyway.
_MAX_LOG_RATIO = 20.0


class MissingBehaviourLogprobs(ValueError):
    """A behaviour-corrected loss was called without behaviour log-probs."""


@dataclass(frozen=True)
class LossConfig:
    """Hyper-parameters shared by the losses (each loss reads only the ones it uses).

    aggregation: "seq-mean" (mean over tokens, then over responses) or "token-mean"
        (mean over all response tokens of the batch). ``dapo`` is always token-mean.
    spo_beta: SPO's fixed scale of negative-advantage responses, 0 < beta <= 1.
    clip_eps: lower (and for grpo/gspo upper) clip range of the ratio: [1-eps, 1+eps].
    clip_eps_high: DAPO's upper clip range (clip-higher): [1-clip_eps, 1+clip_eps_high].
    tis_cap: truncation of the token importance weight in ``tis``.
    nll_eps: ASymPO's floor of the mean NLL it divides by.
    clip_ratio_c: dual-clip bound of grpo/dapo/gspo (Ye et al. 2020, as in verl): the loss
        of an ``A < 0`` token (gspo: response) is at most ``-A * clip_ratio_c``, so a stale
        negative with a huge ratio cannot dominate the step; 0 turns it off, else > 1.
    """

    aggregation: Aggregation = "seq-mean"
    spo_beta: float = 0.5
    clip_eps: float = 0.2
    clip_eps_high: float = 0.28
    tis_cap: float = 2.0
    nll_eps: float = 1e-4
    clip_ratio_c: float = 3.0

    def __post_init__(self) -> None:
        if self.aggregation not in ("seq-mean", "token-mean"):
            raise ValueError(
                f"aggregation must be 'seq-mean' or 'token-mean', got {self.aggregation!r}"
            )
        if not 0 < self.spo_beta <= 1:
            raise ValueError(f"spo_beta must be in (0, 1], got {self.spo_beta}")
        for name in ("clip_eps", "clip_eps_high", "tis_cap", "nll_eps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.clip_ratio_c != 0 and self.clip_ratio_c <= 1:
            raise ValueError(f"clip_ratio_c must be 0 (off) or > 1, got {self.clip_ratio_c}")


@dataclass(frozen=True)
class _Batch:
    """Validated, masked inputs shared by every loss."""

    logprobs: Tensor  # [B, T], 0 where masked out
    mask: Tensor  # [B, T] float {0, 1}
    advantages: Tensor  # [B], detached
    lengths: Tensor  # [B] response token counts
    nll: Tensor  # [B] mean token NLL m_i, detached (0 for empty rows)


def _prepare(logprobs: Tensor, mask: Tensor, advantages: Tensor) -> _Batch:
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be [B, T], got shape {tuple(logprobs.shape)}")
    if mask.shape != logprobs.shape:
        raise ValueError(
            f"mask shape {tuple(mask.shape)} != logprobs shape {tuple(logprobs.shape)}"
        )
    if advantages.shape != logprobs.shape[:1]:
        raise ValueError(
            f"advantages must be [B] = [{logprobs.shape[0]}], got {tuple(advantages.shape)}"
        )
    keep = mask.bool()
    fmask = keep.to(logprobs.dtype)
    # where(), not multiply: -inf * 0 would be NaN at padded positions.
    lp = torch.where(keep, logprobs, torch.zeros_like(logprobs))
    lengths = fmask.sum(dim=1)
    nll = (-(lp.detach() * fmask).sum(dim=1)) / lengths.clamp(min=1.0)
    return _Batch(lp, fmask, advantages.detach().to(logprobs.dtype), lengths, nll)


def _behaviour(name: str, behaviour_logprobs: Tensor | None, b: _Batch) -> Tensor:
    if behaviour_logprobs is None:
        free = ", ".join(n for n, spec in LOSSES.items() if not spec.needs_behaviour)
        raise MissingBehaviourLogprobs(
            f"loss {name!r} needs behaviour log-probs (the sampling policy's per-token "
            "log-probs); ask rollout for them (PromptTask.want_behaviour_logprobs) or use a "
            f"loss that needs none: {free}"
        )
    if behaviour_logprobs.shape != b.logprobs.shape:
        raise ValueError(
            f"behaviour_logprobs shape {tuple(behaviour_logprobs.shape)} != "
            f"logprobs shape {tuple(b.logprobs.shape)}"
        )
    keep = b.mask.bool()
    return torch.where(keep, behaviour_logprobs.detach(), torch.zeros_like(b.logprobs))


def _log_ratio(lp: Tensor, blp: Tensor) -> Tensor:
    return (lp - blp).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)


def _aggregate(token_loss: Tensor, b: _Batch, aggregation: Aggregation) -> tuple[Tensor, Tensor]:
    """Batch loss and per-response losses ``[B]`` from token losses ``[B, T]``."""
    summed = (token_loss * b.mask).sum(dim=1)
    nonempty = (b.lengths > 0).to(token_loss.dtype)
    if aggregation == "seq-mean":
        per_response = summed / b.lengths.clamp(min=1.0)
        loss = per_response.sum() / nonempty.sum().clamp(min=1.0)
    else:
        per_response = summed
        loss = summed.sum() / b.lengths.sum().clamp(min=1.0)
    return loss, per_response


def _balance_stats(per_response: Tensor, b: _Batch) -> dict[str, float]:
    """Positive/negative-side loss sums and mean NLLs (responses with tokens only)."""
    with torch.no_grad():
        nonempty = b.lengths > 0
        pos = (b.advantages > 0) & nonempty
        neg = (b.advantages < 0) & nonempty
        per = per_response.detach()
        loss_pos = per[pos].sum().item()
        loss_neg = per[neg].sum().item()
        return {
            "loss_positive": loss_pos,
            "loss_negative": loss_neg,
            "loss_balance": loss_pos + loss_neg,
            "nll_positive": b.nll[pos].mean().item() if pos.any() else 0.0,
            "nll_negative": b.nll[neg].mean().item() if neg.any() else 0.0,
            "responses_positive": float(pos.sum().item()),
            "responses_negative": float(neg.sum().item()),
        }


def _ratio_stats(ratio: Tensor, clipped: Tensor, weight: Tensor) -> dict[str, float]:
    """Ratio mean/max and clip fraction over entries with ``weight`` 1."""
    with torch.no_grad():
        keep = weight.bool()
        if not keep.any():
            return {"clip_fraction": 0.0, "ratio_mean": 1.0, "ratio_max": 1.0}
        r = ratio.detach()[keep]
        return {
            "clip_fraction": clipped[keep].float().mean().item(),
            "ratio_mean": r.mean().item(),
            "ratio_max": r.max().item(),
        }


def _finish(
    token_loss: Tensor, b: _Batch, aggregation: Aggregation, extra: dict[str, float] | None = None
) -> tuple[Tensor, dict[str, float]]:
    loss, per_response = _aggregate(token_loss, b, aggregation)
    stats = {"loss": loss.detach().item(), **_balance_stats(per_response, b)}
    if extra:
        stats.update(extra)
    return loss, stats


def asympo_loss(
    logprobs: Tensor,
    mask: Tensor,
    advantages: Tensor,
    behaviour_logprobs: Tensor | None,
    cfg: LossConfig,
) -> tuple[Tensor, dict[str, float]]:
    """ASymPO: ``ell[i,t] = A_i * nll[i,t] / sg(max(m_i, nll_eps))``; needs no behaviour info.

    Per-response loss (seq-mean) is ``A_i`` (for ``m_i >= nll_eps``), so a group's losses
    sum to zero; the gradient is ``A_i * grad log m_i``. Shapes: see the module docstring.
    """
    b = _prepare(logprobs, mask, advantages)
    scale = b.nll.clamp(min=cfg.nll_eps)  # detached: the stop-gradient
    token_loss = b.advantages[:, None] * (-b.logprobs) / scale[:, None]
    return _finish(token_loss, b, cfg.aggregation)


def spo_loss(
    logprobs: Tensor,
    mask: Tensor,
    advantages: Tensor,
    behaviour_logprobs: Tensor | None,
    cfg: LossConfig,
) -> tuple[Tensor, dict[str, float]]:
    """SPO: ``ell[i,t] = w_i * A_i * nll[i,t]`` with ``w_i = spo_beta`` if ``A_i < 0`` else 1."""
    b = _prepare(logprobs, mask, advantages)
    weight = torch.where(
        b.advantages < 0, torch.full_like(b.advantages, cfg.spo_beta), torch.ones_like(b.advantages)
    )
    token_loss = (weight * b.advantages)[:, None] * (-b.logprobs)
    return _finish(token_loss, b, cfg.aggregation)


def reinforce_loss(
    logprobs: Tensor,
    mask: Tensor,
    advantages: Tensor,
    behaviour_logprobs: Tensor | None,
    cfg: LossConfig,
) -> tuple[Tensor, dict[str, float]]:
    """REINFORCE / GPG on the current policy, no correction: ``ell[i,t] = A_i * nll[i,t]``."""
    b = _prepare(logprobs, mask, advantages)
    token_loss = b.advantages[:, None] * (-b.logprobs)
    return _finish(token_loss, b, cfg.aggregation)


def _ppo_clip(
    ratio: Tensor, adv: Tensor, low: float, high: float, clip_ratio_c: float
) -> tuple[Tensor, Tensor]:
    """Dual-clipped PPO loss ``max(-r*A, -clip(r, low, high)*A)``, capped at ``-A*c`` for A < 0.

    Returns the loss and where a clip is active (the gradient through ``r`` is zero there).
    """
    unclipped = -ratio * adv
    clipped = -ratio.clamp(low, high) * adv
    loss = torch.maximum(unclipped, clipped)
    # The clipped branch is active (zero gradient) where it is strictly the larger loss.
    active = clipped > unclipped
    if clip_ratio_c > 0:
        cap = -adv * clip_ratio_c
        dual = (adv < 0) & (loss > cap)
        loss = torch.where(dual, cap.expand_as(loss), loss)
        active = active | dual
    return loss, active


def _clipped_surrogate(
    b: _Batch, blp: Tensor, low: float, high: float, clip_ratio_c: float
) -> tuple[Tensor, dict[str, float]]:
    """Token-level dual-clipped PPO loss and its ratio statistics."""
    ratio = torch.exp(_log_ratio(b.logprobs, blp))
    adv = b.advantages[:, None].expand_as(ratio)
    token_loss, active = _ppo_clip(ratio, adv, low, high, clip_ratio_c)
    return token_loss, _ratio_stats(ratio, active, b.mask)


def grpo_loss(
    logprobs: Tensor,
    mask: Tensor,
    advantages: Tensor,
    behaviour_logprobs: Tensor | None,
    cfg: LossConfig,
) -> tuple[Tensor, dict[str, float]]:
    """GRPO/PPO: ``ell = -min(r*A, clip(r, 1-eps, 1+eps)*A)``, ``r = exp(lp - lp_behaviour)``.

    With dual-clip (``clip_ratio_c = c > 0``) an ``A < 0`` token's loss is ``min(ell, -c*A)``.
    """
    b = _prepare(logprobs, mask, advantages)
    blp = _behaviour("grpo", behaviour_logprobs, b)
    token_loss, extra = _clipped_surrogate(
        b, blp, 1 - cfg.clip_eps, 1 + cfg.clip_eps, cfg.clip_ratio_c
    )
    return _finish(token_loss, b, cfg.aggregation, extra)


def dapo_loss(
    logprobs: Tensor,
    mask: Tensor,
    advantages: Tensor,
    behaviour_logprobs: Tensor | None,
    cfg: LossConfig,
) -> tuple[Tensor, dict[str, float]]:
    """DAPO: clip-higher ``clip(r, 1-clip_eps, 1+clip_eps_high)``, dual-clip, always token-mean."""
    b = _prepare(logprobs, mask, advantages)
    blp = _behaviour("dapo", behaviour_logprobs, b)
    token_loss, extra = _clipped_surrogate(
        b, blp, 1 - cfg.clip_eps, 1 + cfg.clip_eps_high, cfg.clip_ratio_c
    )
    return _finish(token_loss, b, "token-mean", extra)


def gspo_loss(
    logprobs: Tensor,
    mask: Tensor,
    advantages: Tensor,
    behaviour_logprobs: Tensor | None,
    cfg: LossConfig,
) -> tuple[Tensor, dict[str, float]]:
    """GSPO: sequence ratio ``s_i = exp(mean_t(lp - lp_behaviour))``, clipped per response.

    ``L_i = -min(s_i*A_i, clip(s_i, 1-eps, 1+eps)*A_i)`` is given to each of the response's
    tokens, so seq-mean averages ``L_i`` and token-mean weights it by the response length.
    Dual-clip (``clip_ratio_c = c > 0``) caps ``L_i`` at ``-c*A_i`` for ``A_i < 0``, per
    response (verl applies it to the token-level ratio losses only).
    """
    b = _prepare(logprobs, mask, advantages)
    blp = _behaviour("gspo", behaviour_logprobs, b)
    mean_log_ratio = ((b.logprobs - blp) * b.mask).sum(dim=1) / b.lengths.clamp(min=1.0)
    ratio = torch.exp(mean_log_ratio.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO))
    seq_loss, active = _ppo_clip(
        ratio, b.advantages, 1 - cfg.clip_eps, 1 + cfg.clip_eps, cfg.clip_ratio_c
    )
    token_loss = seq_loss[:, None].expand_as(b.logprobs)
    extra = _ratio_stats(ratio, active, b.lengths > 0)
    return _finish(token_loss, b, cfg.aggregation, extra)


def tis_loss(
    logprobs: Tensor,
    mask: Tensor,
    advantages: Tensor,
    behaviour_logprobs: Tensor | None,
    cfg: LossConfig,
) -> tuple[Tensor, dict[str, float]]:
    """Truncated IS: ``ell = sg(min(r, tis_cap)) * A * nll``, ``r = exp(lp - lp_behaviour)``."""
    b = _prepare(logprobs, mask, advantages)
    blp = _behaviour("tis", behaviour_logprobs, b)
    ratio = torch.exp(_log_ratio(b.logprobs, blp)).detach()
    weight = ratio.clamp(max=cfg.tis_cap)
    token_loss = weight * b.advantages[:, None] * (-b.logprobs)
    extra = _ratio_stats(ratio, ratio > cfg.tis_cap, b.mask)
    return _finish(token_loss, b, cfg.aggregation, extra)


def logit_grad_norms(token_weight: Tensor, logprobs: Tensor, sum_p2: Tensor) -> Tensor:
    """``[B, T]`` norms ``||dL/dz_t||`` of the loss gradient w.r.t. each token's logits.

    ``token_weight`` ``[B, T]`` is ``w_t = dL/dlog p(y_t)`` (for ASymPO
    ``-A_i / (n_i max(m_i, eps))`` under seq-mean; for the ratio losses it carries the
    ratio and the clip), ``logprobs`` the token log-probs ``log p(y_t)``, ``sum_p2`` the
    softmax's ``sum_v p_v^2`` at each position. Since ``dlog p_y/dz = e_y - p``,
    ``dL/dz_t = w_t (e_y - p)`` and its norm is ``|w_t| sqrt(sum p^2 - 2 p_y + 1)``: no
    vocabulary-sized tensor is needed beyond the softmax the step already computes.
    """
    p_y = logprobs.detach().exp()
    return token_weight.detach().abs() * (sum_p2 - 2 * p_y + 1).clamp(min=0).sqrt()


RatioUnit = Literal["token", "response"]


@dataclass(frozen=True)
class LossSpec:
    """Everything the rest of the system knows about one loss, in one place.

    fn: the pure loss function (signature in the module docstring).
    needs_behaviour: it reads the sampling policy's per-token log-probs.
    aggregation: the aggregation it always uses (``dapo``: token-mean), or None when it
        follows ``LossConfig.aggregation``.
    ratio_unit: what its ``ratio_mean``/``clip_fraction`` are averaged over (a token's
        ratio, or one sequence ratio per response); None when it has no ratio.
    """

    fn: LossFn
    needs_behaviour: bool = False
    aggregation: Aggregation | None = None
    ratio_unit: RatioUnit | None = None


LOSSES: dict[str, LossSpec] = {
    "asympo": LossSpec(asympo_loss),
    "spo": LossSpec(spo_loss),
    "reinforce": LossSpec(reinforce_loss),
    "grpo": LossSpec(grpo_loss, needs_behaviour=True, ratio_unit="token"),
    "dapo": LossSpec(dapo_loss, needs_behaviour=True, aggregation="token-mean", ratio_unit="token"),
    "gspo": LossSpec(gspo_loss, needs_behaviour=True, ratio_unit="response"),
    "tis": LossSpec(tis_loss, needs_behaviour=True, ratio_unit="token"),
}
DEFAULT_LOSS = "asympo"


def loss_spec(name: str) -> LossSpec:
    """The :class:`LossSpec` of loss ``name`` (ValueError naming the known ones if unknown)."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; known losses: {', '.join(sorted(LOSSES))}")
    return LOSSES[name]


def needs_behaviour_logprobs(name: str) -> bool:
    """Whether loss ``name`` needs the sampling policy's per-token log-probs."""
    return loss_spec(name).needs_behaviour


def loss_aggregation(name: str, cfg: LossConfig) -> Aggregation:
    """The aggregation loss ``name`` really uses under ``cfg`` (``dapo`` is always token-mean).

    Gradient accumulation needs it: a micro-batch's loss is re-weighted by its share of
    responses (seq-mean) or of tokens (token-mean) so the sum equals the full-batch loss.
    """
    return loss_spec(name).aggregation or cfg.aggregation


def compute_loss(
    name: str,
    logprobs: Tensor,
    mask: Tensor,
    advantages: Tensor,
    behaviour_logprobs: Tensor | None = None,
    cfg: LossConfig | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Apply registered loss ``name`` (shapes as in the module docstring); see LOSSES."""
    return loss_spec(name).fn(logprobs, mask, advantages, behaviour_logprobs, cfg or LossConfig())
