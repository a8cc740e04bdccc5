"""Build, warm-start and cache the tiny default model (``asympo init-model``).

The result lives in ``<cache_dir>/tiny-<key>/`` where ``key`` hashes everything that
shapes it (architecture, warm-start schedule, task settings, format version), so a
later run with the same configuration reuses it. A directory is only visible once
complete: it is written under a temporary name and renamed.

The warm start trains on the run's task exactly as configured (``task.name``,
``task.path``, ``task.verifier``, ``task.prompt_format``/``prompt_preset``/``system_prompt``),
built by the same :func:`asympo.tasks.task_from_settings` as the learner: the model learns
the prompt format it will be trained and evaluated with, and a ``task.path`` is read
locally (never replaced by the task's hub dataset). Settings left at their defaults stay
out of the key, so adding a setting does not invalidate existing caches; a local
``task.path`` enters the key by its content hash.
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

from asympo.config import Settings, TaskSettings
from asympo.model.architecture import TinyArchitecture, build_tiny_model, count_parameters
from asympo.model.char_tokenizer import CHARACTERS, save_char_tokenizer
from asympo.model.warm_start import SftSchedule, supervised_warm_start
from asympo.tasks import task_from_settings
from asympo.verifiers import as_verdict, resolve_verifier

# Bump when the files written here change meaning, so stale caches are not reused.
FORMAT_VERSION = 2  # 2: byte-level token strings (spaces survive Qwen2Tokenizer), chat template
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
    task_path: str = ""
    task_source_sha256: str = ""
    task_verifier: str = ""
    prompt_format: str = "raw"
    prompt_preset: str = ""
    system_prompt: str = ""

    def cache_key(self) -> str:
        """Stable short hash of the spec (and the file format version).

        Fields at their default value are left out, so a spec written before they
        existed keeps its key (and its cached model).
        """
        fields = dataclasses.asdict(self)
        for f in dataclasses.fields(self):
            if f.name in OPTIONAL_KEY_FIELDS and fields[f.name] == f.default:
                del fields[f.name]
        blob = json.dumps({"format": FORMAT_VERSION, **fields}, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def task_settings(self) -> TaskSettings:
        """The task section this model is warm-started on."""
        return TaskSettings(
            name=self.task_name,
            path=self.task_path,
            verifier=self.task_verifier,
            seed=self.task_seed,
            train_size=self.task_train_size,
            prompt_format=self.prompt_format,  # type: ignore[arg-type]
            prompt_preset=self.prompt_preset,
            system_prompt=self.system_prompt,
        )


OPTIONAL_KEY_FIELDS = (
    "task_path",
    "task_source_sha256",
    "task_verifier",
    "prompt_format",
    "prompt_preset",
    "system_prompt",
)


def source_fingerprint(path: str) -> str:
    """sha256 of a local dataset file (or of a directory's files); '' for a hub id or none."""
    if not path:
        return ""
    p = Path(path).expanduser()
    files = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
    if not all(f.is_file() for f in files):
        return ""
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode())
        digest.update(f.read_bytes())
    return digest.hexdigest()


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
        task_path=settings.task.path,
        task_source_sha256=source_fingerprint(settings.task.path),
        task_verifier=settings.task.verifier,
        prompt_format=settings.task.prompt_format,
        prompt_preset=settings.task.prompt_preset,
        system_prompt=settings.task.system_prompt,
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
    arch = spec.architecture
    with tempfile.TemporaryDirectory() as tok_dir:
        save_char_tokenizer(tok_dir, arch.max_positions)
        tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    task = task_from_settings(spec.task_settings(), tokenizer, "the tiny model")
    train = [(task.render(p), task.sft_target(p)) for p in task.train]
    held_out = [(task.render(p), p.answer) for p in task.test]
    _check_task_alphabet([a + b for a, b in train + held_out], spec.task_name)
    verifier = resolve_verifier(task.verifier)

    def verify(response: str, reference: str) -> float:
        return as_verdict(verifier(response, reference)).reward

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
