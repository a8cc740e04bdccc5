"""`asympo serve reward`: a reward worker until SIGTERM/SIGINT.

It consumes rollout groups (consumer group ``reward`` of the rollouts stream), scores
them in a pool of ``reward.pool_size`` verifier processes with a hard
``reward.time_limit_s`` per call, and produces scored groups. Also serves gRPC
``Reward.Score`` on ``reward.grpc_port`` and HTTP ``/healthz`` ``/readyz`` ``/metrics``
on ``reward.http_port``. Run as many workers as you like on one run id.
"""

from __future__ import annotations

import logging
import threading

import redis

from asympo.config import ConfigError, Settings
from asympo.redis_conn import RedisUnavailable, connect
from asympo.serving import GrpcOptions, GrpcServer, HttpServer, make_http_app, wait_for_signal
from asympo.v1 import reward_pb2_grpc
from asympo.verifiers import UnknownVerifierError, VerifierPool, resolve_verifier
from services.reward import metrics
from services.reward.server import SERVICE_NAME, RewardServicer
from services.reward.worker import RewardWorker

log = logging.getLogger("asympo.reward")
RETRY_S = (0.5, 1, 2, 5, 10)


class RewardService:
    """The worker loop on a thread, plus the gRPC and HTTP servers, sharing one pool."""

    def __init__(self, settings: Settings, redis_client: redis.Redis) -> None:
        cfg = settings.reward
        self.settings = settings
        self.pool = VerifierPool(
            cfg.pool_size, cfg.time_limit_s, plugins=cfg.plugins, format_reward=cfg.format_reward
        )
        self.worker = RewardWorker(settings, redis_client, self.pool)
        self.grpc = GrpcServer(
            GrpcOptions.from_settings(settings, cfg.host, cfg.grpc_port), services=[SERVICE_NAME]
        )
        reward_pb2_grpc.add_RewardServicer_to_server(
            RewardServicer(self.pool, cfg.plugins), self.grpc.server
        )
        self.http = HttpServer(
            make_http_app(metrics.REGISTRY, ready=self.ready, title="asympo reward"),
            cfg.host,
            cfg.http_port,
            max_request_bytes=settings.http_max_request_bytes,
        )
        self.stopping = threading.Event()
        self._healthy = False
        self._loop = threading.Thread(target=self._run_loop, name="reward-loop", daemon=True)

    def ready(self) -> bool:
        """Ready while the loop runs and its last Redis round trip succeeded."""
        return self._healthy and self._loop.is_alive()

    def start(self) -> RewardService:
        """Start serving and consuming."""
        self.grpc.start()
        self.http.start()
        self._loop.start()
        log.info(
            "reward worker %s: stream %s, pool %d x %.1fs, gRPC %s:%d, HTTP %s:%d",
            self.worker.name,
            self.worker.rollouts.stream_key,
            self.pool.size,
            self.pool.time_limit_s,
            self.settings.reward.host,
            self.grpc.port,
            self.settings.reward.host,
            self.http.port,
        )
        return self

    def _run_loop(self) -> None:
        failures = 0
        while not self.stopping.is_set():
            try:
                result = self.worker.step(block_ms=1000)
            except Exception as exc:  # keep serving: report, back off, retry the batch
                self._healthy = False
                delay = RETRY_S[min(failures, len(RETRY_S) - 1)]
                failures += 1
                if isinstance(exc, redis.ConnectionError | redis.TimeoutError):
                    log.warning("Redis unavailable (%s); retrying in %.1fs", exc, delay)
                else:
                    log.exception("reward step failed; retrying in %.1fs", delay)
                self.stopping.wait(delay)
                continue
            self._healthy = True
            failures = 0
            if result.scored or result.duplicates or result.dead_lettered:
                log.info(
                    "scored %d, duplicates %d, dead-lettered %d",
                    result.scored,
                    result.duplicates,
                    result.dead_lettered,
                )

    def stop(self, grace: float = 5.0) -> None:
        """Finish the batch in hand, stop the servers and the verifier pool."""
        self.stopping.set()
        self._loop.join(timeout=grace + self.pool.time_limit_s + 2)
        self.grpc.stop(grace)
        self.http.stop()
        self.pool.close()


def run(settings: Settings) -> None:
    """Run one reward worker in the foreground until SIGTERM/SIGINT."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        for name in settings.reward.plugins:
            resolve_verifier(name, settings.reward.plugins)
        client = connect(settings.redis_url(), settings.redis.embedded_dir)
        service = RewardService(settings, client).start()
    except (UnknownVerifierError, RedisUnavailable, ConfigError) as exc:
        log.error("%s", exc)
        raise SystemExit(2) from exc
    reason = wait_for_signal()
    log.info("reward worker stopping (%s)", reason)
    service.stop()
