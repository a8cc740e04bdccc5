"""The learner's side of the wire: scored-group records into the step's training groups."""

from __future__ import annotations

from asympo.rl.training import TrainGroup
from asympo.v1 import records_pb2


def group_from_scored(scored: records_pb2.ScoredGroup) -> TrainGroup:
    """The :class:`TrainGroup` of a ``ScoredGroup`` record (behaviour log-probs if complete)."""
    rollout = scored.rollout
    if len(scored.scores) != len(rollout.samples):
        raise ValueError(
            f"group {rollout.group_id!r}: {len(scored.scores)} scores for "
            f"{len(rollout.samples)} samples"
        )
    samples = list(rollout.samples)
    behaviour: list[list[float]] | None = [list(s.behaviour_logprobs) for s in samples]
    if any(len(s.behaviour_logprobs) != len(s.completion_tokens) for s in samples):
        behaviour = None
    prompt = list(rollout.prompt_tokens) or list(rollout.prompt.prompt_tokens)
    return TrainGroup(
        group_id=rollout.group_id,
        prompt_tokens=prompt,
        completions=[list(s.completion_tokens) for s in samples],
        rewards=[float(s.reward) for s in scored.scores],
        versions=[int(s.version.start) for s in samples],
        behaviour_logprobs=behaviour,
    )
