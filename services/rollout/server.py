"""gRPC ``Rollout.Generate``: ad-hoc generation with the replica's current weights."""

from __future__ import annotations

import time

import grpc

from asympo.engines import Engine, GenerationRequest
from asympo.v1 import records_pb2, rollout_pb2, rollout_pb2_grpc
from services.rollout.swap import WeightSwapper
from services.rollout.worker import build_group

MAX_PROMPTS = 256
MAX_SAMPLES = 64
MAX_TOKENS = 8192
MAX_PROMPT_CHARS = 100_000


def validate(request: rollout_pb2.GenerateRequest) -> str | None:
    """Why ``request`` is unacceptable, or None."""
    s = request.sampling
    checks = [
        (0 < len(request.prompts) <= MAX_PROMPTS, f"prompts: need 1..{MAX_PROMPTS}"),
        (0 < request.num_samples <= MAX_SAMPLES, f"num_samples: need 1..{MAX_SAMPLES}"),
        (0 < s.max_tokens <= MAX_TOKENS, f"sampling.max_tokens: need 1..{MAX_TOKENS}"),
        (0.0 <= s.temperature <= 10.0, "sampling.temperature: need 0..10"),
        (0.0 <= s.top_p <= 1.0, "sampling.top_p: need 0..1 (0 = 1)"),
        (all(len(p) <= MAX_PROMPT_CHARS for p in request.prompts), "a prompt is too long"),
        (
            len(s.stop) <= 16 and all(0 < len(x) <= 64 for x in s.stop),
            "stop: at most 16 of 1..64 chars",
        ),
    ]
    for ok, why in checks:
        if not ok:
            return why
    return None


class RolloutServicer(rollout_pb2_grpc.RolloutServicer):
    """Serves Generate from the same engine the stream loop uses (under the swap lock)."""

    def __init__(self, engine: Engine, swapper: WeightSwapper, replica: str) -> None:
        self.engine = engine
        self.swapper = swapper
        self.engine_name = engine.name
        self.replica = replica

    def Generate(
        self, request: rollout_pb2.GenerateRequest, context: grpc.ServicerContext
    ) -> rollout_pb2.GenerateReply:
        """Generate ``num_samples`` completions for each prompt."""
        problem = validate(request)
        if problem is not None:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        s = request.sampling
        reqs = [
            GenerationRequest(
                prompt_tokens=self.engine.encode(p),
                n=request.num_samples,
                temperature=s.temperature,
                top_p=s.top_p or 1.0,
                max_tokens=s.max_tokens,
                stop=list(s.stop),
                seed=s.seed or None,
                logprobs=request.want_behaviour_logprobs,
            )
            for p in request.prompts
        ]
        started = time.time()
        with self.swapper.lock:
            version = self.swapper.version
            outputs = self.engine.generate(reqs)
        reply = rollout_pb2.GenerateReply(loaded_version=version)
        for i, (text, req, comps) in enumerate(zip(request.prompts, reqs, outputs, strict=True)):
            prompt = records_pb2.PromptTask(
                prompt_id=f"adhoc:{i}",
                prompt_text=text,
                num_samples=request.num_samples,
                sampling=s,
                want_behaviour_logprobs=request.want_behaviour_logprobs,
            )
            reply.groups.append(
                build_group(prompt, req, comps, version, self.engine_name, self.replica, started)
            )
        return reply
