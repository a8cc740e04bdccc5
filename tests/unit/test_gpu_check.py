"""scripts/gpu_check.py: what runs without a GPU (model building, inputs, the refusal)."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import torch

from asympo.model.sizing import ARCHS, build_random_model
from asympo.rl.training import plan_micro_batches

SCRIPT = Path(__file__).parents[2] / "scripts" / "gpu_check.py"


def _module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_without_cuda_it_exits_2_with_one_clear_line() -> None:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "gpu_check: no CUDA device here; run it on an NVIDIA GPU node"


def test_random_models_have_the_shape_of_their_architecture() -> None:
    tiny = dataclasses.replace(ARCHS["qwen3-1.7b"], hidden=64, intermediate=96, layers=2, vocab=97)
    tiny = dataclasses.replace(tiny, heads=4, kv_heads=2, head_dim=16)
    model = build_random_model(tiny, seed=0)
    assert sum(p.numel() for p in model.parameters()) == tiny.params()
    logits = model(input_ids=torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, 97)
    again = build_random_model(tiny, seed=0)
    assert torch.equal(model.lm_head.weight, again.lm_head.weight)


def test_synthetic_batch_has_long_and_short_responses_under_the_budget() -> None:
    gpu_check = _module()
    groups = gpu_check.synthetic_groups(1000, seed=0)
    assert len(groups) == gpu_check.GROUPS
    lengths = [len(g.prompt_tokens) + len(c) for g in groups for c in g.completions]
    assert min(lengths) < max(lengths)
    plan = plan_micro_batches(lengths, gpu_check.TOKEN_BUDGET, 64)
    assert all(len(mb) * max(lengths[i] for i in mb) <= gpu_check.TOKEN_BUDGET for mb in plan)
