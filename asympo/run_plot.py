"""PNG plot of a run: accuracy, reward, loss values, the update split, staleness, ratios."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from asympo.run_log import series, wilson_interval

PANELS = (
    ("accuracy", "held-out accuracy (greedy)"),
    ("reward_mean", "reward mean"),
    ("loss_balance", "loss values by side (sum; 0 by construction under asympo)"),
    ("update_norm_positive", "update split: ||dL/dlogits|| by side"),
    ("staleness_mean", "staleness (versions)"),
    ("ratio_mean", "importance ratio (behaviour-corrected losses)"),
)


def plot_run(records: list[dict[str, Any]], out: str | Path, title: str = "") -> Path:
    """Write a 2x3 figure of the standard run curves to ``out`` and return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(15, 7))
    for ax, (key, label) in zip(axes.flat, PANELS, strict=True):
        steps, values = series(records, key)
        main = "positive (A>0)" if key == "update_norm_positive" else key
        ax.plot(steps, values, marker="." if len(steps) < 50 else None, label=main)
        extra: tuple[tuple[str, str], ...] = ()
        if key == "accuracy":
            _wilson_band(ax, records)
        if key == "loss_balance":
            extra = (("loss_positive", "--"), ("loss_negative", ":"))
        elif key == "update_norm_positive":
            extra = (("update_norm_negative", "--"),)
        elif key == "staleness_mean":
            extra = (("staleness_max", "--"),)
        elif key == "ratio_mean":
            extra = (("clip_fraction", "--"),)
        for part, style in extra:
            s2, v2 = series(records, part)
            ax.plot(s2, v2, style, label=part)
        if key == "update_norm_positive":
            share = ax.twinx()
            s2, v2 = series(records, "update_share_positive")
            share.plot(s2, v2, ":", color="black", label="positive share")
            share.set_ylim(0, 1)
            share.legend(loc="upper right", fontsize=8)
        if key == "ratio_mean" and not steps:
            ax.text(
                0.5,
                0.5,
                "no ratio: this loss uses no behaviour log-probs",
                ha="center",
                va="center",
                transform=ax.transAxes,
                fontsize=9,
            )
        elif extra:
            ax.legend(loc="best", fontsize=8)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(out)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _wilson_band(ax: Any, records: list[dict[str, Any]]) -> None:
    """Shade the 95 % Wilson interval of each evaluation that names its ``eval_size``."""
    points = [
        (int(r["step"]), *wilson_interval(float(r["accuracy"]), int(r["eval_size"])))
        for r in records
        if isinstance(r.get("accuracy"), int | float) and isinstance(r.get("eval_size"), int)
    ]
    if points:
        steps, lows, highs = zip(*points, strict=True)
        ax.fill_between(steps, lows, highs, alpha=0.2, label="95% interval")
        ax.legend(loc="best", fontsize=8)
