"""The saved tiny model loads in transformers and in vLLM and both decode it identically.

The model is built by the same code as ``asympo init-model`` (architecture, character
tokenizer, warm start, HF save) with a short warm start so the test stays fast.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from asympo.config import load_settings
from asympo.model.tiny import build_and_warm_start, spec_from_settings

pytestmark = pytest.mark.vllm
vllm = pytest.importorskip("vllm")

PROMPTS = ["37+48=", "90-17=", "5+5=", "12+34=", "99-99=", "0+7=", "61-8=", "45+45="]
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = spec_from_settings(load_settings(None, ["task.train_size=2000"]))
    # A short warm start: enough to make the next-token distributions peaked (no greedy ties).
    spec = dataclasses.replace(
        spec, schedule=dataclasses.replace(spec.schedule, max_steps=40, eval_every=40, eval_size=8)
    )
    out = tmp_path_factory.mktemp("tiny") / "model"
    build_and_warm_start(spec, out, log=lambda _: None)
    return out


@pytest.fixture(scope="module")
def llm(model_dir: Path) -> Iterator[Any]:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    engine = vllm.LLM(
        model=str(model_dir),
        dtype="float32",
        enforce_eager=True,
        max_model_len=256,
        max_num_seqs=16,
        seed=0,
        distributed_executor_backend="uni",
    )
    yield engine
    engine.llm_engine.engine_core.shutdown()


@torch.no_grad()
def hf_greedy_tokens(model: Any, prompt_ids: list[int], eos: int) -> tuple[list[int], list[float]]:
    """Reference greedy decoding: full forward each step, argmax, stop after eos."""
    ids = list(prompt_ids)
    out: list[int] = []
    logps: list[float] = []
    for _ in range(MAX_TOKENS):
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1].float()
        logp = torch.log_softmax(logits, dim=-1)
        nxt = int(torch.argmax(logp))
        out.append(nxt)
        logps.append(float(logp[nxt]))
        ids.append(nxt)
        if nxt == eos:
            break
    return out, logps


def test_tiny_model_loads_in_transformers_and_vllm_with_identical_greedy_tokens(
    model_dir: Path, llm: Any
) -> None:
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    params = vllm.SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=1)
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    for prompt, out in zip(PROMPTS, outs, strict=True):
        prompt_ids = tok.encode(prompt, add_special_tokens=False)
        assert list(out.prompt_token_ids) == prompt_ids  # vLLM tokenizes like transformers
        want, want_logps = hf_greedy_tokens(model, prompt_ids, tok.eos_token_id)
        got = list(out.outputs[0].token_ids)
        assert got == want, f"{prompt!r}: vLLM {tok.decode(got)!r} != HF {tok.decode(want)!r}"
        got_logps = [lp[t].logprob for lp, t in zip(out.outputs[0].logprobs, got, strict=True)]
        assert got_logps == pytest.approx(want_logps, abs=1e-3)
        assert out.outputs[0].text == tok.decode(want, skip_special_tokens=True)
