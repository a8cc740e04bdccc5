"""Settings checked against the model before anything starts; per-run defaults of `up`.

The model is a small untrained one in the tiny model's format (character tokenizer,
256-token context): what is checked is its config and tokenizer, never its weights.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from asympo.config import Settings, load_settings
from asympo.engines import EngineError, create_engine
from asympo.launcher import with_run_defaults
from asympo.model.architecture import TinyArchitecture, build_tiny_model
from asympo.model.char_tokenizer import save_char_tokenizer
from asympo.model.loading import ModelLoadError, resolve_model_path
from asympo.model.tiny import MANIFEST, tiny_model_dir
from asympo.preflight import ModelMismatch, check_against_model, task_prompts

ROOT = Path(__file__).resolve().parents[2]
ARCH = TinyArchitecture(
    hidden_size=64, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64
)


def save_small_model(path: Path, arch: TinyArchitecture = ARCH) -> Path:
    """An untrained model with the tiny model's tokenizer and context (256 tokens)."""
    build_tiny_model(arch, seed=0).save_pretrained(str(path))
    save_char_tokenizer(path, arch.max_positions)
    return path


def fake_tiny_cache(cache_dir: Path, overrides: list[str] | None = None) -> Path:
    """Put a small model where the tiny default of these settings is cached, as if built.

    ``overrides`` must be the task/learner settings the process under test will see
    (they key the cache directory).
    """
    settings = load_settings(None, [f"model.cache_dir={cache_dir}", *(overrides or [])])
    path = save_small_model(tiny_model_dir(settings))
    (path / MANIFEST).write_text(json.dumps({"held_out_greedy_accuracy": 0.0, "parameters": 0}))
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(save_small_model(tmp_path_factory.mktemp("model")))


@pytest.fixture(scope="module")
def prompts() -> list[str]:
    return task_prompts(Settings(task={"train_size": 200, "eval_size": 20}))  # type: ignore[arg-type]


def test_default_settings_fit_the_tiny_model(model_dir: str, prompts: list[str]) -> None:
    check_against_model(Settings(), model_dir, prompts)
    longest = max(len(p) for p in prompts)  # one token per character
    fits = Settings(sampling={"max_tokens": 256 - longest})  # type: ignore[arg-type]
    check_against_model(fits, model_dir, prompts)


def test_max_tokens_beyond_the_context_is_one_line_naming_the_fix(
    model_dir: str, prompts: list[str]
) -> None:
    longest = max(len(p) for p in prompts)
    settings = Settings(sampling={"max_tokens": 256 - longest + 1})  # type: ignore[arg-type]
    with pytest.raises(ModelMismatch) as info:
        check_against_model(settings, model_dir, prompts)
    message = str(info.value)
    assert "\n" not in message
    assert f"sampling.max_tokens={256 - longest + 1}" in message
    assert "256-token context" in message
    assert f"at most {256 - longest}" in message
    # Without the task's prompts (a rollout replica), a one-token prompt is assumed.
    check_against_model(settings, model_dir)
    with pytest.raises(ModelMismatch, match="at most 255"):
        check_against_model(Settings(sampling={"max_tokens": 256}), model_dir)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("stop", "needle"),
    [(["\n", ""], "empty string"), (["\n", "é"], "'é' has characters")],
)
def test_stop_strings_the_vocabulary_cannot_produce(
    model_dir: str, stop: list[str], needle: str
) -> None:
    with pytest.raises(ModelMismatch, match=needle):
        check_against_model(Settings(sampling={"stop": stop}), model_dir)  # type: ignore[arg-type]


def test_prompts_the_vocabulary_cannot_encode(model_dir: str, prompts: list[str]) -> None:
    with pytest.raises(ModelMismatch, match="cannot encode"):
        check_against_model(Settings(), model_dir, [*prompts, "what is 2 × 3?"])


def test_tokenizer_larger_than_the_embedding(tmp_path: Path) -> None:
    path = save_small_model(tmp_path / "m")
    config = json.loads((path / "config.json").read_text())
    config["vocab_size"] = 50  # the character tokenizer has 101 tokens
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelMismatch, match="101 tokens but the model's embedding holds 50"):
        check_against_model(Settings(), str(path))


def test_create_engine_never_builds_a_model() -> None:
    with pytest.raises(EngineError, match="needs a model path"):
        create_engine(Settings(), "")


def test_empty_model_path_resolves_to_the_cached_tiny_default(tmp_path: Path) -> None:
    settings = Settings(model={"cache_dir": str(tmp_path)})  # type: ignore[arg-type]
    with pytest.raises(ModelLoadError, match="asympo init-model"):
        resolve_model_path(settings, build_if_missing=False)
    built = fake_tiny_cache(tmp_path)
    assert resolve_model_path(settings, build_if_missing=False) == str(built)


def test_run_defaults_keep_what_the_user_set_even_when_it_is_the_default() -> None:
    default = Settings()
    explicit = load_settings(
        None,
        [
            "run_dir=runs/r1",
            f"weights.store_dir={default.weights.store_dir}",
            f"learner.checkpoint_dir={default.learner.checkpoint_dir}",
        ],
    )
    out = with_run_defaults(explicit)
    assert out.weights.store_dir == default.weights.store_dir
    assert out.learner.checkpoint_dir == default.learner.checkpoint_dir
    assert out.rollout.work_dir == str(Path("runs/r1") / "rollout")  # not set: inside run_dir
    assert out.weights.publish_token.get_secret_value()  # fresh tokens
    assert out.service_token.get_secret_value()
    unset = with_run_defaults(load_settings(None, ["run_dir=runs/r1"]))
    assert unset.weights.store_dir == str(Path("runs/r1") / "weights")
    assert unset.learner.checkpoint_dir == str(Path("runs/r1") / "checkpoints")


@pytest.mark.timeout(120)
def test_up_with_max_tokens_beyond_the_context_ends_at_once_with_one_line(
    tmp_path: Path,
) -> None:
    """The issue's reproduction: `asympo up --set sampling.max_tokens=5000` on the tiny model."""
    fake_tiny_cache(tmp_path / "models")
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ASYMPO_")}
    env["PYTHONPATH"] = str(ROOT)
    argv = [
        sys.executable, "-m", "asympo.cli", "up", "--no-live",
        "--set", "sampling.max_tokens=5000",
        "--set", f"model.cache_dir={tmp_path / 'models'}",
        "--set", f"run_dir={run_dir}",
    ]  # fmt: skip
    started = time.monotonic()
    proc = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=100)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(errors) == 1, proc.stderr
    assert errors[0].startswith("error: sampling.max_tokens=5000 plus the longest prompt")
    assert "256-token context" in errors[0]
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not (run_dir / "logs").exists()  # no service was started
    assert time.monotonic() - started < 90
