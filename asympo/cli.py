"""The `asympo` command line: run the system, one service, or a tool.

Every command takes ``--config FILE`` and ``--set section.key=value`` overrides on
top of ``ASYMPO_*`` environment variables; see ``asympo config show``.
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from asympo.config import ConfigError, Settings, dump_settings, load_settings

app = typer.Typer(
    name="asympo",
    help="ASymPO: asynchronous RL post-training without behaviour log-probs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
serve_app = typer.Typer(help="Run one service in the foreground.", no_args_is_help=True)
config_app = typer.Typer(help="Inspect the resolved configuration.", no_args_is_help=True)
app.add_typer(serve_app, name="serve")
app.add_typer(config_app, name="config")

console = Console(stderr=True)

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="YAML config file (also ASYMPO_CONFIG).")
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override one setting: section.key=value (repeatable)."),
]


def settings_from_cli(config: Path | None, overrides: list[str] | None) -> Settings:
    """Load settings or exit with the configuration error printed (no traceback)."""
    try:
        return load_settings(config, overrides or [])
    except ConfigError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print a user-facing error and return the Exit to raise."""
    console.print(f"[red]error:[/red] {message}", soft_wrap=True)
    return typer.Exit(code)


@config_app.command("show")
def config_show(config: ConfigOpt = None, overrides: SetOpt = None) -> None:
    """Print the resolved configuration (defaults, file, env, overrides) as YAML."""
    print(dump_settings(settings_from_cli(config, overrides)), end="")


def _serve(name: str, config: Path | None, overrides: list[str] | None) -> None:
    settings = settings_from_cli(config, overrides)
    from asympo import threads

    threads.apply(name, settings)  # before the service builds anything that computes
    module = importlib.import_module(f"services.{name}.main")
    module.run(settings)


@serve_app.command("weights")
def serve_weights(config: ConfigOpt = None, overrides: SetOpt = None) -> None:
    """Versioned weight store: gRPC Publish/Fetch/Latest/Watch, HTTP /healthz /metrics."""
    _serve("weights", config, overrides)


@serve_app.command("reward")
def serve_reward(config: ConfigOpt = None, overrides: SetOpt = None) -> None:
    """Reward worker: scores rollout groups from the stream; gRPC Score."""
    _serve("reward", config, overrides)


@serve_app.command("rollout")
def serve_rollout(config: ConfigOpt = None, overrides: SetOpt = None) -> None:
    """Rollout replica: generates groups with vLLM, hot-swaps weights; gRPC Generate."""
    _serve("rollout", config, overrides)


@serve_app.command("learner")
def serve_learner(config: ConfigOpt = None, overrides: SetOpt = None) -> None:
    """Learner: admits prompts, trains on scored groups, publishes versions."""
    _serve("learner", config, overrides)


@app.command()
def up(
    steps: Annotated[int, typer.Option(help="Stop after this many learner steps.")] = 40,
    run_id: Annotated[
        str | None, typer.Option(help="Run id (stream prefix, run dir name); default: up-<time>.")
    ] = None,
    rollout_replicas: Annotated[int, typer.Option(min=1, max=16, help="Rollout processes.")] = 1,
    live: Annotated[bool, typer.Option(help="Live table (--no-live: stream service logs).")] = True,
    max_wall: Annotated[
        float, typer.Option(help="Abort after this many seconds (0 = no limit).")
    ] = 0.0,
    config: ConfigOpt = None,
    overrides: SetOpt = None,
) -> None:
    """Run the whole system locally: Redis, weights, reward, rollout and learner, live.

    Uses the tiny default model (built on first use) on the arith task unless configured
    otherwise. Stops after --steps learner steps or on Ctrl-C; leaves no process behind.
    The run directory keeps config.yaml, metrics.jsonl, logs/, final/ and plot.png.
    """
    import time as _time

    from asympo.launcher import LaunchError, run_up, with_free_ports, with_run_defaults
    from asympo.model import ModelLoadError
    from asympo.preflight import check_against_model, task_prompts
    from asympo.run_plot import plot_run
    from asympo.transport.redis_conn import EmbeddedRedis, RedisUnavailable

    if steps < 1:
        raise fail("--steps must be at least 1")
    rid = run_id or _time.strftime("up-%Y%m%d-%H%M%S")
    settings = settings_from_cli(
        config,
        [f"streams.run_id={rid}", f"learner.max_steps={steps}", *(overrides or [])],
    )
    if "run_dir" not in settings.model_fields_set:
        settings = settings.model_copy(update={"run_dir": f"runs/{rid}"})
    settings = with_free_ports(with_run_defaults(settings))
    from asympo.model import load_tokenizer
    from asympo.tracking import TrackerError, check_backends

    try:  # a tracker whose extra is missing fails here, before any service starts
        check_backends(settings.tracking.backends)
    except TrackerError as exc:
        raise fail(str(exc)) from exc
    try:
        model_path = resolve_model(settings)
        # Mistakes only the model shows (context, vocabulary) end here, before any child.
        prompts = task_prompts(settings, tokenizer=load_tokenizer(model_path))
        check_against_model(settings, model_path, prompts)
    except (ValueError, ModelLoadError) as exc:  # ConfigError, TaskError: the user's settings
        raise fail(str(exc)) from exc
    settings = settings.model_copy(
        update={"model": settings.model.model_copy(update={"path": model_path})}
    )
    embedded: EmbeddedRedis | None = None
    try:
        url = settings.redis_url()
        if not url:
            embedded = EmbeddedRedis(settings.redis.embedded_dir).start()
            url = embedded.url
            console.print(f"embedded Redis at {url}")
        result = run_up(
            settings, url, rollout_replicas=rollout_replicas, live=live, max_wall_s=max_wall
        )
    except (LaunchError, RedisUnavailable) as exc:
        raise fail(str(exc), code=1) from exc
    finally:
        if embedded is not None:
            embedded.stop()
    if result.records:
        png = plot_run(result.records, result.run_dir / "plot.png", title=rid)
        console.print(f"plot: {png}")
    before = "—" if result.accuracy_first is None else f"{result.accuracy_first:.3f}"
    after = "—" if result.accuracy_last is None else f"{result.accuracy_last:.3f}"
    console.print(
        f"[bold]done[/bold]: {result.steps} steps; held-out accuracy {before} → {after}; "
        f"run dir {result.run_dir}" + (" (interrupted)" if result.interrupted else "")
    )


def resolve_model(settings: Settings) -> str:
    """The model path to serve: the configured one, or the tiny default (built if not cached).

    A task the tiny model cannot be built for (missing file, unreachable hub, characters
    outside its alphabet) ends the command with one line, exit status 1.
    """
    from asympo.model import ModelLoadError, resolve_model_path

    try:
        return resolve_model_path(settings, say=console.print)
    except (ValueError, ModelLoadError) as exc:  # TaskError, alphabet, unknown verifier
        raise fail(f"cannot build the tiny default model: {exc}", code=1) from exc


@app.command("init-model")
def init_model(
    force: Annotated[bool, typer.Option(help="Rebuild even if a cached model exists.")] = False,
    verify: Annotated[
        bool,
        typer.Option(help="Rebuild in a scratch dir and check it is byte-identical to the copy."),
    ] = False,
    config: ConfigOpt = None,
    overrides: SetOpt = None,
) -> None:
    """Build the tiny default model, warm-start it on the task, cache it; print accuracy and path.

    The default model ships with the package and is copied into the cache; other task
    settings are built (reproducibly: same bytes on any x86-64 machine with AVX2).
    With model.path set, checks that the model and tokenizer load and prints the path.
    """
    from asympo.model import ModelLoadError, ensure_tiny_model, load_tokenizer
    from asympo.model.tiny import verify_tiny_model

    settings = settings_from_cli(config, overrides)
    if settings.model.path:
        try:
            load_tokenizer(settings.model.path)
        except ModelLoadError as exc:
            raise fail(str(exc), code=1) from exc
        print(f"model: {settings.model.path} (configured; nothing to build)")
        return
    try:
        result = ensure_tiny_model(settings, force=force, log=console.print)
    except ValueError as exc:  # TaskError and alphabet problems: the user's configuration
        raise fail(str(exc), code=1) from exc
    how = "reused cached model" if result.reused else f"built in {result.seconds:.0f}s"
    print(f"held-out greedy accuracy: {result.accuracy:.1%} ({how})")
    print(f"saved: {result.path}")
    if verify:
        rebuilt, expected = verify_tiny_model(settings, log=console.print)
        if rebuilt != expected:
            raise fail(f"rebuild differs: sha256 {rebuilt} != {expected}", code=1)
        print(f"verified: the rebuild is byte-identical (sha256 {rebuilt})")


@app.command("eval")
def eval_model(
    model: Annotated[
        str | None,
        typer.Option(
            help="Model directory, HF id, run directory or run id (runs/<id>/final); "
            "default: model.path, else the tiny model."
        ),
    ] = None,
    task: Annotated[
        str | None,
        typer.Option(help="Task name(s), comma-separated, e.g. arith,gsm8k (default: task.name)."),
    ] = None,
    k: Annotated[
        int, typer.Option("--k", help="Samples per problem for pass@k, mean@k, maj@k (0 = skip).")
    ] = 8,
    n_problems: Annotated[int, typer.Option(help="Held-out problems evaluated per task.")] = 200,
    temperature: Annotated[
        float, typer.Option(help="Sampling temperature for the k samples.")
    ] = 1.0,
    engine: Annotated[
        str | None, typer.Option(help="vllm or transformers (default: rollout.engine).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    config: ConfigOpt = None,
    overrides: SetOpt = None,
) -> None:
    """Greedy pass@1 and sampled pass@k, mean@k, maj@k of a model per task, with 95% intervals.

    Generation uses sampling.max_tokens and sampling.stop and the task's prompt
    (task.prompt_format, task.prompt_preset); completions are judged by the task's verifier
    in worker processes under reward.time_limit_s. Given a run (directory or id) and no
    --config, the run's own config.yaml is used, so the prompts are the ones it trained on.
    Intervals: Wilson for pass@1 and maj@k, percentile bootstrap for pass@k and mean@k.
    """
    import json

    from rich.table import Table

    from asympo.eval_cli import EvalError, run_eval, run_model_dir

    # stdout carries only the result (table or JSON); vLLM's own log goes to stderr.
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    extra = [f"rollout.engine={engine}"] if engine else []
    final = run_model_dir(model) if model else None
    run_config = final.parent / "config.yaml" if final is not None else None
    if config is None and run_config is not None and run_config.is_file():
        config = run_config
        console.print(f"using the run's configuration {run_config}")
    settings = settings_from_cli(config, [*(overrides or []), *extra])
    if final is not None:
        model = str(final)
    try:
        reports = run_eval(
            settings,
            model or resolve_model(settings),
            task or settings.task.name,
            k,
            n_problems,
            temperature,
            log=console.print,
        )
    except EvalError as exc:
        raise fail(str(exc), code=1) from exc
    if as_json:
        dicts = [r.as_dict() for r in reports]
        print(json.dumps(dicts[0] if len(dicts) == 1 else dicts, indent=2))
        return
    first = reports[0]
    table = Table(title=f"{first.model} · {first.prompt_format} prompts · 95% intervals")
    at = f"@{first.k} (T={first.temperature:g})" if first.k else "@k (skipped)"
    for column in ("task", "problems", "pass@1 (greedy)", f"pass{at}", f"mean{at}", f"maj{at}"):
        table.add_column(column, justify="right")

    def cell(value: float | None, ci: tuple[float, float] | None) -> str:
        if value is None or ci is None:
            return "—"
        return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"

    for r in reports:
        table.add_row(
            r.task,
            str(r.n_problems),
            cell(r.pass_at_1, r.pass_at_1_ci),
            cell(r.pass_at_k, r.pass_at_k_ci),
            cell(r.mean_at_k, r.mean_at_k_ci),
            cell(r.maj_at_k, r.maj_at_k_ci),
        )
    # a pipe gets a wide table: the headers and intervals must not wrap
    Console(width=None if sys.stdout.isatty() else 200).print(table)
    for r in reports:
        print(
            f"{r.task}: engine {r.engine}, verifier {r.verifier}, max_tokens {r.max_tokens}, "
            f"verifier timeouts {r.verifier_timeouts}, {r.seconds:.1f}s"
        )


experiment_app = typer.Typer(help="Offline experiments (learner step).", no_args_is_help=True)
app.add_typer(experiment_app, name="experiment")


@experiment_app.command("staleness")
def experiment_staleness(
    quick: Annotated[bool, typer.Option(help="Small grid for CI (2 losses x 2 k).")] = False,
    losses: Annotated[str | None, typer.Option(help="Comma-separated losses.")] = None,
    staleness: Annotated[str | None, typer.Option(help="Comma-separated k values.")] = None,
    seeds: Annotated[str | None, typer.Option(help="Comma-separated seeds.")] = None,
    steps: Annotated[int | None, typer.Option(help="Learner steps per run.")] = None,
    groups: Annotated[int | None, typer.Option(help="Prompts per step.")] = None,
    samples: Annotated[int | None, typer.Option(help="Samples per prompt (G).")] = None,
    lr: Annotated[float | None, typer.Option(help="AdamW learning rate.")] = None,
    eval_every: Annotated[int | None, typer.Option(help="Evaluate every N steps.")] = None,
    eval_size: Annotated[int | None, typer.Option(help="Held-out problems evaluated.")] = None,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads.")] = None,
    out: Annotated[Path | None, typer.Option(help="Report directory.")] = None,
    work_dir: Annotated[Path | None, typer.Option(help="Finished runs (resume) live here.")] = None,
    resume: Annotated[bool, typer.Option(help="Skip runs already in work-dir.")] = True,
    shard: Annotated[str, typer.Option(help="Run cells i, i+n, ... of the grid: i/n.")] = "0/1",
    report_only: Annotated[bool, typer.Option(help="Report finished runs; run none.")] = False,
    config: ConfigOpt = None,
    overrides: SetOpt = None,
) -> None:
    """Losses x forced staleness x seeds on the tiny task: table, JSON and plots (issue 10)."""
    from asympo.experiments.staleness_cli import build_config, parse_ints, parse_names, parse_shard
    from asympo.experiments.staleness_cli import run_experiment as run_staleness

    settings = settings_from_cli(config, overrides)
    try:
        cfg = build_config(
            quick,
            losses=parse_names(losses) if losses else None,
            staleness=parse_ints(staleness, "--staleness") if staleness else None,
            seeds=parse_ints(seeds, "--seeds") if seeds else None,
            steps=steps,
            groups_per_step=groups,
            samples_per_group=samples,
            lr=lr,
            eval_every=eval_every,
            eval_size=eval_size,
            threads=threads,
            # the experiment trains on the configured task and prompt, like the model build
            task=settings.task.name,
            task_seed=settings.task.seed,
            prompt_format=settings.task.prompt_format,
            prompt_preset=settings.task.prompt_preset,
            # learner.loss (--set learner.loss.nll_eps=0.1 ...) applies to its loss here too,
            # and so do the learner's advantage, clipping, schedule and entropy bonus.
            learner_loss=settings.learner.loss,
            advantage=settings.learner.advantage,
            grad_clip=settings.learner.grad_clip,
            warmup_steps=settings.learner.warmup_steps,
            lr_decay_steps=settings.learner.lr_decay_steps,
            min_lr_ratio=settings.learner.min_lr_ratio,
            entropy_coef=settings.learner.entropy_coef,
            kl_coef=settings.learner.kl_coef,
        )
        shard_of = parse_shard(shard)
    except ValueError as exc:
        raise fail(str(exc)) from exc
    name = "staleness-quick" if quick else "staleness"
    out_dir = out or (Path("runs") / name if quick else Path("docs/results"))
    work = work_dir or Path("runs") / name
    log = functools.partial(typer.echo, err=True)
    paths = run_staleness(
        cfg, resolve_model(settings), out_dir, work, resume, shard_of, report_only, log,
        overrides or [],
    )  # fmt: skip
    for kind, path in paths.items():
        print(f"{kind}: {path}")


@app.command()
def plan(
    replicas: Annotated[str, typer.Option(help="Rollout replicas to try, e.g. 1,2,4.")] = "1,2,4,8",
    gpus: Annotated[str, typer.Option(help="Learner GPUs to try, e.g. 1,2,4.")] = "1,2,4,8",
    batch: Annotated[int, typer.Option(help="Samples per learner step.")] = 512,
    max_staleness: Annotated[int, typer.Option(help="Staleness bound (0 = sync).")] = 2,
    report: Annotated[
        Path | None, typer.Option(help="bench/e2e.py --json report: use its measured stages.")
    ] = None,
    generate_s: Annotated[float | None, typer.Option(help="Generation s/sample/replica.")] = None,
    train_s: Annotated[float | None, typer.Option(help="Training s/sample/GPU.")] = None,
    reward_s: Annotated[float | None, typer.Option(help="Scoring s/sample.")] = None,
    publish_s: Annotated[float | None, typer.Option(help="Publish s/step.")] = None,
    swap_s: Annotated[float | None, typer.Option(help="Swap s/step.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the rows as JSON.")] = False,
) -> None:
    """Project N rollout replicas x M learner GPUs -> samples/s, staleness, bottleneck."""
    import json

    from asympo.plan_cli import PlanError, run_plan

    overrides = {
        "generate_s_per_sample": generate_s,
        "train_s_per_sample": train_s,
        "reward_s_per_sample": reward_s,
        "publish_s": publish_s,
        "swap_s": swap_s,
    }
    try:
        text, rows = run_plan(replicas, gpus, batch, max_staleness, report, overrides)
    except PlanError as exc:
        raise fail(str(exc)) from exc
    print(json.dumps(rows, indent=2) if as_json else text)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
