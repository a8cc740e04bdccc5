"""Where dataset rows come from: a local JSONL/JSON/parquet file, a directory, or a HF dataset id.

Every loader gets the same thing back: ``(train_rows, test_rows)`` as lists of dicts.
A single local file is split deterministically by seed; a directory with
``train.*`` and ``test.*`` files, or a Hugging Face dataset with both splits, keeps
its own split.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from asympo.tasks.base import Problem, TaskError

Row = dict[str, Any]
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")


def read_rows(path: Path) -> list[Row]:
    """Read every row of a local ``.jsonl``, ``.json`` (a list of objects) or ``.parquet`` file."""
    if not path.is_file():
        raise TaskError(f"dataset file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as exc:
            raise TaskError(
                "reading parquet needs pyarrow: pip install 'asympo[datasets]'"
            ) from exc
        try:
            return [dict(r) for r in pq.read_table(path).to_pylist()]
        except Exception as exc:  # pyarrow raises several types for corrupt files
            raise TaskError(f"cannot read parquet file {path}: {exc}") from exc
    text = path.read_text(encoding="utf-8")
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise TaskError(f"{path} is not valid JSON: {exc}") from exc
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise TaskError(f"{path} must hold a JSON list of objects")
        return data
    if suffix != ".jsonl":
        raise TaskError(f"unsupported dataset file type {path.suffix!r}; use {LOCAL_SUFFIXES}")
    rows: list[Row] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TaskError(f"{path}:{lineno} is not valid JSON: {exc}") from exc
        if not isinstance(row, dict):
            raise TaskError(f"{path}:{lineno} must be a JSON object")
        rows.append(row)
    return rows


def require_fields(rows: list[Row], fields: tuple[str, ...], source: str, schema: str) -> None:
    """Raise a TaskError naming the first row that lacks a field or has a non-string value."""
    if not rows:
        raise TaskError(f"{source} holds no rows")
    for index, row in enumerate(rows):
        for name in fields:
            if not isinstance(row.get(name), str):
                have = sorted(row)[:10]
                raise TaskError(
                    f"{source} row {index} does not match the {schema} schema: "
                    f"field {name!r} missing or not a string (row has {have}); "
                    f"expected fields {list(fields)}"
                )


def split_rows(rows: list[Row], seed: int, eval_size: int) -> tuple[list[Row], list[Row]]:
    """Shuffle by seed; the first ``eval_size`` rows are held out, the rest train."""
    if len(rows) < 2:
        raise TaskError("a single dataset file needs at least 2 rows to split into train and test")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_test = min(eval_size, len(rows) // 2)
    return [rows[i] for i in order[n_test:]], [rows[i] for i in order[:n_test]]


def _split_file(directory: Path, split: str) -> Path | None:
    for suffix in LOCAL_SUFFIXES:
        candidate = directory / f"{split}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def _looks_local(spec: str) -> bool:
    return spec.startswith((".", "/", "~")) or spec.lower().endswith(LOCAL_SUFFIXES)


def _load_hf(spec: str, default_config: str | None) -> tuple[list[Row], list[Row] | None]:
    """Rows of a Hugging Face dataset ``id`` or ``id:config`` (train split, test split or None)."""
    try:
        import datasets
    except ImportError as exc:
        raise TaskError(
            f"loading the Hugging Face dataset {spec!r} needs the datasets library: "
            "pip install 'asympo[datasets]' (or give a local .jsonl/.parquet file)"
        ) from exc
    name, _, config = spec.partition(":")
    try:
        loaded = datasets.load_dataset(name, config or default_config)
    except Exception as exc:  # datasets raises many types: offline, not found, bad config
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TaskError(
            f"cannot load Hugging Face dataset {spec!r} ({first}); offline or no such dataset? "
            "give a local file with task.path"
        ) from exc
    if "train" not in loaded:
        raise TaskError(f"Hugging Face dataset {spec!r} has no train split: {list(loaded)}")
    train = [dict(r) for r in loaded["train"]]
    test = [dict(r) for r in loaded["test"]] if "test" in loaded else None
    return train, test


def load_rows(
    spec: str, seed: int, eval_size: int, hf_config: str | None = None
) -> tuple[list[Row], list[Row], str]:
    """Train rows, test rows and a description of the source, from a file, directory or HF id."""
    path = Path(spec).expanduser()
    if path.is_dir():
        train_file, test_file = _split_file(path, "train"), _split_file(path, "test")
        if train_file is None:
            raise TaskError(f"directory {path} has no train.jsonl/train.json/train.parquet")
        train = read_rows(train_file)
        if test_file is None:
            train, test = split_rows(train, seed, eval_size)
            return train, test, str(train_file)
        return train, read_rows(test_file), str(path)
    if path.is_file():
        train, test = split_rows(read_rows(path), seed, eval_size)
        return train, test, str(path)
    if _looks_local(spec):
        raise TaskError(f"dataset file not found: {path}")
    hf_train, hf_test = _load_hf(spec, hf_config)
    if hf_test is None:
        hf_train, hf_test = split_rows(hf_train, seed, eval_size)
    return hf_train, hf_test, f"hf:{spec}"


def load_problems(
    spec: str,
    seed: int,
    eval_size: int,
    fields: tuple[str, ...],
    schema: str,
    to_problem: Callable[[Row, str, int], Problem],
    hf_config: str | None = None,
) -> tuple[list[Problem], list[Problem], str]:
    """Train and test problems from ``spec``: rows loaded, checked for ``fields``, converted.

    ``to_problem(row, split, index)`` builds one problem; ``schema`` names the expected
    format in error messages. Returns (train, test, description of the source).
    """
    train_rows, test_rows, where = load_rows(spec, seed, eval_size, hf_config=hf_config)
    splits = {"train": train_rows, "test": test_rows}
    for split, rows in splits.items():
        require_fields(rows, fields, f"{where} ({split})", schema)
    train, test = (
        [to_problem(row, split, i) for i, row in enumerate(rows)] for split, rows in splits.items()
    )
    return train, test, where
