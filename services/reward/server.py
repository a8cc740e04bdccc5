"""gRPC ``Reward.Score``: ad-hoc scoring of (verifier, reference, response) items."""

from __future__ import annotations

import grpc

from asympo.v1 import records_pb2, reward_pb2, reward_pb2_grpc
from asympo.verifiers import VerifierPool
from services.reward import metrics
from services.reward.scoring import score_items

SERVICE_NAME = "asympo.v1.Reward"
MAX_ITEMS = 4096


class RewardServicer(reward_pb2_grpc.RewardServicer):
    """Scores requests in the same pool (and under the same time limit) as the stream."""

    def __init__(self, pool: VerifierPool) -> None:
        self.pool = pool

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
        metrics.SCORE_REQUESTS.inc()
        verdicts = score_items(
            self.pool, [(i.verifier, i.response, i.reference_answer) for i in request.items]
        )
        return reward_pb2.ScoreReply(
            scores=[
                records_pb2.SampleScore(reward=v.reward, reason=v.reason, timed_out=v.timed_out)
                for v in verdicts
            ]
        )
