"""The staleness experiment: every loss trained on groups generated exactly k versions ago.

A deterministic, in-process stand-in for the asynchronous system. At step t the learner's
policy is version t; the step's groups are sampled (temperature 1, full softmax) from the
snapshot of version ``max(0, t - k)``, scored by the task's verifier (the function the
reward service runs), and the current policy is trained on them with
:func:`asympo.rl.training.train_step` and the loss under test. The behaviour-corrected
losses get the behaviour log-probs of the snapshot that sampled, exactly what an engine
would ship. Every cell of the grid spends the same number of samples.

Each finished run is appended to ``runs.jsonl`` in the work directory, so an interrupted
grid resumes where it stopped; :mod:`asympo.experiments.staleness_report` turns the runs
into the table, the JSON and the plots.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import random
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from asympo.config import TaskSettings
from asympo.engines.base import cut_at_stop
from asympo.eval_mode import eval_mode
from asympo.evaluation import evaluate, hf_greedy
from asympo.rl.loss_settings import AsympoLoss
from asympo.rl.losses import LOSSES, LossSettings, loss_settings, needs_behaviour_logprobs
from asympo.rl.schedule import lr_scheduler
from asympo.rl.training import StepConfig, TrainGroup, token_logprobs, train_step
from asympo.tasks import Problem, Task, task_from_settings
from asympo.verifiers import resolve_verifier, run_verifier

Log = Callable[[str], None]


# Fields added after runs were recorded: at their defaults they stay out of the budget key.
ADDED_LATER = (
    "prompt_format",
    "prompt_preset",
    "warmup_steps",
    "lr_decay_steps",
    "min_lr_ratio",
    "entropy_coef",
    "kl_coef",
)


@dataclass(frozen=True)
class StalenessConfig:
    """The grid and the per-run budget (identical for every cell)."""

    losses: tuple[str, ...] = ("asympo", "spo", "reinforce", "grpo", "tis")
    staleness: tuple[int, ...] = (0, 1, 4, 8)
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int = 80
    groups_per_step: int = 8
    samples_per_group: int = 8
    lr: float = 5e-4  # the learner service default (LearnerSettings.lr)
    advantage: str = "grpo"
    micro_batch: int = 64
    grad_clip: float = 1.0
    # learner.warmup_steps / lr_decay_steps / min_lr_ratio: the schedule (asympo.rl.schedule)
    warmup_steps: int = 0
    lr_decay_steps: int = 0
    min_lr_ratio: float = 0.1
    entropy_coef: float = 0.0  # learner.entropy_coef: the entropy bonus (StepConfig)
    kl_coef: float = 0.0  # learner.kl_coef: the KL penalty towards the warm start
    max_tokens: int = 8
    eval_every: int = 10
    eval_size: int = 200
    task: str = "arith"
    task_seed: int = 0
    prompt_format: str = "raw"  # task.prompt_format: raw, or chat (the tokenizer's template)
    prompt_preset: str = ""  # task.prompt_preset
    threads: int = 1
    # learner.loss: the grid's runs of that loss use its settings, other losses their defaults
    learner_loss: LossSettings = field(default_factory=AsympoLoss)

    def __post_init__(self) -> None:
        unknown = [name for name in self.losses if name not in LOSSES]
        if unknown:
            raise ValueError(f"unknown loss(es) {unknown}; known: {', '.join(sorted(LOSSES))}")
        if not self.losses or not self.staleness or not self.seeds:
            raise ValueError("losses, staleness and seeds must each name at least one value")
        if any(k < 0 for k in self.staleness):
            raise ValueError(f"staleness values must be >= 0, got {list(self.staleness)}")
        for name in ("steps", "groups_per_step", "samples_per_group", "eval_every", "eval_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.samples_per_group < 2:
            raise ValueError("samples_per_group must be >= 2 (group-relative advantages)")

    def budget_key(self, model_path: str) -> str:
        """Hash of the model and everything but the grid axes: equal keys = comparable runs."""
        fields = self.as_dict()
        for axis in ("losses", "staleness", "seeds", "threads"):
            fields.pop(axis)
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for name in ADDED_LATER:
            if fields[name] == defaults[name]:  # keys of runs made before it existed hold
                fields.pop(name)
        if fields["learner_loss"].get("weight_cap") == 0.0:
            fields["learner_loss"].pop("weight_cap")
        fields["model"] = str(Path(model_path).resolve()) if model_path else ""
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]

    def as_dict(self) -> dict[str, Any]:
        """The configuration as JSON-ready values."""
        return {**dataclasses.asdict(self), "learner_loss": self.learner_loss.model_dump()}

    def loss_settings(self, loss: str) -> LossSettings:
        """The settings the runs of ``loss`` train with."""
        return self.learner_loss if self.learner_loss.name == loss else loss_settings(loss)

    def samples_per_run(self) -> int:
        """Responses generated (and trained on) by one run."""
        return self.steps * self.groups_per_step * self.samples_per_group


QUICK = StalenessConfig(
    losses=("asympo", "reinforce"),
    staleness=(0, 4),
    seeds=(0,),
    steps=8,
    eval_every=8,
    eval_size=100,
    threads=1,
)


@dataclass(frozen=True)
class Policy:
    """The warm-started model every run starts from, its tokenizer and where it came from."""

    model: torch.nn.Module
    tokenizer: Any
    path: str


@dataclass(frozen=True)
class RunResult:
    """One (loss, staleness, seed) run: accuracy curve and per-step learner statistics."""

    loss: str
    staleness: int
    seed: int
    budget_key: str
    accuracy: list[tuple[int, float]]  # (policy version, held-out greedy accuracy)
    steps: list[dict[str, float]]
    seconds: float

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (round-trips through :meth:`from_json`)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunResult:
        """Inverse of :meth:`to_json`."""
        return cls(
            loss=str(data["loss"]),
            staleness=int(data["staleness"]),
            seed=int(data["seed"]),
            budget_key=str(data["budget_key"]),
            accuracy=[(int(v), float(a)) for v, a in data["accuracy"]],
            steps=[{k: float(x) for k, x in s.items()} for s in data["steps"]],
            seconds=float(data["seconds"]),
        )


class Scorer:
    """The task's verifier called in-process (the same function the reward service runs)."""

    def __init__(self, verifier_name: str) -> None:
        self.name = verifier_name
        self.fn = resolve_verifier(verifier_name)

    def __call__(self, response: str, reference: str) -> float:
        """Reward of ``response`` against ``reference``."""
        return run_verifier(self.fn, self.name, response, reference).reward


def _stop_token_ids(tokenizer: Any, stop: Sequence[str]) -> set[int]:
    ids = {int(tokenizer.eos_token_id)}
    for s in stop:
        encoded = tokenizer.encode(s, add_special_tokens=False)
        if len(encoded) == 1:
            ids.add(int(encoded[0]))
    return ids


def cut_completion(tokens: Iterable[int], stop_ids: set[int]) -> list[int]:
    """Tokens up to and including the first stop/EOS token (what an engine returns)."""
    out: list[int] = []
    for tok in tokens:
        out.append(tok)
        if tok in stop_ids:
            break
    return out


def sampling_kwargs(tokenizer: Any, max_tokens: int) -> dict[str, Any]:
    """``generate`` options sampling from the model's own softmax at temperature 1.

    No top-k/top-p warping (transformers defaults to top_k=50), so the sampling policy
    is exactly the snapshot's distribution and its token log-probs are the behaviour
    log-probs.
    """
    return {
        "do_sample": True,
        "temperature": 1.0,
        "top_k": 0,
        "top_p": 1.0,
        "max_new_tokens": max_tokens,
        "pad_token_id": int(tokenizer.pad_token_id),
        "eos_token_id": int(tokenizer.eos_token_id),
    }


@torch.no_grad()
def sample_completions(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[list[int]],
    samples: int,
    max_tokens: int,
    stop_ids: set[int],
    seed: int,
) -> list[list[list[int]]]:
    """``samples`` completions per prompt at temperature 1 from the full softmax (seeded).

    Returns ``completions[prompt][sample]`` token ids, cut after the first stop token.
    """
    pad = int(tokenizer.pad_token_id)
    rows = [p for p in prompts for _ in range(samples)]
    width = max(len(p) for p in rows)
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in rows])
    attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in rows])
    torch.manual_seed(seed)
    with eval_mode(model):
        out = model.generate(  # type: ignore[operator]
            input_ids=input_ids, attention_mask=attention, **sampling_kwargs(tokenizer, max_tokens)
        )
    flat = [cut_completion(row.tolist(), stop_ids) for row in out[:, width:]]
    return [flat[i * samples : (i + 1) * samples] for i in range(len(prompts))]


@torch.no_grad()
def behaviour_logprobs(
    model: torch.nn.Module, pad_id: int, pairs: Sequence[tuple[list[int], list[int]]]
) -> list[list[float]]:
    """Per-token log-probs of each (prompt, completion) pair's completion under ``model``."""
    seqs = [p + c for p, c in pairs]
    width = max(len(s) for s in seqs)
    ids = torch.tensor([s + [pad_id] * (width - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    with eval_mode(model):
        lp = token_logprobs(model, ids, mask)
    return [lp[i, len(p) : len(p) + len(c)].tolist() for i, (p, c) in enumerate(pairs)]


def make_groups(
    sampler: torch.nn.Module,
    tokenizer: Any,
    task: Task,
    problems: Sequence[Problem],
    scorer: Scorer,
    cfg: StalenessConfig,
    version: int,
    seed: int,
    with_behaviour: bool,
    stop: Sequence[str],
) -> list[TrainGroup]:
    """Sample, score and package one step's groups from the policy ``sampler`` (= ``version``)."""
    prompt_ids = [tokenizer.encode(task.render(p), add_special_tokens=False) for p in problems]
    stop_ids = _stop_token_ids(tokenizer, stop)
    completions = sample_completions(
        sampler, tokenizer, prompt_ids, cfg.samples_per_group, cfg.max_tokens, stop_ids, seed
    )
    behaviour: list[list[float]] | None = None
    if with_behaviour:
        pairs = [(p, c) for p, comps in zip(prompt_ids, completions, strict=True) for c in comps]
        behaviour = behaviour_logprobs(sampler, int(tokenizer.pad_token_id), pairs)
    n = cfg.samples_per_group
    groups = []
    for i, (problem, prompt, comps) in enumerate(
        zip(problems, prompt_ids, completions, strict=True)
    ):
        texts = [
            cut_at_stop(tokenizer.decode(c, skip_special_tokens=True), stop)[0] for c in comps
        ]
        rewards = [scorer(t, problem.answer) for t in texts]
        groups.append(
            TrainGroup(
                group_id=f"v{version}:{problem.prompt_id}",
                prompt_tokens=prompt,
                completions=comps,
                rewards=rewards,
                versions=[version] * len(comps),
                behaviour_logprobs=behaviour[i * n : (i + 1) * n] if behaviour else None,
            )
        )
    return groups


def greedy_accuracy(
    model: torch.nn.Module,
    tokenizer: Any,
    task: Task,
    problems: Sequence[Problem],
    scorer: Scorer,
    max_tokens: int,
    stop: Sequence[str],
) -> float:
    """Held-out greedy pass@1 of ``model`` through :func:`asympo.evaluation.evaluate`."""

    def generate(prompts: list[str], n: int, temperature: float) -> list[list[str]]:
        return [[o] for o in hf_greedy(model, tokenizer, prompts, max_tokens, stop)]

    return evaluate(task, problems, generate, scorer).pass_at_1


def _positive_negative_counts(groups: Sequence[TrainGroup]) -> tuple[int, int]:
    """Responses with advantage > 0 and < 0 (every estimator here is mean-centred)."""
    pos = neg = 0
    for g in groups:
        mean = sum(g.rewards) / len(g.rewards)
        pos += sum(r > mean for r in g.rewards)
        neg += sum(r < mean for r in g.rewards)
    return pos, neg


def step_prompts(task: Task, cfg: StalenessConfig, seed: int) -> list[list[Problem]]:
    """The prompts of every step of a run: a function of the seed only (shared by all cells)."""
    rng = random.Random(f"staleness-prompts:{seed}")
    return [rng.sample(task.train, cfg.groups_per_step) for _ in range(cfg.steps)]


def run_one(
    policy: Policy,
    task: Task,
    scorer: Scorer,
    cfg: StalenessConfig,
    loss: str,
    staleness: int,
    seed: int,
    warm_accuracy: float,
    stop: Sequence[str],
    log: Log = print,
) -> RunResult:
    """Train a copy of ``policy`` for ``cfg.steps`` steps on groups exactly ``staleness`` old."""
    start = time.monotonic()
    torch.manual_seed(seed)
    model = copy.deepcopy(policy.model)
    sampler = copy.deepcopy(policy.model) if staleness > 0 else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    scheduler = lr_scheduler(optimizer, cfg.warmup_steps, cfg.lr_decay_steps, cfg.min_lr_ratio)
    step_cfg = StepConfig(
        loss=cfg.loss_settings(loss),
        advantage=cfg.advantage,
        micro_batch=cfg.micro_batch,
        grad_clip=cfg.grad_clip,
        entropy_coef=cfg.entropy_coef,
        kl_coef=cfg.kl_coef,
    )
    with_behaviour = needs_behaviour_logprobs(loss)
    held_out = task.test[: cfg.eval_size]
    prompts = step_prompts(task, cfg, seed)
    # Versions t-k .. t: the oldest is the one that samples step t (version 0 early on).
    snapshots: deque[tuple[int, dict[str, torch.Tensor]]] = deque(maxlen=staleness + 1)
    accuracy = [(0, warm_accuracy)]
    records: list[dict[str, float]] = []
    for t in range(cfg.steps):
        version = max(0, t - staleness)
        if staleness > 0:
            snapshots.append((t, {k: v.detach().clone() for k, v in model.state_dict().items()}))
            snap_version, state = snapshots[0]
            assert snap_version == version, (snap_version, version)
            sampler.load_state_dict(state)
        groups = make_groups(
            sampler, policy.tokenizer, task, prompts[t], scorer, cfg, version,
            seed=seed * 1_000_003 + t, with_behaviour=with_behaviour, stop=stop,
        )  # fmt: skip
        lr = float(optimizer.param_groups[0]["lr"])  # the rate this step trains at
        stats = train_step(
            model,
            optimizer,
            groups,
            step_cfg,
            scheduler=scheduler,
            pad_id=int(policy.tokenizer.pad_token_id),
            reference=policy.model,  # the warm start, never trained (runs train a copy)
        )
        pos, neg = _positive_negative_counts(groups)
        records.append(
            {
                "version": float(t + 1),
                "staleness": float(t - version),
                "lr": lr,
                "responses_positive": float(pos),
                "responses_negative": float(neg),
                **{k: float(v) for k, v in stats.items()},
            }
        )
        if (t + 1) % cfg.eval_every == 0 or t + 1 == cfg.steps:
            acc = greedy_accuracy(
                model, policy.tokenizer, task, held_out, scorer, cfg.max_tokens, stop
            )
            accuracy.append((t + 1, acc))
            log(
                f"  {loss:>9} k={staleness} seed={seed} step {t + 1:>3}: acc {acc:.3f} "
                f"reward {stats['reward_mean']:.3f} balance {stats['loss_balance']:+.4f} "
                f"nll+ {stats['nll_positive']:.3f} nll- {stats['nll_negative']:.3f}"
            )
    return RunResult(
        loss,
        staleness,
        seed,
        cfg.budget_key(policy.path),
        accuracy,
        records,
        time.monotonic() - start,
    )


def load_runs(work_dir: Path, budget_key: str) -> dict[tuple[str, int, int], RunResult]:
    """Finished runs in ``work_dir/runs*.jsonl`` with this budget, keyed by (loss, k, seed)."""
    runs: dict[tuple[str, int, int], RunResult] = {}
    for path in sorted(work_dir.glob("runs*.jsonl")):
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            try:
                run = RunResult.from_json(json.loads(line))
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by an interrupted write
            if run.budget_key == budget_key:
                runs[(run.loss, run.staleness, run.seed)] = run
    return runs


def grid_cells(cfg: StalenessConfig) -> list[tuple[str, int, int]]:
    """Every (loss, staleness, seed) of the grid, in run order: seed by seed, so that an
    interrupted grid still holds whole single-seed grids."""
    return [(loss, k, s) for s in cfg.seeds for k in cfg.staleness for loss in cfg.losses]


@dataclass(frozen=True)
class GridOutcome:
    """The grid's finished runs (grid order), the warm start's accuracy, and completeness."""

    runs: list[RunResult]
    warm_accuracy: float
    missing: list[tuple[str, int, int]]


def run_grid(
    policy: Policy,
    cfg: StalenessConfig,
    work_dir: Path,
    stop: Sequence[str] = ("\n",),
    resume: bool = True,
    shard: tuple[int, int] = (0, 1),
    max_new_runs: int | None = None,
    log: Log = print,
) -> GridOutcome:
    """Run this shard's cells not yet finished in ``work_dir`` (``runs*.jsonl``).

    ``shard = (i, n)``: this process runs cells ``i, i+n, i+2n, ...`` and appends them to
    its own file, so ``n`` processes can share one work directory. ``resume=False``
    discards this shard's earlier runs. ``max_new_runs=0`` only collects finished runs.
    """
    index, count = shard
    if not 0 <= index < count:
        raise ValueError(f"shard must be i/n with 0 <= i < n, got {index}/{count}")
    torch.set_num_threads(cfg.threads)
    task = task_from_settings(
        TaskSettings(
            name=cfg.task,
            seed=cfg.task_seed,
            eval_size=cfg.eval_size,
            prompt_format=cfg.prompt_format,  # type: ignore[arg-type]
            prompt_preset=cfg.prompt_preset,
        ),
        policy.tokenizer,
        policy.path,
    )
    scorer = Scorer(task.verifier)
    work_dir.mkdir(parents=True, exist_ok=True)
    runs_file = work_dir / ("runs.jsonl" if count == 1 else f"runs-shard{index}of{count}.jsonl")
    if not resume and runs_file.exists():
        runs_file.unlink()
    key = cfg.budget_key(policy.path)
    done = load_runs(work_dir, key) if resume else {}
    warm = greedy_accuracy(
        policy.model, policy.tokenizer, task, task.test[: cfg.eval_size], scorer,
        cfg.max_tokens, stop,
    )  # fmt: skip
    cells = grid_cells(cfg)
    mine = [c for i, c in enumerate(cells) if i % count == index and c not in done]
    if max_new_runs is not None:
        mine = mine[:max_new_runs]
    log(
        f"warm start: held-out greedy accuracy {warm:.3f} on {cfg.eval_size} problems; "
        f"{cfg.samples_per_run()} samples per run; {len(done)}/{len(cells)} runs already done, "
        f"{len(mine)} to run in shard {index}/{count}"
    )
    for n, (loss, k, seed) in enumerate(mine, start=1):
        log(f"[{n}/{len(mine)}] loss={loss} staleness={k} seed={seed}")
        run = run_one(policy, task, scorer, cfg, loss, k, seed, warm, stop, log)
        with runs_file.open("a") as f:
            f.write(json.dumps(run.to_json()) + "\n")
        log(f"[{n}/{len(mine)}] done in {run.seconds:.1f}s: final acc {run.accuracy[-1][1]:.3f}")
        done[(loss, k, seed)] = run
    if resume:  # other shards may have finished cells meanwhile
        done = {**load_runs(work_dir, key), **done}
    return GridOutcome(
        runs=[done[c] for c in cells if c in done],
        warm_accuracy=warm,
        missing=[c for c in cells if c not in done],
    )
