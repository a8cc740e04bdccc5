"""Policy losses: ASymPO, SPO and the baselines, one registry of pure tensor functions.

Every loss has the signature::

    loss_fn(logprobs, mask, advantages, behaviour_logprobs, settings) -> LossTerms

* ``logprobs``  ``[B, T]`` float: current-policy log-prob of each response token
  (differentiable; values at masked-out positions are ignored, may be anything finite or not).
* ``mask``      ``[B, T]`` bool or {0, 1}: 1 where the position is a response token.
* ``advantages`` ``[B]`` float: one advantage per response (constant for the gradient).
* ``behaviour_logprobs`` ``[B, T]`` or ``None``: log-probs under the policy that sampled
  the response; only the behaviour-corrected baselines need them.
* ``settings`` the loss's own settings (:class:`AsympoLoss`, :class:`GrpoLoss`, ...,
  in ``asympo/rl/loss_settings.py``).

It returns :class:`LossTerms`: the loss and its statistics as *sums* over the batch, so
micro-batches and ranks add up exactly and the caller divides once, by the global count
(:func:`compute_loss` does it for one batch). The math, and why ASymPO's loss balance is
zero, is written out in ``docs/losses.md``.

Each loss is defined by a token loss ``ell[i, t]``; the *per-response loss* is its
mean over the response's tokens under sequence-mean aggregation (so under ``asympo``
it equals ``A_i``) and its sum under token-mean aggregation. The batch loss is the
mean of per-response losses over non-empty responses (``seq-mean``) or the sum of all
token losses over the number of response tokens (``token-mean``). Rows whose mask is
all zero contribute nothing and are not counted, so padding never changes a loss.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, get_args

import torch
from pydantic import TypeAdapter, ValidationError
from torch import Tensor

from asympo.rl.loss_settings import (
    Aggregation,
    AnyLossSettings,
    AsympoLoss,
    DapoLoss,
    GrpoLoss,
    GspoLoss,
    LossSettings,
    ReinforceLoss,
    SpoLoss,
    TisLoss,
)

LossFn = Callable[[Tensor, Tensor, Tensor, Tensor | None, Any], "LossTerms"]

# exp() of a log-ratio beyond this overflows fp32 (e^88); ratios this far off are clipped
# or truncated by every loss that uses them anyway.
_MAX_LOG_RATIO = 20.0


class MissingBehaviourLogprobs(ValueError):
    """A behaviour-corrected loss was called without behaviour log-probs."""


_ANY_LOSS: TypeAdapter[LossSettings] = TypeAdapter(AnyLossSettings)

# The statistics every loss sums over its batch, in this order (LossTerms.sums):
# per-response losses of the whole batch and of each advantage sign, the mean NLLs m_i
# and counts of each sign's (non-empty) responses, and, for the ratio losses, the
# clipped entries, the ratios and the entries a ratio is averaged over (tokens, or
# responses for gspo); 0 for losses without a ratio.
SUM_KEYS = (
    "loss",
    "loss_positive",
    "loss_negative",
    "nll_positive",
    "nll_negative",
    "responses_positive",
    "responses_negative",
    "clipped",
    "ratio",
    "ratio_units",
)


@dataclass(frozen=True)
class LossTerms:
    """One batch's loss as sums, so batches and ranks add up before anything is divided.

    total: differentiable scalar, the sum of per-response losses (seq-mean) or of token
        losses (token-mean); the batch loss is ``total / units``.
    units: the count ``total`` is averaged over (non-empty responses, or response tokens).
    sums: ``[len(SUM_KEYS)]`` float64, detached, the statistics in :data:`SUM_KEYS` order.
    ratio_max: the largest ratio (0 for losses without one), detached.
    All are tensors on the inputs' device: nothing here waits for the device.
    """

    total: Tensor
    units: Tensor
    sums: Tensor
    ratio_max: Tensor


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


def _ratio_sums(ratio: Tensor, clipped: Tensor, weight: Tensor) -> tuple[Tensor, ...]:
    """Clipped count, ratio sum, count and max of the ratio over entries with ``weight`` 1."""
    with torch.no_grad():
        keep = weight.bool()
        # float64 sums: the same in any order, so micro-batches and ranks add up exactly.
        r = torch.where(keep, ratio.detach(), torch.zeros_like(ratio)).to(torch.float64)
        return (
            (clipped & keep).sum().to(r.dtype),
            r.sum(),
            keep.sum().to(r.dtype),
            # Ratios are positive, so 0 at the dropped entries never wins the max.
            r.max() if r.numel() else r.new_zeros(()),
        )


def _finish(
    token_loss: Tensor,
    b: _Batch,
    aggregation: Aggregation,
    ratio: tuple[Tensor, ...] | None = None,
) -> LossTerms:
    """The :class:`LossTerms` of token losses ``[B, T]`` (and the ratio sums, if any)."""
    summed = (token_loss * b.mask).sum(dim=1)
    nonempty = b.lengths > 0
    if aggregation == "seq-mean":
        per_response = summed / b.lengths.clamp(min=1.0)
        units = nonempty.sum().to(summed.dtype)
    else:
        per_response = summed
        units = b.lengths.sum()
    total = per_response.sum()
    with torch.no_grad():
        pos = (b.advantages > 0) & nonempty
        neg = (b.advantages < 0) & nonempty
        # float64 sums: the same in any order, so micro-batches and ranks add up exactly.
        per = per_response.detach().to(torch.float64)
        nll = b.nll.to(torch.float64)
        zero = torch.zeros_like(per)
        # where(), not indexing: a boolean index would wait for the device.
        ratio_part = ratio[:3] if ratio is not None else (zero.sum(),) * 3
        sums = torch.stack(
            [
                per.sum(),
                torch.where(pos, per, zero).sum(),
                torch.where(neg, per, zero).sum(),
                torch.where(pos, nll, zero).sum(),
                torch.where(neg, nll, zero).sum(),
                pos.sum().to(per.dtype),
                neg.sum().to(per.dtype),
                *ratio_part,
            ]
        )
        ratio_max = ratio[3] if ratio is not None else zero.sum()
    return LossTerms(total, units.detach(), sums, ratio_max)


def _div(a: float, b: float, empty: float = 0.0) -> float:
    return a / b if b > 0 else empty


def loss_metrics(
    sums: Mapping[str, float], units: float, ratio_max: float, with_ratio: bool
) -> dict[str, float]:
    """The reported loss statistics of :data:`SUM_KEYS` sums over ``units`` (see LossTerms).

    loss (``sums["loss"] / units``), loss_positive / loss_negative (sums of the
    per-response losses of each advantage sign) and loss_balance (their sum),
    nll_positive / nll_negative (mean NLL of each sign's responses), and ``with_ratio``
    clip_fraction, ratio_mean, ratio_max (1.0 when nothing has a ratio).
    """
    out = {
        "loss": _div(sums["loss"], units),
        "loss_positive": sums["loss_positive"],
        "loss_negative": sums["loss_negative"],
        "loss_balance": sums["loss_positive"] + sums["loss_negative"],
        "nll_positive": _div(sums["nll_positive"], sums["responses_positive"]),
        "nll_negative": _div(sums["nll_negative"], sums["responses_negative"]),
    }
    if with_ratio:
        n = sums["ratio_units"]
        out["clip_fraction"] = _div(sums["clipped"], n)
        out["ratio_mean"] = _div(sums["ratio"], n, empty=1.0)
        out["ratio_max"] = ratio_max if n > 0 else 1.0
    return out


def asympo_loss(
    logprobs: Tensor,
    mask: Tensor,
    advantages: Tensor,
    behaviour_logprobs: Tensor | None,
    cfg: AsympoLoss,
) -> LossTerms:
    """ASymPO: ``ell[i,t] = A_i * nll[i,t] / sg(max(m_i, nll_eps))``; needs no behaviour info.

    Per-response loss (seq-mean) is ``A_i`` (for ``m_i >= nll_eps``), so a group's losses
    sum to zero; the gradient is ``A_i * grad log m_i``. Shapes: see the module docstring.
    ``weight_cap`` > 0 also floors the divisor at ``|A_i| / weight_cap``: a response's
    scale ``|A_i| / m_i`` (its tokens' weight times ``n_i``) is at most ``weight_cap``, at
    the price of the zero sum for the responses where the cap binds.
    """
    b = _prepare(logprobs, mask, advantages)
    scale = b.nll.clamp(min=cfg.nll_eps)  # detached: the stop-gradient
    if cfg.weight_cap > 0:
        scale = torch.maximum(scale, b.advantages.abs() / cfg.weight_cap)
    token_loss = b.advantages[:, None] * (-b.logprobs) / scale[:, None]
    return _finish(token_loss, b, cfg.aggregation)


def spo_loss(
    logprobs: Tensor,
    mask: Tensor,
    advantages: Tensor,
    behaviour_logprobs: Tensor | None,
    cfg: SpoLoss,
) -> LossTerms:
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
    cfg: ReinforceLoss,
) -> LossTerms:
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
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """Token-level dual-clipped PPO loss and its ratio statistics."""
    ratio = torch.exp(_log_ratio(b.logprobs, blp))
    adv = b.advantages[:, None].expand_as(ratio)
    token_loss, active = _ppo_clip(ratio, adv, low, high, clip_ratio_c)
    return token_loss, _ratio_sums(ratio, active, b.mask)


def grpo_loss(
    logprobs: Tensor,
    mask: Tensor,
    advantages: Tensor,
    behaviour_logprobs: Tensor | None,
    cfg: GrpoLoss,
) -> LossTerms:
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
    cfg: DapoLoss,
) -> LossTerms:
    """DAPO: clip-higher ``clip(r, 1-clip_eps, 1+clip_eps_high)``, dual-clip, always token-mean."""
    b = _prepare(logprobs, mask, advantages)
    blp = _behaviour("dapo", behaviour_logprobs, b)
    token_loss, extra = _clipped_surrogate(
        b, blp, 1 - cfg.clip_eps, 1 + cfg.clip_eps_high, cfg.clip_ratio_c
    )
    return _finish(token_loss, b, cfg.aggregation, extra)


def gspo_loss(
    logprobs: Tensor,
    mask: Tensor,
    advantages: Tensor,
    behaviour_logprobs: Tensor | None,
    cfg: GspoLoss,
) -> LossTerms:
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
    extra = _ratio_sums(ratio, active, b.lengths > 0)
    return _finish(token_loss, b, cfg.aggregation, extra)


def tis_loss(
    logprobs: Tensor,
    mask: Tensor,
    advantages: Tensor,
    behaviour_logprobs: Tensor | None,
    cfg: TisLoss,
) -> LossTerms:
    """Truncated IS: ``ell = sg(min(r, tis_cap)) * A * nll``, ``r = exp(lp - lp_behaviour)``."""
    b = _prepare(logprobs, mask, advantages)
    blp = _behaviour("tis", behaviour_logprobs, b)
    ratio = torch.exp(_log_ratio(b.logprobs, blp)).detach()
    weight = ratio.clamp(max=cfg.tis_cap)
    token_loss = weight * b.advantages[:, None] * (-b.logprobs)
    extra = _ratio_sums(ratio, ratio > cfg.tis_cap, b.mask)
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


@dataclass(frozen=True)
class LossSpec:
    """Everything the rest of the system knows about one loss, in one place.

    fn: the pure loss function (signature in the module docstring).
    settings: its settings class (its ``name`` is the loss's name, its fields the
        hyper-parameters and their defaults; ``learner.loss`` holds one).
    needs_behaviour: it reads the sampling policy's per-token log-probs (and so reports
        ratio statistics: clip_fraction, ratio_mean, ratio_max).
    """

    fn: LossFn
    settings: type[LossSettings]
    needs_behaviour: bool = False

    @property
    def name(self) -> str:
        """The loss's name, as its settings class declares it."""
        return str(self.settings.model_fields["name"].default)


LOSSES: dict[str, LossSpec] = {
    spec.name: spec
    for spec in (
        LossSpec(asympo_loss, AsympoLoss),
        LossSpec(spo_loss, SpoLoss),
        LossSpec(reinforce_loss, ReinforceLoss),
        LossSpec(grpo_loss, GrpoLoss, needs_behaviour=True),
        LossSpec(dapo_loss, DapoLoss, needs_behaviour=True),
        LossSpec(gspo_loss, GspoLoss, needs_behaviour=True),
        LossSpec(tis_loss, TisLoss, needs_behaviour=True),
    )
}
# The discriminated union and the registry name the same classes (checked at import).
assert {s.settings for s in LOSSES.values()} == set(get_args(get_args(AnyLossSettings)[0]))


def loss_spec(name: str) -> LossSpec:
    """The :class:`LossSpec` of loss ``name`` (ValueError naming the known ones if unknown)."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; known losses: {', '.join(sorted(LOSSES))}")
    return LOSSES[name]


def needs_behaviour_logprobs(name: str) -> bool:
    """Whether loss ``name`` needs the sampling policy's per-token log-probs."""
    return loss_spec(name).needs_behaviour


def loss_settings(name: str, **params: Any) -> LossSettings:
    """The settings of loss ``name`` with ``params`` over its defaults.

    ValueError names the known losses for an unknown ``name``, and says which parameter
    is unknown to this loss or out of range.
    """
    loss_spec(name)
    try:
        return _ANY_LOSS.validate_python({**params, "name": name})
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(x) for x in err['loc'][1:]) or 'name'}: {err['msg']}"
            for err in exc.errors()
        )
        raise ValueError(f"loss {name!r}: {problems}") from None


def loss_terms(
    settings: LossSettings,
    logprobs: Tensor,
    mask: Tensor,
    advantages: Tensor,
    behaviour_logprobs: Tensor | None = None,
) -> LossTerms:
    """The :class:`LossTerms` of the loss ``settings`` names, on one batch."""
    return loss_spec(settings.name).fn(logprobs, mask, advantages, behaviour_logprobs, settings)


def compute_loss(
    name: str,
    logprobs: Tensor,
    mask: Tensor,
    advantages: Tensor,
    behaviour_logprobs: Tensor | None = None,
    cfg: LossSettings | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Loss ``name`` on one batch: the scalar to minimise and its statistics as floats.

    ``cfg`` defaults to the loss's default settings (it must be that loss's settings).
    Statistics: those of :func:`loss_metrics`, plus responses_positive /
    responses_negative. Shapes as in the module docstring.
    """
    settings = cfg if cfg is not None else loss_settings(name)
    if settings.name != name:
        raise ValueError(f"settings of loss {settings.name!r} given to loss {name!r}")
    terms = loss_terms(settings, logprobs, mask, advantages, behaviour_logprobs)
    sums = dict(zip(SUM_KEYS, terms.sums.tolist(), strict=True))
    units = float(terms.units)
    stats = loss_metrics(sums, units, float(terms.ratio_max), loss_spec(name).needs_behaviour)
    stats["responses_positive"] = sums["responses_positive"]
    stats["responses_negative"] = sums["responses_negative"]
    return terms.total / max(units, 1.0), stats
