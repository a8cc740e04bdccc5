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

Reproducible bytes: the build runs in a child process whose numerics are pinned
(``BUILD_ENV``: one thread, ATen and MKL held to their AVX2 code paths), so the same
spec gives the same ``model.safetensors`` on any x86-64 machine with AVX2, idle or
busy. Measured: the default AVX-512 kernels give other bits than AVX2 ones after one
step, so an unpinned build depends on the CPU; and one thread is also ~10x faster
than two on an oversubscribed machine (OpenMP barriers wait for descheduled threads).
The default model is shipped with the package (``shipped/``) and copied into the
cache on first use; ``asympo init-model --verify`` rebuilds it and compares the hash.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
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
# 2: byte-level token strings (spaces survive Qwen2Tokenizer), chat template.
# 3: built in a child process with pinned numerics (BUILD_ENV); manifest has the sha256.
FORMAT_VERSION = 3
MANIFEST = "asympo_model.json"
WEIGHTS = "model.safetensors"
WARM_START_THREADS = 1
# The build child's environment: read by OpenMP, MKL and ATen when they start, so they
# cannot be set from inside a process that already ran torch code.
BUILD_ENV = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "MKL_DYNAMIC": "FALSE",
    "MKL_CBWR": "AVX2",  # MKL's conditional numerical reproducibility: one code path
    "ATEN_CPU_CAPABILITY": "avx2",  # ATen's own kernels (softmax, norms, adds)
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "PYTHONHASHSEED": "0",
    "CUDA_VISIBLE_DEVICES": "",  # the build is defined on the CPU
}
# Default models shipped with the package, one directory per cache key.
SHIPPED_DIR = Path(__file__).parent / "shipped"


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

    def to_json(self) -> str:
        """The spec as JSON (what the build child receives)."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @staticmethod
    def from_json(text: str) -> TinyModelSpec:
        """Inverse of ``to_json``."""
        data = json.loads(text)
        return TinyModelSpec(
            architecture=TinyArchitecture(**data.pop("architecture")),
            schedule=SftSchedule(**data.pop("schedule")),
            **data,
        )

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
    """The tiny-model spec implied by the run's settings (the task section).

    ``learner.seed`` does not enter: runs with different RL seeds start from the same
    warm-started model (and need no build of their own), so seeds compare like with like.
    """
    return TinyModelSpec(
        architecture=TinyArchitecture(),
        schedule=SftSchedule(),
        task_name=settings.task.name,
        task_seed=settings.task.seed,
        task_train_size=settings.task.train_size,
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
    # max_steps and the evaluations bound the work; the clock only as a safety net, and
    # then the model is not reproducible: say so in the manifest.
    clock_stopped = result.seconds > spec.schedule.hard_max_seconds

    with _installed_atomically(out_dir) as tmp:
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
            "sha256": file_sha256(tmp / WEIGHTS),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": WARM_START_THREADS,
            "stopped_by_clock": clock_stopped,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return TinyModelResult(out_dir, result.accuracy, n_params, False, time.monotonic() - start)


# How the build child reports a user mistake: one prefixed line and its own exit status.
_USER_ERROR = "build refused: "
_USER_ERROR_EXIT = 3


@contextlib.contextmanager
def _installed_atomically(out_dir: Path) -> Iterator[Path]:
    """A scratch directory beside ``out_dir`` that replaces it only if the body succeeds,
    so a crash never leaves a half-written model under its cache key."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        yield tmp
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def build_in_child(
    spec: TinyModelSpec, out_dir: Path, log: Callable[[str], None] = print
) -> TinyModelResult:
    """``build_and_warm_start`` in a child process with the pinned numerics of BUILD_ENV."""
    start = time.monotonic()
    env = {**os.environ, **BUILD_ENV}
    cmd = [sys.executable, "-m", "asympo.model.tiny", spec.to_json(), str(out_dir)]
    with subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as child:
        assert child.stdout is not None
        tail: list[str] = []
        for line in child.stdout:
            line = line.rstrip("\n")
            if line.startswith(("warm start", "tiny model")):
                log(line)
            tail = [*tail[-19:], line]
        code = child.wait()
    if code == _USER_ERROR_EXIT:
        # The child's one-line reason, raised as the ValueError it was (no child traceback).
        reasons = [line[len(_USER_ERROR) :] for line in tail if line.startswith(_USER_ERROR)]
        raise ValueError(reasons[-1] if reasons else "tiny model build refused its settings")
    if code != 0:
        raise RuntimeError(f"tiny model build failed (exit {code}):\n" + "\n".join(tail))
    manifest = read_manifest(out_dir)
    assert manifest is not None, f"the build left no manifest in {out_dir}"
    return TinyModelResult(
        out_dir,
        float(manifest["held_out_greedy_accuracy"]),  # type: ignore[arg-type]
        int(manifest["parameters"]),  # type: ignore[call-overload]
        False,
        time.monotonic() - start,
    )


def _copy_shipped(out_dir: Path) -> bool:
    """Copy the shipped model for ``out_dir``'s key into the cache; False if none ships."""
    source = SHIPPED_DIR / out_dir.name
    manifest = read_manifest(source)
    if manifest is None or file_sha256(source / WEIGHTS) != manifest.get("sha256"):
        return False
    with _installed_atomically(out_dir) as tmp:
        shutil.copytree(source, tmp, dirs_exist_ok=True)
    return True


def ensure_tiny_model(
    settings: Settings, force: bool = False, log: Callable[[str], None] = print
) -> TinyModelResult:
    """The cached tiny model for ``settings``: cached, else the shipped copy, else built.

    ``force`` rebuilds (in the pinned child process) even when a copy exists.
    """
    out_dir = tiny_model_dir(settings)
    if not force and read_manifest(out_dir) is None and _copy_shipped(out_dir):
        log(f"tiny model: copied the shipped build {out_dir.name} into the cache")
    manifest = None if force else read_manifest(out_dir)
    if manifest is not None:
        return TinyModelResult(
            out_dir,
            float(manifest["held_out_greedy_accuracy"]),  # type: ignore[arg-type]
            int(manifest["parameters"]),  # type: ignore[call-overload]
            True,
            0.0,
        )
    return build_in_child(spec_from_settings(settings), out_dir, log)


def verify_tiny_model(
    settings: Settings, log: Callable[[str], None] = print
) -> tuple[str, str | None]:
    """Rebuild the tiny model in a scratch directory: (sha256 of the rebuild, expected sha256).

    The expected hash is the shipped build's, else the cached one's, else None.
    """
    name = tiny_model_dir(settings).name
    expected = None
    for where in (SHIPPED_DIR / name, tiny_model_dir(settings)):
        manifest = read_manifest(where)
        if manifest is not None and isinstance(manifest.get("sha256"), str):
            expected = str(manifest["sha256"])
            break
    with tempfile.TemporaryDirectory(prefix="asympo-verify-") as scratch:
        out = Path(scratch) / name
        build_in_child(spec_from_settings(settings), out, log)
        return file_sha256(out / WEIGHTS), expected


def _main(argv: list[str]) -> int:
    """Child entry point: ``python -m asympo.model.tiny SPEC_JSON OUT_DIR``."""
    spec_json, out_dir = argv
    torch.use_deterministic_algorithms(True)
    try:
        build_and_warm_start(TinyModelSpec.from_json(spec_json), Path(out_dir), log=_say)
    except ValueError as exc:  # a user mistake (task data, alphabet, verifier): one line
        _say(f"{_USER_ERROR}{exc}")
        return _USER_ERROR_EXIT
    return 0


def _say(line: str) -> None:
    print(line, flush=True)


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
