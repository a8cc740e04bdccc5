"""What a task is: problems with reference answers, a prompt template and a verifier name."""

from __future__ import annotations

from dataclasses import dataclass, field


class TaskError(ValueError):
    """A task cannot be built from what the user gave (missing file, wrong schema, bad spec)."""


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

    ``template`` is a ``str.format`` pattern with one ``{question}`` field.
    """

    name: str
    train: list[Problem]
    test: list[Problem]
    verifier: str
    template: str = "{question}"
    target_kind: str = "solution"
    metadata: dict[str, str] = field(default_factory=dict)

    def render(self, problem: Problem) -> str:
        """The prompt text the model sees for ``problem``."""
        return self.template.replace("{question}", problem.question)

    def sft_target(self, problem: Problem) -> str:
        """A completion the task's verifier accepts, for supervised warm-start.

        For arith it is the bare number (e.g. ``"85"``), never ending in the
        default stop string; for datasets with worked solutions it is the solution.
        """
        if self.target_kind == "number":
            return final_number(problem.answer)
        return (problem.solution or problem.answer).rstrip("\n")


def final_number(answer: str) -> str:
    """The text after the last ``####`` of a GSM8K-style answer, stripped (else the answer)."""
    _, sep, tail = answer.rpartition("####")
    return tail.strip() if sep else answer.strip()
