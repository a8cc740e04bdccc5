"""Your own data with the default model: every entry point reads task.path, and a user
mistake or a missing network ends in one clear line (exit status 1), never a traceback.

Before the fix, the tiny model's warm start loaded GSM8K from the hub whatever task.path
said (five network retries, then a traceback).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def cli(*args: str, cache: Path) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",  # no network: the hub must not be the fallback
        "ASYMPO_MODEL__CACHE_DIR": str(cache),
    }
    return subprocess.run(
        [sys.executable, "-m", "asympo.cli", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> str:
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-2000:]
    assert "Traceback" not in out, out[-3000:]
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def test_up_with_own_gsm8k_file_reads_that_file_not_the_hub(tmp_path: Path) -> None:
    data = tmp_path / "my.jsonl"
    # A character outside the tiny tokenizer's alphabet: only reading *this* file finds it.
    data.write_text(
        '{"question": "Zoë has 3 apples and buys 2. How many?", "answer": "3+2=5\\n#### 5"}\n'
        '{"question": "Tom has 4 pens and loses 1. How many?", "answer": "4-1=3\\n#### 3"}\n'
    )
    proc = cli(
        "up", "--steps", "1", "--set", "task.name=gsm8k", "--set", f"task.path={data}",
        cache=tmp_path / "models",
    )  # fmt: skip
    one_line_error(proc, "cannot build the tiny default model", "characters", "'ë'")
    assert "hf:" not in proc.stdout + proc.stderr and "openai/gsm8k" not in proc.stderr


def test_missing_file_and_missing_network_are_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    for command in ("init-model", "up"):
        proc = cli(
            command, "--set", "task.name=gsm8k", "--set", f"task.path={missing}",
            cache=tmp_path / "models",
        )  # fmt: skip
        one_line_error(proc, "dataset file not found", str(missing))
    proc = cli("init-model", "--set", "task.name=gsm8k", cache=tmp_path / "models")
    one_line_error(proc, "cannot load Hugging Face dataset 'openai/gsm8k'", "task.path")


def test_unknown_preset_and_missing_chat_template_are_one_line(tmp_path: Path) -> None:
    proc = cli("init-model", "--set", "task.prompt_preset=cot", cache=tmp_path / "models")
    one_line_error(proc, "unknown prompt preset 'cot'")
