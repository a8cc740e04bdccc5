"""`asympo serve rollout`: one rollout replica (engine, stream loop, weight follower, APIs)."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from asympo.config import Settings
from asympo.engines import create_engine
from asympo.redis_conn import connect
from asympo.serving import GrpcOptions, GrpcServer, HttpServer, make_http_app, wait_for_signal
from asympo.v1 import rollout_pb2_grpc
from asympo.weights_client import WeightsClient
from services.rollout import metrics
from services.rollout.server import RolloutServicer
from services.rollout.swap import WeightSwapper
from services.rollout.versions import VersionFollower
from services.rollout.worker import RolloutWorker

log = logging.getLogger("asympo.rollout")

# Before the learner's first publish the replica serves the configured model, unproven:
# version -1, so that version 0 (with its probe) is swapped in and verified too.
UNPUBLISHED_VERSION = -1


def run(settings: Settings) -> None:
    """Serve until SIGTERM/SIGINT."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if not settings.model.path:
        raise SystemExit("rollout: model.path is empty (run `asympo init-model` or set it)")
    client = connect(settings.redis_url(), settings.redis.embedded_dir)
    engine = create_engine(settings, settings.model.path)
    swapper = WeightSwapper(engine, UNPUBLISHED_VERSION, Path(settings.model.path))
    weights = WeightsClient.from_settings(settings)
    follower = VersionFollower.from_settings(settings, client, weights, swapper)
    worker = RolloutWorker(settings, client, engine, swapper)
    http = HttpServer(
        make_http_app(metrics.REGISTRY, ready=lambda: True, title="asympo-rollout"),
        settings.rollout.host,
        settings.rollout.http_port,
        max_request_bytes=settings.http_max_request_bytes,
    ).start()
    grpc_server = GrpcServer(
        GrpcOptions.from_settings(settings, settings.rollout.host, settings.rollout.grpc_port),
        services=("asympo.v1.Rollout",),
    )
    rollout_pb2_grpc.add_RolloutServicer_to_server(
        RolloutServicer(engine, swapper, worker.replica), grpc_server.server
    )
    grpc_server.start()
    threads = [
        threading.Thread(target=follower.run, name="weights-follower", daemon=True),
        threading.Thread(target=worker.run, name="rollout-loop", daemon=True),
    ]
    for t in threads:
        t.start()
    log.info(
        "rollout %s serving (%s engine, grpc :%d, http :%d)",
        worker.replica,
        engine.name,
        grpc_server.port,
        http.port,
    )
    try:
        wait_for_signal()
    finally:
        follower.stop_event.set()
        worker.stop_event.set()
        for t in threads:
            t.join(timeout=10)
        grpc_server.stop(grace=2)
        http.stop()
        weights.close()
        engine.close()
