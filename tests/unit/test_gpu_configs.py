"""The ready GPU configs (configs/*.yaml) load with the project's loader and fit the node."""

from __future__ import annotations

from pathlib import Path

import pytest

from asympo.config import load_settings
from asympo.model.sizing import ARCHS, learner_memory

CONFIGS = sorted((Path(__file__).parents[2] / "configs").glob("*.yaml"))
ARCH_OF = {
    "Qwen/Qwen3-1.7B-Base": "qwen3-1.7b",
    "Qwen/Qwen3-4B-Base": "qwen3-4b",
    "meta-llama/Llama-3.2-3B-Instruct": "llama-3.2-3b",
}


def test_there_is_a_config_per_paper_model_and_task() -> None:
    names = {p.stem for p in CONFIGS}
    for model in ("qwen3-1.7b-base", "qwen3-4b-base", "llama-3.2-3b-instruct"):
        for task in ("gsm8k", "math"):
            assert f"{model}-{task}" in names


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_loads_and_fits_four_80gb_learner_gpus(path: Path) -> None:
    settings = load_settings(path)
    assert settings.learner.strategy == "fsdp" and settings.learner.mixed_precision == "bf16"
    assert settings.rollout.dtype == "bfloat16" and settings.model.dtype == "float32"
    assert settings.task.name in path.stem
    arch = ARCHS[ARCH_OF[settings.model.path]]
    memory = learner_memory(
        arch,
        "fsdp",
        4,
        settings.learner.max_tokens_per_micro_batch,
        settings.learner.activation_checkpointing,
    )
    assert memory["total"] < 0.8 * 80  # leaves room for the allocator and NCCL buffers
