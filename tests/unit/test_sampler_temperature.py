"""Behaviour log-probs are those of the distribution really sampled, at any temperature.

The learner divides its logits by ``sampling.temperature``; the engine must report the
log-probs of the same tempered distribution, or every behaviour-corrected loss sees a
ratio far from 1 on perfectly fresh data (at T = 0.7 grpo clipped ~45 % of tokens).
The vLLM half of this check is tests/integration/test_vllm_temperature.py.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from asympo.engines import GenerationRequest
from asympo.engines.hf_engine import HFEngine, sampling_logprobs
from asympo.rl.losses import loss_settings
from asympo.rl.training import StepConfig, TrainGroup, train_step
from tests.unit.test_hf_engine import _save

BEHAVIOUR_LOSSES = ("grpo", "dapo", "gspo", "tis")
PROMPTS = ("12+3=", "7-5=", "40+2=")


def fresh_groups(engine: Any, temperature: float) -> list[TrainGroup]:
    """Groups sampled by ``engine`` at ``temperature`` with behaviour log-probs, mixed rewards."""
    requests = [
        GenerationRequest(
            engine.encode(p), n=4, temperature=temperature, max_tokens=8, seed=i, logprobs=True
        )
        for i, p in enumerate(PROMPTS)
    ]
    groups = []
    for i, (request, outs) in enumerate(zip(requests, engine.generate(requests), strict=True)):
        groups.append(
            TrainGroup(
                group_id=f"g{i}",
                prompt_tokens=request.prompt_tokens,
                completions=[c.tokens for c in outs],
                rewards=[1.0, 0.0, 0.0, 1.0],
                versions=[0] * len(outs),
                behaviour_logprobs=[list(c.logprobs or []) for c in outs],
            )
        )
    return groups


def assert_fresh_ratio_is_one(model: torch.nn.Module, groups: list[TrainGroup], t: float) -> None:
    """On fresh data every behaviour-corrected loss sees ratio 1 and clips nothing."""
    for loss in BEHAVIOUR_LOSSES:
        learner = copy.deepcopy(model)
        opt = torch.optim.SGD(learner.parameters(), lr=0.0)
        stats = train_step(
            learner, opt, groups, StepConfig(loss=loss_settings(loss), temperature=t)
        )
        assert stats["ratio_mean"] == pytest.approx(1.0, abs=2e-4), (loss, t, stats)
        assert stats["ratio_max"] == pytest.approx(1.0, abs=1e-3), (loss, t, stats)
        assert stats["clip_fraction"] == 0.0, (loss, t, stats)


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> HFEngine:
    out = tmp_path_factory.mktemp("temp") / "m"
    _save(0, out)
    return HFEngine(str(out))


@pytest.mark.parametrize("temperature", [0.7, 1.0, 1.5])
def test_hf_engine_behaviour_logprobs_give_ratio_one_on_fresh_data(
    engine: HFEngine, temperature: float
) -> None:
    groups = fresh_groups(engine, temperature)
    assert_fresh_ratio_is_one(engine.model, groups, temperature)


def test_sampling_logprobs_are_tempered_and_renormalised_to_the_nucleus() -> None:
    logits = torch.tensor([0.0, 2.0, 1.0, -1.0])
    torch.testing.assert_close(
        sampling_logprobs(logits, 0.5, 1.0), torch.log_softmax(logits / 0.5, dim=-1)
    )
    torch.testing.assert_close(sampling_logprobs(logits, 0.0, 0.3), torch.log_softmax(logits, -1))
    nucleus = sampling_logprobs(logits, 1.0, 0.8)  # p = .09 .67 .24 .03: keeps tokens 1, 2
    kept = torch.log_softmax(torch.tensor([2.0, 1.0]), dim=-1)
    torch.testing.assert_close(nucleus[1:3], kept)
    assert torch.isinf(nucleus[0]) and torch.isinf(nucleus[3])
