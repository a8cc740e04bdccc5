"""Read back what the experiment trackers wrote, from their files only (no network, no UI).

* W&B offline runs: ``<dir>/wandb/offline-run-*/run-*.wandb`` is W&B's LevelDB-style log
  (a 7-byte ``:W&B`` header, 32 KiB blocks of ``crc32 | length | type`` records holding
  protobuf ``Record`` messages); the history records carry the logged values.
* TensorBoard: the event files, through tensorboard's own EventAccumulator.
* MLflow: the local file store, through ``MlflowClient``.

Each reader returns ``{step: {key: value}}``.
"""

from __future__ import annotations

import json
import os
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

Values = dict[int, dict[str, float]]
WANDB_BLOCK = 32 * 1024
WANDB_HEADER = struct.Struct("<4sHB")
WANDB_RECORD = struct.Struct("<IHB")


def wandb_records(path: Path) -> Iterator[Any]:
    """The protobuf ``Record`` messages of an offline ``.wandb`` file, in order."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    ident, _magic, _version = WANDB_HEADER.unpack_from(data)
    assert ident == b":W&B", f"{path} is not a W&B run file"
    pos, pending = WANDB_HEADER.size, b""
    while pos + WANDB_RECORD.size <= len(data):
        left = WANDB_BLOCK - pos % WANDB_BLOCK
        if left < WANDB_RECORD.size:  # block trailer: zero padding
            pos += left
            continue
        _crc, length, kind = WANDB_RECORD.unpack_from(data, pos)
        if kind == 0 and length == 0:
            break
        pos += WANDB_RECORD.size
        pending += data[pos : pos + length]
        pos += length
        if kind in (1, 4):  # FULL or LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def wandb_values(directory: Path, wait_s: float = 60.0) -> tuple[Values, dict[str, Any]]:
    """Per-step values and the run's config from the offline run under ``directory``.

    ``wandb.finish()`` returns before W&B's core process has flushed the file: wait
    (up to ``wait_s``) until the run's exit record is in it.
    """
    (run_file,) = directory.glob("wandb/offline-run-*/run-*.wandb")
    deadline = time.monotonic() + wait_s
    records = list(wandb_records(run_file))
    while not any(r.WhichOneof("record_type") == "exit" for r in records):
        assert time.monotonic() < deadline, f"{run_file} has no exit record"
        time.sleep(0.5)
        records = list(wandb_records(run_file))
    values: Values = {}
    config: dict[str, Any] = {}
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = {
                i.key or "/".join(i.nested_key): json.loads(i.value_json)
                for i in record.history.item
            }
            step = int(items.pop("_step"))
            row = values.setdefault(step, {})
            row.update({k: float(v) for k, v in items.items() if not k.startswith("_")})
        elif kind in ("run", "config"):
            update = record.run.config.update if kind == "run" else record.config.update
            config.update({u.key: json.loads(u.value_json) for u in update})
    return values, config


def tensorboard_values(directory: Path) -> tuple[Values, str]:
    """Per-step scalars and the config text summary from the event files in ``directory``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(directory), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    values: Values = {}
    for tag in acc.Tags()["scalars"]:
        for event in acc.Scalars(tag):
            values.setdefault(event.step, {})[tag] = event.value
    config = ""
    for tag in acc.Tags()["tensors"]:
        if tag.startswith("config"):
            config = acc.Tensors(tag)[0].tensor_proto.string_val[0].decode()
    return values, config


def mlflow_values(uri: str, experiment: str) -> tuple[Values, dict[str, str], str]:
    """Per-step metrics, params and config.yaml of the one run of ``experiment`` at ``uri``."""
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no MLflow experiment {experiment!r} at {uri}"
    (run,) = client.search_runs([exp.experiment_id])
    values: Values = {}
    for key in run.data.metrics:
        for m in client.get_metric_history(run.info.run_id, key):
            values.setdefault(m.step, {})[key] = m.value
    artifact = Path(client.download_artifacts(run.info.run_id, "config.yaml"))
    return values, dict(run.data.params), artifact.read_text()


def metrics_values(records: list[dict[str, Any]]) -> Values:
    """metrics.jsonl records as ``{step: {key: value}}``: the numeric fields trackers get."""
    from asympo.tracking import numeric_values

    values: Values = {}
    for record in records:
        if isinstance(record.get("step"), int):
            values.setdefault(record["step"], {}).update(numeric_values(record))
    return values
