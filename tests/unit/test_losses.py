"""The policy-loss registry: ASymPO's zero-sum balance and gradient, SPO, the baselines."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from asympo.rl.advantages import compute_advantages
from asympo.rl.loss_settings import (
    AsympoLoss,
    DapoLoss,
    GrpoLoss,
    GspoLoss,
    LossSettings,
    ReinforceLoss,
    SpoLoss,
    TisLoss,
)
from asympo.rl.losses import (
    LOSSES,
    Aggregation,
    MissingBehaviourLogprobs,
    compute_loss,
    logit_grad_norms,
    loss_settings,
    needs_behaviour_logprobs,
)

BEHAVIOUR_LOSSES = ["grpo", "dapo", "gspo", "tis"]


def settings_for(name: str, **params: Any) -> LossSettings:
    """Loss ``name``'s settings with those ``params`` it has (dapo's aggregation is fixed)."""
    fields = LOSSES[name].settings.model_fields
    kept = {k: v for k, v in params.items() if k in fields}
    if name == "dapo":
        kept.pop("aggregation", None)
    return loss_settings(name, **kept)


def stale_batch(
    seed: int, groups: int = 4, g: int = 6, t: int = 12
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Zero-sum advantages; negatives have ~6x the mean NLL of positives (stale data).

    Returns logprobs [B, T], mask [B, T], advantages [B] with B = groups * g.
    """
    gen = torch.Generator().manual_seed(seed)
    rewards = torch.zeros(groups, g)
    rewards[:, : g // 2] = 1.0  # every group mixed
    rewards = rewards[:, torch.randperm(g, generator=gen)]
    adv, _ = compute_advantages("grpo", rewards)
    adv = adv.reshape(-1)
    b = groups * g
    lengths = torch.randint(3, t + 1, (b,), generator=gen)
    mask = torch.arange(t)[None, :] < lengths[:, None]
    per_token_nll = torch.where(adv > 0, 0.3, 1.8)[:, None] * (
        0.5 + torch.rand(b, t, generator=gen)
    )
    logprobs = -per_token_nll
    return logprobs, mask, adv


def test_registry_lists_the_seven_losses() -> None:
    assert sorted(LOSSES) == ["asympo", "dapo", "grpo", "gspo", "reinforce", "spo", "tis"]
    assert [n for n in LOSSES if needs_behaviour_logprobs(n)] == BEHAVIOUR_LOSSES


def test_unknown_loss_names_the_known_ones() -> None:
    lp, mask, adv = stale_batch(0)
    with pytest.raises(ValueError, match="known losses: asympo, dapo"):
        compute_loss("ppo", lp, mask, adv)
    with pytest.raises(ValueError, match="unknown loss"):
        needs_behaviour_logprobs("nope")


@pytest.mark.parametrize("name", BEHAVIOUR_LOSSES)
def test_behaviour_losses_without_behaviour_logprobs_say_so(name: str) -> None:
    lp, mask, adv = stale_batch(0)
    with pytest.raises(MissingBehaviourLogprobs, match="needs behaviour log-probs"):
        compute_loss(name, lp, mask, adv, None)


def test_shape_mismatch_is_a_clear_error() -> None:
    lp, mask, adv = stale_batch(0)
    with pytest.raises(ValueError, match="advantages must be"):
        compute_loss("asympo", lp, mask, adv[:-1])
    with pytest.raises(ValueError, match="mask shape"):
        compute_loss("asympo", lp, mask[:, :-1], adv)


@pytest.mark.parametrize("seed", range(5))
def test_asympo_balance_is_zero_on_stale_data_reinforce_is_not(seed: int) -> None:
    lp, mask, adv = stale_batch(seed)
    _, st_a = compute_loss("asympo", lp, mask, adv)
    _, st_r = compute_loss("reinforce", lp, mask, adv)
    scale_a = abs(st_a["loss_positive"]) + abs(st_a["loss_negative"])
    scale_r = abs(st_r["loss_positive"]) + abs(st_r["loss_negative"])
    assert scale_a > 1.0
    assert abs(st_a["loss_balance"]) <= 1e-6 * scale_a
    # Per-response values are exactly A_i, group by group.
    assert st_a["loss_positive"] == pytest.approx(adv[adv > 0].sum().item(), rel=1e-6)
    # The naive control is dominated by the negatives (large NLL under the current policy).
    assert st_r["loss_balance"] < -0.3 * scale_r
    assert st_r["nll_negative"] > 4 * st_r["nll_positive"]
    assert st_a["nll_negative"] == pytest.approx(st_r["nll_negative"])


def test_asympo_group_sums_are_zero_per_group() -> None:
    lp, mask, adv = stale_batch(7, groups=3, g=4)
    for grp in range(3):
        rows = slice(grp * 4, grp * 4 + 4)
        _, s = compute_loss("asympo", lp[rows], mask[rows], adv[rows])
        assert abs(s["loss_balance"]) < 1e-6


def test_token_mean_breaks_zero_sum_as_documented() -> None:
    lp, mask, adv = stale_batch(3)
    _, s = compute_loss("asympo", lp, mask, adv, cfg=AsympoLoss(aggregation="token-mean"))
    expected = (adv * mask.sum(dim=1)).sum().item()  # sum_i A_i |y_i|
    assert s["loss_balance"] == pytest.approx(expected, rel=1e-5)
    assert abs(expected) > 1e-3


@pytest.mark.parametrize("aggregation", ["seq-mean", "token-mean"])
def test_asympo_gradient_is_advantage_times_grad_log_mean_nll(aggregation: Aggregation) -> None:
    base, mask, adv = stale_batch(11)
    lp = base.clone().requires_grad_(True)
    loss, _ = compute_loss("asympo", lp, mask, adv, cfg=AsympoLoss(aggregation=aggregation))
    (grad,) = torch.autograd.grad(loss, lp)

    # Independent reference: d/dlp of sum_i w_i * A_i * log(m_i).
    ref_lp = base.clone().requires_grad_(True)
    fmask = mask.float()
    lengths = fmask.sum(dim=1)
    m = -(ref_lp * fmask).sum(dim=1) / lengths
    if aggregation == "seq-mean":
        weight = torch.full_like(lengths, 1.0 / len(lengths))
    else:  # per-response loss A_i * |y_i| * m_i / sg(m_i), over total tokens
        weight = lengths / lengths.sum()
    objective = (weight * adv * torch.log(m)).sum()
    (expected,) = torch.autograd.grad(objective, ref_lp)

    assert grad.abs().max() > 1e-3
    torch.testing.assert_close(grad, expected * fmask, rtol=1e-5, atol=1e-7)
    assert torch.all(grad[~mask] == 0)


@given(cap=st.floats(0.05, 20.0), seed=st.integers(0, 10_000))
@settings(max_examples=40, deadline=None)
def test_asympo_weight_cap_bounds_each_response_scale(cap: float, seed: int) -> None:
    """learner.loss.weight_cap: the token weight is A_i / (n_i max(m_i, |A_i| / cap))."""
    base, mask, adv = stale_batch(seed)
    lp = base.clone().requires_grad_(True)
    loss, _ = compute_loss("asympo", lp, mask, adv, cfg=AsympoLoss(weight_cap=cap))
    (grad,) = torch.autograd.grad(loss, lp)

    fmask = mask.float()
    n = fmask.sum(dim=1)
    m = -(base * fmask).sum(dim=1) / n
    # seq-mean over B responses: d loss / d lp[i, t] = -A_i / (B n_i scale_i)
    per_response = -(grad * fmask).sum(dim=1) * len(n)  # = A_i / scale_i
    capped = adv.abs() / m > cap
    expected = torch.where(capped, adv.sign() * cap, adv / m)
    torch.testing.assert_close(per_response, expected, rtol=1e-5, atol=1e-6)
    assert torch.all((per_response.abs() <= cap * (1 + 1e-5)) | (adv == 0))


def test_asympo_weight_cap_zero_is_the_plain_loss() -> None:
    base, mask, adv = stale_batch(5)
    lp1 = base.clone().requires_grad_(True)
    lp2 = base.clone().requires_grad_(True)
    compute_loss("asympo", lp1, mask, adv, cfg=AsympoLoss(weight_cap=0.0))[0].backward()
    compute_loss("asympo", lp2, mask, adv)[0].backward()
    assert lp1.grad is not None and lp2.grad is not None
    assert torch.equal(lp1.grad, lp2.grad)


def test_without_stop_gradient_the_asympo_gradient_would_vanish() -> None:
    """Why sg() matters: A_i * m_i / m_i is constant, so its gradient is exactly zero."""
    base, mask, adv = stale_batch(2)
    lp = base.clone().requires_grad_(True)
    m = -(lp * mask).sum(dim=1) / mask.sum(dim=1)
    (adv * m / m).mean().backward()
    assert lp.grad is not None and lp.grad.abs().max() < 1e-6
    lp2 = base.clone().requires_grad_(True)
    compute_loss("asympo", lp2, mask, adv)[0].backward()
    assert lp2.grad is not None and lp2.grad.abs().max() > 1e-3


@pytest.mark.parametrize("beta", [0.25, 0.5, 1.0])
def test_spo_scales_exactly_the_negative_terms(beta: float) -> None:
    base, mask, adv = stale_batch(5)
    lp_s = base.clone().requires_grad_(True)
    loss_s, st_s = compute_loss("spo", lp_s, mask, adv, cfg=SpoLoss(spo_beta=beta))
    loss_s.backward()
    lp_r = base.clone().requires_grad_(True)
    loss_r, st_r = compute_loss("reinforce", lp_r, mask, adv)
    loss_r.backward()
    assert st_s["loss_positive"] == pytest.approx(st_r["loss_positive"], rel=1e-6)
    assert st_s["loss_negative"] == pytest.approx(beta * st_r["loss_negative"], rel=1e-6)
    assert lp_s.grad is not None and lp_r.grad is not None
    neg = adv < 0
    torch.testing.assert_close(lp_s.grad[neg], beta * lp_r.grad[neg])
    torch.testing.assert_close(lp_s.grad[~neg], lp_r.grad[~neg])


def _grad(
    name: str,
    base: torch.Tensor,
    mask: torch.Tensor,
    adv: torch.Tensor,
    behaviour: torch.Tensor | None,
    cfg: LossSettings | None,
) -> tuple[torch.Tensor, dict[str, float]]:
    lp = base.clone().requires_grad_(True)
    loss, stats = compute_loss(name, lp, mask, adv, behaviour, cfg)
    (grad,) = torch.autograd.grad(loss, lp)
    return grad, stats


@pytest.mark.parametrize("name", BEHAVIOUR_LOSSES)
@pytest.mark.parametrize("aggregation", ["seq-mean", "token-mean"])
def test_on_policy_behaviour_losses_give_the_policy_gradient(
    name: str, aggregation: Aggregation
) -> None:
    base, mask, adv = stale_batch(9)
    cfg = settings_for(name, aggregation=aggregation)
    grad, stats = _grad(name, base, mask, adv, base.clone(), cfg)
    ref_cfg = ReinforceLoss(aggregation="token-mean" if name == "dapo" else aggregation)
    ref, _ = _grad("reinforce", base, mask, adv, None, ref_cfg)
    torch.testing.assert_close(grad, ref, rtol=1e-5, atol=1e-7)
    assert stats["clip_fraction"] == 0.0
    assert stats["ratio_mean"] == pytest.approx(1.0)
    assert stats["ratio_max"] == pytest.approx(1.0)


def _ratios_away_from_edges(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Log-ratios spread over [-0.6, 0.6] but never within 0.01 of a clip edge."""
    gen = torch.Generator().manual_seed(seed)
    r = 0.45 + 0.9 * torch.rand(shape, generator=gen)
    edges = torch.tensor([0.8, 1.2, 1.28, 2.0])
    near = (r[..., None] - edges).abs().min(dim=-1).values < 0.01
    return torch.log(torch.where(near, torch.ones_like(r), r))


@pytest.mark.parametrize("name", ["grpo", "dapo"])
def test_token_clipping_engages_exactly_outside_the_range(name: str) -> None:
    base, mask, adv = stale_batch(4)
    log_r = _ratios_away_from_edges(tuple(base.shape), 1)
    behaviour = base - log_r
    cfg = DapoLoss() if name == "dapo" else GrpoLoss()
    high = 1 + (cfg.clip_eps_high if isinstance(cfg, DapoLoss) else cfg.clip_eps)
    low = 1 - cfg.clip_eps
    grad, stats = _grad(name, base, mask, adv, behaviour, cfg)
    ratio = torch.exp(log_r)
    a = adv[:, None].expand_as(ratio)
    clipped = ((a > 0) & (ratio > high)) | ((a < 0) & (ratio < low))
    # Unclipped tokens: d/dlp of -r*A, normalised like the reinforce reference.
    agg: Aggregation = "token-mean" if name == "dapo" else "seq-mean"
    ref, _ = _grad("reinforce", base, mask, adv, None, ReinforceLoss(aggregation=agg))
    expected = torch.where(clipped, torch.zeros_like(ref), ref * ratio)
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-7)
    assert 0 < clipped[mask].sum() < mask.sum()
    assert stats["clip_fraction"] == pytest.approx(clipped[mask].float().mean().item())
    assert stats["ratio_max"] == pytest.approx(ratio[mask].max().item(), rel=1e-5)


def test_gspo_clips_whole_sequences_outside_the_range() -> None:
    base, mask, adv = stale_batch(6)
    fmask = mask.float()
    gen = torch.Generator().manual_seed(3)
    seq_log_r = torch.log(
        torch.tensor([0.5, 0.9, 1.1, 1.5])[torch.randint(0, 4, (len(adv),), generator=gen)]
    )
    # Token log-ratios that differ within a response (+-0.7 around the sequence's), with
    # the sequence's as their mean: exp(mean log r) and the mean of the token ratios
    # (~1.27x larger) then disagree, and so do their clip decisions.
    sign = torch.where(torch.arange(base.shape[1]) % 2 == 0, 1.0, -1.0).expand_as(base)
    wiggle = 0.7 * sign * fmask
    wiggle = (wiggle - (wiggle.sum(1) / fmask.sum(1))[:, None]) * fmask
    log_r = seq_log_r[:, None] + wiggle
    behaviour = base - log_r
    grad, stats = _grad("gspo", base, mask, adv, behaviour, None)
    s = torch.exp(seq_log_r)
    clipped = ((adv > 0) & (s > 1.2)) | ((adv < 0) & (s < 0.8))
    ref, _ = _grad("reinforce", base, mask, adv, None, None)
    expected = torch.where(clipped[:, None], torch.zeros_like(ref), ref * s[:, None]) * fmask
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-7)
    assert 0 < clipped.sum() < len(adv)
    assert stats["clip_fraction"] == pytest.approx(clipped.float().mean().item())
    assert stats["ratio_mean"] == pytest.approx(s.mean().item(), rel=1e-5)
    # The mutant (arithmetic mean of token ratios) clips other responses: this test sees it.
    arith = (torch.exp(log_r) * fmask).sum(1) / fmask.sum(1)
    arith_clipped = ((adv > 0) & (arith > 1.2)) | ((adv < 0) & (arith < 0.8))
    assert not torch.equal(arith_clipped, clipped)


def test_tis_truncates_exactly_above_the_cap() -> None:
    base, mask, adv = stale_batch(8)
    gen = torch.Generator().manual_seed(2)
    ratio = torch.exp(torch.empty(base.shape).uniform_(-1.5, 1.5, generator=gen))
    behaviour = base - torch.log(ratio)
    grad, stats = _grad("tis", base, mask, adv, behaviour, TisLoss(tis_cap=2.0))
    ref, _ = _grad("reinforce", base, mask, adv, None, None)
    torch.testing.assert_close(grad, ref * ratio.clamp(max=2.0), rtol=1e-5, atol=1e-7)
    truncated = ratio[mask] > 2.0
    assert 0 < truncated.sum() < mask.sum()
    assert stats["clip_fraction"] == pytest.approx(truncated.float().mean().item())


@st.composite
def batches(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    b = draw(st.integers(1, 5))
    t = draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([draw(st.integers(0, t)) for _ in range(b)])
    mask = torch.arange(t)[None, :] < lengths[:, None]
    lp = -torch.rand(b, t, generator=gen) * draw(st.sampled_from([1e-9, 1e-3, 1.0, 5.0]))
    adv = torch.randn(b, generator=gen)
    behaviour = lp - 0.5 * torch.randn(b, t, generator=gen)
    return lp, mask, adv, behaviour


@settings(max_examples=40, deadline=None)
@given(data=batches(), pad_cols=st.integers(0, 3), pad_rows=st.integers(0, 2))
def test_padding_never_changes_any_loss(
    data: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    pad_cols: int,
    pad_rows: int,
) -> None:
    lp, mask, adv, behaviour = data
    b, t = lp.shape

    def pad(x: torch.Tensor, fill: float) -> torch.Tensor:
        wide = torch.cat([x, torch.full((b, pad_cols), fill, dtype=x.dtype)], dim=1)
        return torch.cat([wide, torch.full((pad_rows, t + pad_cols), fill, dtype=x.dtype)])

    # Garbage (even -inf) at padded positions must not leak into the loss.
    p_lp, p_beh = pad(lp, -math.inf), pad(behaviour, 3.0)
    p_mask = pad(mask.float(), 0.0).bool()
    p_adv = torch.cat([adv, torch.randn(pad_rows)])
    aggregations: tuple[Aggregation, ...] = ("seq-mean", "token-mean")
    for aggregation in aggregations:
        for name in LOSSES:
            cfg = settings_for(name, aggregation=aggregation)
            x = lp.clone().requires_grad_(True)
            p_x = p_lp.clone().requires_grad_(True)
            loss, stats = compute_loss(name, x, mask, adv, behaviour, cfg)
            p_loss, p_stats = compute_loss(name, p_x, p_mask, p_adv, p_beh, cfg)
            assert p_loss.item() == pytest.approx(loss.item(), rel=1e-5, abs=1e-6), name
            for key, value in stats.items():
                assert p_stats[key] == pytest.approx(value, rel=1e-5, abs=1e-6), (name, key)
            # The gradient too: the same on real tokens, exactly zero on padding.
            (grad,) = torch.autograd.grad(loss, x, allow_unused=True, materialize_grads=True)
            (p_grad,) = torch.autograd.grad(p_loss, p_x, allow_unused=True, materialize_grads=True)
            torch.testing.assert_close(p_grad[:b, :t], grad, rtol=1e-5, atol=1e-7, msg=name)
            assert torch.all(p_grad[:b, t:] == 0) and torch.all(p_grad[b:] == 0), name


@settings(max_examples=30, deadline=None)
@given(data=batches())
def test_no_nan_or_inf_for_tiny_nll_or_empty_rows(
    data: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
) -> None:
    lp, mask, adv, behaviour = data
    mask = mask.clone()
    mask[0] = False  # one response with no tokens at all
    lp = lp.clone()
    lp[-1] = 0.0  # and one the policy is certain of (NLL exactly 0)
    aggregations: tuple[Aggregation, ...] = ("seq-mean", "token-mean")
    for aggregation in aggregations:
        for name in LOSSES:
            cfg = settings_for(name, aggregation=aggregation)
            x = lp.clone().requires_grad_(True)
            loss, stats = compute_loss(name, x, mask, adv, behaviour, cfg)
            loss.backward()
            assert x.grad is not None
            assert torch.isfinite(loss), name
            assert torch.isfinite(x.grad).all(), name
            assert all(math.isfinite(v) for v in stats.values()), (name, stats)


def test_all_stats_are_reported_by_every_loss() -> None:
    lp, mask, adv = stale_batch(1)
    keys = {
        "loss",
        "loss_positive",
        "loss_negative",
        "loss_balance",
        "nll_positive",
        "nll_negative",
    }
    ratio_keys = {"clip_fraction", "ratio_mean", "ratio_max"}
    for name in LOSSES:
        _, s = compute_loss(name, lp, mask, adv, lp.clone())
        assert keys <= set(s), name
        assert (ratio_keys <= set(s)) == needs_behaviour_logprobs(name), name
        assert all(isinstance(v, float) for v in s.values())
        assert s["loss_balance"] == pytest.approx(s["loss_positive"] + s["loss_negative"])


def verl_pg_losses(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    cliprange_low: float,
    cliprange_high: float,
    clip_ratio_c: float,
) -> torch.Tensor:
    """Token losses of verl's ``compute_policy_loss_vanilla`` (verl/trainer/ppo/core_algos.py,
    volcengine/verl HEAD), the math copied unchanged; aggregation is left to the caller."""
    negative_approx_kl = log_prob - old_log_prob
    negative_approx_kl = torch.clamp(negative_approx_kl, min=-20.0, max=20.0)
    ratio = torch.exp(negative_approx_kl)
    pg_losses1 = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1 - cliprange_low, 1 + cliprange_high)
    clip_pg_losses1 = torch.maximum(pg_losses1, pg_losses2)
    pg_losses3 = -advantages * clip_ratio_c
    clip_pg_losses2 = torch.min(pg_losses3, clip_pg_losses1)
    pg_losses = torch.where(advantages < 0, clip_pg_losses2, clip_pg_losses1)
    return pg_losses


def _verl_agg(pg_losses: torch.Tensor, mask: torch.Tensor, mode: Aggregation) -> torch.Tensor:
    """verl's agg_loss: "token-mean", or "seq-mean-token-mean" for our seq-mean."""
    m = mask.float()
    if mode == "token-mean":
        return (pg_losses * m).sum() / m.sum()
    return ((pg_losses * m).sum(-1) / m.sum(-1)).mean()


@pytest.mark.parametrize("name", ["grpo", "dapo"])
@pytest.mark.parametrize("clip_ratio_c", [3.0, 1.5])
def test_dual_clip_matches_verl(name: str, clip_ratio_c: float) -> None:
    base, mask, adv = stale_batch(11)
    gen = torch.Generator().manual_seed(5)
    # Ratios up to e^2.5 ~ 12: stale A < 0 tokens far beyond the dual-clip bound.
    log_r = torch.empty(base.shape).uniform_(-1.5, 2.5, generator=gen)
    behaviour = base - log_r
    cfg = (
        DapoLoss(clip_ratio_c=clip_ratio_c)
        if name == "dapo"
        else GrpoLoss(clip_ratio_c=clip_ratio_c)
    )
    agg = cfg.aggregation
    high = cfg.clip_eps_high if isinstance(cfg, DapoLoss) else cfg.clip_eps
    lp = base.clone().requires_grad_(True)
    loss, _ = compute_loss(name, lp, mask, adv, behaviour, cfg)
    (grad,) = torch.autograd.grad(loss, lp)
    ref_lp = base.clone().requires_grad_(True)
    a = adv[:, None].expand_as(base)
    ref_loss = _verl_agg(
        verl_pg_losses(behaviour, ref_lp, a, cfg.clip_eps, high, clip_ratio_c), mask, agg
    )
    (ref_grad,) = torch.autograd.grad(ref_loss, ref_lp)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6)
    torch.testing.assert_close(grad * mask, ref_grad * mask, rtol=1e-5, atol=1e-8)
    dual = (a < 0) & (torch.exp(log_r) > clip_ratio_c) & mask
    assert dual.sum() > 5  # the dual clip really engaged
    assert torch.all(grad[dual] == 0)
    # Off: the plain clipped surrogate, whose A < 0 loss grows with the ratio.
    off = cfg.model_copy(update={"clip_ratio_c": 0.0})
    off_loss, _ = compute_loss(name, base, mask, adv, behaviour, off)
    plain = torch.maximum(-a * torch.exp(log_r), -a * torch.exp(log_r).clamp(0.8, 1 + high))
    assert off_loss.item() == pytest.approx(_verl_agg(plain, mask, agg).item(), rel=1e-6)
    assert off_loss.item() > loss.item()


def test_gspo_dual_clip_caps_each_stale_negative_response() -> None:
    base, mask, adv = stale_batch(12)
    seq_log_r = torch.tensor([2.0, 0.0, -0.5, 1.5])[torch.arange(len(adv)) % 4]
    behaviour = base - seq_log_r[:, None]
    lp = base.clone().requires_grad_(True)
    loss, _ = compute_loss("gspo", lp, mask, adv, behaviour, GspoLoss(clip_ratio_c=3.0))
    (grad,) = torch.autograd.grad(loss, lp)
    s = torch.exp(seq_log_r)
    capped = (adv < 0) & (s > 3.0)
    assert capped.any()
    assert torch.all(grad[capped] == 0)
    per = torch.maximum(-s * adv, -s.clamp(0.8, 1.2) * adv)
    per = torch.where(capped, -3.0 * adv, per)
    assert loss.item() == pytest.approx(per.mean().item(), rel=1e-6)


def test_clip_ratio_c_must_be_off_or_above_one() -> None:
    with pytest.raises(ValueError, match="clip_ratio_c"):
        GrpoLoss(clip_ratio_c=1.0)
    GrpoLoss(clip_ratio_c=0.0)


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("aggregation", ["seq-mean", "token-mean"])
def test_analytic_logit_gradient_norms_match_autograd(name: str, aggregation: Aggregation) -> None:
    gen = torch.Generator().manual_seed(21)
    b, t, v = 8, 7, 11
    logits = (2 * torch.randn(b, t, v, generator=gen)).requires_grad_(True)
    targets = torch.randint(0, v, (b, t), generator=gen)
    lengths = torch.tensor([7, 3, 5, 1, 6, 7, 2, 4])
    mask = torch.arange(t)[None, :] < lengths[:, None]
    adv = torch.tensor([1.2, -0.4, 0.7, -1.5, 0.0, -0.3, 0.9, -0.6])
    logp_all = torch.log_softmax(logits, dim=-1)
    logprobs = logp_all.gather(-1, targets[..., None]).squeeze(-1)
    # Ratios in [0.4, 4]: clips, dual clips and truncations all active somewhere.
    behaviour = logprobs.detach() - torch.empty(b, t).uniform_(-0.9, 1.4, generator=gen)
    cfg = settings_for(name, aggregation=aggregation)
    # Autograd on the logits: the reference.
    loss, _ = compute_loss(name, logprobs, mask, adv, behaviour, cfg)
    (dz,) = torch.autograd.grad(loss, logits)
    reference = dz.norm(dim=-1) * mask
    # Analytic: w = dL/dlog p from the loss alone, then |w| sqrt(sum p^2 - 2 p_y + 1).
    lp = logprobs.detach().requires_grad_(True)
    loss2, _ = compute_loss(name, lp, mask, adv, behaviour, cfg)
    (w,) = torch.autograd.grad(loss2, lp)
    p = logp_all.detach().exp()
    analytic = logit_grad_norms(w, lp.detach(), (p * p).sum(-1)) * mask
    torch.testing.assert_close(analytic, reference, rtol=1e-4, atol=1e-7)
    assert reference.sum() > 0


def _update_split(
    name: str, logits: torch.Tensor, targets: torch.Tensor, adv: torch.Tensor
) -> float:
    """Positive share of sum_t ||dL/dz_t|| (the learner's update split) on given logits."""
    logp_all = torch.log_softmax(logits, dim=-1)
    lp = logp_all.gather(-1, targets[..., None]).squeeze(-1).requires_grad_(True)
    mask = torch.ones_like(lp, dtype=torch.bool)
    loss, _ = compute_loss(name, lp, mask, adv)
    (w,) = torch.autograd.grad(loss, lp)
    p = logp_all.exp()
    per_row = logit_grad_norms(w, lp.detach(), (p * p).sum(-1)).sum(dim=1)
    pos, neg = per_row[adv > 0].sum(), per_row[adv < 0].sum()
    return float(pos / (pos + neg))


def test_asympo_reverses_the_stale_update_imbalance_at_the_logits() -> None:
    """Stale data: the policy is sure of its positives (NLL ~0.1), not of its negatives (~3).

    REINFORCE's logit update is dominated by the negatives; ASymPO's by the positives (it
    reverses the imbalance rather than removing it, which is what the learner monitors).
    """
    gen = torch.Generator().manual_seed(0)
    b, t, v = 8, 6, 16
    targets = torch.randint(0, v, (b, t), generator=gen)
    adv = torch.tensor([1.0, 1.0, 1.0, 1.0, -1.0, -1.0, -1.0, -1.0])
    logits = torch.randn(b, t, v, generator=gen)
    boost = torch.where(adv > 0, 6.0, -1.0)[:, None].expand(b, t)
    logits = logits.scatter_add(-1, targets[..., None], boost[..., None])
    assert _update_split("reinforce", logits, targets, adv) < 0.35
    assert _update_split("asympo", logits, targets, adv) > 0.65
