"""Tasks: prompts with reference answers, a prompt template and the verifier to score them.

``load_task(name, ...)`` is the one entry point. Names: ``arith`` (optionally with
options, ``arith:digits=3,ops=+-*,negative=1``), ``gsm8k``, ``math`` and ``jsonl``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from asympo.tasks.arith import (
    ARITH_ALPHABET,
    PRINTABLE_ALPHABET,
    ArithSpec,
    make_arith_task,
    parse_arith_spec,
)
from asympo.tasks.base import Problem, PromptStyle, Task, TaskError
from asympo.tasks.gsm8k import load_gsm8k
from asympo.tasks.jsonl import load_jsonl
from asympo.tasks.math_dataset import load_math
from asympo.tasks.prompting import PRESETS, PROMPT_FORMATS, prompt_style, resolve_preset

if TYPE_CHECKING:
    from asympo.config import TaskSettings

TASK_NAMES = ("arith", "gsm8k", "math", "jsonl")
# The verifier each task uses unless configured otherwise (the reward service falls back
# to this when a prompt arrives without a verifier name).
DEFAULT_VERIFIERS = {"arith": "gsm8k", "gsm8k": "gsm8k", "math": "math", "jsonl": "math"}

__all__ = [
    "ARITH_ALPHABET",
    "DEFAULT_VERIFIERS",
    "PRESETS",
    "PRINTABLE_ALPHABET",
    "PROMPT_FORMATS",
    "TASK_NAMES",
    "ArithSpec",
    "Problem",
    "PromptStyle",
    "Task",
    "TaskError",
    "default_verifier",
    "load_task",
    "make_arith_task",
    "task_from_settings",
]


def load_task(
    name: str,
    path: str = "",
    seed: int = 0,
    train_size: int = 20_000,
    eval_size: int = 200,
    verifier: str = "",
) -> Task:
    """Build task ``name``; ``path`` is a local file/directory or HF dataset id (not for arith).

    ``verifier`` overrides the task's default verifier name (a builtin, a configured
    plug-in, or ``module:function``). Raises TaskError with a readable message.
    """
    base, _, options = name.partition(":")
    if base == "arith":
        task = make_arith_task(parse_arith_spec(options), seed, train_size, eval_size)
    elif options:
        raise TaskError(f"task {base!r} takes no ':options' (got {name!r})")
    elif base == "gsm8k":
        task = load_gsm8k(path, seed, train_size, eval_size)
    elif base == "math":
        task = load_math(path, seed, train_size, eval_size)
    elif base == "jsonl":
        task = load_jsonl(path, seed, train_size, eval_size)
    else:
        raise TaskError(f"unknown task {name!r}; known: {', '.join(TASK_NAMES)}")
    if verifier:
        task.verifier = verifier
    return task


def default_verifier(task_name: str) -> str:
    """The default verifier of task ``task_name`` (``arith:digits=3`` works); '' if unknown."""
    return DEFAULT_VERIFIERS.get(task_name.partition(":")[0], "")


def task_from_settings(
    settings: TaskSettings,
    tokenizer: Any = None,
    model: str = "the model",
    train_size: int | None = None,
    eval_size: int | None = None,
) -> Task:
    """The run's task exactly as configured: name, path, seed, sizes, verifier and prompt.

    Every entry point builds its task here (learner, ``asympo eval``, the tiny model's warm
    start, the staleness experiment), so all render the same prompts. ``tokenizer`` (of
    ``model``) is needed for ``prompt_format=chat``; a preset's verifier applies unless
    ``verifier`` is set. Raises TaskError with one readable line.
    """
    preset = resolve_preset(settings.prompt_preset)
    task = load_task(
        settings.name,
        path=settings.path,
        seed=settings.seed,
        train_size=settings.train_size if train_size is None else train_size,
        eval_size=settings.eval_size if eval_size is None else eval_size,
        verifier=settings.verifier or (preset.verifier if preset else ""),
    )
    task.prompt = prompt_style(
        settings.prompt_format, settings.prompt_preset, settings.system_prompt, tokenizer, model
    )
    return task
