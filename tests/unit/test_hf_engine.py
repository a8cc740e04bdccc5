"""The transformers fallback engine honours the Engine contract and swaps weights exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from asympo.engines import Engine, EngineError, GenerationRequest
from asympo.engines.base import cut_at_stop
from asympo.engines.hf_engine import HFEngine, sample_token
from asympo.model.architecture import TinyArchitecture, build_tiny_model
from asympo.model.char_tokenizer import save_char_tokenizer
from asympo.rl.probe import probe_logprobs, probe_tokens

ARCH = TinyArchitecture(
    hidden_size=64, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=128
)


def _save(seed: int, out: Path) -> torch.nn.Module:
    model = build_tiny_model(ARCH, seed)
    with torch.no_grad():  # sharper than the 0.02-std init, so greedy has no near-ties
        for p in model.parameters():
            p.mul_(20.0 if p.dim() > 1 else 1.0)
    model.save_pretrained(out)
    save_char_tokenizer(out, ARCH.max_positions)
    return model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("hf") / "m"
    _save(0, out)
    return out


def test_hf_engine_generates_samples_with_stop_strings_and_logprobs(model_dir: Path) -> None:
    engine = HFEngine(str(model_dir))
    assert isinstance(engine, Engine)
    prompt = engine.encode("12+3=")
    (group,) = engine.generate(
        [GenerationRequest(prompt, n=3, temperature=1.0, top_p=0.9, max_tokens=5, logprobs=True)]
    )
    assert len(group) == 3
    for c in group:
        assert 1 <= len(c.tokens) <= 5 and c.logprobs is not None
        assert len(c.logprobs) == len(c.tokens) and all(lp <= 0 for lp in c.logprobs)
        assert c.finish_reason == "stop" or len(c.tokens) == 5
    (greedy,) = engine.generate([GenerationRequest(prompt, temperature=0.0, max_tokens=6)])
    assert greedy[0].logprobs is None
    # Greedy = argmax of full forwards.
    ids = list(prompt)
    for tok in greedy[0].tokens:
        logits = engine.model(input_ids=torch.tensor([ids])).logits[0, -1]
        assert int(torch.argmax(logits)) == tok
        ids.append(tok)
    # Seeded sampling is reproducible.
    req = GenerationRequest(prompt, n=2, temperature=1.0, max_tokens=5, seed=7)
    assert engine.generate([req]) == engine.generate([req])
    for bad in (GenerationRequest([], max_tokens=2), GenerationRequest(prompt, max_tokens=0)):
        with pytest.raises(EngineError):
            engine.generate([bad])


def test_hf_engine_load_weights_from_directory_and_state_dict(
    model_dir: Path, tmp_path: Path
) -> None:
    engine = HFEngine(str(model_dir))
    tokens = probe_tokens(engine.model.config.vocab_size, length=12)
    other = _save(1, tmp_path / "v1")
    assert engine.probe_logprobs(tokens) != pytest.approx(probe_logprobs(other, tokens), abs=1e-3)
    engine.load_weights(tmp_path / "v1")
    assert engine.probe_logprobs(tokens) == pytest.approx(probe_logprobs(other, tokens), abs=1e-5)
    third = build_tiny_model(ARCH, 2)
    engine.load_weights(third.state_dict())
    assert engine.probe_logprobs(tokens) == pytest.approx(probe_logprobs(third, tokens), abs=1e-5)
    with pytest.raises(EngineError):
        engine.load_weights({"model.embed_tokens.weight": torch.zeros(3, 3)})
    with pytest.raises(EngineError):
        engine.load_weights(tmp_path / "missing")
    # A refused load leaves the previous weights in place.
    assert engine.probe_logprobs(tokens) == pytest.approx(probe_logprobs(third, tokens), abs=1e-5)


def test_sampling_helpers() -> None:
    logits = torch.tensor([0.0, 5.0, 1.0])
    assert sample_token(logits, 0.0, 1.0, None) == 1
    gen = torch.Generator().manual_seed(0)
    # top_p small enough keeps only the most likely token.
    assert {sample_token(logits, 1.0, 0.5, gen) for _ in range(20)} == {1}
    assert cut_at_stop("12\n34", ["\n"]) == ("12", True)
    assert cut_at_stop("1234", ["\n", ""]) == ("1234", False)
    assert cut_at_stop("ab#c\nd", ["\n", "#"]) == ("ab", True)


def test_create_engine_builds_the_configured_backend(model_dir: Path) -> None:
    from asympo.config import load_settings
    from asympo.engines import create_engine

    settings = load_settings(None, ["rollout.engine=transformers", "rollout.device=cpu"])
    engine = create_engine(settings, str(model_dir))
    assert isinstance(engine, HFEngine) and engine.name == "transformers"
    assert engine.decode(engine.encode("7+8=15")) == "7+8=15"
    assert str(engine.device) == "cpu"


def test_the_engine_takes_its_device_from_rollout_not_learner(model_dir: Path) -> None:
    import torch

    from asympo.config import load_settings
    from asympo.engines import EngineError, create_engine

    # The learner's device is the learner's: rollout may run on another node.
    settings = load_settings(None, ["rollout.engine=transformers", "learner.device=cuda"])
    assert str(create_engine(settings, str(model_dir)).device) == (  # type: ignore[attr-defined]
        "cuda" if torch.cuda.is_available() else "cpu"
    )
    if not torch.cuda.is_available():
        cuda = load_settings(None, ["rollout.engine=transformers", "rollout.device=cuda"])
        with pytest.raises(EngineError, match=r"rollout\.device=cuda"):
            create_engine(cuda, str(model_dir))
