"""The tiny default model: character tokenizer, architecture, warm start, cache."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from asympo.config import load_settings
from asympo.model.architecture import TinyArchitecture, build_tiny_model, count_parameters
from asympo.model.char_tokenizer import CHARACTERS, EOS_TOKEN, char_vocab
from asympo.model.tiny import (
    MANIFEST,
    SHIPPED_DIR,
    WEIGHTS,
    TinyModelSpec,
    build_and_warm_start,
    build_in_child,
    ensure_tiny_model,
    file_sha256,
    read_manifest,
    spec_from_settings,
    tiny_model_dir,
)
from asympo.model.warm_start import IGNORE, collate, encode_example
from asympo.tasks import PRINTABLE_ALPHABET


def test_tokenizer_is_one_token_per_character_and_round_trips(tokenizer: object) -> None:
    text = "37+48=85\nQ: what is \\frac{1}{2}?\t~ {x}"
    ids = tokenizer.encode(text, add_special_tokens=False)  # type: ignore[attr-defined]
    assert len(ids) == len(text)
    assert tokenizer.decode(ids) == text  # type: ignore[attr-defined]
    # No special token is added by default (like Qwen tokenizers).
    assert tokenizer(text)["input_ids"] == ids  # type: ignore[operator]


def test_tokenizer_covers_printable_text_and_has_distinct_specials(tokenizer: object) -> None:
    assert set(PRINTABLE_ALPHABET) <= set(CHARACTERS)
    tok = tokenizer
    specials = {tok.pad_token_id, tok.bos_token_id, tok.eos_token_id}  # type: ignore[attr-defined]
    assert len(specials) == 3 and None not in specials
    assert tok.eos_token_id == char_vocab()[EOS_TOKEN]  # type: ignore[attr-defined]
    assert len(tok) == len(char_vocab())  # type: ignore[arg-type]
    # Specials are dropped on request but kept otherwise.
    ids = [*tok.encode("12", add_special_tokens=False), tok.eos_token_id]  # type: ignore[attr-defined]
    assert tok.decode(ids, skip_special_tokens=True) == "12"  # type: ignore[attr-defined]
    assert tok.decode(ids) == "12" + EOS_TOKEN  # type: ignore[attr-defined]


def test_default_architecture_is_a_one_to_five_million_parameter_qwen2() -> None:
    model = build_tiny_model(TinyArchitecture(), seed=0)
    assert model.config.model_type == "qwen2"
    assert 1_000_000 <= count_parameters(model) <= 5_000_000
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    assert head_dim in {32, 64, 80, 96, 112, 128}  # vLLM CPU attention head sizes
    same = build_tiny_model(TinyArchitecture(), seed=0)
    other = build_tiny_model(TinyArchitecture(), seed=1)
    w = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(model.state_dict()[w], same.state_dict()[w])
    assert not torch.equal(model.state_dict()[w], other.state_dict()[w])


def test_sft_labels_mask_the_prompt_and_end_with_eos(tokenizer: object) -> None:
    ids, labels = encode_example(tokenizer, "12+3=", "15")  # type: ignore[arg-type]
    eos = tokenizer.eos_token_id  # type: ignore[attr-defined]
    assert len(ids) == len(labels) == len("12+3=15") + 1
    assert labels[:5] == [IGNORE] * 5
    assert labels[5:] == ids[5:] and ids[-1] == eos
    batch_ids, mask, batch_labels = collate([(ids, labels), (ids[:3], labels[:3])], pad_id=0)
    assert batch_ids.shape == mask.shape == batch_labels.shape == (2, len(ids))
    assert mask[1].tolist() == [1, 1, 1] + [0] * (len(ids) - 3)
    assert (batch_labels[1, 3:] == IGNORE).all()


def test_cache_key_tracks_every_setting_that_shapes_the_model(tmp_path: Path) -> None:
    base = load_settings(None, [f"model.cache_dir={tmp_path}"])
    same = load_settings(None, [f"model.cache_dir={tmp_path}"])
    assert tiny_model_dir(base) == tiny_model_dir(same)
    for override in ("task.seed=1", "task.name=arith:digits=1", "task.train_size=300"):
        changed = load_settings(None, [f"model.cache_dir={tmp_path}", override])
        assert tiny_model_dir(changed) != tiny_model_dir(base), override
    # RL seeds share one warm-started model: seeds then differ only in the RL run.
    other_seed = load_settings(None, [f"model.cache_dir={tmp_path}", "learner.seed=3"])
    assert tiny_model_dir(other_seed) == tiny_model_dir(base)
    spec = spec_from_settings(base)
    wider = dataclasses.replace(
        spec, architecture=dataclasses.replace(spec.architecture, hidden_size=256, num_heads=8)
    )
    assert wider.cache_key() != spec.cache_key()


def _micro_spec() -> TinyModelSpec:
    spec = spec_from_settings(load_settings(None, ["task.train_size=300"]))
    return dataclasses.replace(
        spec,
        architecture=TinyArchitecture(
            hidden_size=64, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=128
        ),
        schedule=dataclasses.replace(
            spec.schedule, max_steps=6, eval_every=3, eval_size=8, batch_size=8
        ),
    )


def test_warm_start_saves_a_loadable_hf_model_and_the_cache_is_reused(tmp_path: Path) -> None:
    settings = load_settings(None, [f"model.cache_dir={tmp_path}", "task.train_size=300"])
    out = tiny_model_dir(settings)
    logs: list[str] = []
    result = build_and_warm_start(_micro_spec(), out, logs.append)
    assert result.path == out and not result.reused
    assert 0.0 <= result.accuracy <= 1.0
    assert any("held-out greedy accuracy" in line for line in logs)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).is_file(), name
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["held_out_greedy_accuracy"] == result.accuracy
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    ids = torch.tensor([tok.encode("12+3=", add_special_tokens=False)])
    assert model(input_ids=ids).logits.shape == (1, 5, len(tok))
    # Same settings: the cached directory is reused without training.
    again = ensure_tiny_model(settings, log=logs.append)
    assert again.reused and again.path == out and again.accuracy == result.accuracy
    # No temporary directory is left next to the cache entry.
    assert [p.name for p in tmp_path.iterdir()] == [out.name]


def test_warm_start_stops_by_steps_or_target_not_by_the_clock(tokenizer: object) -> None:
    from asympo.model.warm_start import SftSchedule, supervised_warm_start

    train = [(f"{a}+{b}=", str(a + b)) for a in range(10) for b in range(10)]
    held_out = [(p, f"#### {c}") for p, c in train[:8]]

    def verify(response: str, reference: str) -> float:
        return float(response.strip() == reference.removeprefix("#### "))

    def run(**kw: float) -> tuple[int, list[str]]:
        model = build_tiny_model(
            TinyArchitecture(
                hidden_size=64, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=128
            ),
            seed=0,
        )
        logs: list[str] = []
        schedule = SftSchedule(batch_size=4, eval_every=2, max_steps=5, **kw)  # type: ignore[arg-type]
        result = supervised_warm_start(
            model,
            tokenizer,  # type: ignore[arg-type]
            train,
            held_out,
            verify,
            ["\n"],
            schedule,
            logs.append,
        )
        return result.steps, logs

    # Target out of reach: exactly max_steps, evaluated at steps 2, 4 and the last.
    steps, logs = run(target_accuracy=1.1)
    assert steps == 5 and len(logs) == 3 and "step 5/5" in logs[-1]
    # Target met at the first evaluation: stops there.
    steps, logs = run(target_accuracy=0.0)
    assert steps == 2 and len(logs) == 1
    # The safety net stops a run that takes too long, and says so.
    steps, logs = run(target_accuracy=1.1, hard_max_seconds=0.0)
    assert steps == 1 and "safety limit" in logs[-1]


def test_build_is_byte_identical_whatever_the_callers_threads_and_cpu_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Unpinned, ATen's AVX-512 and AVX2 kernels give other bits after one step, and so
    # may other thread counts: the build child pins both, whatever its parent has.
    spec = _micro_spec()
    assert TinyModelSpec.from_json(spec.to_json()) == spec
    first = build_in_child(spec, tmp_path / "a", log=lambda _: None)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.setenv("MKL_NUM_THREADS", "2")
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "default")
    monkeypatch.setenv("MKL_CBWR", "AUTO")
    second = build_in_child(spec, tmp_path / "b", log=lambda _: None)
    sha = file_sha256(first.path / WEIGHTS)
    assert sha == file_sha256(second.path / WEIGHTS)
    manifest = read_manifest(first.path)
    assert manifest is not None and manifest["sha256"] == sha
    assert manifest["threads"] == 1 and manifest["cpu_capability"] == "AVX2"


def test_the_default_model_ships_and_is_copied_into_an_empty_cache(tmp_path: Path) -> None:
    settings = load_settings(None, [f"model.cache_dir={tmp_path}"])
    shipped = SHIPPED_DIR / tiny_model_dir(settings).name
    manifest = read_manifest(shipped)
    assert manifest is not None, f"no shipped build for the default spec at {shipped}"
    assert file_sha256(shipped / WEIGHTS) == manifest["sha256"]
    logs: list[str] = []
    result = ensure_tiny_model(settings, log=logs.append)  # a build would take minutes
    assert result.reused and result.path == tiny_model_dir(settings)
    assert file_sha256(result.path / WEIGHTS) == manifest["sha256"]
    assert any("copied the shipped build" in line for line in logs)
    assert 0.25 <= result.accuracy <= 0.45
