"""The learner's gRPC API: ``Status`` (read-only) and ``Checkpoint`` (needs the token)."""

from __future__ import annotations

import concurrent.futures

import grpc

from asympo.config import Settings
from asympo.transport.serving import GrpcOptions, GrpcServer
from asympo.v1 import learner_pb2, learner_pb2_grpc
from services.learner.learner import Learner

SERVICE_NAME = "asympo.v1.Learner"
CHECKPOINT_METHOD = f"/{SERVICE_NAME}/Checkpoint"
CHECKPOINT_TIMEOUT_S = 600.0


class LearnerServicer(learner_pb2_grpc.LearnerServicer):
    """Answers from the live learner; a checkpoint is written by the training loop."""

    def __init__(self, learner: Learner) -> None:
        self.learner = learner

    def Status(
        self, request: learner_pb2.StatusRequest, context: grpc.ServicerContext
    ) -> learner_pb2.LearnerStatus:
        """Version, counters and the last step's loss."""
        lr = self.learner
        last = lr.last_record
        return learner_pb2.LearnerStatus(
            version=lr.version,
            groups_trained=int(lr.counters["groups_trained"]),
            groups_dropped_stale=int(lr.counters["groups_dropped_stale"]),
            prompts_admitted=lr.admitter.admitted() if lr.admitter is not None else 0,
            max_staleness=lr.lc.max_staleness,
            loss=lr.lc.loss.name,
            last_loss=float(last.get("loss", 0.0)),
            last_loss_balance=float(last.get("loss_balance", 0.0)),
        )

    def Checkpoint(
        self, request: learner_pb2.CheckpointRequest, context: grpc.ServicerContext
    ) -> learner_pb2.CheckpointReply:
        """Checkpoint between two steps and return where it is."""
        future = self.learner.request_checkpoint()
        try:
            path = future.result(timeout=CHECKPOINT_TIMEOUT_S)
        except concurrent.futures.TimeoutError:
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "the training loop did not answer")
        except Exception as exc:
            context.abort(grpc.StatusCode.INTERNAL, f"checkpoint failed: {exc}")
        return learner_pb2.CheckpointReply(version=self.learner.version, path=path)


def start_grpc(settings: Settings, learner: Learner, port: int | None = None) -> GrpcServer:
    """Serve the learner API on ``learner.grpc_port`` (``port`` overrides; 0 = any)."""
    lc = settings.learner
    server = GrpcServer(
        GrpcOptions.from_settings(settings, lc.host, lc.grpc_port if port is None else port),
        token=settings.service_token.get_secret_value(),
        protected_methods={CHECKPOINT_METHOD},
        services=[SERVICE_NAME],
    )
    learner_pb2_grpc.add_LearnerServicer_to_server(LearnerServicer(learner), server.server)
    server.start()
    return server
