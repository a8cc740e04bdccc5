"""Token-budget micro-batches: a partition under the budget, and the full-batch gradient."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from asympo.rl.losses import loss_settings
from asympo.rl.training import StepConfig, TrainGroup, plan_micro_batches, train_step
from tests.unit.test_learner_step import VOCAB, fixed_groups, tiny_model, with_behaviour


@settings(max_examples=200, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 300), max_size=60),
    max_tokens=st.integers(0, 1000),
    max_seqs=st.integers(1, 20),
)
def test_plan_is_a_partition_within_the_budget(
    lengths: list[int], max_tokens: int, max_seqs: int
) -> None:
    plan = plan_micro_batches(lengths, max_tokens, max_seqs)
    assert sorted(i for mb in plan for i in mb) == list(range(len(lengths)))
    for mb in plan:
        assert 1 <= len(mb) <= max_seqs
        cost = len(mb) * max(lengths[i] for i in mb)
        # Only a sequence alone may exceed the budget (it cannot be split).
        assert max_tokens == 0 or cost <= max_tokens or len(mb) == 1


def test_plan_groups_similar_lengths_and_fills_the_budget() -> None:
    lengths = [10, 100, 12, 95, 11, 400]
    plan = plan_micro_batches(lengths, 200, 32)
    assert plan == [[5], [1, 3], [2, 4, 0]]  # 400 alone; 2x100; 3x12 instead of 6x400
    assert plan_micro_batches(lengths, 0, 4) == [[5, 1, 3, 2], [4, 0]]
    with pytest.raises(ValueError, match="micro_batch"):
        plan_micro_batches(lengths, 100, 0)


def _long_and_short_groups() -> list[TrainGroup]:
    gen = torch.Generator().manual_seed(7)

    def toks(n: int) -> list[int]:
        return [int(t) for t in torch.randint(1, VOCAB, (n,), generator=gen)]

    long_group = TrainGroup(
        "long", toks(6), [toks(30), toks(2), toks(25), toks(3)], [1.0, 0.0, 0.0, 1.0], [0] * 4
    )
    return [*fixed_groups(), long_group]


@pytest.mark.parametrize("loss", ["asympo", "dapo"])
@pytest.mark.parametrize("budget", [1, 24, 60])
def test_token_budget_gives_the_gradient_of_one_big_batch(loss: str, budget: int) -> None:
    groups = _long_and_short_groups()
    if loss == "dapo":  # token-mean with behaviour log-probs: a different weighting
        groups = [
            TrainGroup(
                g.group_id,
                g.prompt_tokens,
                g.completions,
                g.rewards,
                g.versions,
                [[-1.5] * len(c) for c in g.completions],
            )
            for g in groups
        ]
    results = []
    for max_tokens, micro in ((0, 1000), (budget, 1000)):
        model = tiny_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        cfg = StepConfig(
            loss=loss_settings(loss),
            micro_batch=micro,
            max_tokens_per_micro_batch=max_tokens,
            grad_clip=0.0,
        )
        stats = train_step(model, opt, groups, cfg)
        results.append((stats, torch.cat([p.detach().flatten() for p in model.parameters()])))
    (one, one_params), (split, split_params) = results
    lengths = [len(g.prompt_tokens) + len(c) for g in groups for c in g.completions]
    assert len(plan_micro_batches(lengths, budget, 1000)) >= 3  # the budget really splits
    torch.testing.assert_close(split_params, one_params, rtol=1e-5, atol=1e-6)
    for key in ("loss", "grad_norm", "tokens", "samples", "entropy"):
        assert split[key] == pytest.approx(one[key], rel=1e-5, abs=1e-7), key
    # The update is real: weights moved.
    assert not torch.equal(one_params, torch.cat([p.flatten() for p in tiny_model().parameters()]))


@pytest.mark.parametrize("loss", ["asympo", "spo", "grpo", "gspo", "tis"])
def test_micro_batched_step_reports_the_one_batch_metrics(loss: str) -> None:
    """Every logged value of a step split into uneven micro-batches equals the unsplit one's.

    Micro-batches of 2 over responses of 1..7 tokens: their losses, token counts and ratio
    counts all differ, so a statistic averaged per micro-batch (instead of summed and
    divided once, globally) or a maximum taken from one micro-batch shows here.
    """
    groups = with_behaviour(fixed_groups(), seed=7)
    results = []
    for micro in (1000, 2):
        model = tiny_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        cfg = StepConfig(loss=loss_settings(loss), micro_batch=micro, grad_clip=0.5)
        stats = train_step(model, opt, groups, cfg)
        results.append((stats, torch.cat([p.detach().flatten() for p in model.parameters()])))
    (one, one_params), (split, split_params) = results
    lengths = [len(g.prompt_tokens) + len(c) for g in groups for c in g.completions]
    assert len(plan_micro_batches(lengths, 0, 2)) >= 4
    assert set(split) == set(one)
    # The balance is a difference of two fp32 sums: its rounding is theirs.
    scale = abs(one["loss_positive"]) + abs(one["loss_negative"])
    for key, value in one.items():
        tol = 1e-6 * scale if key == "loss_balance" else 1e-6
        assert split[key] == pytest.approx(value, rel=1e-5, abs=tol), key
    torch.testing.assert_close(split_params, one_params, rtol=1e-5, atol=1e-6)
    if "clip_fraction" in one:  # the ratio statistics are really exercised
        assert 0 < one["clip_fraction"] < 1 and one["ratio_max"] > one["ratio_mean"] > 0
