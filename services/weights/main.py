"""`asympo serve weights`: run the weights service until SIGTERM/SIGINT."""

from __future__ import annotations

import logging
from functools import partial

from asympo.config import Settings
from asympo.redis_conn import connect
from asympo.serving import wait_for_signal
from services.weights.server import StreamAnnouncer, WeightsService

log = logging.getLogger("asympo.weights")


def run(settings: Settings) -> None:
    """Serve the store in ``weights.store_dir``; announce versions on the weights stream."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if not settings.weights.publish_token.get_secret_value():
        log.warning(
            "weights.publish_token is empty: Publish is refused until a token is configured "
            "(ASYMPO_WEIGHTS__PUBLISH_TOKEN or --set weights.publish_token=...)"
        )
    announcer = StreamAnnouncer(
        partial(connect, settings.redis_url(), settings.redis.embedded_dir),
        settings.streams.key(settings.streams.weights),
        settings.streams.maxlen,
    )
    service = WeightsService(settings, announce=announcer).start()
    reason = wait_for_signal()
    log.info("weights service stopping (%s)", reason)
    service.stop()
