"""What a task is: problems with reference answers, a prompt template and a verifier name."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


class TaskError(ValueError):
    """A task cannot be built from what the user gave (missing file, wrong schema, bad spec)."""


Messages = list[dict[str, str]]
ChatFn = Callable[[Messages], str]


@dataclass(frozen=True)
class PromptStyle:
    """How :meth:`Task.render` turns a question into prompt text.

    ``user`` is the user-message template (``""`` = the task's own template); ``chat``
    renders messages with a tokenizer's chat template and is required when
    ``format == "chat"``.
    """

    format: str = "raw"
    user: str = ""
    system: str = ""
    chat: ChatFn | None = None

    def render(self, question: str, task_template: str) -> str:
        """The prompt text for ``question`` (``task_template`` when no preset user template)."""
        user = (self.user or task_template).replace("{question}", question)
        if self.format == "raw":
            return f"{self.system}\n\n{user}" if self.system else user
        if self.chat is None:
            raise TaskError("task.prompt_format=chat needs the model's tokenizer to render")
        system = [{"role": "system", "content": self.system}] if self.system else []
        return self.chat([*system, {"role": "user", "content": user}])


@dataclass(frozen=True)
class Problem:
    """One prompt with its reference answer.

    ``answer`` is what the verifier compares against (GSM8K style ``#### N`` for
    arith/gsm8k, ``\\boxed{...}`` for MATH); ``solution`` is an optional worked
    solution that supervised warm-start can imitate.
    """

    prompt_id: str
    question: str
    answer: str
    solution: str = ""


@dataclass
class Task:
    """Problems split into train and held-out test, plus how to prompt and verify them.

    ``template`` is a ``str.format`` pattern with one ``{question}`` field; ``prompt``
    (raw by default) says how the rendered question becomes the prompt text
    (:mod:`asympo.tasks.prompting`).
    """

    name: str
    train: list[Problem]
    test: list[Problem]
    verifier: str
    template: str = "{question}"
    target_kind: str = "solution"
    metadata: dict[str, str] = field(default_factory=dict)
    prompt: PromptStyle = field(default_factory=PromptStyle)

    def render(self, problem: Problem) -> str:
        """The prompt text the model sees for ``problem`` (every entry point calls this)."""
        return self.prompt.render(problem.question, self.template)

    def sft_target(self, problem: Problem) -> str:
        """A completion the task's verifier accepts, for supervised warm-start.

        For arith it is the bare number (e.g. ``"85"``), never ending in the
        default stop string; for datasets with worked solutions it is the solution.
        """
        if self.target_kind == "number":
            number = final_number(problem.answer)
            # A boxed preset's verifier wants the answer in \boxed{}: teach that form.
            return f"\\boxed{{{number}}}" if self.verifier == "boxed" else number
        return (problem.solution or problem.answer).rstrip("\n")


def final_number(answer: str) -> str:
    """The text after the last ``####`` of a GSM8K-style answer, stripped (else the answer)."""
    _, sep, tail = answer.rpartition("####")
    return tail.strip() if sep else answer.strip()
