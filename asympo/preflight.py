"""Settings checked against the model before any service starts.

Some mistakes only show against a particular model: ``sampling.max_tokens`` beyond its
context, prompts or stop strings its vocabulary cannot encode, a tokenizer larger than
the embedding. Left to the engine they surface as an exception in a running loop,
minutes later and in one process's log; here they are one line before anything starts.
``asympo up`` checks before it starts a child, and the learner and rollout services
check again at their own start (they may be started alone, e.g. on Kubernetes).

Only the model's ``config.json`` and tokenizer are read: no weights, no engine.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from transformers import AutoConfig

from asympo.config import ConfigError, Settings
from asympo.model.loading import ModelLoadError, load_tokenizer
from asympo.tasks import Task, task_from_settings

# Attribute names different architectures give their context length, most specific first.
_CONTEXT_ATTRS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


class ModelMismatch(ConfigError):
    """The settings ask for something this model cannot do; the message says what to change."""


def model_context(config: Any) -> int | None:
    """The context length (tokens) of a transformers model config, or None if it names none."""
    for attr in _CONTEXT_ATTRS:
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def task_prompts(settings: Settings, task: Task | None = None, tokenizer: Any = None) -> list[str]:
    """Every prompt text the learner can admit or evaluate, as the model will see it.

    Without ``task``, the run's task is built as the learner builds it; ``tokenizer`` (the
    model's) renders ``task.prompt_format=chat``.
    """
    if task is None:
        task = task_from_settings(settings.task, tokenizer)
    return [task.render(p) for p in (*task.train, *task.test)]


def check_against_model(
    settings: Settings, model_path: str, prompts: Sequence[str] | None = None
) -> None:
    """Raise ModelMismatch (one line) if the settings cannot run on ``model_path``.

    Checks the tokenizer against the embedding size, every stop string against the
    vocabulary, and, with ``prompts``, that each one encodes without unknown tokens and
    that the longest one plus ``sampling.max_tokens`` fits the context. Without
    ``prompts`` (a rollout replica does not own the task) a one-token prompt is assumed.
    """
    tokenizer = load_tokenizer(model_path)  # first: its errors say what a wrong path is
    try:
        config = AutoConfig.from_pretrained(model_path)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read the model config of {model_path!r}: {exc}") from exc
    vocab = getattr(config, "vocab_size", None)
    if isinstance(vocab, int) and len(tokenizer) > vocab:
        raise ModelMismatch(
            f"the tokenizer of {model_path} has {len(tokenizer)} tokens but the model's "
            f"embedding holds {vocab}: they do not belong together"
        )

    def lost(texts: list[str], encoded: list[list[int]]) -> int | None:
        """Index of the first text its tokens do not give back (unknown characters)."""
        decoded = tokenizer.batch_decode(
            encoded, skip_special_tokens=True, clean_up_tokenization_spaces=False
        )
        for i, (text, back) in enumerate(zip(texts, decoded, strict=True)):
            # Whitespace aside: some tokenizers add or drop a leading space by design.
            if "".join(text.split()) != "".join(back.split()):
                return i
        return None

    stops = list(settings.sampling.stop)
    encoded_stops = [tokenizer.encode(s, add_special_tokens=False) for s in stops]
    if "" in stops:
        raise ModelMismatch("sampling.stop holds an empty string; remove it")
    bad_stop = lost(stops, encoded_stops)
    if bad_stop is not None:
        raise ModelMismatch(
            f"sampling.stop {stops[bad_stop]!r} has characters the vocabulary of {model_path} "
            "lacks: the model can never produce it"
        )
    longest, longest_text = 1, ""
    if prompts:
        encoded = tokenizer(list(prompts), add_special_tokens=False).input_ids
        bad = lost(list(prompts), encoded)
        if bad is not None:
            raise ModelMismatch(
                f"task {settings.task.name!r} has prompts the vocabulary of {model_path} cannot "
                f"encode (e.g. {prompts[bad][:60]!r}); use a model whose tokenizer covers the task"
            )
        at = max(range(len(encoded)), key=lambda i: len(encoded[i]))
        longest, longest_text = len(encoded[at]), prompts[at]
    context = model_context(config)
    max_tokens = settings.sampling.max_tokens
    if context is not None and longest + max_tokens > context:
        what = f"the longest prompt ({longest} tokens)" if longest_text else "a prompt"
        raise ModelMismatch(
            f"sampling.max_tokens={max_tokens} plus {what} exceeds the {context}-token context "
            f"of {model_path}; set sampling.max_tokens to at most {max(context - longest, 0)}"
        )
