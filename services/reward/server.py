"""gRPC ``Reward.Score``: ad-hoc scoring of (verifier, reference, response) items."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import grpc

from asympo.v1 import records_pb2, reward_pb2, reward_pb2_grpc
from asympo.verifiers import VerifierPool, available_verifiers
from services.reward import metrics
from services.reward.scoring import score_items

log = logging.getLogger("asympo.reward")

SERVICE_NAME = "asympo.v1.Reward"
MAX_ITEMS = 4096


class RewardServicer(reward_pb2_grpc.RewardServicer):
    """Scores requests in the same pool (and under the same time limit) as the stream.

    Only verifiers known by name (builtins, configured ``plugins``, installed entry
    points) are served: a literal ``module:function`` from a client would let anyone who
    reaches the port call any importable function on the response (``os:popen`` runs it
    as a shell command), so such names get NOT_FOUND like any unknown name.
    """

    def __init__(self, pool: VerifierPool, plugins: Mapping[str, str] | None = None) -> None:
        self.pool = pool
        self.verifiers = frozenset(available_verifiers(plugins))

    def Score(
        self, request: reward_pb2.ScoreRequest, context: grpc.ServicerContext
    ) -> reward_pb2.ScoreReply:
        """One SampleScore per item, same order; a broken verifier is reported in ``reason``."""
        if len(request.items) > MAX_ITEMS:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"at most {MAX_ITEMS} items per request"
            )
        for index, item in enumerate(request.items):
            if not item.verifier:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"items[{index}]: verifier empty")
            if item.verifier not in self.verifiers:
                log.warning("Score refused: unknown verifier %r", item.verifier[:100])
                context.abort(
                    grpc.StatusCode.NOT_FOUND,
                    f"items[{index}]: unknown verifier {item.verifier[:100]!r}; "
                    f"known: {', '.join(sorted(self.verifiers))}",
                )
        metrics.SCORE_REQUESTS.inc()
        verdicts = score_items(
            self.pool, [(i.verifier, i.response, i.reference_answer) for i in request.items]
        )
        return reward_pb2.ScoreReply(
            scores=[
                records_pb2.SampleScore(
                    reward=v.reward, reason=v.reason, timed_out=v.timed_out, correct=v.correct
                )
                for v in verdicts
            ]
        )
