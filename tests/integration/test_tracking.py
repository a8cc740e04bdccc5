"""Experiment trackers carry exactly the per-step values of metrics.jsonl.

A real learner (real Redis streams, real optimiser steps) writes through
``MetricsWriter`` with W&B (offline), TensorBoard and MLflow (local file store) open;
each tracker is read back from its own files and compared with metrics.jsonl. Each
backend's test is skipped only where its optional extra is not installed.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from asympo.config import Settings
from asympo.run_log import MetricsWriter, read_metrics
from asympo.tracking import BACKENDS, TrackerError, check_backends, open_trackers
from services.learner.learner import Learner
from tests.integration.test_learner import fill, settings_for
from tests.tracker_files import metrics_values, mlflow_values, tensorboard_values, wandb_values
from tests.unit.test_learner_step import tiny_model

STEPS = 3


def installed(backend: str) -> bool:
    return importlib.util.find_spec(BACKENDS[backend][0]) is not None


def tracked_run(
    tmp_path: Path, redis_client: redis.Redis, run_id: str, backend: str
) -> tuple[Settings, list[dict[str, Any]]]:
    """STEPS learner steps plus the accuracy records the learner's main writes."""
    if not installed(backend):
        pytest.skip(f"the {backend} extra is not installed")
    base = settings_for(run_id, tmp_path / "ckpt")
    settings = base.model_copy(
        update={
            "run_dir": str(tmp_path / "run"),
            "tracking": base.tracking.model_copy(
                update={"backends": [backend], "project": "asympo-test", "wandb_mode": "offline"}
            ),
        }
    )
    writer = MetricsWriter(tmp_path / "run" / "metrics.jsonl", open_trackers(settings))
    learner = Learner(settings, redis_client, tiny_model(), metrics_writer=writer)
    fill(redis_client, settings, run_id, 2 * STEPS)
    writer.write({"step": 0, "version": 0, "accuracy": 0.25})
    for step in range(1, STEPS + 1):
        assert learner.step(timeout_s=10) is not None
        if step == STEPS:
            writer.write({"step": step, "version": step, "accuracy": 0.5})
    writer.close()
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert len([r for r in records if "loss" in r]) == STEPS
    return settings, records


def assert_same_values(tracked: dict[int, dict[str, float]], records: list[dict[str, Any]]) -> None:
    expected = metrics_values(records)
    assert sorted(tracked) == sorted(expected) == list(range(STEPS + 1))
    for step, values in expected.items():
        assert set(tracked[step]) == set(values), step
        for key, value in values.items():
            assert tracked[step][key] == pytest.approx(value, rel=1e-6, abs=1e-9), (step, key)


def test_wandb_offline_run_holds_the_metrics_and_the_config(
    tmp_path: Path, redis_client: redis.Redis, run_id: str, key_prefix: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.setenv("WANDB_SILENT", "true")
    settings, records = tracked_run(tmp_path, redis_client, run_id, "wandb")
    values, config = wandb_values(tmp_path / "run" / "trackers")
    assert_same_values(values, records)
    assert config["learner"]["loss"]["name"] == settings.learner.loss.name
    assert config["weights"]["publish_token"] == ""  # dump_settings masks secrets


def test_tensorboard_events_hold_the_metrics_and_the_config(
    tmp_path: Path, redis_client: redis.Redis, run_id: str, key_prefix: str
) -> None:
    settings, records = tracked_run(tmp_path, redis_client, run_id, "tensorboard")
    values, config = tensorboard_values(tmp_path / "run" / "trackers" / "tensorboard")
    assert_same_values(values, records)
    assert yaml.safe_load(config)["streams"]["run_id"] == settings.streams.run_id


def test_mlflow_file_store_holds_the_metrics_params_and_config(
    tmp_path: Path, redis_client: redis.Redis, run_id: str, key_prefix: str
) -> None:
    settings, records = tracked_run(tmp_path, redis_client, run_id, "mlflow")
    uri = (tmp_path / "run" / "trackers" / "mlruns").resolve().as_uri()
    values, params, config = mlflow_values(uri, "asympo-test")
    assert_same_values(values, records)
    assert params["learner.loss.name"] == settings.learner.loss.name
    assert params["learner.groups_per_step"] == str(settings.learner.groups_per_step)
    assert yaml.safe_load(config)["learner"]["lr"] == settings.learner.lr


class BrokenTracker:
    name = "broken"

    def log(self, values: object, step: int) -> None:
        raise ConnectionError("tracker server gone")

    def close(self) -> None:
        raise AssertionError("a dropped tracker is not closed")


def test_a_failing_tracker_is_dropped_and_the_file_carries_on(tmp_path: Path) -> None:
    writer = MetricsWriter(tmp_path / "m.jsonl", [BrokenTracker()])
    writer.write({"step": 1, "loss": 0.5})
    writer.write({"step": 2, "loss": 0.25})
    writer.close()
    assert writer.trackers == []
    assert [r["loss"] for r in read_metrics(tmp_path / "m.jsonl")] == [0.5, 0.25]


def test_a_missing_extra_is_one_line_naming_the_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(BACKENDS, "wandb", ("asympo_no_such_module", "wandb"))
    with pytest.raises(TrackerError) as err:
        check_backends(["tensorboard", "wandb"] if installed("tensorboard") else ["wandb"])
    assert str(err.value) == (
        "tracking.backends has wandb but asympo_no_such_module is not installed: "
        "pip install 'asympo[wandb]'"
    )
