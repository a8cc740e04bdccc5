"""Build, warm-start and cache the tiny default model (``asympo init-model``).

The result lives in ``<cache_dir>/tiny-<key>/`` where ``key`` hashes everything that
shapes it (architecture, warm-start schedule, task settings, format version), so a
later run with the same configuration reuses it. A directory is only visible once
complete: it is written under a temporary name and renamed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer

from asympo.config import Settings
from asympo.model.architecture import TinyArchitecture, build_tiny_model, count_parameters
from asympo.model.char_tokenizer import CHARACTERS, save_char_tokenizer
from asympo.model.warm_start import SftSchedule, supervised_warm_start
from asympo.tasks import load_task
from asympo.verifiers import as_verdict, resolve_verifier

# Bump when the files written here change meaning, so stale caches are not reused.
FORMAT_VERSION = 1
MANIFEST = "asympo_model.json"
WARM_START_THREADS = 2


@dataclass(frozen=True)
class TinyModelSpec:
    """Everything that determines the tiny model: shape, seed, warm start, task."""

    architecture: TinyArchitecture
    schedule: SftSchedule
    task_name: str
    task_seed: int
    task_train_size: int
    seed: int = 0

    def cache_key(self) -> str:
        """Stable short hash of the spec (and the file format version)."""
        blob = json.dumps(
            {"format": FORMAT_VERSION, **dataclasses.asdict(self)}, sort_keys=True
        ).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


@dataclass(frozen=True)
class TinyModelResult:
    """Where the model is, how well it solves the held-out split, and whether it was cached."""

    path: Path
    accuracy: float
    parameters: int
    reused: bool
    seconds: float


def spec_from_settings(settings: Settings) -> TinyModelSpec:
    """The tiny-model spec implied by the run's settings (task section, learner seed)."""
    return TinyModelSpec(
        architecture=TinyArchitecture(),
        schedule=SftSchedule(),
        task_name=settings.task.name,
        task_seed=settings.task.seed,
        task_train_size=settings.task.train_size,
        seed=settings.learner.seed,
    )


def tiny_model_dir(settings: Settings) -> Path:
    """Cache directory the tiny model for ``settings`` lives (or will live) in."""
    return Path(settings.model.cache_dir) / f"tiny-{spec_from_settings(settings).cache_key()}"


def read_manifest(path: Path) -> dict[str, object] | None:
    """The manifest of a complete cached model, or None when ``path`` holds none."""
    file = path / MANIFEST
    if not file.is_file():
        return None
    data = json.loads(file.read_text())
    return data if isinstance(data, dict) else None


def _check_task_alphabet(texts: list[str], task_name: str) -> None:
    allowed = set(CHARACTERS)
    bad = sorted({ch for text in texts for ch in text} - allowed)
    if bad:
        raise ValueError(
            f"task {task_name!r} uses characters the tiny model's tokenizer lacks: {bad[:10]}; "
            "point model.path at a Hugging Face model for this task"
        )


def build_and_warm_start(
    spec: TinyModelSpec, out_dir: Path, log: Callable[[str], None] = print
) -> TinyModelResult:
    """Build the tiny model, warm-start it on the task and save it (HF format) to ``out_dir``."""
    start = time.monotonic()
    task = load_task(spec.task_name, seed=spec.task_seed, train_size=spec.task_train_size)
    train = [(task.render(p), task.sft_target(p)) for p in task.train]
    held_out = [(task.render(p), p.answer) for p in task.test]
    _check_task_alphabet([a + b for a, b in train + held_out], spec.task_name)
    verifier = resolve_verifier(task.verifier)

    def verify(response: str, reference: str) -> float:
        return as_verdict(verifier(response, reference)).reward

    arch = spec.architecture
    with tempfile.TemporaryDirectory() as tok_dir:
        save_char_tokenizer(tok_dir, arch.max_positions)
        tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    model = build_tiny_model(arch, spec.seed)
    n_params = count_parameters(model)
    log(f"tiny model: {n_params / 1e6:.2f} M parameters; warm start on {task.name!r}")

    threads = torch.get_num_threads()
    torch.set_num_threads(WARM_START_THREADS)
    try:
        result = supervised_warm_start(
            model, tokenizer, train, held_out, verify, ["\n"], spec.schedule, log
        )
    finally:
        torch.set_num_threads(threads)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        save_char_tokenizer(tmp, arch.max_positions)
        manifest = {
            "format": FORMAT_VERSION,
            "kind": "asympo-tiny",
            "spec": dataclasses.asdict(spec),
            "parameters": n_params,
            "task": task.name,
            "held_out_greedy_accuracy": result.accuracy,
            "warm_start_steps": result.steps,
            "warm_start_seconds": round(result.seconds, 1),
            "final_loss": result.final_loss,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return TinyModelResult(out_dir, result.accuracy, n_params, False, time.monotonic() - start)


def ensure_tiny_model(
    settings: Settings, force: bool = False, log: Callable[[str], None] = print
) -> TinyModelResult:
    """The cached tiny model for ``settings``, built and warm-started first if missing."""
    out_dir = tiny_model_dir(settings)
    manifest = None if force else read_manifest(out_dir)
    if manifest is not None:
        return TinyModelResult(
            out_dir,
            float(manifest["held_out_greedy_accuracy"]),  # type: ignore[arg-type]
            int(manifest["parameters"]),  # type: ignore[call-overload]
            True,
            0.0,
        )
    return build_and_warm_start(spec_from_settings(settings), out_dir, log)
