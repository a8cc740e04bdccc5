"""Experiment trackers (W&B, TensorBoard, MLflow) fed from the one place metrics are written.

:class:`asympo.run_log.MetricsWriter` hands every record it appends to metrics.jsonl to
the trackers of ``tracking.backends``: the numeric fields, at the record's ``step``, so a
tracker shows exactly the per-step values of metrics.jsonl (which, with Prometheus, stays
the source of truth). The resolved configuration (secrets masked) is logged once when a
tracker opens. Each backend is an optional extra; a backend named in the configuration
but not installed is a one-line :class:`TrackerError` before anything starts. A tracker
that fails while the run is going (a network error in online W&B, a full disk) is
logged and dropped; the run and metrics.jsonl carry on.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import yaml

from asympo.config import Settings, dump_settings

log = logging.getLogger(__name__)

# backend -> (module that must import, the extra that installs it)
BACKENDS = {
    "wandb": ("wandb", "wandb"),
    "tensorboard": ("tensorboard", "tensorboard"),
    "mlflow": ("mlflow", "mlflow"),
}
MLFLOW_PARAM_CHARS = 500  # MLflow rejects longer parameter values


class TrackerError(ValueError):
    """A configured tracker cannot be used (its extra is not installed); the message says why."""


class Tracker(Protocol):
    """One experiment tracker: scalar values per step, closed at the end of the run."""

    name: str

    def log(self, values: Mapping[str, float], step: int) -> None:
        """Record ``values`` at ``step``."""

    def close(self) -> None:
        """Flush and close the tracker's run."""


def numeric_values(record: Mapping[str, Any]) -> dict[str, float]:
    """The finite numeric fields of a metrics record, without ``step`` (bools excluded)."""
    return {
        key: float(value)
        for key, value in record.items()
        if key != "step"
        and isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
    }


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (the configuration as tracker parameters)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def check_backends(backends: Sequence[str]) -> None:
    """TrackerError naming the extra to install for the first backend that cannot import."""
    for name in backends:
        module, extra = BACKENDS[name]
        if importlib.util.find_spec(module) is None:
            raise TrackerError(
                f"tracking.backends has {name} but {module} is not installed: "
                f"pip install 'asympo[{extra}]'"
            )


class WandbTracker:
    """Weights & Biases: ``wandb.init`` with the configuration, ``log(step=...)`` per record."""

    name = "wandb"

    def __init__(self, settings: Settings, config: dict[str, Any], directory: Path) -> None:
        import wandb

        t = settings.tracking
        self._run = wandb.init(
            project=t.project,
            name=t.run_name or settings.streams.run_id,
            config=config,
            dir=str(directory),
            mode=t.wandb_mode or os.environ.get("WANDB_MODE") or "online",  # type: ignore[arg-type]
            reinit="create_new",
        )

    def log(self, values: Mapping[str, float], step: int) -> None:
        """Record ``values`` at ``step``."""
        self._run.log(dict(values), step=step)

    def close(self) -> None:
        """Finish the run (offline runs stay in ``<dir>/wandb`` for ``wandb sync``)."""
        self._run.finish()


class TensorBoardTracker:
    """TensorBoard event files: one scalar per key, the configuration as a text summary."""

    name = "tensorboard"

    def __init__(self, settings: Settings, config_yaml: str, directory: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(str(directory / "tensorboard"))
        fenced = "    " + config_yaml.replace("\n", "\n    ")  # markdown code block
        self._writer.add_text("config", fenced, 0)

    def log(self, values: Mapping[str, float], step: int) -> None:
        """Record ``values`` at ``step``."""
        for key, value in values.items():
            self._writer.add_scalar(key, value, step)
        self._writer.flush()

    def close(self) -> None:
        """Flush and close the event file."""
        self._writer.close()


class MlflowTracker:
    """MLflow: the configuration as parameters (and config.yaml), metrics per step."""

    name = "mlflow"

    def __init__(
        self, settings: Settings, config: dict[str, Any], config_yaml: str, directory: Path
    ) -> None:
        t = settings.tracking
        uri = t.mlflow_tracking_uri or (directory / "mlruns").resolve().as_uri()
        if uri.startswith("file:") or "://" not in uri:
            # MLflow 3 refuses its file store unless told; a local store is what we want here.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.tracking import MlflowClient

        self._client = MlflowClient(uri)
        experiment = self._client.get_experiment_by_name(t.project)
        experiment_id = (
            experiment.experiment_id
            if experiment is not None
            else self._client.create_experiment(t.project)
        )
        run = self._client.create_run(experiment_id, run_name=t.run_name or settings.streams.run_id)
        self.run_id: str = run.info.run_id
        from mlflow.entities import Param

        params = [
            Param(key, str(value)[:MLFLOW_PARAM_CHARS]) for key, value in flatten(config).items()
        ]
        for i in range(0, len(params), 100):  # log_batch takes at most 100 params
            self._client.log_batch(self.run_id, params=params[i : i + 100])
        self._client.log_text(self.run_id, config_yaml, "config.yaml")

    def log(self, values: Mapping[str, float], step: int) -> None:
        """Record ``values`` at ``step``."""
        from mlflow.entities import Metric

        now = int(1000 * time.time())
        metrics = [Metric(key, value, now, step) for key, value in values.items()]
        self._client.log_batch(self.run_id, metrics=metrics)

    def close(self) -> None:
        """Mark the run finished."""
        self._client.set_terminated(self.run_id)


def open_trackers(settings: Settings) -> list[Tracker]:
    """The trackers of ``tracking.backends``, each opened with the resolved configuration."""
    backends = list(dict.fromkeys(settings.tracking.backends))
    if not backends:
        return []
    check_backends(backends)
    directory = Path(settings.tracking.dir or Path(settings.run_dir) / "trackers")
    directory.mkdir(parents=True, exist_ok=True)
    config_yaml = dump_settings(settings)
    config = yaml.safe_load(config_yaml)
    trackers: list[Tracker] = []
    for name in backends:
        if name == "wandb":
            trackers.append(WandbTracker(settings, config, directory))
        elif name == "tensorboard":
            trackers.append(TensorBoardTracker(settings, config_yaml, directory))
        else:
            trackers.append(MlflowTracker(settings, config, config_yaml, directory))
        log.info("tracking to %s (%s)", name, directory)
    return trackers
