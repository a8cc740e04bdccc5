"""PNG plot of a run: accuracy, reward, loss balance and staleness over steps."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from asympo.run_log import series

PANELS = (
    ("accuracy", "held-out accuracy (greedy)"),
    ("reward_mean", "reward mean"),
    ("loss_balance", "loss balance (pos + neg)"),
    ("staleness_mean", "staleness (versions)"),
)


def plot_run(records: list[dict[str, Any]], out: str | Path, title: str = "") -> Path:
    """Write a 2x2 figure of the standard run curves to ``out`` and return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (key, label) in zip(axes.flat, PANELS, strict=True):
        steps, values = series(records, key)
        ax.plot(steps, values, marker="." if len(steps) < 50 else None)
        if key == "loss_balance":
            for part, style in (("loss_positive", "--"), ("loss_negative", ":")):
                s2, v2 = series(records, part)
                ax.plot(s2, v2, style, label=part)
            ax.legend(loc="best", fontsize=8)
        if key == "staleness_mean":
            s2, v2 = series(records, "staleness_max")
            ax.plot(s2, v2, "--", label="max")
            ax.legend(loc="best", fontsize=8)
        ax.set_title(label)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(out)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
