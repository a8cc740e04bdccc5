"""How a problem becomes prompt text: the task's template or a reasoning preset, raw or chat.

One function renders every prompt the system sees: :meth:`Task.render`, with the
:class:`PromptStyle` that :func:`asympo.tasks.task_from_settings` attaches. The learner
renders the prompts it admits (the rollout service tokenises that text for the engine and
ships the tokens back, which the learner re-scores), ``asympo eval``, the tiny model's warm
start and the staleness experiment call the same method, so the prompt is byte-identical
wherever it is used.

* ``raw``: the text itself (the task's template, or the preset's user message; a system
  prompt, if any, goes first, separated by a blank line).
* ``chat``: ``[system?, user]`` messages through the model tokenizer's own Jinja chat
  template, ``add_generation_prompt=True``, exactly as TRL and verl do for conversational
  prompts. The rendered text carries the template's markers (``<|im_start|>`` ...), so the
  engine sees the same tokens the template would give when tokenised directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from asympo.tasks.base import ChatFn, Messages, PromptStyle, TaskError

PROMPT_FORMATS = ("raw", "chat")
BOXED_INSTRUCTION = "Let's think step by step and output the final answer within \\boxed{}."


@dataclass(frozen=True)
class PromptPreset:
    """A named prompt convention: user message, optional system prompt, matched verifier.

    ``user`` holds one ``{question}`` field; ``verifier`` replaces the task's default
    verifier unless ``task.verifier`` is set explicitly.
    """

    name: str
    user: str
    system: str
    verifier: str
    description: str


PRESETS: dict[str, PromptPreset] = {
    p.name: p
    for p in (
        PromptPreset(
            "boxed",
            "{question}\n" + BOXED_INSTRUCTION,
            "",
            "boxed",
            "verl's GSM8K/MATH recipe and TRL's GRPO examples: step-by-step instruction "
            "after the question, answer in the last \\boxed{}",
        ),
        PromptPreset(
            "boxed-system",
            "{question}",
            "Please reason step by step, and put your final answer within \\boxed{}.",
            "boxed",
            "Qwen2.5-Math's system prompt (the R1-Zero-style math runs); the question alone "
            "as the user message",
        ),
    )
}


def chat_renderer(tokenizer: Any, model: str = "the model") -> ChatFn:
    """Render messages with ``tokenizer``'s chat template, ending with the assistant's turn.

    TaskError (one line) when the tokenizer has no chat template.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise TaskError(
            f"task.prompt_format=chat needs a chat template, and the tokenizer of {model} has "
            "none: use task.prompt_format=raw (base models) or an instruct model"
        )

    def render(messages: Messages) -> str:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return str(text)

    return render


def prompt_style(
    prompt_format: str,
    preset: str = "",
    system_prompt: str = "",
    tokenizer: Any = None,
    model: str = "the model",
) -> PromptStyle:
    """The style for these settings; TaskError for an unknown format/preset or no template.

    ``system_prompt`` overrides the preset's system prompt.
    """
    if prompt_format not in PROMPT_FORMATS:
        raise TaskError(f"unknown prompt format {prompt_format!r}; known: raw, chat")
    chosen = resolve_preset(preset)
    chat = None
    if prompt_format == "chat":
        if tokenizer is None:
            raise TaskError("task.prompt_format=chat needs the model's tokenizer to render")
        chat = chat_renderer(tokenizer, model)
    return PromptStyle(
        format=prompt_format,
        user=chosen.user if chosen else "",
        system=system_prompt or (chosen.system if chosen else ""),
        chat=chat,
    )


def resolve_preset(name: str) -> PromptPreset | None:
    """The preset called ``name`` (None for ``""``); TaskError listing the known ones."""
    if not name:
        return None
    if name not in PRESETS:
        raise TaskError(f"unknown prompt preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]
