"""`asympo eval` as a process on the tiny default model and the real vLLM engine.

pass@1 from the command must equal an independent greedy computation (transformers
generate, the same verifier called in this process) on the same problems. The tiny
model's arith accuracy may be near 0, which would make that comparison weak, so the run
is scored with ``eval_plugins.leading_digit`` (configured as the task's verifier, a plug-in in
the reward pool): it gives partial, discriminating credit, so pass@1 depends on what
each greedy completion actually is.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from asympo.config import Settings
from asympo.evaluation import hf_greedy
from asympo.model import ensure_default_model, load_causal_lm, load_tokenizer
from asympo.tasks import load_task
from asympo.verifiers import as_verdict, resolve_verifier

pytestmark = pytest.mark.vllm

REPO = Path(__file__).resolve().parents[2]
N_PROBLEMS = 40
K = 4
PLUGIN = "tests.integration.eval_plugins:leading_digit"


def run_cli(*args: str, timeout: float = 150.0) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "asympo.cli", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return ensure_default_model(Settings())


def independent_pass_at_1(model_dir: Path) -> float:
    """Greedy pass@1 by transformers + the verifier called directly (no engine, no pool)."""
    settings = Settings()
    task = load_task("arith", train_size=1, eval_size=N_PROBLEMS)
    model = load_causal_lm(str(model_dir))
    tokenizer = load_tokenizer(str(model_dir))
    prompts = [task.render(p) for p in task.test]
    outs = hf_greedy(
        model, tokenizer, prompts, settings.sampling.max_tokens, settings.sampling.stop
    )
    verify = resolve_verifier(PLUGIN)
    correct = sum(
        as_verdict(verify(o, p.answer)).reward >= 1.0 for o, p in zip(outs, task.test, strict=True)
    )
    return correct / len(task.test)


def test_eval_json_matches_independent_greedy(model_dir: Path) -> None:
    proc = run_cli(
        "eval",
        "--model",
        str(model_dir),
        "--task",
        "arith",
        "--n-problems",
        str(N_PROBLEMS),
        "--k",
        str(K),
        "--json",
        "--set",
        f"task.verifier={PLUGIN}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["n_problems"] == N_PROBLEMS
    assert report["engine"] == "vllm"
    assert report["verifier"] == PLUGIN
    assert report["k"] == K and report["verifier_timeouts"] == 0
    expected = independent_pass_at_1(model_dir)
    # vLLM and transformers greedy agree on this fp32 model; allow one problem of slack
    # for a near-tie argmax.
    assert abs(report["pass_at_1"] - expected) <= 1.0 / N_PROBLEMS + 1e-9, (report, expected)
    assert 0.0 < expected < 1.0, "the plug-in verifier should discriminate"
    assert 0.0 < report["pass_at_k"] <= 1.0


def test_eval_table_on_the_transformers_engine(model_dir: Path) -> None:
    proc = run_cli(
        "eval",
        "--model",
        str(model_dir),
        "--task",
        "arith",
        "--n-problems",
        "8",
        "--k",
        "2",
        "--engine",
        "transformers",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "pass@1 (greedy)" in proc.stdout and "pass@2 (T=1)" in proc.stdout
    assert "engine transformers, verifier gsm8k" in proc.stdout


def test_eval_table_and_clean_errors(model_dir: Path, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    proc = run_cli("eval", "--model", str(missing), "--task", "arith", timeout=60)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr + proc.stdout
    assert "no-such-model" in proc.stderr

    proc = run_cli("eval", "--model", str(model_dir), "--task", "nosuchtask", timeout=60)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr + proc.stdout
    assert "unknown task" in proc.stderr

    proc = run_cli(
        "eval", "--model", str(model_dir), "--engine", "tensorrt", "--task", "arith", timeout=60
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr + proc.stdout
    assert "rollout.engine" in proc.stderr
