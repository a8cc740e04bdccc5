"""End-to-end throughput: the whole system as `asympo up` runs it, sync vs async, one run.

For each ``max_staleness`` (0 = truly synchronous, then 1, 2, 4) the launcher starts the
real services as processes (weights, reward, rollout on vLLM, learner) against a real
Redis, on the same model, task and seed, for the same number of trained samples. Per
setting, over the steps after a warm-up:

* samples trained/s (learner step timestamps), and the ratio to the synchronous run;
* busy fractions from the services' own timers: the learner's time in ``train_step``
  (``train_s`` of each step; ``asympo_learner_busy_seconds_total``) and the generator's
  time in ``engine.generate`` (``asympo_rollout_busy_seconds_total``, scraped), over
  the same window;
* publish -> first sample of the new version: for each version, the first rollout group
  generated with it (``finished_at``) minus the version's announcement (weights stream);
* mean staleness of the trained samples.

In the same run, each stage alone on the same machine: ``train_step`` on identical
batches (the scored groups of the synchronous run, same threads as the learner) and the
engine alone on identical prompts (the prompts of that run, same batch). The pipeline
model (``asympo.pipeline_model``) turns these into the bounds printed next to the
measurements: sync ≈ 1/Σ stages, async ≈ 1/max(stage), capped by the shared cores.

The model: ``--model DIR``, else the tiny default if it is built, else an untrained tiny
model built here in seconds (``.cache/bench/tiny-untrained``: throughput, not learning,
is measured; untrained samples run to ``max_tokens``, the longest case).
Redis: REDIS_URL, else 127.0.0.1:6379 if it answers, else an embedded server; every key
of a run is deleted at the end.

    .venv/bin/python bench/e2e.py [--staleness 0,1,2,4] [--steps 30] [--warmup 4]
                                  [--groups 8] [--samples 8] [--json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

import redis
import torch

from asympo.config import Settings
from asympo.launcher import free_port, run_up, with_run_defaults
from asympo.pipeline_model import Stage, project
from asympo.run_log import read_metrics
from asympo.transport.redis_conn import EmbeddedRedis, connect, reachable
from asympo.transport.streams import decode
from asympo.v1 import records_pb2

LOCAL_URL = "redis://127.0.0.1:6379/0"
T = TypeVar("T")
UNTRAINED_DIR = Path(".cache/bench/tiny-untrained")
TARGET_OF_SLOWEST = 0.7  # samples/s at max_staleness=2 over the slowest stage alone
TARGET_MODEL_GAP = 0.10  # |measured async/sync - model async/sync| / model
BUSY = "asympo_rollout_busy_seconds_total"
SWAP_SUM = "asympo_weight_swap_seconds_sum"
SWAP_COUNT = "asympo_weight_swap_seconds_count"
# the learner: from a snapshot until the store has it verified and announced
PUBLISH_SUM = "asympo_learner_publish_latency_seconds_sum"
PUBLISH_COUNT = "asympo_learner_publish_latency_seconds_count"


@dataclass
class BenchConfig:
    """What to run: settings, sizes, and which isolated stages to time."""

    staleness: list[int] = field(default_factory=lambda: [0, 1, 2, 4])
    steps: int = 30  # measured steps per setting (after the warm-up); 12 was too noisy
    warmup: int = 4
    groups: int = 8
    samples: int = 8
    max_tokens: int = 24
    learner_threads: int = 0  # 0 = the configured budget (threads.learner)
    isolate_engine: bool = True
    isolate_reps: int = 3
    model: str = ""
    overrides: list[str] = field(default_factory=list)
    work_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="asympo-e2e-")))


def build_untrained_tiny(out: Path) -> str:
    """The tiny architecture with its seed-0 initial weights (no warm start), saved once."""
    from asympo.model.architecture import TinyArchitecture, build_tiny_model
    from asympo.model.char_tokenizer import save_char_tokenizer

    if not (out / "model.safetensors").exists():
        arch = TinyArchitecture()
        out.mkdir(parents=True, exist_ok=True)
        build_tiny_model(arch, 0).save_pretrained(str(out), safe_serialization=True)
        save_char_tokenizer(str(out), arch.max_positions)
    return str(out.resolve())


def pick_model(cfg: BenchConfig, settings: Settings) -> str:
    """``--model``, else the built tiny default, else the untrained tiny model."""
    if cfg.model:
        return cfg.model
    from asympo.model.loading import resolve_model_path

    try:
        return resolve_model_path(settings, build_if_missing=False)
    except Exception:  # not built yet: a warm start takes minutes; throughput needs none
        return build_untrained_tiny(UNTRAINED_DIR)


class Scraper:
    """Samples Prometheus counters of one service every ``period_s`` on a thread."""

    def __init__(self, port: int, metrics: list[str], period_s: float = 0.25) -> None:
        self.port = port
        self.metrics = metrics
        self.period_s = period_s
        self.samples: dict[str, list[tuple[float, float]]] = {m: [] for m in metrics}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="scraper", daemon=True)

    def __enter__(self) -> Scraper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        from asympo.launcher import scrape_counter

        while not self._stop.wait(self.period_s):
            for metric in self.metrics:
                value = scrape_counter(self.port, metric)
                if value is not None:
                    self.samples[metric].append((time.time(), value))

    def last(self, metric: str) -> float | None:
        """The last value scraped of ``metric``."""
        s = self.samples[metric]
        return s[-1][1] if s else None

    def value_at(self, metric: str, t: float) -> float | None:
        """``metric`` at wall time ``t`` (linear between samples; None outside them)."""
        s = self.samples[metric]
        if not s or t < s[0][0] or t > s[-1][0]:
            return None
        for (t0, v0), (t1, v1) in itertools.pairwise(s):
            if t0 <= t <= t1:
                return v0 if t1 == t0 else v0 + (v1 - v0) * (t - t0) / (t1 - t0)
        return s[-1][1]


def read_stream(client: redis.Redis, key: str) -> list[dict[bytes, bytes]]:
    """Every entry's fields of stream ``key``."""
    return [fields for _id, fields in cast("list[Any]", client.xrange(key))]


def publish_to_first_sample(client: redis.Redis, settings: Settings) -> list[float]:
    """Per version >= 1: first group generated with it (finished_at) minus its announcement."""
    s = settings.streams
    announced: dict[int, float] = {}
    for fields in read_stream(client, s.key(s.weights)):
        ann = decode(fields, records_pb2.VersionAnnouncement)
        announced.setdefault(int(ann.version), float(ann.announced_at))
    first: dict[int, float] = {}
    for fields in read_stream(client, s.key(s.rollouts)):
        group = decode(fields, records_pb2.RolloutGroup)
        for v in {int(x.version.start) for x in group.samples}:
            first[v] = min(first.get(v, float("inf")), float(group.finished_at))
    return [first[v] - announced[v] for v in sorted(first) if v >= 1 and v in announced]


def scored_groups(client: redis.Redis, settings: Settings) -> list[records_pb2.ScoredGroup]:
    """The run's scored groups (the learner's input), in stream order."""
    s = settings.streams
    return [decode(f, records_pb2.ScoredGroup) for f in read_stream(client, s.key(s.scored))]


def delete_run_keys(client: redis.Redis, settings: Settings) -> None:
    """Delete every Redis key of the run (``asympo:<run_id>:*``)."""
    keys = list(client.scan_iter(match=settings.streams.key("*"), count=1000))
    if keys:
        client.delete(*keys)


def window_mean(sc: Scraper, total: str, count: str, t0: float, t1: float) -> float | None:
    """Mean of a histogram over ``[t0, t1]`` (the start-up swap of version 0 is left out)."""
    s0, s1 = sc.value_at(total, t0), sc.value_at(total, t1)
    c0, c1 = sc.value_at(count, t0), sc.value_at(count, t1)
    if None in (s0, s1, c0, c1) or c1 - c0 <= 0:  # type: ignore[operator]
        return None
    return (s1 - s0) / (c1 - c0)  # type: ignore[operator]


def run_setting(
    cfg: BenchConfig, base: Settings, url: str, client: redis.Redis, k: int, tag: str
) -> tuple[dict[str, Any], list[records_pb2.ScoredGroup], list[records_pb2.PromptTask]]:
    """One `asympo up` at ``max_staleness = k``: its row, its scored groups and prompts."""
    run_id = f"e2e-{tag}-k{k}"
    ports = {svc: {"http_port": free_port(), "grpc_port": free_port()} for svc in
             ("weights", "reward", "rollout", "learner")}  # fmt: skip
    settings = base.model_copy(
        update={
            "run_dir": str(cfg.work_dir / run_id),
            "streams": base.streams.model_copy(update={"run_id": run_id}),
            "learner": base.learner.model_copy(
                update={
                    "max_staleness": k,
                    "max_steps": cfg.warmup + cfg.steps,
                    **ports["learner"],
                }
            ),
            **{svc: getattr(base, svc).model_copy(update=ports[svc])
               for svc in ("weights", "reward", "rollout")},
        }
    )  # fmt: skip
    settings = with_run_defaults(settings)
    started = time.time()
    try:
        with (
            Scraper(settings.rollout.http_port, [BUSY, SWAP_SUM, SWAP_COUNT]) as sc,
            Scraper(settings.learner.http_port, [PUBLISH_SUM, PUBLISH_COUNT]) as lc,
        ):
            result = run_up(settings, url, live=True)
        if result.interrupted:
            raise KeyboardInterrupt
        groups = scored_groups(client, settings)
        s = settings.streams
        prompts = [decode(f, records_pb2.PromptTask) for f in read_stream(client, s.key(s.prompts))]
        latencies = publish_to_first_sample(client, settings)
    finally:
        delete_run_keys(client, settings)
    steps = [r for r in read_metrics(Path(settings.run_dir) / "metrics.jsonl") if "train_s" in r]
    steps.sort(key=lambda r: r["step"])
    if len(steps) < cfg.warmup + cfg.steps:
        raise RuntimeError(f"max_staleness={k}: only {len(steps)} steps were recorded")
    t0 = steps[cfg.warmup - 1]["time"] if cfg.warmup else started
    window = steps[cfg.warmup :]
    t1 = window[-1]["time"]
    wall = max(t1 - t0, 1e-9)
    samples = len(window) * cfg.groups * cfg.samples  # every step trains one full batch
    busy_gen = None
    g0, g1 = sc.value_at(BUSY, t0), sc.value_at(BUSY, t1)
    if g0 is not None and g1 is not None:
        busy_gen = min(max((g1 - g0) / wall, 0.0), 1.0)
    row = {
        "max_staleness": k,
        "samples": samples,
        "seconds": wall,
        "samples_per_s": samples / wall,
        "learner_busy": min(sum(r["train_s"] for r in window) / wall, 1.0),
        "generator_busy": busy_gen,
        "staleness_mean": statistics.fmean(r["staleness_mean"] for r in window),
        "publish_to_sample_s": statistics.median(latencies) if latencies else None,
        "step_wait_s": statistics.median(r["wait_s"] for r in window),
        "step_train_s": statistics.median(r["train_s"] for r in window),
        "step_publish_s": statistics.median(r["publish_s"] for r in window),
        "groups_dropped_stale": window[-1]["groups_dropped_stale"],
        "swap_s": window_mean(sc, SWAP_SUM, SWAP_COUNT, t0, t1),
        "publish_latency_s": window_mean(lc, PUBLISH_SUM, PUBLISH_COUNT, t0, t1),
    }
    return row, groups, prompts


def full_batches(items: Sequence[T], size: int, reps: int, what: str) -> list[list[T]]:
    """The first ``reps + 1`` whole batches of ``size`` items (the first one is a warm-up)."""
    batches = [list(items[i : i + size]) for i in range(0, len(items) - size + 1, size)]
    if len(batches) < 2:
        raise RuntimeError(f"too few batches of the synchronous run to time {what} alone")
    return batches[: reps + 1]


def median_seconds(batches: Sequence[T], run: Callable[[T], object]) -> float:
    """Median wall seconds of ``run(batch)`` over ``batches`` after the first, which pays
    one-time allocations and connections."""
    times = []
    for i, batch in enumerate(batches):
        start = time.perf_counter()
        run(batch)
        if i:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def isolated_train(
    cfg: BenchConfig, settings: Settings, model_path: str, groups: list[records_pb2.ScoredGroup]
) -> float:
    """Seconds per sample of ``train_step`` alone on the run's own batches."""
    from asympo.model.loading import load_causal_lm, load_tokenizer
    from asympo.rl.training import train_step
    from services.learner.learner import make_optimizer, step_config
    from services.learner.records import group_from_scored

    model = load_causal_lm(model_path, settings.model.dtype, "cpu").train()
    tok = load_tokenizer(model_path)
    pad = int(tok.pad_token_id if tok.pad_token_id is not None else 0)
    optimizer, scheduler = make_optimizer(model, settings)
    step_cfg = step_config(settings)
    train = [group_from_scored(g) for g in groups]
    batches = full_batches(train, cfg.groups, cfg.isolate_reps, "train_step")
    seconds = median_seconds(
        batches, lambda b: train_step(model, optimizer, b, step_cfg, scheduler, pad_id=pad)
    )
    return seconds / (cfg.groups * cfg.samples)


def isolated_reward(
    cfg: BenchConfig, settings: Settings, groups: list[records_pb2.ScoredGroup]
) -> float:
    """Seconds per sample of the reward service's verifier pool alone on the run's responses.

    The pool the reward service runs (same size, limits and plug-ins), one step's responses
    per ``score_many`` call, as the service scores a batch.
    """
    from asympo.verifiers.pool import VerifierPool

    rc = settings.reward
    items = [
        (g.rollout.prompt.verifier, s.completion_text, g.rollout.prompt.reference_answer)
        for g in groups
        for s in g.rollout.samples
    ]
    per_step = cfg.groups * cfg.samples
    batches = full_batches(items, per_step, cfg.isolate_reps, "the verifiers")
    with VerifierPool(
        rc.pool_size, rc.time_limit_s, plugins=rc.plugins, format_reward=rc.format_reward
    ) as pool:
        return median_seconds(batches, pool.score_many) / per_step


def isolated_generate(
    cfg: BenchConfig, settings: Settings, model_path: str, prompts: list[records_pb2.PromptTask]
) -> float:
    """Seconds per sample of the engine alone on the run's prompts, ``groups`` per call."""
    from asympo.engines import create_engine
    from services.rollout.worker import requests_for

    engine = create_engine(settings, model_path)
    try:
        batches = full_batches(prompts, cfg.groups, cfg.isolate_reps, "the engine")
        requests = [requests_for(b, engine) for b in batches]
        return median_seconds(requests, engine.generate) / (cfg.groups * cfg.samples)
    finally:
        engine.close()


def run_bench(cfg: BenchConfig, url: str | None = None, log: Callable[[str], None] = print) -> dict:
    """Every setting, the isolated stages and the model's bounds, as one report."""
    from asympo.config import load_settings

    base = load_settings(
        None,
        [
            f"learner.groups_per_step={cfg.groups}",
            f"sampling.num_samples={cfg.samples}",
            f"sampling.max_tokens={cfg.max_tokens}",
            "learner.eval_every=0",
            f"rollout.max_inflight_prompts={max(16, 2 * cfg.groups)}",
            *([f"threads.learner={cfg.learner_threads}"] if cfg.learner_threads else []),
            *cfg.overrides,
        ],
    )
    model_path = pick_model(cfg, base)
    base = base.model_copy(update={"model": base.model.model_copy(update={"path": model_path})})
    tag = uuid.uuid4().hex[:8]
    rows: list[dict[str, Any]] = []
    load_before = os.getloadavg()
    with ExitStack() as stack:
        if url is None:
            url = os.environ.get("REDIS_URL") or (LOCAL_URL if reachable(LOCAL_URL) else "")
            if not url:
                url = stack.enter_context(EmbeddedRedis(Path(cfg.work_dir) / "redis").start()).url
        client = connect(url)
        stack.callback(client.close)
        sync_groups: list[records_pb2.ScoredGroup] = []
        sync_prompts: list[records_pb2.PromptTask] = []
        for k in cfg.staleness:
            log(f"max_staleness={k}: {cfg.warmup}+{cfg.steps} steps ...")
            row, groups, prompts = run_setting(cfg, base, url, client, k, tag)
            log(f"  {row['samples_per_s']:.1f} samples/s")
            rows.append(row)
            if not sync_groups:
                sync_groups, sync_prompts = groups, prompts
    cores = os.cpu_count() or 1
    threads = {svc: getattr(base.threads, svc) or cores for svc in ("learner", "rollout")}
    # Each stage alone runs under the same thread budget as its service.
    torch.set_num_threads(threads["learner"])
    train_s = isolated_train(cfg, base, model_path, sync_groups)
    reward_s = isolated_reward(cfg, base, sync_groups)
    gen_s = None
    if cfg.isolate_engine:
        os.environ["OMP_NUM_THREADS"] = str(threads["rollout"])  # the engine core inherits it
        gen_s = isolated_generate(cfg, base, model_path, sync_prompts)
    return report(
        cfg, rows, train_s, gen_s, threads, load_before, model_path, reward_s,
        reward_cores=float(min(base.reward.pool_size, cores)),
    )  # fmt: skip


def report(
    cfg: BenchConfig,
    rows: list[dict[str, Any]],
    train_s: float,
    gen_s: float | None,
    threads: dict[str, int],
    load_before: tuple[float, float, float],
    model_path: str,
    reward_s: float | None = None,
    reward_cores: float = 1.0,
) -> dict[str, Any]:
    """Add ratios, stage limits and the pipeline model's bounds to the measured rows."""
    batch = cfg.groups * cfg.samples
    sync = next((r for r in rows if r["max_staleness"] == 0), None)
    for r in rows:
        r["ratio_to_sync"] = r["samples_per_s"] / sync["samples_per_s"] if sync else None
    publish = statistics.fmean(r["step_publish_s"] for r in rows)
    swaps = [r["swap_s"] for r in rows if r["swap_s"] is not None]
    swap = statistics.fmean(swaps) if swaps else 0.0
    # The publish past the learner's blocked part (upload, verification, announcement) is
    # a hand-off: the next step's generation waits for it only when the stages take turns.
    latencies = [r["publish_latency_s"] for r in rows if r.get("publish_latency_s") is not None]
    handoff = max(statistics.fmean(latencies) - publish, 0.0) if latencies else 0.0
    stage_limits = {
        "train": 1 / train_s,
        **({"generate": 1 / gen_s} if gen_s else {}),
        **({"reward": 1 / reward_s} if reward_s else {}),
    }
    out: dict[str, Any] = {
        "config": {
            "staleness": cfg.staleness,
            "steps": cfg.steps,
            "warmup": cfg.warmup,
            "groups": cfg.groups,
            "samples": cfg.samples,
            "max_tokens": cfg.max_tokens,
            "batch": batch,
            "learner_threads": threads["learner"],
            "rollout_threads": threads["rollout"],
            "model": model_path,
        },
        "machine": {
            "cores": os.cpu_count(),
            "load_before": list(load_before),
            "load_after": list(os.getloadavg()),
        },
        "stages": {
            "train_s_per_sample": train_s,
            "generate_s_per_sample": gen_s,
            "reward_s_per_sample": reward_s,
            "publish_s": publish,
            "publish_handoff_s": handoff,
            "swap_s": swap,
        },
        "stage_limits_samples_per_s": stage_limits,
        "settings": rows,
    }
    if gen_s:
        cores = float(os.cpu_count() or 1)
        stages = [
            Stage("generate", gen_s, swap, cores=float(threads["rollout"])),
            Stage("train", train_s, publish, cores=float(threads["learner"]), handoff_s=handoff),
        ]
        if reward_s:
            # The verifier pool's workers are processes of their own, busy together.
            stages.append(Stage("reward", reward_s, cores=reward_cores))
        model = project(stages, batch, max_staleness=2, shared_cores=cores)
        slowest = min(stage_limits.values())
        k2 = next((r for r in rows if r["max_staleness"] == 2), None)
        model_ratio = model.async_samples_per_s / model.sync_samples_per_s
        measured_ratio = k2["ratio_to_sync"] if k2 and sync else None
        out["model"] = {
            "sync_samples_per_s": model.sync_samples_per_s,
            "async_samples_per_s": model.async_samples_per_s,
            "core_bound_samples_per_s": model.core_bound_samples_per_s,
            "bottleneck": model.bottleneck,
            "async_over_sync": model_ratio,
        }
        out["targets"] = {
            "k2_over_slowest_stage": k2["samples_per_s"] / slowest if k2 else None,
            "k2_over_slowest_target": TARGET_OF_SLOWEST,
            "async_over_sync_measured": measured_ratio,
            "async_over_sync_model": model_ratio,
            "model_gap": abs(measured_ratio - model_ratio) / model_ratio
            if measured_ratio
            else None,
            "model_gap_target": TARGET_MODEL_GAP,
        }
    return out


def _fmt(value: Any, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def render(rep: dict[str, Any]) -> str:
    """The report as text: the table, the stage limits and the model's bounds."""
    c, m = rep["config"], rep["machine"]
    lines = [
        f"e2e: batch {c['groups']}x{c['samples']} = {c['batch']} samples/step, {c['steps']} steps"
        f" (+{c['warmup']} warm-up) per setting, max_tokens {c['max_tokens']},"
        f" threads learner {c['learner_threads']} rollout {c['rollout_threads']},"
        f" {m['cores']} cores,"
        f" load {m['load_before'][0]:.2f} -> {m['load_after'][0]:.2f}",
        "",
        f"{'k':>3} {'samples/s':>10} {'x sync':>7} {'learner busy':>12} {'gen busy':>9}"
        f" {'staleness':>9} {'pub->sample s':>13} {'wait s':>7} {'train s':>8} {'publish s':>9}",
    ]
    for r in rep["settings"]:
        lines.append(
            f"{r['max_staleness']:>3} {r['samples_per_s']:>10.1f}"
            f" {_fmt(r['ratio_to_sync'], '.2f'):>7}"
            f" {r['learner_busy']:>12.2f} {_fmt(r['generator_busy'], '.2f'):>9}"
            f" {r['staleness_mean']:>9.2f} {_fmt(r['publish_to_sample_s'], '.2f'):>13}"
            f" {r['step_wait_s']:>7.3f} {r['step_train_s']:>8.3f} {r['step_publish_s']:>9.3f}"
        )
    lines.append("")
    limits = ", ".join(f"{k} {v:.1f}" for k, v in rep["stage_limits_samples_per_s"].items())
    lines.append(f"stages alone (samples/s): {limits}")
    st = rep["stages"]
    lines.append(
        f"per step: swap {st['swap_s']:.3f} s, publish blocked {st['publish_s']:.3f} s +"
        f" hand-off {st.get('publish_handoff_s', 0.0):.3f} s (until announced)"
    )
    if "model" in rep:
        mo, t = rep["model"], rep["targets"]
        lines.append(
            f"pipeline model: sync {mo['sync_samples_per_s']:.1f}, async"
            f" {mo['async_samples_per_s']:.1f} samples/s (core bound"
            f" {_fmt(mo['core_bound_samples_per_s'], '.1f')}; bottleneck {mo['bottleneck']});"
            f" async/sync {mo['async_over_sync']:.2f}"
        )
        lines.append(
            f"targets: k=2 / slowest stage {_fmt(t['k2_over_slowest_stage'], '.2f')}"
            f" (>= {t['k2_over_slowest_target']}); async/sync measured"
            f" {_fmt(t['async_over_sync_measured'], '.2f')} vs model"
            f" {t['async_over_sync_model']:.2f} (gap {_fmt(t['model_gap'], '.2f')},"
            f" <= {t['model_gap_target']})"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run, print the table (or JSON)."""
    d = BenchConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--staleness", default=",".join(map(str, d.staleness)), help="max_staleness settings"
    )
    p.add_argument("--steps", type=int, default=d.steps, help="measured steps per setting")
    p.add_argument("--warmup", type=int, default=d.warmup, help="steps before the clock starts")
    p.add_argument("--groups", type=int, default=d.groups, help="prompts per step")
    p.add_argument("--samples", type=int, default=d.samples, help="samples per prompt")
    p.add_argument("--max-tokens", type=int, default=d.max_tokens)
    p.add_argument("--learner-threads", type=int, default=0, help="0 = threads.learner")
    p.add_argument("--model", default="", help="model directory (default: see docstring)")
    p.add_argument("--no-engine-alone", action="store_true", help="skip the engine-alone run")
    p.add_argument("--set", action="append", default=[], help="section.key=value override")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    a = p.parse_args(argv)
    # vLLM logs to stdout by default; keep stdout for the table or the JSON.
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    try:
        staleness = [int(x) for x in a.staleness.split(",")]
    except ValueError:
        print(f"error: --staleness: expected integers, got {a.staleness!r}", file=sys.stderr)
        return 2
    if a.steps < 1 or a.warmup < 1 or min(staleness) < 0:
        print("error: --steps and --warmup must be >= 1, staleness >= 0", file=sys.stderr)
        return 2
    cfg = BenchConfig(
        staleness=staleness,
        steps=a.steps,
        warmup=a.warmup,
        groups=a.groups,
        samples=a.samples,
        max_tokens=a.max_tokens,
        learner_threads=a.learner_threads,
        isolate_engine=not a.no_engine_alone,
        model=a.model,
        overrides=a.set,
    )
    rep = run_bench(cfg, log=lambda s: print(s, file=sys.stderr))
    print(json.dumps(rep, indent=2) if a.json else render(rep))
    return 0


if __name__ == "__main__":
    sys.exit(main())
