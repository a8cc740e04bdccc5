"""Sizing arithmetic: parameter counts against a built model, memory formulas, MFU."""

from __future__ import annotations

import pytest
from transformers import Qwen3Config, Qwen3ForCausalLM

from asympo.model.sizing import ARCHS, Arch, learner_memory, mfu, peak_flops_for


def test_param_count_matches_a_built_qwen3_model() -> None:
    arch = Arch("tiny", 64, 3, 4, 2, 16, 96, 128, tied=True)
    cfg = Qwen3Config(
        vocab_size=arch.vocab,
        hidden_size=arch.hidden,
        intermediate_size=arch.intermediate,
        num_hidden_layers=arch.layers,
        num_attention_heads=arch.heads,
        num_key_value_heads=arch.kv_heads,
        head_dim=arch.head_dim,
        tie_word_embeddings=True,
    )
    model = Qwen3ForCausalLM(cfg)
    assert arch.params() == sum(p.numel() for p in model.parameters())


def test_published_sizes() -> None:
    # The models' own names: 1.7B, 3.2B, 4.0B, 8.2B parameters.
    assert ARCHS["qwen3-1.7b"].params() == pytest.approx(1.72e9, rel=0.01)
    assert ARCHS["llama-3.2-3b"].params() == pytest.approx(3.21e9, rel=0.01)
    assert ARCHS["qwen3-4b"].params() == pytest.approx(4.02e9, rel=0.01)
    assert ARCHS["qwen3-8b"].params() == pytest.approx(8.19e9, rel=0.01)


def test_memory_formulas() -> None:
    arch = ARCHS["qwen3-4b"]
    ddp = learner_memory(arch, "ddp", 8, 0, False)
    assert ddp["state"] == pytest.approx(16 * arch.params() / 2**30)  # the issue's ~64 GB
    fsdp = learner_memory(arch, "fsdp", 8, 0, False)
    assert fsdp["state"] == pytest.approx(ddp["state"] / 8)
    off = learner_memory(arch, "fsdp-offload", 8, 0, False)
    assert off["state"] == 0 and off["host"] == pytest.approx(fsdp["state"])
    on = learner_memory(arch, "fsdp", 8, 8192, True)["activations"]
    assert on < learner_memory(arch, "fsdp", 8, 8192, False)["activations"] / 2
    with pytest.raises(ValueError, match="unknown strategy"):
        learner_memory(arch, "zero3", 8, 0, False)


def test_mfu_arithmetic() -> None:
    assert mfu(1000.0, 6e9, 989e12) == pytest.approx(6e12 / 989e12)
    assert peak_flops_for("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops_for("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops_for("Some CPU") is None
    with pytest.raises(ValueError):
        mfu(1.0, 1.0, 0.0)
