"""Hot weight swap with proof: load a fetched version, check the probe, or roll back.

The probe is the learner's log-probs of a fixed token sequence under the version it
published. After loading, the engine recomputes them itself; if any differs by more
than the tolerance the new weights did not really land (e.g. vLLM's CPU backend kept
stale repacked linear weights), so the version is refused and the previous one is
reloaded: a replica never serves weights it cannot vouch for. The same holds whichever
path brought the weights (files from the store, or the learner's broadcast received
straight into the engine).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from asympo.transport.weight_broadcast import ProbeData
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
    source: str = "store"  # the path that brought the weights: "store" or "broadcast"


class WeightSwapper:
    """Owns which version the engine serves; every engine call must hold ``lock``.

    ``path`` is where the served version's files are (the rollback target); None after a
    version that came over the broadcast, which has no files: then a rollback fetches the
    served version from the store through ``fetch``.
    """

    def __init__(
        self,
        engine: SwappableEngine,
        version: int,
        path: Path | None,
        fetch: Callable[[int], Path] | None = None,
    ) -> None:
        self.engine = engine
        self.version = version
        self.path = path
        self.fetch = fetch
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
        """Load ``path`` (already fetched and verified) as ``manifest.version``, prove it.

        Refuses a version that is not newer, has no probe, or whose probe disagrees; in the
        last case the previous weights are reloaded before returning.
        """
        probe = manifest.probe
        expected = ProbeData(tuple(probe.tokens), tuple(probe.logprobs), probe.tolerance)
        return self.offer_loaded(
            manifest.version, expected, tolerance, lambda: self.engine.load_weights(path), path
        )

    def offer_loaded(
        self,
        version: int,
        probe: ProbeData | None,
        tolerance: float,
        load: Callable[[], None],
        path: Path | None = None,
        source: str = "store",
    ) -> SwapOutcome:
        """Run ``load`` (it puts ``version`` into the engine: files at ``path``, or a
        broadcast already received), then prove it with ``probe`` as :meth:`offer` does.
        A ``load`` that raises is refused like a probe mismatch (it may have half landed)."""
        start = time.monotonic()
        if version <= self.version:
            return SwapOutcome(version, False, 0.0, 0.0, f"not newer than {self.version}", source)
        if probe is None or len(probe.tokens) < 2 or len(probe.logprobs) != len(probe.tokens) - 1:
            return SwapOutcome(version, False, float("inf"), 0.0, "no usable probe", source)
        tol = probe.tolerance if probe.tolerance > 0 else tolerance
        with self.lock:
            try:
                load()
            except Exception as exc:
                log.error(
                    "loading version %d failed (%s); keeping version %d",
                    *(version, exc, self.version),
                )
                self._restore()
                return SwapOutcome(
                    version,
                    False,
                    float("inf"),
                    time.monotonic() - start,
                    f"load failed: {exc}",
                    source,
                )
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
                self._restore()
                return SwapOutcome(
                    version, False, diff, time.monotonic() - start, "probe mismatch", source
                )
            self.version, self.path = version, path
            self.changed.notify_all()
        seconds = time.monotonic() - start
        metrics.POLICY_VERSION.set(version)
        log.info(
            "serving version %d via the %s (probe max |diff| %.2e, %.2fs)",
            *(version, source, diff, seconds),
        )
        return SwapOutcome(version, True, diff, seconds, "ok", source)

    def _restore(self) -> None:
        """Put the served version's weights back (under ``lock``).

        The served version's files may be gone: a broadcast version has none, and a version
        opened in place in a shared store is pruned once enough newer ones exist. Then they
        are fetched (again) first."""
        gone = self.path is None or not self.path.exists()
        if gone and self.fetch is not None and self.version >= 0:
            self.path = self.fetch(self.version)
        if self.path is not None:
            self.engine.load_weights(self.path)
