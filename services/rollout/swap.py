"""Hot weight swap with proof: load a fetched version, check the probe, or roll back.

The probe is the learner's log-probs of a fixed token sequence under the version it
published. After loading, the engine recomputes them itself; if any differs by more
than the tolerance the new weights did not really land (e.g. vLLM's CPU backend kept
stale repacked linear weights), so the version is refused and the previous one is
reloaded: a replica never serves weights it cannot vouch for.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from asympo.v1 import records_pb2
from services.rollout import metrics

log = logging.getLogger(__name__)


class SwappableEngine(Protocol):
    """What a swap needs from an engine."""

    def load_weights(self, path: Path) -> None:
        """Replace the engine's weights with the safetensors files in ``path``."""

    def probe_logprobs(self, tokens: Sequence[int]) -> list[float]:
        """log p(tokens[i+1] | tokens[:i+1]) under the weights the engine holds now."""


def probe_max_abs_diff(expected: Sequence[float], got: Sequence[float]) -> float:
    """Largest absolute difference; infinite when the lengths differ."""
    if len(expected) != len(got):
        return float("inf")
    return max((abs(a - b) for a, b in zip(expected, got, strict=True)), default=0.0)


@dataclass
class SwapOutcome:
    """What happened to one offered version."""

    version: int
    accepted: bool
    max_abs_diff: float
    seconds: float
    reason: str


class WeightSwapper:
    """Owns which version the engine serves; every engine call must hold ``lock``."""

    def __init__(self, engine: SwappableEngine, version: int, path: Path | None) -> None:
        self.engine = engine
        self.version = version
        self.path = path
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)  # notified when a version is accepted
        metrics.POLICY_VERSION.set(version)

    def wait_newer(self, version: int, timeout_s: float) -> bool:
        """Block until a version newer than ``version`` is served or ``timeout_s`` passes."""
        with self.changed:
            return self.changed.wait_for(lambda: self.version > version, timeout_s)

    def offer(
        self, manifest: records_pb2.WeightsManifest, path: Path, tolerance: float
    ) -> SwapOutcome:
        """Load ``path`` (already fetched and sha-verified) as ``manifest.version``, prove it.

        Refuses a version that is not newer, has no probe, or whose probe disagrees; in the
        last case the previous weights are reloaded before returning.
        """
        start = time.monotonic()
        version = manifest.version
        if version <= self.version:
            return SwapOutcome(version, False, 0.0, 0.0, f"not newer than {self.version}")
        probe = manifest.probe
        if len(probe.tokens) < 2 or len(probe.logprobs) != len(probe.tokens) - 1:
            return SwapOutcome(version, False, float("inf"), 0.0, "manifest has no usable probe")
        tol = probe.tolerance if probe.tolerance > 0 else tolerance
        with self.lock:
            self.engine.load_weights(path)
            got = self.engine.probe_logprobs(list(probe.tokens))
            diff = probe_max_abs_diff(list(probe.logprobs), got)
            metrics.PROBE_MAX_ABS_DIFF.set(diff)
            if diff > tol:
                metrics.PROBE_MISMATCH.inc()
                log.error(
                    "PROBE MISMATCH: refusing version %d (max |diff| %.3g > %.3g); "
                    "keeping version %d",
                    version,
                    diff,
                    tol,
                    self.version,
                )
                if self.path is not None:
                    self.engine.load_weights(self.path)
                return SwapOutcome(version, False, diff, time.monotonic() - start, "probe mismatch")
            self.version, self.path = version, path
            self.changed.notify_all()
        seconds = time.monotonic() - start
        metrics.POLICY_VERSION.set(version)
        log.info("serving version %d (probe max |diff| %.2e, %.2fs)", version, diff, seconds)
        return SwapOutcome(version, True, diff, seconds, "ok")
