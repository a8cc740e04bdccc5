"""`asympo serve learner`: train on scored groups until max_steps or SIGTERM/SIGINT.

Loads the policy (``model.path``, else the tiny default of ``asympo init-model``),
resumes from the newest checkpoint in ``learner.checkpoint_dir`` if there is one,
publishes version 0 (then every ``publish_every`` steps) to the weights service with
the probe log-probs, writes one line per step to ``<run_dir>/metrics.jsonl`` and serves
``/healthz`` ``/readyz`` ``/metrics`` on ``learner.http_port`` and the gRPC ``Learner``
API (``Status``; ``Checkpoint`` with the service token) on ``learner.grpc_port``.
On stop it checkpoints and saves the final model in Hugging Face format to
``<run_dir>/final``.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from pathlib import Path
from types import FrameType

import torch
from transformers import PreTrainedTokenizerBase

from asympo.config import Settings
from asympo.evaluation import evaluate, hf_greedy
from asympo.losses import needs_behaviour_logprobs
from asympo.model.loading import (
    ModelLoadError,
    load_causal_lm,
    load_tokenizer,
    resolve_model_path,
)
from asympo.probe import make_probe, probe_tokens
from asympo.redis_conn import RedisUnavailable, connect
from asympo.run_log import METRICS_FILE, MetricsWriter
from asympo.serving import HttpServer, make_http_app
from asympo.tasks import Task, load_task
from asympo.verifiers import as_verdict, resolve_verifier
from asympo.weights_client import PublishRejected, WeightsClient, WeightsClientError
from services.learner import metrics
from services.learner.distributed import init_distributed, wrap_ddp
from services.learner.learner import Learner, Publisher, follow
from services.learner.server import start_grpc

log = logging.getLogger("asympo.learner")

PUBLISH_RETRY_S = 120.0


def weights_publisher(settings: Settings, client: WeightsClient, tokens: list[int]) -> Publisher:
    """Publish through the weights service, retrying while it is not up yet."""

    def publish(version: int, parent: int, model: torch.nn.Module) -> None:
        # The bare module: a forward through the DDP wrapper on rank 0 alone would hang.
        inner = getattr(model, "module", model)
        probe = make_probe(inner, tokens, settings.rollout.probe_tolerance)
        state = {k: v.detach() for k, v in inner.state_dict().items()}
        deadline = time.monotonic() + PUBLISH_RETRY_S
        start = time.monotonic()
        while True:
            try:
                client.publish_state_dict(
                    state, version, parent, probe, {"loss": settings.learner.loss}
                )
                log.info("published version %d (%.2fs)", version, time.monotonic() - start)
                return
            except PublishRejected as exc:
                latest = client.latest()
                if latest is not None and latest.version >= version:
                    # A resumed learner re-reaches versions it published before the crash.
                    log.warning("version %d already in the store (%s); keeping it", version, exc)
                    return
                if time.monotonic() > deadline:
                    raise
                log.warning("publish of version %d failed (%s); retrying", version, exc)
            except WeightsClientError as exc:
                if time.monotonic() > deadline:
                    raise
                log.warning("weights service not reachable (%s); retrying", exc)
            time.sleep(1.0)

    return publish


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


def run(settings: Settings) -> None:
    """Run the learner until ``learner.max_steps`` (0 = forever) or a signal.

    Configuration mistakes (unknown loss, missing model or task data, unreachable
    Redis) are logged as one clear line and exit with status 2.
    """
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        _run(settings)
    except (ValueError, ModelLoadError, RedisUnavailable) as exc:
        # ValueError covers TaskError and an unknown loss or advantage name.
        log.error("learner cannot start: %s", exc)
        raise SystemExit(2) from exc


def _run(settings: Settings) -> None:
    lc = settings.learner
    needs_behaviour_logprobs(lc.loss)  # an unknown loss name fails here, before any work
    torch.manual_seed(lc.seed)
    info = init_distributed(lc.device)
    device = info.device
    path = resolve_model_path(settings)
    model = load_causal_lm(path, settings.model.dtype, str(device)).train()
    tokenizer = load_tokenizer(path)
    pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    trained = wrap_ddp(model, info)
    if info.rank != 0:
        steps = follow(settings, trained, info, pad_id)
        log.info("rank %d: trained %d steps", info.rank, steps)
        return
    redis_client = connect(settings.redis_url(), settings.redis.embedded_dir)
    task = load_task(
        settings.task.name,
        settings.task.path,
        settings.task.seed,
        settings.task.train_size,
        settings.task.eval_size,
    )
    client = WeightsClient.from_settings(settings)
    tokens = probe_tokens(int(model.config.vocab_size))
    writer = MetricsWriter(Path(settings.run_dir) / METRICS_FILE)
    learner = Learner(
        settings,
        redis_client,
        trained,
        task=task,
        publisher=weights_publisher(settings, client, tokens),
        metrics_writer=writer,
        pad_id=pad_id,
        dist_info=info,
    )
    http = HttpServer(
        make_http_app(metrics.REGISTRY, title="asympo learner"),
        lc.host,
        lc.http_port,
    ).start()
    grpc_server = start_grpc(settings, learner)

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("learner stopping (%s)", signal.Signals(signum).name)
        learner.stop_event.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
    log.info(
        "learner: loss=%s version=%d max_staleness=%d groups_per_step=%d device=%s",
        lc.loss,
        learner.version,
        lc.max_staleness,
        lc.groups_per_step,
        device,
    )
    try:
        if lc.eval_every and learner.version == 0:
            acc = held_out_accuracy(settings, model, tokenizer, task)
            writer.write({"step": 0, "version": 0, "accuracy": acc})
        while not learner.stop_event.is_set() and (
            lc.max_steps == 0 or learner.version < lc.max_steps
        ):
            record = learner.step(timeout_s=1.0)
            learner.serve_requests()
            if record is None:
                continue
            last = lc.max_steps != 0 and learner.version >= lc.max_steps
            if lc.eval_every and (learner.version % lc.eval_every == 0 or last):
                acc = held_out_accuracy(settings, model, tokenizer, task)
                writer.write({"step": learner.version, "version": learner.version, "accuracy": acc})
            log.info(
                "step %d loss %.4f balance %+.2e reward %.3f staleness %.2f",
                learner.version,
                record["loss"],
                record["loss_balance"],
                record["reward_mean"],
                record["staleness_mean"],
            )
        learner.stop_followers()
        learner.checkpoint()
        if learner.published_version < learner.version:
            learner.publish()
        final = Path(settings.run_dir) / "final"
        model.save_pretrained(str(final))
        tokenizer.save_pretrained(str(final))
        log.info("learner stopped at version %d; final model in %s", learner.version, final)
    finally:
        grpc_server.stop(grace=1.0)
        http.stop()
        client.close()
        writer.close()
