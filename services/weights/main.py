"""`asympo serve weights`: serve the weight store until SIGTERM/SIGINT.

The store in ``weights.store_dir`` behind gRPC ``Weights`` (Publish needs
``weights.publish_token``) on ``weights.grpc_port``, HTTP ``/healthz`` ``/readyz``
``/metrics`` on ``weights.http_port``; each new version is announced on the run's
weights stream. No loop of its own: the gRPC server's threads do the work.
"""

from __future__ import annotations

import logging
from functools import partial

from asympo.config import Settings
from asympo.service import Service, configure_logging
from asympo.transport.redis_conn import connect
from services.weights.server import StreamAnnouncer, WeightsService

log = logging.getLogger("asympo.weights")


def run(settings: Settings) -> None:
    """Serve the store; announce versions on the weights stream; exit 2 on a startup mistake."""
    configure_logging()
    if not settings.weights.publish_token.get_secret_value():
        log.warning(
            "weights.publish_token is empty: Publish is refused until a token is configured "
            "(ASYMPO_WEIGHTS__PUBLISH_TOKEN or --set weights.publish_token=...)"
        )
    with Service("weights") as svc:
        announcer = StreamAnnouncer(
            partial(connect, settings.redis_url(), settings.redis.embedded_dir),
            settings.streams.key(settings.streams.weights),
            settings.streams.maxlen,
        )
        service = WeightsService(settings, announce=announcer).start()
        svc.closing(service.stop)
        svc.serve()
