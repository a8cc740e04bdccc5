"""The live view of `asympo up`: the learner's metrics.jsonl and the rollout replicas'
generated-token counters, drawn as one table every second.
"""

from __future__ import annotations

import time
import urllib.request
from collections import deque
from typing import Any

from asympo.launcher.supervisor import Supervisor
from asympo.run_log import wilson_interval

GENERATED_TOKENS = "asympo_generated_tokens_total"


def scrape_counter(port: int, metric: str) -> float | None:
    """Sum of a Prometheus metric's samples on ``127.0.0.1:port/metrics``, or None."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1) as resp:
            text = resp.read().decode()
    except OSError:
        return None
    total, found = 0.0, False
    for line in text.splitlines():
        if line.startswith(metric) and not line.startswith("#"):
            name = line.split("{", 1)[0].split(" ", 1)[0]
            if name == metric:
                total += float(line.rsplit(" ", 1)[1])
                found = True
    return total if found else None


def accuracy_with_interval(record: dict[str, Any]) -> str:
    """``0.340 [0.278, 0.408]``: an eval record's accuracy and its Wilson 95 % interval."""
    acc = float(record["accuracy"])
    n = record.get("eval_size")
    if not isinstance(n, int) or n < 1:
        return f"{acc:.3f}"
    lo, hi = wilson_interval(acc, n)
    return f"{acc:.3f} [{lo:.3f}, {hi:.3f}]"


def status_table(
    sup: Supervisor, records: list[dict[str, Any]], tokens_per_s: float | None, elapsed: float
) -> Any:
    """The live table: services up/down, step and version, staleness, reward, balance."""
    from rich.table import Table

    steps = [r for r in records if "loss_balance" in r]  # eval records carry accuracy only
    last = steps[-1] if steps else {}
    accs = [r for r in records if isinstance(r.get("accuracy"), int | float)]
    table = Table(title=f"asympo up — {elapsed:5.0f}s", show_header=True, expand=False)
    table.add_column("metric")
    table.add_column("value", justify="right")

    def fmt(key: str, spec: str = ".3f", rec: dict[str, Any] | None = None) -> str:
        value = (rec if rec is not None else last).get(key)
        return format(value, spec) if isinstance(value, int | float) else "—"

    table.add_row(
        "services", " ".join(f"{c.name}:{'up' if c.alive() else 'DOWN'}" for c in sup.children)
    )
    table.add_row("step / policy version", f"{fmt('step', 'd')} / {fmt('version', 'd')}")
    table.add_row(
        "staleness mean / max", f"{fmt('staleness_mean', '.2f')} / {fmt('staleness_max', 'd')}"
    )
    table.add_row("reward mean", fmt("reward_mean"))
    if accs:
        table.add_row(
            "held-out accuracy (first → last, 95% CI)",
            f"{accuracy_with_interval(accs[0])} → {accuracy_with_interval(accs[-1])}",
        )
    table.add_row(
        "loss balance (pos + neg)",
        f"{fmt('loss_balance', '+.2e')} "
        f"({fmt('loss_positive', '+.3f')} {fmt('loss_negative', '+.3f')})",
    )
    table.add_row(
        "groups trained / dropped stale",
        f"{fmt('groups_trained', 'd')} / {fmt('groups_dropped_stale', 'd')}",
    )
    table.add_row("tokens/s generated", f"{tokens_per_s:.0f}" if tokens_per_s is not None else "—")
    return table


class TokenRate:
    """Generated tokens per second over the last ``window_s``, from the replicas' counters."""

    def __init__(self, http_ports: list[int], window_s: float = 10.0) -> None:
        self.http_ports = http_ports
        self.window_s = window_s
        self.started = time.monotonic()
        self.total = 0.0
        self.per_s: float | None = None
        self._window: deque[tuple[float, float]] = deque()  # (time, total tokens)

    def sample(self) -> None:
        """Scrape every replica once and update ``total`` and ``per_s``."""
        counts = [scrape_counter(p, GENERATED_TOKENS) for p in self.http_ports]
        self.total = sum(c for c in counts if c is not None)
        now = time.monotonic()
        self._window.append((now, self.total))
        while now - self._window[0][0] > self.window_s:
            self._window.popleft()
        if now > self._window[0][0]:
            self.per_s = (self.total - self._window[0][1]) / (now - self._window[0][0])

    def finish(self) -> None:
        """Switch ``per_s`` to the whole run's average."""
        self.per_s = self.total / max(time.monotonic() - self.started, 1e-9)
