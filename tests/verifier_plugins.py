"""User-style verifier plug-ins for tests: ``tests.verifier_plugins:<name>``.

They run in real VerifierPool worker processes (and in real reward workers).
"""

from __future__ import annotations

import os
import time

from asympo.verifiers import Verdict
from asympo.verifiers.gsm8k import verify_gsm8k


def hang(response: str, reference: str) -> float:
    """Never returns on its own (a pathological verifier)."""
    while True:
        time.sleep(0.05)


def crash(response: str, reference: str) -> float:
    """Kills its own process, like a segfault in a native extension."""
    os._exit(7)


def explode(response: str, reference: str) -> float:
    """Raises, like a buggy verifier."""
    raise RuntimeError("plug-in bug")


def hang_on_marker(response: str, reference: str) -> Verdict:
    """GSM8K verification, except that a response containing ``HANG`` never finishes."""
    if "HANG" in response:
        hang(response, reference)
    return verify_gsm8k(response, reference)


def shouting(response: str, reference: str) -> tuple[float, str]:
    """Reward 1 for an all-caps response: a verifier no builtin could stand in for."""
    loud = bool(response) and response.isupper()
    return (1.0 if loud else 0.0, "loud" if loud else "quiet")


def sleepy(response: str, reference: str) -> Verdict:
    """GSM8K verification that takes a while (so a batch is in flight long enough to kill)."""
    time.sleep(0.25)
    return verify_gsm8k(response, reference)


def chatty(response: str, reference: str) -> bool:
    """Prints to stdout (which must not corrupt the pool's protocol), then judges exactly."""
    print("debugging output", response, flush=True)
    return response == reference
