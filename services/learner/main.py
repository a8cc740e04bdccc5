"""`asympo serve learner`: train on scored groups until max_steps or SIGTERM/SIGINT.

Loads the policy (``model.path``, else the tiny default of ``asympo init-model``),
resumes from the newest checkpoint in ``learner.checkpoint_dir`` if there is one,
publishes version 0 (then every ``publish_every`` steps) to the weights service with
the probe log-probs (with ``weights.transport=broadcast`` also straight into the rollout
engines, see services/learner/publisher.py), writes one line per step to
``<run_dir>/metrics.jsonl`` and serves
``/healthz`` ``/readyz`` ``/metrics`` on ``learner.http_port`` and the gRPC ``Learner``
API (``Status``; ``Checkpoint`` with the service token) on ``learner.grpc_port``.
On stop it checkpoints and saves the final model in Hugging Face format to
``<run_dir>/final``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from asympo.config import Settings
from asympo.model.loading import load_causal_lm, load_tokenizer, resolve_model_path
from asympo.preflight import check_against_model, task_prompts
from asympo.rl.probe import make_probe, probe_tokens
from asympo.run_log import METRICS_FILE, MetricsWriter
from asympo.service import Service, configure_logging
from asympo.tasks import task_from_settings
from asympo.tracking import open_trackers
from asympo.transport.redis_conn import connect
from asympo.transport.weight_broadcast import BroadcastHub, Layout
from asympo.transport.weights_client import WeightsClient
from services.learner import metrics
from services.learner.distributed import init_distributed, leave_distributed
from services.learner.learner import Learner, follow
from services.learner.loop import TrainingLoop, finish
from services.learner.prefetch import Prefetcher
from services.learner.publisher import (
    BackgroundPublisher,
    SnapshotSink,
    broadcast_sink,
    store_sink,
)
from services.learner.server import start_grpc
from services.learner.sharding import is_sharded, wrap_model

log = logging.getLogger("asympo.learner")


def start_broadcast(
    settings: Settings, svc: Service, client: WeightsClient, layout: Layout, store: SnapshotSink
) -> SnapshotSink:
    """Rank 0's broadcast hub, registered with the weights service; the sink that
    broadcasts each version before ``store`` publishes it."""
    cfg = settings.weights
    hub = BroadcastHub(layout, cfg.broadcast_port, cfg.broadcast_timeout_s)
    svc.closing(hub.close)

    def register() -> None:
        client.register_broadcast(cfg.broadcast_host, hub.port, hub.epoch)

    log.info("broadcast hub at %s:%d", cfg.broadcast_host, hub.port)
    return broadcast_sink(hub, register, store)


def run(settings: Settings) -> None:
    """Run the learner until ``learner.max_steps`` (0 = forever) or a signal.

    Configuration mistakes (unknown loss, a model that does not fit the settings,
    missing task data, unreachable Redis) are logged as one clear line and exit with
    status 2; a training loop that dies exits with status 1 (asympo.service).
    """
    configure_logging()
    lc = settings.learner
    with Service("learner") as svc:
        torch.manual_seed(lc.seed)
        info = init_distributed(lc.device)
        path = resolve_model_path(settings)
        task = None
        if info.rank == 0:
            # the run's task as configured (verifier, prompt format, preset), as eval builds it
            task = task_from_settings(settings.task, load_tokenizer(path), path)
            check_against_model(settings, path, task_prompts(settings, task))
        model = load_causal_lm(path, settings.model.dtype, str(info.device)).train()
        layout = Layout.of(model.state_dict())  # what a snapshot holds, before any sharding
        tokenizer = load_tokenizer(path)
        pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
        # learner.kl_coef: the starting weights, frozen (a resumed run pulls towards the
        # same model: model.path, not its checkpoint).
        reference = None
        if lc.kl_coef > 0:
            reference = load_causal_lm(path, settings.model.dtype, str(info.device))
            reference.eval().requires_grad_(False)
        trained = wrap_model(
            model,
            info,
            lc.strategy,
            lc.mixed_precision,
            lc.cpu_offload,
            lc.activation_checkpointing,
        )
        if task is None:
            steps = follow(settings, trained, info, pad_id, reference)
            log.info("rank %d: trained %d steps", info.rank, steps)
            leave_distributed()
            return
        redis_client = connect(settings.redis_url(), settings.redis.embedded_dir)
        client = WeightsClient.from_settings(settings)
        svc.closing(client.close)
        writer = MetricsWriter(Path(settings.run_dir) / METRICS_FILE, open_trackers(settings))
        svc.closing(writer.close)
        probe = probe_tokens(int(model.config.vocab_size))
        sink = store_sink(client, {"loss": lc.loss.name})
        if settings.weights.transport == "broadcast":
            sink = start_broadcast(settings, svc, client, layout, sink)
        publisher = BackgroundPublisher(
            sink,
            lambda m: make_probe(m, probe, settings.rollout.probe_tolerance),
        )
        svc.closing(publisher.close)
        learner = Learner(
            settings,
            redis_client,
            trained,
            task=task,
            publisher=publisher,
            metrics_writer=writer,
            pad_id=pad_id,
            dist_info=info,
        )
        learner.reference = reference
        if lc.prefetch:
            learner.prefetcher = Prefetcher(
                learner.consumer, lc.groups_per_step, max_queued=2 * lc.groups_per_step
            )
            svc.loop("learner-intake", learner.prefetcher.step)
        grpc_server = start_grpc(settings, learner)
        svc.closing(lambda: grpc_server.stop(grace=1.0))
        svc.http(metrics.REGISTRY, settings, lc.host, lc.http_port)
        loop_settings = settings
        if is_sharded(trained) and lc.eval_every:
            # Greedy decoding on rank 0 alone would wait forever for the other ranks' shards.
            log.warning("learner.eval_every is ignored under fsdp (evaluate published versions)")
            loop_settings = settings.model_copy(
                update={"learner": lc.model_copy(update={"eval_every": 0})}
            )
        loop = TrainingLoop(loop_settings, learner, model, tokenizer, task, writer, svc.stop)
        # A step is never cut short: the model is saved only after it ends.
        svc.loop("learner-loop", loop.step, join_timeout_s=None)
        log.info(
            "learner: loss=%s version=%d max_staleness=%d groups_per_step=%d device=%s",
            *(lc.loss.name, learner.version, lc.max_staleness, lc.groups_per_step, info.device),
        )
        if svc.serve():
            learner.stop_event.set()
            finish(settings, learner, model, tokenizer)
            if info.active:
                leave_distributed()
