"""The pipeline model: what throughput a synchronous or bounded-staleness run can reach.

A step of ``B`` samples passes three stages: generation (rollout), scoring (reward) and
training (learner), plus per-step costs that are not per sample (publishing a version,
swapping it into the engines). With per-sample stage times ``t_i`` (seconds per sample
on the stage's own resources):

* **synchronous** (``max_staleness = 0``): the stages take turns, each step waits for
  the previous one's weights, so ``samples/s = B / (B * sum(t_i) + publish + swap +
  hand-offs)``, where a stage's hand-off is latency after its own work that the next
  stage waits for only when they take turns (the part of a publish that runs on the
  publisher's thread while the learner trains on: upload, verification, announcement);
* **asynchronous** (``max_staleness >= 1``): every stage works on a different step at
  once, so the slowest one sets the pace: ``samples/s = B / max(B * t_i + own per-step
  cost)`` (the learner publishes, the generator swaps);
* **shared cores**: when the stages run on the same ``C`` cores, one stage's busy
  threads are cores the others lack. A stage that keeps ``c_i`` cores busy while it works
  costs ``t_i * c_i`` core-seconds per sample, and no schedule does more than ``C`` core-
  seconds per second: ``samples/s <= C / sum(t_i * c_i)``. The async bound is the lower
  of the two; on one small machine this is what limits asynchrony.

Replicas divide a stage's time (generation scales with rollout replicas, training with
learner GPUs at ``dp_efficiency`` per extra GPU, as data parallelism pays an all-reduce).
Mean staleness follows from which stage is slower: when training is the bottleneck the
generators run ahead up to the bound (staleness ≈ ``max_staleness``); when generation is,
groups are trained as they arrive, one version behind the weights that made them.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Stage:
    """One stage: seconds per sample on its resources, per-step cost, cores it keeps busy."""

    name: str
    seconds_per_sample: float
    per_step_s: float = 0.0
    cores: float = 0.0  # cores kept busy while working (0 = not on the shared cores)
    handoff_s: float = 0.0  # latency the next stage waits for only when stages take turns

    def step_seconds(self, batch: int) -> float:
        """Seconds this stage needs for one step of ``batch`` samples."""
        return batch * self.seconds_per_sample + self.per_step_s


@dataclass(frozen=True)
class Projection:
    """What the model predicts for one configuration."""

    sync_samples_per_s: float
    async_samples_per_s: float
    bottleneck: str
    staleness_mean: float
    core_bound_samples_per_s: float | None
    stage_samples_per_s: dict[str, float] = field(default_factory=dict)

    @property
    def speedup(self) -> float:
        """Async over sync throughput."""
        return self.async_samples_per_s / self.sync_samples_per_s


def project(
    stages: list[Stage], batch: int, max_staleness: int = 1, shared_cores: float = 0.0
) -> Projection:
    """Sync and async throughput of ``stages`` at ``batch`` samples per step.

    ``shared_cores`` > 0: the stages share that many cores (local mode); each stage's
    ``cores`` then counts against them (see the module docstring).
    """
    if batch < 1:
        raise ValueError("batch must be >= 1")
    if not stages:
        raise ValueError("the pipeline needs at least one stage")
    step = {s.name: s.step_seconds(batch) for s in stages}
    sync = batch / sum(step[s.name] + s.handoff_s for s in stages)
    slowest = max(stages, key=lambda s: step[s.name])
    async_rate = batch / step[slowest.name]
    core_bound = None
    if shared_cores > 0:
        core_seconds = sum(s.seconds_per_sample * s.cores for s in stages)
        if core_seconds > 0:
            core_bound = shared_cores / core_seconds
            async_rate = min(async_rate, core_bound)
    async_rate = max(async_rate, sync)  # running ahead never has to be slower than taking turns
    if max_staleness == 0:
        async_rate = sync
    learner_bound = slowest.name == "train"
    staleness = float(max_staleness) if learner_bound else float(min(max_staleness, 1))
    return Projection(
        sync_samples_per_s=sync,
        async_samples_per_s=async_rate,
        bottleneck=slowest.name,
        staleness_mean=staleness,
        core_bound_samples_per_s=core_bound,
        stage_samples_per_s={
            n: batch / sec if sec > 0 else float("inf") for n, sec in step.items()
        },
    )


@dataclass(frozen=True)
class ClusterFigures:
    """Per-device stage figures for ``plan`` (seconds per sample on ONE device)."""

    generate_s_per_sample: float
    train_s_per_sample: float
    reward_s_per_sample: float = 0.0
    publish_s: float = 0.0
    swap_s: float = 0.0
    dp_efficiency: float = 0.9
    source: str = "assumed"


# Stated assumptions, not measurements: a ~1.5B-parameter policy, 8 samples of ~512
# completion tokens per prompt, bf16 on one 80 GB-class GPU. Generation ~8k tokens/s
# per vLLM replica (about 0.06 s per sample), training ~3 samples/s per GPU forward +
# backward with recomputation (0.3 s per sample), weights broadcast ~1.5 s, swap ~1 s.
GPU_ASSUMPTIONS = ClusterFigures(
    generate_s_per_sample=0.06,
    train_s_per_sample=0.3,
    reward_s_per_sample=0.001,
    publish_s=1.5,
    swap_s=1.0,
    dp_efficiency=0.9,
    source="assumed: ~1.5B policy, 512-token samples, one 80 GB GPU per device",
)


def cluster_stages(
    figures: ClusterFigures, rollout_replicas: int, learner_gpus: int
) -> list[Stage]:
    """The stages of ``rollout_replicas`` generators and a ``learner_gpus``-way learner."""
    if rollout_replicas < 1 or learner_gpus < 1:
        raise ValueError("rollout replicas and learner GPUs must be >= 1")
    dp_speed = 1 + (learner_gpus - 1) * figures.dp_efficiency
    return [
        Stage("generate", figures.generate_s_per_sample / rollout_replicas, figures.swap_s),
        Stage("reward", figures.reward_s_per_sample),
        Stage("train", figures.train_s_per_sample / dp_speed, figures.publish_s),
    ]


def plan_table(
    figures: ClusterFigures,
    replicas: list[int],
    gpus: list[int],
    batch: int,
    max_staleness: int,
) -> list[dict[str, float | int | str]]:
    """One row per (rollout replicas, learner GPUs): sync and async samples/s, bottleneck."""
    rows: list[dict[str, float | int | str]] = []
    for n in replicas:
        for m in gpus:
            p = project(cluster_stages(figures, n, m), batch, max_staleness)
            rows.append(
                {
                    "rollout_replicas": n,
                    "learner_gpus": m,
                    "sync_samples_per_s": p.sync_samples_per_s,
                    "async_samples_per_s": p.async_samples_per_s,
                    "speedup": p.speedup,
                    "staleness_mean": p.staleness_mean,
                    "bottleneck": p.bottleneck,
                    "samples_per_s_per_gpu": p.async_samples_per_s / (n + m),
                }
            )
    return rows
