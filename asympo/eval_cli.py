"""`asympo eval`: greedy pass@1 and sampled pass@k of a model through the inference engine.

The model generates with the configured engine (vLLM by default, the same one rollout
serves with), with the run's stop strings and token budget (``sampling.stop``,
``sampling.max_tokens``); every completion is judged by the task's verifier in the
reward service's killable worker pool under ``reward.time_limit_s``. The arithmetic
(pass@k estimator, greedy/sampled split) is :func:`asympo.evaluation.evaluate`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from asympo.config import Settings
from asympo.engines import Engine, EngineError, GenerationRequest, create_engine
from asympo.evaluation import GenerateFn, VerifyFn, evaluate
from asympo.model import ModelLoadError, load_tokenizer
from asympo.tasks import Task, TaskError, load_task
from asympo.verifiers import UnknownVerifierError, VerifierPool, resolve_verifier


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


def load_eval_task(settings: Settings, name: str, n_problems: int) -> Task:
    """Task ``name`` with its first ``n_problems`` held-out problems (EvalError if unusable)."""
    try:
        task = load_task(
            name,
            path=settings.task.path,
            seed=settings.task.seed,
            train_size=1,  # eval reads only the held-out split
            eval_size=n_problems,
            verifier=settings.task.verifier,
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


def start_engine(settings: Settings, model: str) -> Engine:
    """The configured engine on ``model``; EvalError with the reason if it cannot start."""
    try:
        load_tokenizer(model)  # a wrong path fails here, clearly and before vLLM starts
    except ModelLoadError as exc:
        raise EvalError(str(exc)) from exc
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
) -> EvalReport:
    """Evaluate ``model`` on ``task_name``: greedy pass@1 and, for ``k > 0``, pass@k."""
    if n_problems < 1:
        raise EvalError("--n-problems must be at least 1")
    if k < 0:
        raise EvalError("--k must be >= 0 (0 skips pass@k)")
    if temperature <= 0 and k > 0:
        raise EvalError("--temperature must be > 0 for pass@k (greedy samples are identical)")
    task = load_eval_task(settings, task_name, n_problems)
    started = time.monotonic()
    log(f"starting the {settings.rollout.engine} engine on {model} ...")
    engine = start_engine(settings, model)
    try:
        with VerifierPool(
            size=settings.reward.pool_size,
            time_limit_s=settings.reward.time_limit_s,
            plugins=settings.reward.plugins,
        ) as pool:
            log(f"evaluating {len(task.test)} problems of {task_name} (k={k}) ...")
            generate = engine_generate_fn(
                engine, settings.sampling.max_tokens, settings.sampling.stop, settings.learner.seed
            )
            try:
                result = evaluate(
                    task, task.test, generate, pool_verify_fn(pool, task.verifier), k, temperature
                )
            except EngineError as exc:
                raise EvalError(f"the engine refused a request: {exc}") from exc
            timeouts = pool.timeouts
    finally:
        engine.close()
    return EvalReport(
        model=model,
        task=task_name,
        engine=engine.name,
        verifier=task.verifier,
        n_problems=result.n_problems,
        pass_at_1=result.pass_at_1,
        k=result.k,
        pass_at_k=result.pass_at_k,
        temperature=temperature,
        max_tokens=settings.sampling.max_tokens,
        verifier_timeouts=timeouts,
        seconds=time.monotonic() - started,
    )
