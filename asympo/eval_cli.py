"""`asympo eval`: greedy pass@1 and sampled pass@k, mean@k, maj@k of a model, per task.

The model generates with the configured engine (vLLM by default, the same one rollout
serves with), with the run's stop strings and token budget (``sampling.stop``,
``sampling.max_tokens``) and the run's prompt (the task built by
:func:`asympo.tasks.task_from_settings`, so ``task.prompt_format``/``prompt_preset`` render
exactly what the learner trained on); every completion is judged by the task's verifier
in the reward service's killable worker pool under ``reward.time_limit_s``. The
arithmetic (estimators, majority vote, confidence intervals) is
:func:`asympo.evaluation.evaluate`. The model may be a model directory, a HF id, a run
directory (its ``final/``) or a run id (``runs/<id>/final``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from asympo.config import Settings
from asympo.engines import Engine, EngineError, GenerationRequest, create_engine
from asympo.evaluation import GenerateFn, VerifyFn, evaluate
from asympo.model import ModelLoadError, load_tokenizer
from asympo.tasks import Task, TaskError, task_from_settings
from asympo.verifiers import UnknownVerifierError, VerifierPool, answer_key, resolve_verifier

RUNS_DIR = "runs"


class EvalError(RuntimeError):
    """The evaluation cannot run as asked (model, task, verifier or engine); say why."""


@dataclass(frozen=True)
class EvalReport:
    """What ``asympo eval`` measured, printable as a table or JSON."""

    model: str
    task: str
    engine: str
    verifier: str
    n_problems: int
    pass_at_1: float
    k: int
    pass_at_k: float | None
    pass_at_1_ci: tuple[float, float]
    pass_at_k_ci: tuple[float, float] | None
    mean_at_k: float | None
    mean_at_k_ci: tuple[float, float] | None
    maj_at_k: float | None
    maj_at_k_ci: tuple[float, float] | None
    prompt_format: str
    prompt_preset: str
    temperature: float
    max_tokens: int
    verifier_timeouts: int
    seconds: float

    def as_dict(self) -> dict[str, object]:
        """The report as a JSON-ready dict."""
        return asdict(self)


def engine_generate_fn(engine: Engine, max_tokens: int, stop: list[str], seed: int) -> GenerateFn:
    """A :data:`GenerateFn` over ``engine``: temperature 0 is greedy, one call per batch.

    Every prompt of a call goes to the engine at once, so vLLM batches them all.
    """

    def generate(prompts: list[str], n: int, temperature: float) -> list[list[str]]:
        requests = [
            GenerationRequest(
                prompt_tokens=engine.encode(p),
                n=n,
                temperature=temperature,
                max_tokens=max_tokens,
                stop=list(stop),
                seed=None if temperature == 0 else seed + i,
            )
            for i, p in enumerate(prompts)
        ]
        return [[c.text for c in outs] for outs in engine.generate(requests)]

    return generate


def pool_verify_fn(pool: VerifierPool, verifier: str) -> VerifyFn:
    """A :data:`VerifyFn` that scores through ``pool`` (hard time limit; a timeout scores 0)."""

    def verify(response: str, reference: str) -> float:
        return pool.score(verifier, response, reference).reward

    return verify


def run_model_dir(spec: str, runs_dir: str = RUNS_DIR) -> Path | None:
    """The ``final/`` model of a run given as its directory or its id, else None.

    ``spec`` may be a run directory holding ``final/`` or a run id with
    ``<runs_dir>/<id>/final``; a model directory itself is not a run (None).
    """
    for run in (Path(spec).expanduser(), Path(runs_dir) / spec):
        if (run / "final" / "config.json").is_file():
            return run / "final"
    return None


def load_eval_task(
    settings: Settings, name: str, n_problems: int, tokenizer: Any = None, model: str = "the model"
) -> Task:
    """Task ``name`` with its first ``n_problems`` held-out problems (EvalError if unusable).

    Everything else (path, seed, verifier, prompt format and preset) is the run's
    ``task`` section, so the prompts are the ones the learner renders.
    """
    task_settings = settings.task.model_copy(update={"name": name})
    try:
        task = task_from_settings(  # eval reads only the held-out split
            task_settings, tokenizer, model, train_size=1, eval_size=n_problems
        )
    except TaskError as exc:
        raise EvalError(str(exc)) from exc
    if not task.test:
        raise EvalError(f"task {name!r} has no held-out problems")
    task.test = task.test[:n_problems]
    try:
        resolve_verifier(task.verifier, settings.reward.plugins)
    except UnknownVerifierError as exc:
        raise EvalError(str(exc)) from exc
    return task


def eval_tokenizer(model: str) -> Any:
    """The tokenizer of ``model`` (EvalError if it cannot load): fails fast, before vLLM."""
    try:
        return load_tokenizer(model)
    except ModelLoadError as exc:
        raise EvalError(str(exc)) from exc


def start_engine(settings: Settings, model: str) -> Engine:
    """The configured engine on ``model``; EvalError with the reason if it cannot start."""
    eval_tokenizer(model)  # a wrong path fails here, clearly and before vLLM starts
    try:
        return create_engine(settings, model)
    except Exception as exc:  # vLLM raises many types; the user needs the message only
        raise EvalError(
            f"cannot start the {settings.rollout.engine} engine on {model}: "
            f"{type(exc).__name__}: {exc}"
        ) from exc


def run_eval(
    settings: Settings,
    model: str,
    task_name: str,
    k: int,
    n_problems: int,
    temperature: float,
    log: Callable[[str], object] = lambda _m: None,
) -> list[EvalReport]:
    """Evaluate ``model`` on each task of ``task_name`` (comma-separated): one report each.

    Greedy pass@1 and, for ``k > 0``, pass@k, mean@k and maj@k, with 95% intervals.
    """
    if n_problems < 1:
        raise EvalError("--n-problems must be at least 1")
    if k < 0:
        raise EvalError("--k must be >= 0 (0 skips pass@k)")
    if temperature <= 0 and k > 0:
        raise EvalError("--temperature must be > 0 for pass@k (greedy samples are identical)")
    names = [n.strip() for n in task_name.split(",") if n.strip()]
    if not names:
        raise EvalError("--task names no task")
    tokenizer = eval_tokenizer(model)
    tasks = [load_eval_task(settings, name, n_problems, tokenizer, model) for name in names]
    log(f"starting the {settings.rollout.engine} engine on {model} ...")
    engine = start_engine(settings, model)
    reports = []
    try:
        with VerifierPool(
            size=settings.reward.pool_size,
            time_limit_s=settings.reward.time_limit_s,
            plugins=settings.reward.plugins,
        ) as pool:
            generate = engine_generate_fn(
                engine, settings.sampling.max_tokens, settings.sampling.stop, settings.rollout.seed
            )
            for name, task in zip(names, tasks, strict=True):
                started, timeouts_before = time.monotonic(), pool.timeouts
                log(f"evaluating {len(task.test)} problems of {name} (k={k}) ...")
                verifier = task.verifier

                def key(response: str, verifier: str = verifier) -> str | None:
                    return answer_key(verifier, response)

                try:
                    result = evaluate(
                        task, task.test, generate, pool_verify_fn(pool, verifier), k,
                        temperature, answer_key=key,
                    )  # fmt: skip
                except EngineError as exc:
                    raise EvalError(f"the engine refused a request: {exc}") from exc
                mean, maj = result.mean_at_k, result.maj_at_k
                reports.append(
                    EvalReport(
                        model=model,
                        task=name,
                        engine=engine.name,
                        verifier=verifier,
                        n_problems=result.n_problems,
                        pass_at_1=result.pass_at_1,
                        k=result.k,
                        pass_at_k=result.pass_at_k,
                        pass_at_1_ci=result.pass_at_1_ci,
                        pass_at_k_ci=result.pass_at_k_ci,
                        mean_at_k=None if mean is None else mean.value,
                        mean_at_k_ci=None if mean is None else (mean.low, mean.high),
                        maj_at_k=None if maj is None else maj.value,
                        maj_at_k_ci=None if maj is None else (maj.low, maj.high),
                        prompt_format=task.prompt.format,
                        prompt_preset=settings.task.prompt_preset,
                        temperature=temperature,
                        max_tokens=settings.sampling.max_tokens,
                        verifier_timeouts=pool.timeouts - timeouts_before,
                        seconds=time.monotonic() - started,
                    )
                )
    finally:
        engine.close()
    return reports
