"""One prompt everywhere: the learner's admitted text, the engine's tokens, the re-scored
tokens and ``asympo eval``'s prompt are byte-identical, for raw and chat formats.

The chain is the real one: the learner's :class:`Admitter` renders the ``PromptTask``
(task built by ``task_from_settings``, as the learner's main does), the rollout worker's
``requests_for`` tokenises it for the engine (vLLM, and the transformers fallback), the
engine generates, ``build_group`` packs the ``RolloutGroup``, and the learner's
``group_from_scored`` yields the tokens it re-scores. ``asympo eval``'s task comes from
``load_eval_task`` and its prompts go through ``engine_generate_fn``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from asympo.config import Settings, StreamSettings
from asympo.engines import Engine, create_engine
from asympo.eval_cli import engine_generate_fn, load_eval_task
from asympo.evaluation import evaluate
from asympo.model import load_tokenizer
from asympo.model.architecture import TinyArchitecture, build_tiny_model
from asympo.model.char_tokenizer import save_char_tokenizer
from asympo.tasks import task_from_settings
from asympo.v1 import records_pb2
from services.learner.admission import Admitter
from services.learner.records import group_from_scored
from services.rollout.worker import build_group, requests_for

FORMATS = [
    ("raw", ""),
    ("raw", "boxed-system"),
    ("chat", ""),
    ("chat", "boxed"),
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained tiny model (weights do not matter here, the prompt path does)."""
    d = tmp_path_factory.mktemp("tiny-untrained")
    arch = TinyArchitecture()
    build_tiny_model(arch, seed=0).save_pretrained(d, safe_serialization=True)
    save_char_tokenizer(d, arch.max_positions)
    return d


def settings_for(
    model_dir: Path, streams: StreamSettings, engine: str, fmt: str, preset: str
) -> Settings:
    return Settings(
        streams=streams,
        rollout={"engine": engine},  # type: ignore[arg-type]
        model={"path": str(model_dir)},  # type: ignore[arg-type]
        sampling={"num_samples": 2, "max_tokens": 4},  # type: ignore[arg-type]
        task={  # type: ignore[arg-type]
            "train_size": 30,
            "eval_size": 5,
            "prompt_format": fmt,
            "prompt_preset": preset,
            "system_prompt": "Answer briefly." if fmt == "chat" and not preset else "",
        },
    )


def check_one_prompt_everywhere(
    engine: Engine, settings: Settings, model_dir: Path, client: redis.Redis
) -> None:
    tokenizer = load_tokenizer(str(model_dir))
    task = task_from_settings(settings.task, tokenizer, str(model_dir))  # the learner's
    admission = Admitter(settings, client, task)
    slot = admission.schedule.slot(0)
    prompt = admission.prompt(slot, version=0, min_version=0)
    text = prompt.prompt_text
    if settings.task.prompt_format == "chat":
        assert text.startswith("<|im_start|>") and text.endswith("<|im_start|>assistant\n")
    # Rollout: the tokens the engine is sent, then the record the learner re-scores.
    (request,) = requests_for([prompt], engine)
    (completions,) = engine.generate([request])
    group = build_group(prompt, request, completions, 0, engine.name, "r0", time.time())
    scored = records_pb2.ScoredGroup(rollout=group)
    for _ in completions:
        scored.scores.add(reward=0.0)
    rescored = group_from_scored(scored).prompt_tokens
    assert rescored == request.prompt_tokens
    assert tokenizer.decode(rescored) == text  # byte-identical, tokens round-trip
    assert tokenizer.encode(text, add_special_tokens=False) == rescored
    # asympo eval: its task renders the admitted problem to the same text ...
    eval_task = load_eval_task(settings, settings.task.name, 3, tokenizer, str(model_dir))
    assert eval_task.render(slot.problem) == text
    # ... and the prompts it sends through the engine are its task's renderings.
    sent: list[str] = []
    inner = engine_generate_fn(engine, 2, list(settings.sampling.stop), 0)

    def recording(prompts: list[str], n: int, temperature: float) -> list[list[str]]:
        sent.extend(prompts)
        return inner(prompts, n, temperature)

    evaluate(eval_task, eval_task.test, recording, lambda _r, _a: 0.0)
    assert sent == [task.render(p) for p in eval_task.test]


@pytest.fixture(scope="module")
def hf_engine(model_dir: Path) -> Iterator[Engine]:
    engine = create_engine(Settings(rollout={"engine": "transformers"}), str(model_dir))  # type: ignore[arg-type]
    yield engine
    engine.close()


@pytest.mark.parametrize(("fmt", "preset"), FORMATS)
def test_one_prompt_everywhere_transformers_engine(
    hf_engine: Engine,
    model_dir: Path,
    stream_settings: StreamSettings,
    redis_client: redis.Redis,
    fmt: str,
    preset: str,
) -> None:
    settings = settings_for(model_dir, stream_settings, "transformers", fmt, preset)
    check_one_prompt_everywhere(hf_engine, settings, model_dir, redis_client)


@pytest.mark.vllm
def test_one_prompt_everywhere_vllm_engine(
    model_dir: Path, stream_settings: StreamSettings, redis_client: redis.Redis
) -> None:
    engine = create_engine(Settings(), str(model_dir))
    try:
        assert engine.name == "vllm"
        for fmt, preset in FORMATS:
            settings = settings_for(model_dir, stream_settings, "vllm", fmt, preset)
            check_one_prompt_everywhere(engine, settings, model_dir, redis_client)
    finally:
        engine.close()
