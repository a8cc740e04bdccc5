"""One learner step against a reference computed independently, sequence by sequence."""

from __future__ import annotations

import copy
import dataclasses
import inspect
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from asympo.rl.loss_settings import DapoLoss, GrpoLoss, ReinforceLoss
from asympo.rl.losses import MissingBehaviourLogprobs, loss_settings
from asympo.rl.probe import make_probe, probe_logprobs, probe_tokens
from asympo.rl.training import (
    StepConfig,
    TrainGroup,
    flatten_groups,
    token_logprobs,
    train_step,
    untrainable_reason,
)
from asympo.v1 import records_pb2
from services.learner.records import group_from_scored

VOCAB = 64


def tiny_model(seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        pad_token_id=0,
    )
    return Qwen2ForCausalLM(cfg).float()


def fixed_groups() -> list[TrainGroup]:
    gen = torch.Generator().manual_seed(1)

    def toks(n: int) -> list[int]:
        return [int(t) for t in torch.randint(1, VOCAB, (n,), generator=gen)]

    return [
        TrainGroup(
            "g0", toks(5), [toks(3), toks(6), toks(1), toks(4)], [1.0, 0.0, 0.0, 1.0], [3, 3, 2, 3]
        ),
        TrainGroup("g1", toks(3), [toks(7), toks(2), toks(5)], [0.0, 1.0, 0.5], [4, 4, 4]),
        TrainGroup("g2", toks(4), [toks(2), toks(3)], [1.0, 1.0], [4, 4]),  # no signal
    ]


def reference_gradient_step(
    model: Qwen2ForCausalLM,
    groups: list[TrainGroup],
    lr: float,
    clip: float,
    loss: str,
    entropy_coef: float = 0.0,
    kl_coef: float = 0.0,
    reference: Qwen2ForCausalLM | None = None,
) -> tuple[float, float, float, float, float]:
    """ASymPO / REINFORCE seq-mean written out by hand, one unpadded sequence at a time.

    Returns the loss, the gradient norm before clipping, the mean completion-token entropy
    and the summed norms of dL/dlogits over the positive and the negative responses'
    completion tokens (by autograd on the logits). ``entropy_coef`` adds the entropy bonus
    to what is differentiated (minus the coefficient times the mean over all completion
    tokens); the returned loss is the policy loss alone, as the step reports it.
    ``kl_coef`` adds the k3 KL estimate towards ``reference`` (mean over completion tokens).
    """
    terms = []
    entropies = []
    bonus_terms = []
    kl_terms = []
    side_logits: list[tuple[torch.Tensor, int, float]] = []
    for g in groups:
        r = torch.tensor(g.rewards)
        std = r.std(correction=0)
        adv = torch.zeros_like(r) if bool((r == r[0]).all()) else (r - r.mean()) / (std + 1e-6)
        for completion, a in zip(g.completions, adv, strict=True):
            ids = torch.tensor([g.prompt_tokens + completion])
            logits = model(input_ids=ids).logits[0, :-1].float()
            logits.retain_grad()
            side_logits.append((logits, len(g.prompt_tokens) - 1, float(a)))
            logp = torch.log_softmax(logits, dim=-1)
            targets = ids[0, 1:]
            lp = logp[torch.arange(len(targets)), targets][len(g.prompt_tokens) - 1 :]
            if reference is not None:
                with torch.no_grad():
                    ref_logp = torch.log_softmax(reference(input_ids=ids).logits[0, :-1], dim=-1)
                ref_lp = ref_logp[torch.arange(len(targets)), targets][len(g.prompt_tokens) - 1 :]
                d = ref_lp - lp
                kl_terms.append(torch.exp(d) - d - 1)
            completion_logp = logp[len(g.prompt_tokens) - 1 :]
            bonus_terms.append(-(completion_logp.exp() * completion_logp).sum(dim=-1))
            completion_logp = completion_logp.detach()
            entropies.append(-(completion_logp.exp() * completion_logp).sum(dim=-1))
            m = -lp.mean()
            if loss == "asympo":
                terms.append(a * m / m.detach().clamp(min=1e-4))
            else:
                terms.append(a * m)
    total = torch.stack(terms).mean()
    model.zero_grad()
    objective = total - entropy_coef * torch.cat(bonus_terms).mean()
    if kl_terms:
        objective = objective + kl_coef * torch.cat(kl_terms).mean()
    objective.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    norm = torch.sqrt(torch.stack([(g**2).sum() for g in grads]).sum())
    split = {1: 0.0, -1: 0.0}
    for logits, start, a in side_logits:
        assert logits.grad is not None
        if a != 0:
            split[1 if a > 0 else -1] += float(logits.grad[start:].norm(dim=-1).sum())
    scale = min(1.0, clip / (float(norm) + 1e-6))
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p.sub_(lr * scale * p.grad)
    entropy = float(torch.cat(entropies).mean())
    return float(total.detach()), float(norm), entropy, split[1], split[-1]


@pytest.mark.parametrize("loss", ["asympo", "reinforce"])
@pytest.mark.parametrize("micro_batch", [1, 4, 64])
def test_step_matches_the_independent_reference(loss: str, micro_batch: int) -> None:
    groups = fixed_groups()
    model = tiny_model()
    ref = copy.deepcopy(model)
    lr, clip = 0.05, 0.1
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    stats = train_step(
        model,
        opt,
        groups,
        StepConfig(loss=loss_settings(loss), micro_batch=micro_batch, grad_clip=clip),
    )
    ref_loss, ref_norm, ref_entropy, ref_pos, ref_neg = reference_gradient_step(
        ref, groups, lr, clip, loss
    )

    assert stats["loss"] == pytest.approx(ref_loss, abs=1e-6)
    assert stats["grad_norm"] == pytest.approx(ref_norm, rel=1e-4)
    assert ref_norm > clip  # the clip engaged, so it is tested too
    for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    assert stats["zero_adv_groups"] == 1.0
    assert stats["groups"] == 3.0 and stats["samples"] == 9.0
    assert stats["tokens"] == 33.0
    assert stats["reward_mean"] == pytest.approx(5.5 / 9)
    assert stats["entropy"] == pytest.approx(ref_entropy, rel=1e-5)
    # The update split at the logits, analytic in the step, autograd in the reference.
    assert stats["update_norm_positive"] == pytest.approx(ref_pos, rel=1e-4)
    assert stats["update_norm_negative"] == pytest.approx(ref_neg, rel=1e-4)
    assert stats["update_share_positive"] == pytest.approx(ref_pos / (ref_pos + ref_neg))
    if loss == "asympo":
        assert abs(stats["loss_balance"]) < 1e-5
        assert stats["loss_positive"] > 0.5
    assert stats["nll_positive"] > 0 and stats["nll_negative"] > 0


@pytest.mark.parametrize("micro_batch", [1, 64])
def test_the_entropy_bonus_matches_the_independent_reference(micro_batch: int) -> None:
    """learner.entropy_coef: the step descends loss - c * (mean completion-token entropy)."""
    groups = fixed_groups()
    model = tiny_model()
    ref, without = copy.deepcopy(model), copy.deepcopy(model)
    lr, clip, coef = 0.05, 10.0, 0.5
    stats = train_step(
        model,
        torch.optim.SGD(model.parameters(), lr=lr),
        groups,
        StepConfig(loss=loss_settings("asympo"), micro_batch=micro_batch, grad_clip=clip,
                   entropy_coef=coef),
    )  # fmt: skip
    ref_loss, ref_norm, ref_entropy, _, _ = reference_gradient_step(
        ref, groups, lr, clip, "asympo", entropy_coef=coef
    )
    plain = train_step(
        without,
        torch.optim.SGD(without.parameters(), lr=lr),
        groups,
        StepConfig(loss=loss_settings("asympo"), micro_batch=micro_batch, grad_clip=clip),
    )

    assert stats["loss"] == pytest.approx(ref_loss, abs=1e-6)
    assert stats["entropy"] == pytest.approx(ref_entropy, rel=1e-5)
    assert stats["grad_norm"] == pytest.approx(ref_norm, rel=1e-4)
    assert ref_norm < clip  # unclipped: the parameters below show the bonus's own gradient
    for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    # ... and the bonus did something: the same step without it lands elsewhere.
    assert plain["grad_norm"] != pytest.approx(stats["grad_norm"], rel=1e-3)


@pytest.mark.parametrize("micro_batch", [1, 64])
def test_the_kl_penalty_matches_the_independent_reference(micro_batch: int) -> None:
    """learner.kl_coef: the step descends loss + c * mean k3(log ref - log pi)."""
    groups = fixed_groups()
    model, reference = tiny_model(), tiny_model(seed=1)  # different weights: KL > 0
    ref = copy.deepcopy(model)
    lr, clip, coef = 0.05, 10.0, 0.5
    stats = train_step(
        model,
        torch.optim.SGD(model.parameters(), lr=lr),
        groups,
        StepConfig(loss=loss_settings("asympo"), micro_batch=micro_batch, grad_clip=clip,
                   kl_coef=coef),
        reference=reference,
    )  # fmt: skip
    _, ref_norm, _, _, _ = reference_gradient_step(
        ref, groups, lr, clip, "asympo", kl_coef=coef, reference=reference
    )
    assert stats["grad_norm"] == pytest.approx(ref_norm, rel=1e-4)
    assert ref_norm < clip
    for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    assert stats["kl"] > 1e-3


def test_the_kl_penalty_of_the_policy_itself_is_zero_and_changes_nothing() -> None:
    groups = fixed_groups()
    model = tiny_model()
    with_kl, plain = copy.deepcopy(model), copy.deepcopy(model)
    cfg = StepConfig(loss=loss_settings("asympo"), grad_clip=10.0)
    a = train_step(with_kl, torch.optim.SGD(with_kl.parameters(), lr=0.05), groups,
                   dataclasses.replace(cfg, kl_coef=1.0), reference=model)  # fmt: skip
    b = train_step(plain, torch.optim.SGD(plain.parameters(), lr=0.05), groups, cfg)
    assert a["kl"] == 0.0 and "kl" not in b
    for p, q in zip(with_kl.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_a_kl_penalty_without_a_reference_is_refused() -> None:
    model = tiny_model()
    with pytest.raises(ValueError, match="reference"):
        train_step(model, torch.optim.SGD(model.parameters(), lr=0.1), fixed_groups(),
                   StepConfig(kl_coef=0.1))  # fmt: skip


def test_a_negative_entropy_coefficient_is_refused() -> None:
    with pytest.raises(ValueError, match="entropy_coef"):
        StepConfig(entropy_coef=-0.1)


def with_behaviour(groups: list[TrainGroup], seed: int) -> list[TrainGroup]:
    """``groups`` with behaviour log-probs near the tiny model's (ratios ~0.4..2.5)."""
    gen = torch.Generator().manual_seed(seed)
    return [
        dataclasses.replace(
            g,
            behaviour_logprobs=[
                (-4.2 + 1.8 * torch.rand(len(c), generator=gen) - 0.9).tolist()
                for c in g.completions
            ],
        )
        for g in groups
    ]


def reference_dapo_step(model: Qwen2ForCausalLM, groups: list[TrainGroup], lr: float) -> float:
    """DAPO written out by hand: dual-clipped clip-higher token losses, token-mean, plain SGD."""
    cfg = DapoLoss()
    token_losses = []
    for g in groups:
        assert g.behaviour_logprobs is not None
        r = torch.tensor(g.rewards)
        std = r.std(correction=0)
        adv = torch.zeros_like(r) if bool((r == r[0]).all()) else (r - r.mean()) / (std + 1e-6)
        for completion, a, beh in zip(g.completions, adv, g.behaviour_logprobs, strict=True):
            ids = torch.tensor([g.prompt_tokens + completion])
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
            lp = logp[torch.arange(ids.shape[1] - 1), ids[0, 1:]][len(g.prompt_tokens) - 1 :]
            ratio = torch.exp(lp - torch.tensor(beh))
            ell = torch.maximum(
                -a * ratio, -a * ratio.clamp(1 - cfg.clip_eps, 1 + cfg.clip_eps_high)
            )
            if a < 0:
                ell = torch.minimum(ell, -a * cfg.clip_ratio_c)
            token_losses.append(ell)
    total = torch.cat(token_losses).mean()
    model.zero_grad()
    total.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p.sub_(lr * p.grad)
    return float(total.detach())


def test_micro_batching_does_not_change_token_mean_dapo_either() -> None:
    groups = with_behaviour(fixed_groups(), seed=4)
    ref = tiny_model()
    ref_loss = reference_dapo_step(ref, groups, lr=0.1)
    for micro in (1, 3, 100):
        model = tiny_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        cfg = StepConfig(loss=DapoLoss(), micro_batch=micro, grad_clip=0.0)
        stats = train_step(model, opt, groups, cfg)
        assert stats["loss"] == pytest.approx(ref_loss, abs=1e-6), micro
        assert 0 < stats["clip_fraction"] < 1, micro
        for p, q in zip(model.parameters(), ref.parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=f"micro {micro}")


def test_an_empty_response_is_dropped_before_the_advantages() -> None:
    """The rule: an empty response leaves its group before advantages; the group stays zero-sum.

    Training a group with an empty response must equal training it without that response.
    """
    g = fixed_groups()[0]
    with_empty = dataclasses.replace(
        g,
        completions=[*g.completions, []],
        rewards=[*g.rewards, 1.0],
        versions=[*g.versions, 3],
    )
    seqs, _ = flatten_groups([with_empty], StepConfig())
    assert len(seqs) == len(g.completions)
    assert abs(sum(s.advantage for s in seqs)) < 1e-12
    results = []
    for groups in ([with_empty], [g]):
        model = tiny_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        stats = train_step(model, opt, groups, StepConfig(loss=ReinforceLoss(), grad_clip=0.0))
        results.append((stats, torch.cat([p.detach().flatten() for p in model.parameters()])))
    torch.testing.assert_close(results[0][1], results[1][1])
    assert results[0][0]["loss_balance"] == pytest.approx(results[1][0]["loss_balance"])
    assert results[0][0]["reward_mean"] == pytest.approx(results[1][0]["reward_mean"])


@pytest.mark.parametrize(
    ("change", "cfg", "reason"),
    [
        ({}, StepConfig(loss=GrpoLoss()), "missing_behaviour_logprobs"),
        ({"rewards": [1.0, float("nan"), 0.0, 1.0]}, StepConfig(), "non_finite_reward"),
        ({"completions": [[], [], [], []]}, StepConfig(), "no_completion_tokens"),
        ({"completions": [[3], [], [], []]}, StepConfig(advantage="rloo"), "too_few_responses"),
        ({"prompt_tokens": [1, VOCAB]}, StepConfig(), "token_out_of_vocabulary"),
    ],
)
def test_untrainable_groups_are_named_and_refused_by_the_step(
    change: dict[str, object], cfg: StepConfig, reason: str
) -> None:
    g = dataclasses.replace(fixed_groups()[0], **change)  # type: ignore[arg-type]
    bad = untrainable_reason(g, cfg, VOCAB)
    assert bad is not None and bad[0] == reason
    assert untrainable_reason(fixed_groups()[0], StepConfig(), VOCAB) is None
    if reason != "token_out_of_vocabulary":  # the step does not know the vocabulary
        model = tiny_model()
        with pytest.raises(ValueError, match=r"behaviour|untrainable"):
            train_step(model, torch.optim.SGD(model.parameters(), lr=0.1), [g], cfg)


def test_behaviour_loss_without_behaviour_logprobs_is_refused_before_any_update() -> None:
    model = tiny_model()
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(MissingBehaviourLogprobs, match="grpo"):
        train_step(model, opt, fixed_groups(), StepConfig(loss=GrpoLoss()))
    for p, q in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, q)


def test_token_logprobs_align_with_input_ids_and_ignore_right_padding() -> None:
    model = tiny_model()
    ids = torch.tensor([[5, 9, 3, 7], [5, 9, 0, 0]])
    attn = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    lp = token_logprobs(model, ids, attn)
    assert lp.shape == (2, 4)
    assert torch.all(lp[:, 0] == 0)
    torch.testing.assert_close(lp[0, 1:], torch.tensor(probe_logprobs(model, [5, 9, 3, 7])))
    torch.testing.assert_close(lp[1, 1], lp[0, 1])


def test_probe_is_deterministic_and_changes_with_the_weights() -> None:
    tokens = probe_tokens(VOCAB)
    assert tokens == probe_tokens(VOCAB) and len(tokens) == 32
    model = tiny_model()
    probe = make_probe(model, tokens, 1e-3)
    assert len(probe.logprobs) == len(tokens) - 1
    assert all(x < 0 for x in probe.logprobs)
    other = probe_logprobs(tiny_model(seed=1), tokens)
    assert max(abs(a - b) for a, b in zip(probe.logprobs, other, strict=True)) > 1e-3


def test_group_from_scored_record() -> None:
    sample = records_pb2.Sample(
        completion_tokens=[4, 5], version=records_pb2.VersionRange(start=2, end=3)
    )
    rollout = records_pb2.RolloutGroup(
        group_id="run/0:1", prompt_tokens=[1, 2], samples=[sample, sample]
    )
    scored = records_pb2.ScoredGroup(
        rollout=rollout, scores=[records_pb2.SampleScore(reward=1.0), records_pb2.SampleScore()]
    )
    g = group_from_scored(scored)
    assert g.group_id == "run/0:1" and g.prompt_tokens == [1, 2]
    assert g.rewards == [1.0, 0.0] and g.versions == [2, 2] and g.behaviour_logprobs is None
    del scored.scores[1]
    with pytest.raises(ValueError, match="1 scores for 2 samples"):
        group_from_scored(scored)


def test_the_step_reads_the_device_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loss and step statistics stay tensors until one ``tolist()`` at the step's end.

    Counted: every way a tensor's value reaches Python (``item``, ``tolist``, ``float()``,
    ``int()``, ``bool()``) from the step's and the losses' code, micro-batch after
    micro-batch. The advantages are computed on host tensors before the device is touched
    (``flatten_groups``), so they are not reads of the device.
    """
    reads: list[tuple[str, str, str]] = []
    for method in ("item", "tolist", "__float__", "__int__", "__bool__"):
        original = getattr(torch.Tensor, method)

        def counted(
            self: torch.Tensor, *args: object, _m: str = method, _o: Any = original
        ) -> object:
            caller = inspect.stack(context=0)[1]
            reads.append((Path(caller.filename).name, caller.function, _m))
            return _o(self, *args)

        monkeypatch.setattr(torch.Tensor, method, counted)
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    groups = with_behaviour(fixed_groups(), seed=2)
    train_step(model, opt, groups, StepConfig(loss=GrpoLoss(), micro_batch=2))
    ours = [r for r in reads if r[0] in ("training.py", "losses.py") and r[1] != "flatten_groups"]
    assert ours == [("training.py", "train_step", "tolist")]
