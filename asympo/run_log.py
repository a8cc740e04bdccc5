"""The per-step metrics log of a run: one JSON object per line in ``<run_dir>/metrics.jsonl``.

The learner appends a line after every optimiser step (and held-out accuracy when it
evaluates); ``asympo up`` tails the file for its live view and plots it at the end.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"


class MetricsWriter:
    """Appends one JSON line per record; each line is flushed so readers see whole lines."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = self.path.open("a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        """Append ``record`` (non-finite floats become null so the file stays valid JSON)."""
        clean = {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in record.items()
        }
        self._fh.write(json.dumps(clean, sort_keys=True) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        """Close the file."""
        self._fh.close()


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


def series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of ``key`` over the records that carry it."""
    steps, values = [], []
    for rec in records:
        value = rec.get(key)
        if isinstance(value, int | float) and "step" in rec:
            steps.append(int(rec["step"]))
            values.append(float(value))
    return steps, values
