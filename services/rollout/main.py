"""`asympo serve rollout`: one rollout replica until SIGTERM/SIGINT or a dead loop.

Serves ``model.path`` (empty: the tiny default, built first if not cached) with the
configured engine; two supervised loops (asympo.service) generate groups from the prompts
stream and follow the weights stream (and, with ``weights.transport=broadcast``, the
learner's broadcast group); gRPC ``Rollout`` on ``rollout.grpc_port`` and HTTP
``/healthz`` ``/readyz`` ``/metrics`` on ``rollout.http_port``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import cast

from asympo.config import Settings
from asympo.engines import create_engine
from asympo.model import resolve_model_path
from asympo.preflight import check_against_model
from asympo.service import Service, configure_logging
from asympo.transport.redis_conn import connect
from asympo.transport.serving import GrpcOptions, GrpcServer
from asympo.transport.weights_client import WeightsClient
from asympo.v1 import rollout_pb2_grpc
from services.rollout import metrics
from services.rollout.server import RolloutServicer
from services.rollout.swap import WeightSwapper
from services.rollout.versions import BroadcastEngine, BroadcastLink, VersionFollower
from services.rollout.worker import RolloutWorker

log = logging.getLogger("asympo.rollout")

# Before the learner's first publish the replica serves the configured model, unproven:
# version -1, so that version 0 (with its probe) is swapped in and verified too.
UNPUBLISHED_VERSION = -1


def broadcast_link(
    settings: Settings, engine: object, weights: WeightsClient
) -> BroadcastLink | None:
    """The membership in the learner's broadcast group, with ``weights.transport=broadcast``
    and an engine that can receive one (vLLM); None otherwise (the store path only)."""
    cfg = settings.weights
    if cfg.transport != "broadcast":
        return None
    if not hasattr(engine, "join_broadcast"):
        log.warning(
            "weights.transport=broadcast needs the vllm engine; this replica uses the store"
        )
        return None
    return BroadcastLink(cast(BroadcastEngine, engine), weights, cfg.broadcast_timeout_s)


def run(settings: Settings) -> None:
    """Serve until SIGTERM/SIGINT; exit 2 on a startup mistake, 1 when a loop dies."""
    configure_logging()
    cfg = settings.rollout
    with Service("rollout") as svc:
        model = resolve_model_path(settings)
        check_against_model(settings, model)
        client = connect(settings.redis_url(), settings.redis.embedded_dir)
        engine = create_engine(settings, model)
        svc.closing(engine.close)
        weights = WeightsClient.from_settings(settings)
        svc.closing(weights.close)
        swapper = WeightSwapper(engine, UNPUBLISHED_VERSION, Path(model))
        follower = VersionFollower.from_settings(
            settings, client, weights, swapper, broadcast_link(settings, engine, weights)
        )
        swapper.fetch = follower.fetch  # a rollback after a broadcast version needs its files
        worker = RolloutWorker(settings, client, engine, swapper)
        grpc_server = GrpcServer(
            GrpcOptions.from_settings(settings, cfg.host, cfg.grpc_port),
            services=("asympo.v1.Rollout",),
        )
        rollout_pb2_grpc.add_RolloutServicer_to_server(
            RolloutServicer(engine, swapper, worker.replica), grpc_server.server
        )
        grpc_server.start()
        svc.closing(lambda: grpc_server.stop(grace=2))
        svc.loop("rollout-loop", worker.step)
        svc.loop("weights-follower", follower.step)
        http = svc.http(metrics.REGISTRY, settings, cfg.host, cfg.http_port)
        log.info(
            "rollout %s: %s engine on %s, gRPC :%d, HTTP :%d",
            *(worker.replica, engine.name, model, grpc_server.port, http.port),
        )
        svc.serve()
