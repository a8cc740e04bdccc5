"""The run directory of `asympo up`: per-run defaults, the resolved config file, the summary.

A run keeps everything in ``run_dir``: config.yaml (secrets masked), metrics.jsonl,
logs/, checkpoints/, weights/, rollout/, final/ and plot.png. Settings the user did not
set explicitly are pointed inside it; a setting the user set is kept, even when its
value equals the default.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from asympo.config import Settings, dump_settings
from asympo.run_log import METRICS_FILE, read_metrics


@dataclass
class RunResult:
    """What `up` reports when it stops."""

    run_dir: Path
    steps: int
    accuracy_first: float | None
    accuracy_last: float | None
    interrupted: bool
    records: list[dict[str, Any]]


def with_run_defaults(settings: Settings) -> Settings:
    """Fill per-run values: fresh tokens when empty, unset directories inside ``run_dir``,
    and (one machine) the rollout replicas reading the run's weight store in place.

    A directory counts as unset when the user gave no value for it (file, environment
    or ``--set``), whatever its value: ``--set weights.store_dir=runs/weights`` keeps
    ``runs/weights`` although it is the default. An empty token is never useful (it
    refuses every Publish), so tokens are filled by value.
    """
    run_dir = Path(settings.run_dir)
    weights: dict[str, Any] = {}
    updates: dict[str, Any] = {}
    if not settings.weights.publish_token.get_secret_value():
        weights["publish_token"] = SecretStr(secrets.token_urlsafe(24))
    if not settings.service_token.get_secret_value():
        updates["service_token"] = SecretStr(secrets.token_urlsafe(24))
    if "store_dir" not in settings.weights.model_fields_set:
        weights["store_dir"] = str(run_dir / "weights")
    if weights:
        updates["weights"] = settings.weights.model_copy(update=weights)
    if "checkpoint_dir" not in settings.learner.model_fields_set:
        updates["learner"] = settings.learner.model_copy(
            update={"checkpoint_dir": str(run_dir / "checkpoints")}
        )
    rollout: dict[str, Any] = {}
    if "work_dir" not in settings.rollout.model_fields_set:
        rollout["work_dir"] = str(run_dir / "rollout")
    if "shared_store_dir" not in settings.rollout.model_fields_set:
        # One machine: the replicas open each version in place in the run's store instead
        # of fetching a copy (a swap without the transfer; docs/weights.md).
        store = weights.get("store_dir", settings.weights.store_dir)
        rollout["shared_store_dir"] = str(store)
    if rollout:
        updates["rollout"] = settings.rollout.model_copy(update=rollout)
    return settings.model_copy(update=updates)


def child_env(settings: Settings, config_path: Path, redis_url: str) -> dict[str, str]:
    """Environment shared by every child: the run's config file plus secrets and Redis URL."""
    env = dict(os.environ)
    env.update(
        {
            "ASYMPO_CONFIG": str(config_path),
            "ASYMPO_REDIS__URL": redis_url,
            "ASYMPO_WEIGHTS__PUBLISH_TOKEN": settings.weights.publish_token.get_secret_value(),
            "ASYMPO_SERVICE_TOKEN": settings.service_token.get_secret_value(),
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


def write_run_config(settings: Settings) -> Path:
    """Write the resolved configuration (secrets masked) into the run directory."""
    run_dir = Path(settings.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.yaml"
    path.write_text(dump_settings(settings))
    return path


def metrics_path(settings: Settings) -> Path:
    """Where the learner writes its per-step metrics."""
    return Path(settings.run_dir) / METRICS_FILE


def summarise(settings: Settings, interrupted: bool) -> RunResult:
    """Read the run's metrics and report first/last held-out accuracy."""
    records = read_metrics(metrics_path(settings))
    accs = [r["accuracy"] for r in records if isinstance(r.get("accuracy"), int | float)]
    steps = max((int(r.get("step", 0)) for r in records), default=0)
    return RunResult(
        run_dir=Path(settings.run_dir),
        steps=steps,
        accuracy_first=accs[0] if accs else None,
        accuracy_last=accs[-1] if accs else None,
        interrupted=interrupted,
        records=records,
    )
