"""`asympo serve reward`: a reward worker until SIGTERM/SIGINT or a dead loop.

It consumes rollout groups (consumer group ``reward`` of the rollouts stream), scores
them in a pool of ``reward.pool_size`` verifier processes with a hard
``reward.time_limit_s`` per call, and produces scored groups, in one supervised loop
(asympo.service). Also serves gRPC ``Reward.Score`` on ``reward.grpc_port`` and HTTP
``/healthz`` ``/readyz`` ``/metrics`` on ``reward.http_port``. Run as many workers as
you like on one run id.
"""

from __future__ import annotations

import logging

from asympo.config import Settings
from asympo.service import Service, configure_logging
from asympo.transport.redis_conn import connect
from asympo.transport.serving import GrpcOptions, GrpcServer
from asympo.v1 import reward_pb2_grpc
from asympo.verifiers import VerifierPool, resolve_verifier
from services.reward import metrics
from services.reward.server import SERVICE_NAME, RewardServicer
from services.reward.worker import RewardWorker

log = logging.getLogger("asympo.reward")


def run(settings: Settings) -> None:
    """Serve until SIGTERM/SIGINT; exit 2 on a startup mistake, 1 when the loop dies."""
    configure_logging()
    cfg = settings.reward
    with Service("reward") as svc:
        for name in cfg.plugins:
            resolve_verifier(name, cfg.plugins)
        client = connect(settings.redis_url(), settings.redis.embedded_dir)
        pool = VerifierPool(
            cfg.pool_size, cfg.time_limit_s, plugins=cfg.plugins, format_reward=cfg.format_reward
        )
        svc.closing(pool.close)
        worker = RewardWorker(settings, client, pool)
        grpc_server = GrpcServer(
            GrpcOptions.from_settings(settings, cfg.host, cfg.grpc_port), services=[SERVICE_NAME]
        )
        reward_pb2_grpc.add_RewardServicer_to_server(
            RewardServicer(pool, cfg.plugins), grpc_server.server
        )
        grpc_server.start()
        svc.closing(lambda: grpc_server.stop(5.0))

        def step() -> None:
            result = worker.step(block_ms=1000)
            if result.scored or result.duplicates or result.dead_lettered:
                log.info(
                    "scored %d, duplicates %d, dead-lettered %d",
                    *(result.scored, result.duplicates, result.dead_lettered),
                )

        # The batch in hand finishes (each verifier call is bounded) before the pool closes.
        svc.loop("reward-loop", step, join_timeout_s=cfg.time_limit_s * cfg.batch + 5)
        http = svc.http(metrics.REGISTRY, settings, cfg.host, cfg.http_port)
        log.info(
            "reward worker %s: stream %s, pool %d x %.1fs, gRPC :%d, HTTP :%d",
            *(worker.name, worker.rollouts.stream_key, pool.size, pool.time_limit_s),
            *(grpc_server.port, http.port),
        )
        svc.serve()
