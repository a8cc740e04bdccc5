"""Prompt formats (raw, chat), reasoning presets and the boxed verifier; maj@k and intervals."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from asympo.config import TaskSettings, load_settings
from asympo.evaluation import bootstrap_interval, evaluate, majority_correct, wilson_interval
from asympo.model.architecture import TinyArchitecture, build_tiny_model
from asympo.model.char_tokenizer import CHARACTERS, char_vocab, save_char_tokenizer
from asympo.model.tiny import (
    FORMAT_VERSION,
    OPTIONAL_KEY_FIELDS,
    source_fingerprint,
    spec_from_settings,
    tiny_model_dir,
)
from asympo.tasks import PRESETS, TaskError, task_from_settings
from asympo.tasks.prompting import BOXED_INSTRUCTION
from asympo.verifiers import answer_key, apply_format_reward, resolve_verifier
from asympo.verifiers.boxed import last_boxed
from asympo.verifiers.verdict import Verdict


def small(**fields: object) -> TaskSettings:
    return TaskSettings(train_size=20, eval_size=5, **fields)  # type: ignore[arg-type]


def test_raw_format_is_the_task_template(tokenizer: object) -> None:
    task = task_from_settings(small(), tokenizer)
    problem = task.test[0]
    assert task.render(problem) == problem.question + "="
    assert task.verifier == "gsm8k"


def test_chat_format_is_qwen_chatml_through_the_tokenizer_template(tokenizer: object) -> None:
    task = task_from_settings(small(prompt_format="chat"), tokenizer)
    q = task.test[0].question
    text = task.render(task.test[0])
    assert text == f"<|im_start|>user\n{q}=<|im_end|>\n<|im_start|>assistant\n"
    # The same string apply_chat_template gives directly (what TRL/verl would send).
    direct = tokenizer.apply_chat_template(  # type: ignore[attr-defined]
        [{"role": "user", "content": q + "="}], tokenize=False, add_generation_prompt=True
    )
    assert text == direct
    ids = tokenizer.encode(text, add_special_tokens=False)  # type: ignore[attr-defined]
    assert tokenizer.decode(ids) == text  # type: ignore[attr-defined]  # tokens round-trip


def test_system_prompt_goes_first_in_both_formats(tokenizer: object) -> None:
    raw = task_from_settings(small(system_prompt="Be exact."), tokenizer)
    assert raw.render(raw.test[0]) == f"Be exact.\n\n{raw.test[0].question}="
    chat = task_from_settings(small(prompt_format="chat", system_prompt="Be exact."), tokenizer)
    assert chat.render(chat.test[0]).startswith("<|im_start|>system\nBe exact.<|im_end|>\n")


def test_presets_set_instruction_system_prompt_and_boxed_verifier(tokenizer: object) -> None:
    task = task_from_settings(small(prompt_format="chat", prompt_preset="boxed"), tokenizer)
    q = task.test[0].question
    assert task.verifier == "boxed"
    assert f"<|im_start|>user\n{q}\n{BOXED_INSTRUCTION}<|im_end|>" in task.render(task.test[0])
    # The warm-start target is in the form the verifier accepts.
    target = task.sft_target(task.train[0])
    assert target.startswith("\\boxed{")
    verify = resolve_verifier(task.verifier)
    assert verify("so " + target, task.train[0].answer).reward == 1.0  # type: ignore[union-attr]
    sys_task = task_from_settings(small(prompt_preset="boxed-system"), tokenizer)
    assert sys_task.render(sys_task.test[0]).startswith(PRESETS["boxed-system"].system + "\n\n")
    # An explicit verifier wins over the preset's.
    explicit = task_from_settings(small(prompt_preset="boxed", verifier="exact"), tokenizer)
    assert explicit.verifier == "exact"


def test_prompt_mistakes_are_one_line_task_errors(tokenizer: object, tmp_path: Path) -> None:
    with pytest.raises(TaskError, match="unknown prompt preset 'cot'; known: boxed"):
        task_from_settings(small(prompt_preset="cot"), tokenizer)
    with pytest.raises(TaskError, match="needs the model's tokenizer"):
        task_from_settings(small(prompt_format="chat"))
    plain = tmp_path / "plain"
    save_char_tokenizer(plain, 64)
    cfg = plain / "tokenizer_config.json"
    cfg.write_text(cfg.read_text().replace('"chat_template"', '"unused_template"'))
    bare = AutoTokenizer.from_pretrained(plain)
    with pytest.raises(TaskError, match=r"has none: use task\.prompt_format=raw") as err:
        task_from_settings(small(prompt_format="chat"), bare, "my-base-model")
    assert "\n" not in str(err.value) and "my-base-model" in str(err.value)


def test_boxed_verifier_and_its_format_reward() -> None:
    verify = resolve_verifier("boxed")
    assert last_boxed("a \\boxed{1} then \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert verify("\\boxed{1,000}", "#### 1000").reward == 1.0  # type: ignore[union-attr]
    assert verify("\\boxed{\\frac{1}{2}}", "\\boxed{0.5}").reward == 1.0  # type: ignore[union-attr]
    assert verify("1000", "#### 1000").reward == 0.0  # type: ignore[union-attr]  # no box
    assert verify("\\boxed{7}", "#### 1000").reward == 0.0  # type: ignore[union-attr]
    wrong = Verdict(0.0, "wrong answer")
    assert apply_format_reward("boxed", wrong, "\\boxed{7}", 0.1).reward == 0.1
    assert apply_format_reward("boxed", wrong, "7", 0.1).reward == 0.0


def test_answer_keys_normalise_as_the_verifier_reads() -> None:
    assert answer_key("gsm8k", "so #### 1,000.0") == answer_key("gsm8k", "1000") == "1000"
    assert answer_key("boxed", "x \\boxed{ 85 }") == "85"
    assert answer_key("boxed", "85") is None
    assert answer_key("math", "\\boxed{x + 1}") == answer_key("math", "\\boxed{x+1}")
    assert answer_key("exact", "  ") is None


def test_majority_vote_counts_normalised_answers_and_ignores_no_answer() -> None:
    keys = ["85", "84", "85", None, None, None]
    assert majority_correct(keys, [True, False, True, False, False, False])
    assert not majority_correct(["84", "84", "85"], [False, False, True])
    assert majority_correct(["85", "84"], [True, False])  # a tie: the first seen wins
    assert not majority_correct([None, None], [False, False])


def test_wilson_and_bootstrap_intervals() -> None:
    low, high = wilson_interval(8, 10)
    assert (round(low, 4), round(high, 4)) == (0.4902, 0.9433)  # the textbook value
    assert wilson_interval(0, 20)[0] == 0.0 and 0.1 < wilson_interval(0, 20)[1] < 0.2
    for n in (1, 3, 6, 7, 40, 200):  # exact ends, so low <= value <= high holds at 0 and 1
        assert wilson_interval(0, n)[0] == 0.0 and wilson_interval(n, n)[1] == 1.0
    values = [1.0, 0.0] * 50
    low, high = bootstrap_interval(values)
    assert 0.38 < low < 0.5 < high < 0.62
    assert bootstrap_interval([0.25] * 10) == pytest.approx((0.25, 0.25))
    assert bootstrap_interval(values) == bootstrap_interval(values)  # seeded


def test_tiny_model_cache_key_keeps_defaults_and_follows_task_settings(tmp_path: Path) -> None:
    base = tiny_model_dir(load_settings())
    # The default's key is the one builds made before the optional fields existed.
    spec = spec_from_settings(load_settings())
    old = {k: v for k, v in dataclasses.asdict(spec).items() if k not in OPTIONAL_KEY_FIELDS}
    blob = json.dumps({"format": FORMAT_VERSION, **old}, sort_keys=True).encode()
    assert base.name == f"tiny-{hashlib.sha256(blob).hexdigest()[:16]}"
    chat = tiny_model_dir(load_settings(overrides=["task.prompt_format=chat"]))
    assert chat != base
    data = tmp_path / "mine.jsonl"
    data.write_text('{"question": "1+1", "answer": "#### 2"}\n' * 3)
    overrides = ["task.name=gsm8k", f"task.path={data}"]
    spec = spec_from_settings(load_settings(overrides=overrides))
    assert spec.task_settings().path == str(data)
    assert spec.task_source_sha256 == source_fingerprint(str(data)) != ""
    before = tiny_model_dir(load_settings(overrides=overrides))
    data.write_text('{"question": "1+2", "answer": "#### 3"}\n' * 3)
    assert tiny_model_dir(load_settings(overrides=overrides)) != before  # edited data


def test_tiny_model_directory_tokenizer_keeps_spaces_and_newlines(tmp_path: Path) -> None:
    """transformers 5 loads a qwen2 directory's tokenizer as Qwen2Tokenizer (byte-level)."""
    arch = TinyArchitecture(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1)
    build_tiny_model(arch, seed=0).save_pretrained(tmp_path)
    save_char_tokenizer(tmp_path, 256)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    text = "<|im_start|>user\nJohn has 3 apples.\tHow many?<|im_end|>\n" + "".join(CHARACTERS)
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) == len(text) and tok.decode(ids) == text
    assert ids[: len("<|im_start|>")] == [char_vocab()[c] for c in "<|im_start|>"]


def test_evaluate_reports_mean_and_majority_at_k_with_intervals(tokenizer: object) -> None:
    """Scripted samples: per problem, k=4 answers in different spellings of numbers."""
    task = task_from_settings(small(), tokenizer)
    problems = task.test[:4]
    gold = {task.render(p): p.answer.removeprefix("#### ") for p in problems}
    wrong = {k: str(int(v) + 1) for k, v in gold.items()}
    # problem 0: 3/4 right, majority right; 1: 1/4 right, majority wrong ("1,0xx" variants
    # of one wrong number vote together); 2: 2 right vs 2 different wrongs: majority right;
    # 3: no sample right.
    plans = [
        lambda g, w: [g, g + ".0", w, g],
        lambda g, w: [g, w, w + ".0", "#### " + w],
        lambda g, w: [w, g, g, w + "1"],
        lambda g, w: [w, w, w, w],
    ]

    def generate(prompts: list[str], n: int, temperature: float) -> list[list[str]]:
        if temperature == 0:
            return [[gold[p]] for p in prompts]
        return [plans[i](gold[p], wrong[p])[:n] for i, p in enumerate(prompts)]

    verify = resolve_verifier("gsm8k")

    def score(out: str, ref: str) -> float:
        return verify(out, ref).reward  # type: ignore[union-attr]

    def key(out: str) -> str | None:
        return answer_key("gsm8k", out)

    result = evaluate(task, problems, generate, score, k=4, temperature=1.0, answer_key=key)
    assert result.pass_at_1 == 1.0 and result.pass_at_1_ci == wilson_interval(4, 4)
    assert result.mean_at_k is not None and result.maj_at_k is not None
    assert result.mean_at_k.value == pytest.approx((3 + 1 + 2 + 0) / 16)
    assert result.maj_at_k.value == 0.5  # problems 0 and 2
    assert (result.maj_at_k.low, result.maj_at_k.high) == wilson_interval(2, 4)
    assert result.pass_at_k == 0.75
    assert result.mean_at_k.low <= result.mean_at_k.value <= result.mean_at_k.high
