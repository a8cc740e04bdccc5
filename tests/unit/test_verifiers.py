"""Verifiers: equivalence tables, hard time limits in the pool, plug-ins, property tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asympo.verifiers import (
    UnknownVerifierError,
    Verdict,
    VerifierPool,
    apply_format_reward,
    resolve_verifier,
    run_verifier,
)
from asympo.verifiers.exact import verify_exact
from asympo.verifiers.gsm8k import verify_gsm8k
from asympo.verifiers.math_equiv import verify_math
from services.reward.scoring import outcome

TIME_LIMIT_S = 1.5
MARGIN_S = 1.5

MATH_EQUIVALENT = [
    ("\\frac{1}{2}", "0.5"),
    ("$\\boxed{\\frac{1}{2}}$", "\\frac12"),
    ("The answer is $\\boxed{3}$.", "3"),
    ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}"),
    ("\\boxed{\\dfrac{3}{4}}", "0.75"),
    ("\\boxed{(1, 2)}", "(1,2)"),
    ("so $x = 5$", "5"),
    ("$\\boxed{-\\frac{7}{3}}$", "-7/3"),
]
MATH_DIFFERENT = [
    ("\\boxed{\\frac{1}{3}}", "0.5"),
    ("\\boxed{3}", "4"),
    ("\\boxed{\\sqrt{2}}", "2"),
    ("\\boxed{(2, 1)}", "(1,2)"),
]
GSM8K_EQUIVALENT = [
    ("#### 1,000", "#### 1000"),
    ("The answer is 85.0", "#### 85"),
    ("#### $85", "#### 85"),
    ("so #### 85.", "#### 85"),
    ("85", "He has 85.\n#### 85"),
    ("3 + 4 = 7, #### 7 apples", "#### 7"),
    ("-5", "#### -5"),
    ("#### 0.50", "#### .5"),
]
GSM8K_DIFFERENT = [
    ("#### 84", "#### 85"),
    ("85 and then 86", "#### 85"),
    ("#### 850", "#### 85"),
    ("#### 85 then 86", "#### 86"),
    ("5", "#### -5"),
]


@pytest.mark.parametrize(("response", "reference"), MATH_EQUIVALENT)
def test_math_equivalent(response: str, reference: str) -> None:
    assert verify_math(response, reference) == Verdict(1.0, "correct")


@pytest.mark.parametrize(("response", "reference"), MATH_DIFFERENT)
def test_math_not_equivalent(response: str, reference: str) -> None:
    assert verify_math(response, reference) == Verdict(0.0, "wrong answer")


@pytest.mark.parametrize(("response", "reference"), GSM8K_EQUIVALENT)
def test_gsm8k_equivalent(response: str, reference: str) -> None:
    assert verify_gsm8k(response, reference) == Verdict(1.0, "correct")


@pytest.mark.parametrize(("response", "reference"), GSM8K_DIFFERENT)
def test_gsm8k_not_equivalent(response: str, reference: str) -> None:
    assert verify_gsm8k(response, reference) == Verdict(0.0, "wrong answer")


def test_no_answer_reasons() -> None:
    assert verify_gsm8k("I do not know", "#### 85").reason == "no answer"
    assert verify_math("", "3").reason == "no answer"
    assert verify_exact("  ", "x").reason == "no answer"
    assert verify_gsm8k("85", "no number here").reason == "reference has no number"


def test_exact_and_plain_text_math() -> None:
    assert verify_exact(" Paris\n", "Paris").reward == 1.0
    assert verify_exact("85", "#### 85").reward == 1.0
    assert verify_exact("paris", "Paris").reward == 0.0
    assert verify_math("paris", "Paris").reward == 1.0
    assert verify_math("London", "Paris").reward == 0.0


def test_format_reward_only_for_wrong_but_well_formed() -> None:
    wrong = verify_gsm8k("#### 84", "#### 85")
    assert apply_format_reward("gsm8k", wrong, "#### 84", 0.1).reward == 0.1
    assert apply_format_reward("gsm8k", Verdict(0.0, "wrong answer"), "84", 0.1).reward == 0.0
    assert apply_format_reward("math", Verdict(0.0, "x"), "\\boxed{1}", 0.2).reward == 0.2
    assert apply_format_reward("gsm8k", Verdict(1.0, "correct"), "#### 85", 0.1).reward == 1.0
    assert apply_format_reward("gsm8k", wrong, "#### 84", 0.0) == wrong
    shaped = apply_format_reward("gsm8k", wrong, "#### 84", 0.1)
    assert shaped.reward > 0 and not shaped.correct and outcome(shaped) == "wrong"
    assert outcome(Verdict(1.0, "exact match")) == "correct"
    assert not Verdict(1.0, "x", failed=True).correct


def test_plugin_return_values_are_normalised() -> None:
    fn = resolve_verifier("tests.verifier_plugins:shouting")
    assert run_verifier(fn, "x", "HELLO", "") == Verdict(1.0, "loud")
    broken = run_verifier(resolve_verifier("tests.verifier_plugins:explode"), "x", "a", "b")
    assert broken.failed and "RuntimeError: plug-in bug" in broken.reason


def test_resolution_order_and_errors() -> None:
    plugins = {"gsm8k": "tests.verifier_plugins:shouting"}
    assert resolve_verifier("gsm8k", plugins).__name__ == "shouting"
    assert resolve_verifier("gsm8k").__name__ == "verify_gsm8k"
    for bad in ["nope", "tests.no_such_module:f", "tests.verifier_plugins:missing", "x:"]:
        with pytest.raises(UnknownVerifierError):
            resolve_verifier(bad)


def test_entry_point_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dist = tmp_path / "my_verifiers-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-verifiers\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[asympo.verifiers]\nloud = tests.verifier_plugins:shouting\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert resolve_verifier("loud").__name__ == "shouting"


@pytest.fixture(scope="module")
def pool() -> Iterator[VerifierPool]:
    with VerifierPool(
        size=2,
        time_limit_s=TIME_LIMIT_S,
        plugins={"shout": "tests.verifier_plugins:shouting"},
        format_reward=0.1,
    ) as p:
        yield p


def test_pool_scores_builtins_and_named_plugins(pool: VerifierPool) -> None:
    verdicts = pool.score_many(
        [
            ("math", "\\boxed{\\frac{1}{2}}", "0.5"),
            ("gsm8k", "#### 84", "#### 85"),
            ("exact", "a", "a"),
            ("shout", "HEY", ""),
        ]
    )
    assert [v.reward for v in verdicts] == [1.0, 0.1, 1.0, 1.0]
    assert verdicts[3].reason == "loud"
    # "Correct" has one meaning on both sides of the worker pipe: the verifier's own
    # credit. Format shaping (0.1) is a reward, not a correct answer; a plug-in's own
    # reason ("loud") does not make a correct answer wrong.
    assert [v.correct for v in verdicts] == [True, False, True, True]


def test_hanging_verifier_is_cut_off_and_pool_goes_on(pool: VerifierPool) -> None:
    started = time.monotonic()
    verdict = pool.score("tests.verifier_plugins:hang", "x", "y")
    elapsed = time.monotonic() - started
    assert verdict.timed_out and verdict.reward == 0.0 and verdict.reason.startswith("timeout")
    assert TIME_LIMIT_S <= elapsed < TIME_LIMIT_S + MARGIN_S
    assert pool.score_many([("gsm8k", "85", "#### 85")] * 4) == [Verdict(1.0, "correct")] * 4


def test_hangs_run_in_parallel_up_to_pool_size(pool: VerifierPool) -> None:
    started = time.monotonic()
    verdicts = pool.score_many([("tests.verifier_plugins:hang", "", "")] * 2)
    assert all(v.timed_out for v in verdicts)
    assert time.monotonic() - started < 2 * TIME_LIMIT_S


def test_crashing_and_raising_verifiers_fail_without_stopping_the_pool(
    pool: VerifierPool,
) -> None:
    crashed = pool.score("tests.verifier_plugins:crash", "x", "y")
    assert crashed.failed and crashed.reason.startswith("verifier crashed")
    raised = pool.score("tests.verifier_plugins:explode", "x", "y")
    assert raised.failed and "plug-in bug" in raised.reason
    unknown = pool.score("no_such_verifier", "x", "y")
    assert unknown.failed and "unknown verifier" in unknown.reason
    assert pool.score("gsm8k", "7", "#### 7").reward == 1.0


def test_plugin_printing_to_stdout_does_not_break_the_pool(pool: VerifierPool) -> None:
    assert pool.score("tests.verifier_plugins:chatty", "a", "a").reward == 1.0
    assert pool.score("tests.verifier_plugins:chatty", "a", "b").reward == 0.0


OWNER_SCRIPT = """
import sys, threading, time
from asympo.verifiers import VerifierPool
pool = VerifierPool(2, 60.0)
assert pool.score("gsm8k", "1", "#### 1").reward == 1.0
threading.Thread(target=pool.score, args=("tests.verifier_plugins:hang", "", "")).start()
print("ready", flush=True)
time.sleep(120)
"""


def test_workers_die_with_a_killed_owner(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[2]
    script = tmp_path / "owner.py"  # no __main__ guard on purpose: workers must not re-run it
    script.write_text(OWNER_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(root)}
    owner = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, env=env)
    assert owner.stdout is not None and owner.stdout.readline() == b"ready\n"
    children = subprocess.run(
        ["ps", "-o", "pid=", "--ppid", str(owner.pid)], capture_output=True, text=True
    ).stdout.split()
    assert len(children) == 2
    owner.send_signal(signal.SIGKILL)
    owner.wait()
    deadline = time.monotonic() + 5
    alive = children
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = [pid for pid in children if Path(f"/proc/{pid}").exists() and not _zombie(pid)]
    assert not alive, "verifier workers outlived their owner"


def _zombie(pid: str) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")
    except OSError:
        return False


LATEXISH = st.text(alphabet="\\{}()^_+-*/=.,0123456789xyzabfrcsqtbox $#%!", max_size=400)
HUGE = st.sampled_from(
    [
        "\\frac{" * 20_000,
        "9" * 300_000,
        "(" * 50_000 + "1",
        "\\boxed{" * 5_000 + "1" + "}" * 5_000,
        "#### " + "1," * 100_000,
        "10^{10^{10^{10^{10^{10}}}}}",
        "x" * 1_000_000,
        "\\sqrt{" * 3_000 + "2" + "}" * 3_000,
    ]
)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    verifier=st.sampled_from(["math", "gsm8k", "exact"]),
    response=st.one_of(st.text(max_size=300), LATEXISH, HUGE),
    reference=st.one_of(st.sampled_from(["3", "#### 85", "\\frac{1}{2}", "x^2"]), LATEXISH),
)
def test_any_input_gives_a_verdict_within_the_time_limit(
    pool: VerifierPool, verifier: str, response: str, reference: str
) -> None:
    started = time.monotonic()
    verdict = pool.score(verifier, response, reference)
    assert time.monotonic() - started < TIME_LIMIT_S + MARGIN_S
    assert isinstance(verdict, Verdict) and not verdict.failed
    assert 0.0 <= verdict.reward <= 1.0


@settings(max_examples=200, deadline=None)
@given(response=st.text(), reference=st.text())
def test_plain_verifiers_never_raise(response: str, reference: str) -> None:
    for fn in (verify_gsm8k, verify_exact):
        verdict = fn(response, reference)
        assert verdict.reward in (0.0, 1.0) and verdict.reason
