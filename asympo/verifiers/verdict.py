"""The result of verifying one response, and how plug-in return values map onto it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from numbers import Real


@dataclass(frozen=True)
class Verdict:
    """A reward in [0, 1] (plug-ins may use any finite float) and why it was given.

    ``timed_out``: the verifier was cut off at its time limit (reward 0; a judgement
    on the response). ``failed``: the verifier itself broke (crashed, raised, unknown
    name) — not a judgement on the response, so the reward service dead-letters it.
    ``elapsed_s``: wall time of the call as the pool measured it (not compared).
    ``shaped``: the reward is format shaping of a wrong answer (``task.format_reward``),
    not the verifier's own credit.
    """

    reward: float
    reason: str
    timed_out: bool = False
    failed: bool = False
    elapsed_s: float = field(default=0.0, compare=False)
    shaped: bool = False

    @property
    def correct(self) -> bool:
        """The one meaning of "correct" (train accuracy, the reward service's outcome
        label): the verifier's own positive credit, not format shaping, not a failure."""
        return self.reward > 0 and not self.shaped and not self.failed


# A verifier takes (response, reference) and judges the response.
VerifierFn = Callable[[str, str], object]

CORRECT = "correct"
WRONG = "wrong answer"
NO_ANSWER = "no answer"


def as_verdict(value: object) -> Verdict:
    """Normalise what a verifier returned: a Verdict, a bool, a number, or (reward, reason).

    Raises TypeError for anything else, so a broken plug-in is reported, not misread.
    """
    if isinstance(value, Verdict):
        return value
    if isinstance(value, bool):
        return Verdict(1.0 if value else 0.0, CORRECT if value else WRONG)
    if isinstance(value, Real):
        reward = float(value)
        return Verdict(reward, CORRECT if reward > 0 else WRONG)
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], Real | bool):
        return Verdict(float(value[0]), str(value[1]))
    raise TypeError(
        f"a verifier must return a Verdict, bool, number or (reward, reason); got {type(value)!r}"
    )
