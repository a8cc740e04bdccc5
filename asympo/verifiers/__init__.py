"""Verifiers: judge a model response against a reference answer, under a hard time limit.

``resolve_verifier(name, plugins)`` gives the function; ``VerifierPool`` runs it in
killable worker processes. Builtins: ``math`` (math-verify equivalence), ``gsm8k``
(``####`` extraction, decimal comparison), ``boxed`` (the last ``\\boxed{}``, for the
reasoning prompt presets) and ``exact``.
"""

from __future__ import annotations

from asympo.verifiers.answers import answer_key
from asympo.verifiers.pool import CRASHED, TIMEOUT, VerifierPool
from asympo.verifiers.registry import (
    BUILTIN,
    ENTRY_POINT_GROUP,
    UnknownVerifierError,
    apply_format_reward,
    available_verifiers,
    resolve_verifier,
    run_verifier,
)
from asympo.verifiers.verdict import CORRECT, NO_ANSWER, WRONG, Verdict, as_verdict

__all__ = [
    "BUILTIN",
    "CORRECT",
    "CRASHED",
    "ENTRY_POINT_GROUP",
    "NO_ANSWER",
    "TIMEOUT",
    "WRONG",
    "UnknownVerifierError",
    "Verdict",
    "VerifierPool",
    "answer_key",
    "apply_format_reward",
    "as_verdict",
    "available_verifiers",
    "resolve_verifier",
    "run_verifier",
]
