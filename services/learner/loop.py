"""The learner's supervised loop and what surrounds it: evaluate, finish.

``TrainingLoop.step`` is what ``asympo serve learner`` supervises (asympo.service): wait
for a batch, train, serve checkpoint requests, evaluate every ``eval_every`` steps.
Publishing lives in services/learner/publisher.py; ``finish`` is the clean stop
(checkpoint, last publish, final model).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from asympo.config import Settings
from asympo.evaluation import evaluate, hf_greedy
from asympo.run_log import MetricsWriter
from asympo.tasks import Task
from asympo.verifiers import as_verdict, resolve_verifier
from services.learner.learner import Learner
from services.learner.sharding import is_sharded

log = logging.getLogger("asympo.learner")


def held_out_accuracy(
    settings: Settings, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, task: Task
) -> float:
    """Greedy pass@1 of ``model`` on the task's held-out split."""
    verifier = resolve_verifier(task.verifier, settings.reward.plugins)

    def generate(prompts: list[str], n: int, temperature: float) -> list[list[str]]:
        outs = hf_greedy(
            model, tokenizer, prompts, settings.sampling.max_tokens, settings.sampling.stop
        )
        return [[o] for o in outs]

    def verify(response: str, reference: str) -> float:
        return as_verdict(verifier(response, reference)).reward

    return evaluate(task, task.test[: settings.task.eval_size], generate, verify).pass_at_1


class TrainingLoop:
    """One supervised step of the learner: train, serve requests, evaluate, log.

    Sets ``stop`` once ``learner.max_steps`` is reached (0 = never).
    """

    def __init__(
        self,
        settings: Settings,
        learner: Learner,
        model: torch.nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        task: Task,
        writer: MetricsWriter,
        stop: threading.Event,
    ) -> None:
        self.settings = settings
        self.learner = learner
        self.model = model
        self.tokenizer = tokenizer
        self.task = task
        self.writer = writer
        self.stop = stop
        self._evaluated_start = learner.version != 0

    def done(self) -> bool:
        """Whether ``learner.max_steps`` is reached."""
        max_steps = self.settings.learner.max_steps
        return max_steps != 0 and self.learner.version >= max_steps

    def evaluate(self) -> None:
        """Write the held-out accuracy of the current version to metrics.jsonl."""
        acc = held_out_accuracy(self.settings, self.model, self.tokenizer, self.task)
        n_eval = len(self.task.test[: self.settings.task.eval_size])  # for the 95% interval
        self.writer.write(
            {"step": self.learner.version, "version": self.learner.version, "accuracy": acc}
            | {"eval_size": n_eval}
        )

    def step(self) -> None:
        """Wait up to 1 s for a batch and train on it; evaluate every ``eval_every`` steps."""
        lc, learner = self.settings.learner, self.learner
        if lc.eval_every and not self._evaluated_start:
            self.evaluate()
            self._evaluated_start = True
        if self.done():
            self.stop.set()
            return
        record = learner.step(timeout_s=1.0)
        learner.serve_requests()
        if record is None:
            return
        last = self.done()
        if lc.eval_every and (learner.version % lc.eval_every == 0 or last):
            self.evaluate()
        log.info(
            "step %d loss %.4f balance %+.2e reward %.3f staleness %.2f",
            learner.version,
            record["loss"],
            record["loss_balance"],
            record["reward_mean"],
            record["staleness_mean"],
        )
        if last:
            self.stop.set()


def finish(
    settings: Settings, learner: Learner, model: Any, tokenizer: PreTrainedTokenizerBase
) -> None:
    """After a clean stop: checkpoint, publish what is unpublished (and wait until the store
    has it), save the final model."""
    # Under fsdp the other ranks join these three, so they are told to stop after.
    learner.checkpoint()
    learner.finish_publishing()
    final = Path(settings.run_dir) / "final"
    weights = learner.gather_weights() if is_sharded(learner.model) else None
    learner.stop_followers()
    model.save_pretrained(str(final), state_dict=weights)
    tokenizer.save_pretrained(str(final))
    log.info("learner stopped at version %d; final model in %s", learner.version, final)
