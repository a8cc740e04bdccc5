"""The staleness experiment trains with the learner's schedule and entropy bonus settings."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from asympo.experiments.staleness import Policy, StalenessConfig, run_grid
from asympo.model.architecture import TinyArchitecture, build_tiny_model
from asympo.model.char_tokenizer import save_char_tokenizer
from asympo.rl.loss_settings import AsympoLoss
from asympo.rl.schedule import lr_factor

SMALL = StalenessConfig(
    losses=("asympo",), staleness=(1,), seeds=(0,), steps=5, groups_per_step=2,
    samples_per_group=2, lr=1e-3, eval_every=5, eval_size=4, max_tokens=3,
)  # fmt: skip


@pytest.fixture(scope="module")
def policy(tmp_path_factory: pytest.TempPathFactory) -> Policy:
    directory: Path = tmp_path_factory.mktemp("tok")
    save_char_tokenizer(directory, 64)
    arch = TinyArchitecture(
        hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=32,
        max_positions=96,
    )  # fmt: skip
    return Policy(build_tiny_model(arch, seed=3), AutoTokenizer.from_pretrained(directory), "")


def test_each_step_trains_at_the_scheduled_rate(policy: Policy, tmp_path: Path) -> None:
    cfg = dataclasses.replace(SMALL, warmup_steps=2, lr_decay_steps=3, min_lr_ratio=0.2)
    (run,) = run_grid(policy, cfg, tmp_path, resume=False, log=lambda _: None).runs
    expected = [1e-3 * lr_factor(2, 3, 0.2, t) for t in range(cfg.steps)]
    assert [s["lr"] for s in run.steps] == pytest.approx(expected)
    assert expected[0] < expected[1] > expected[3] > expected[4]  # warm-up and decay both ran


def test_the_entropy_bonus_and_the_kl_penalty_reach_the_step(
    policy: Policy, tmp_path: Path
) -> None:
    plain = run_grid(policy, SMALL, tmp_path / "a", resume=False, log=lambda _: None).runs[0]
    bonus_cfg = dataclasses.replace(SMALL, entropy_coef=1.0)
    bonus = run_grid(policy, bonus_cfg, tmp_path / "b", resume=False, log=lambda _: None).runs[0]
    # Same prompts and sampling noise at step 0, so the first gradients differ only by it.
    assert plain.steps[0]["grad_norm"] != pytest.approx(bonus.steps[0]["grad_norm"], rel=1e-3)
    # The untrained model earns no reward here, so the bonus is what moves the policy.
    kl_cfg = dataclasses.replace(SMALL, entropy_coef=1.0, kl_coef=1.0)
    kl = run_grid(policy, kl_cfg, tmp_path / "c", resume=False, log=lambda _: None).runs[0]
    # The reference is the warm start: no KL at step 0, some once the policy moved.
    assert kl.steps[0]["kl"] == 0.0 and kl.steps[-1]["kl"] > 0.0
    assert "kl" not in plain.steps[0]


def test_settings_added_later_keep_earlier_budget_keys() -> None:
    """Runs made before the schedule, bonus and weight cap existed still resume."""
    fields = dataclasses.asdict(SMALL)
    key = SMALL.budget_key("m")
    explicit_off = dataclasses.replace(SMALL, learner_loss=AsympoLoss(weight_cap=0.0))
    assert explicit_off.budget_key("m") == key
    for changed in (
        dataclasses.replace(SMALL, lr_decay_steps=10),
        dataclasses.replace(SMALL, entropy_coef=0.01),
        dataclasses.replace(SMALL, kl_coef=0.01),
        dataclasses.replace(SMALL, learner_loss=AsympoLoss(weight_cap=2.0)),
    ):
        assert changed.budget_key("m") != key
    assert "warmup_steps" in fields
