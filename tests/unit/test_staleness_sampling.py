"""The staleness experiment's sampler: behaviour log-probs are the sampling policy's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoTokenizer

from asympo.experiments.staleness import (
    behaviour_logprobs,
    cut_completion,
    sample_completions,
    sampling_kwargs,
)
from asympo.model.architecture import TinyArchitecture, build_tiny_model
from asympo.model.char_tokenizer import save_char_tokenizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    directory: Path = tmp_path_factory.mktemp("tok")
    save_char_tokenizer(directory, 64)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    arch = TinyArchitecture(
        hidden_size=64, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64,
        max_positions=64,
    )  # fmt: skip
    return build_tiny_model(arch, seed=3).eval(), tokenizer


def test_cut_completion_keeps_the_first_stop_token_and_nothing_after() -> None:
    assert cut_completion([5, 6, 2, 0, 0], {2}) == [5, 6, 2]
    assert cut_completion([5, 6, 7], {2}) == [5, 6, 7]


def test_behaviour_logprobs_equal_the_log_softmax_the_sampler_drew_from(
    tiny: tuple[Any, Any],
) -> None:
    model, tok = tiny
    prompts = [tok.encode("12+3=", add_special_tokens=False), tok.encode("7-5=")]
    rows = [p for p in prompts for _ in range(3)]
    width = max(len(p) for p in rows)
    pad = tok.pad_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in rows])
    attn = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in rows])
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, attention_mask=attn, output_scores=True,
            return_dict_in_generate=True, **sampling_kwargs(tok, 6),
        )  # fmt: skip
    # The scores generate sampled from (after its logits processors), per step [B, V].
    sampled_logp = torch.stack([torch.log_softmax(s, dim=-1) for s in out.scores], dim=1)
    torch.manual_seed(0)
    completions = sample_completions(model, tok, prompts, 3, 6, {tok.eos_token_id}, seed=0)
    flat = [c for group in completions for c in group]
    gen = out.sequences[:, width:]
    behaviour = behaviour_logprobs(model, pad, [(rows[i], c) for i, c in enumerate(flat)])
    for i, c in enumerate(flat):
        assert c == gen[i, : len(c)].tolist()  # same seed, same samples
        expected = [float(sampled_logp[i, t, tok_id]) for t, tok_id in enumerate(c)]
        assert behaviour[i] == pytest.approx(expected, abs=1e-4)
