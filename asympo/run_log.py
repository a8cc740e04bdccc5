"""The per-step metrics log of a run: one JSON object per line in ``<run_dir>/metrics.jsonl``.

The learner appends a line after every optimiser step (and held-out accuracy when it
evaluates); ``asympo up`` tails the file for its live view and plots it at the end. The
writer is also the one place experiment trackers (:mod:`asympo.tracking`) are fed from,
so they show the same per-step values as the file.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from asympo.tracking import Tracker

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


class MetricsWriter:
    """Appends one JSON line per record; each line is flushed so readers see whole lines.

    Each record with a ``step`` also goes to ``trackers`` (its numeric fields at that
    step); a tracker that raises is logged and dropped, the file is never affected.
    """

    def __init__(self, path: str | Path, trackers: Sequence[Tracker] = ()) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = self.path.open("a", encoding="utf-8")
        self.trackers = list(trackers)

    def write(self, record: dict[str, Any]) -> None:
        """Append ``record`` (non-finite floats become null so the file stays valid JSON)."""
        clean = {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in record.items()
        }
        self._fh.write(json.dumps(clean, sort_keys=True) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())
        step = clean.get("step")
        if self.trackers and isinstance(step, int):
            self._track(clean, step)

    def _track(self, record: dict[str, Any], step: int) -> None:
        from asympo.tracking import numeric_values

        values = numeric_values(record)
        for tracker in list(self.trackers):
            try:
                tracker.log(values, step)
            except Exception as exc:  # a tracker's failure must not stop the run
                log.warning("tracker %s failed (%s); no longer logging to it", tracker.name, exc)
                self.trackers.remove(tracker)

    def close(self) -> None:
        """Close the file and the trackers."""
        self._fh.close()
        for tracker in self.trackers:
            try:
                tracker.close()
            except Exception as exc:  # closing a tracker must not mask the run's outcome
                log.warning("tracker %s did not close cleanly: %s", tracker.name, exc)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All complete records in the file; a torn last line (writer mid-append) is skipped."""
    p = Path(path)
    if not p.exists():
        return []
    records = []
    for line in p.read_text(encoding="utf-8").splitlines():
        try:
            value = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            records.append(value)
    return records


def wilson_interval(accuracy: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval (95 % by default) of a success rate ``accuracy`` over ``n`` trials.

    Unlike ``p ± z·sqrt(p(1-p)/n)`` it stays inside [0, 1] and is not degenerate at 0 or 1.
    Eval records carry ``eval_size``, so a rise can be told from the evaluation's noise.
    """
    if n < 1 or not 0.0 <= accuracy <= 1.0:
        raise ValueError(f"need n >= 1 and 0 <= accuracy <= 1, got n={n} accuracy={accuracy}")
    denom = 1.0 + z * z / n
    centre = (accuracy + z * z / (2 * n)) / denom
    half = z * math.sqrt(accuracy * (1 - accuracy) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of ``key`` over the records that carry it."""
    steps, values = [], []
    for rec in records:
        value = rec.get(key)
        if isinstance(value, int | float) and "step" in rec:
            steps.append(int(rec["step"]))
            values.append(float(value))
    return steps, values
