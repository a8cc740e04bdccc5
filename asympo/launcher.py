"""`asympo up`: run every service as a child process on one machine, with a live view.

The launcher owns process lifetimes only. Services talk to each other through Redis
and gRPC exactly as they would on a cluster; the launcher just starts them with one
resolved configuration, keeps their logs (prefixed, in ``<run_dir>/logs``), shows the
learner's metrics as they arrive, and stops everything — no child survives it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from pydantic import SecretStr

from asympo.config import Settings, dump_settings
from asympo.run_log import METRICS_FILE, read_metrics

SERVICE_ORDER = ("weights", "reward", "rollout", "learner")
STOP_GRACE_S = 15.0


class LaunchError(RuntimeError):
    """A service failed to start or died; the message names it and shows its log tail."""


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether nothing listens on ``host:port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A port the OS says is free now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Child:
    """One service process, its own process group, and the thread copying its log."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    http_port: int
    _pump: threading.Thread | None = None
    tail: list[str] = field(default_factory=list)

    def alive(self) -> bool:
        """Whether the process is still running."""
        return self.proc.poll() is None


def _pump_log(child: Child, sink: IO[str], echo: Callable[[str], None] | None) -> None:
    """Copy the child's output line by line into its log, prefixed with its name."""
    assert child.proc.stdout is not None
    with child.log_path.open("a", encoding="utf-8") as own:
        for raw in iter(child.proc.stdout.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip("\n")
            own.write(line + "\n")
            own.flush()
            sink.write(f"[{child.name}] {line}\n")
            sink.flush()
            child.tail.append(line)
            del child.tail[:-40]
            if echo is not None:
                echo(f"[{child.name}] {line}")


class Supervisor:
    """Starts services as child processes and guarantees they are all gone on stop()."""

    def __init__(self, run_dir: Path, env: dict[str, str], echo: Callable[[str], None] | None):
        self.run_dir = run_dir
        self.log_dir = run_dir / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.env = env
        self.echo = echo
        self.children: list[Child] = []
        self._combined = (self.log_dir / "all.log").open("a", encoding="utf-8")

    def start(self, name: str, argv: list[str], http_port: int, extra_env: dict[str, str]) -> Child:
        """Start ``argv`` as service ``name`` in its own process group."""
        proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**self.env, **extra_env},
            start_new_session=True,  # one group per child: stop() kills grandchildren too
        )
        child = Child(
            name=name, proc=proc, log_path=self.log_dir / f"{name}.log", http_port=http_port
        )
        child._pump = threading.Thread(
            target=_pump_log, args=(child, self._combined, self.echo), daemon=True
        )
        child._pump.start()
        self.children.append(child)
        return child

    def wait_ready(self, child: Child, timeout_s: float) -> None:
        """Poll the child's /readyz until it answers 200; LaunchError if it dies or times out."""
        deadline = time.monotonic() + timeout_s
        url = f"http://127.0.0.1:{child.http_port}/readyz"
        while time.monotonic() < deadline:
            if not child.alive():
                raise LaunchError(self.describe_death(child))
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        raise LaunchError(
            f"{child.name} was not ready after {timeout_s:.0f}s; see {child.log_path}"
        )

    def describe_death(self, child: Child) -> str:
        """A message naming a dead child, its exit code and the last lines of its log."""
        if child._pump is not None:
            child._pump.join(timeout=2)
        tail = "\n".join(f"    {line}" for line in child.tail[-15:])
        return (
            f"{child.name} exited with code {child.proc.returncode}; "
            f"last lines of {child.log_path}:\n{tail}"
        )

    def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """SIGTERM every process group, wait up to ``grace_s``, then SIGKILL what is left."""
        for child in reversed(self.children):
            _signal_group(child.proc, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for child in self.children:
            remaining = max(0.1, deadline - time.monotonic())
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.proc.wait(timeout=remaining)
        for child in self.children:
            # The group may hold grandchildren (e.g. vLLM's engine core) even if the leader exited.
            _signal_group(child.proc, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.proc.wait(timeout=5)
            if child._pump is not None:
                child._pump.join(timeout=2)
        self._combined.close()


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def assign_ports(settings: Settings) -> dict[str, Any]:
    """Overrides that move any busy configured port to a free one (so `up` runs beside anything)."""
    moved: dict[str, Any] = {}
    for name in SERVICE_ORDER:
        section = getattr(settings, name)
        for attr in ("grpc_port", "http_port"):
            port = getattr(section, attr)
            if not port_is_free(port):
                moved.setdefault(name, {})[attr] = free_port()
    return moved


def scrape_counter(port: int, metric: str) -> float | None:
    """Sum of a Prometheus metric's samples on ``127.0.0.1:port/metrics``, or None."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1) as resp:
            text = resp.read().decode()
    except OSError:
        return None
    total, found = 0.0, False
    for line in text.splitlines():
        if line.startswith(metric) and not line.startswith("#"):
            name = line.split("{", 1)[0].split(" ", 1)[0]
            if name == metric:
                total += float(line.rsplit(" ", 1)[1])
                found = True
    return total if found else None


@dataclass
class RunResult:
    """What `up` reports when it stops."""

    run_dir: Path
    steps: int
    accuracy_first: float | None
    accuracy_last: float | None
    interrupted: bool
    records: list[dict[str, Any]]


def child_env(settings: Settings, config_path: Path, redis_url: str) -> dict[str, str]:
    """Environment shared by every child: the run's config file plus secrets and Redis URL."""
    env = dict(os.environ)
    env.update(
        {
            "ASYMPO_CONFIG": str(config_path),
            "ASYMPO_REDIS__URL": redis_url,
            "ASYMPO_WEIGHTS__PUBLISH_TOKEN": settings.weights.publish_token.get_secret_value(),
            "ASYMPO_SERVICE_TOKEN": settings.service_token.get_secret_value(),
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


def with_run_defaults(settings: Settings) -> Settings:
    """Fill per-run values: fresh tokens when unset, store and checkpoints inside the run dir."""
    run_dir = Path(settings.run_dir)
    updates: dict[str, Any] = {}
    if not settings.weights.publish_token.get_secret_value():
        updates["weights"] = settings.weights.model_copy(
            update={"publish_token": SecretStr(secrets.token_urlsafe(24))}
        )
    if not settings.service_token.get_secret_value():
        updates["service_token"] = SecretStr(secrets.token_urlsafe(24))
    if settings.weights.store_dir == Settings().weights.store_dir:
        w = updates.get("weights", settings.weights)
        updates["weights"] = w.model_copy(update={"store_dir": str(run_dir / "weights")})
    if settings.learner.checkpoint_dir == Settings().learner.checkpoint_dir:
        updates["learner"] = settings.learner.model_copy(
            update={"checkpoint_dir": str(run_dir / "checkpoints")}
        )
    if settings.rollout.work_dir == Settings().rollout.work_dir:
        updates["rollout"] = settings.rollout.model_copy(
            update={"work_dir": str(run_dir / "rollout")}
        )
    return settings.model_copy(update=updates)


def write_run_config(settings: Settings) -> Path:
    """Write the resolved configuration (secrets masked) into the run directory."""
    run_dir = Path(settings.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.yaml"
    path.write_text(dump_settings(settings))
    return path


def metrics_path(settings: Settings) -> Path:
    """Where the learner writes its per-step metrics."""
    return Path(settings.run_dir) / METRICS_FILE


def summarise(settings: Settings, interrupted: bool) -> RunResult:
    """Read the run's metrics and report first/last held-out accuracy."""
    records = read_metrics(metrics_path(settings))
    accs = [r["accuracy"] for r in records if isinstance(r.get("accuracy"), int | float)]
    steps = max((int(r.get("step", 0)) for r in records), default=0)
    return RunResult(
        run_dir=Path(settings.run_dir),
        steps=steps,
        accuracy_first=accs[0] if accs else None,
        accuracy_last=accs[-1] if accs else None,
        interrupted=interrupted,
        records=records,
    )


def service_argv(name: str) -> list[str]:
    """The command line that runs one service in the foreground."""
    return [sys.executable, "-m", "asympo.cli", "serve", name]


def _status_table(
    sup: Supervisor, records: list[dict[str, Any]], tokens_per_s: float | None, elapsed: float
) -> Any:
    from rich.table import Table

    steps = [r for r in records if "loss_balance" in r]  # eval records carry accuracy only
    last = steps[-1] if steps else {}
    accs = [r for r in records if isinstance(r.get("accuracy"), int | float)]
    table = Table(title=f"asympo up — {elapsed:5.0f}s", show_header=True, expand=False)
    table.add_column("metric")
    table.add_column("value", justify="right")

    def fmt(key: str, spec: str = ".3f", rec: dict[str, Any] | None = None) -> str:
        value = (rec if rec is not None else last).get(key)
        return format(value, spec) if isinstance(value, int | float) else "—"

    table.add_row(
        "services", " ".join(f"{c.name}:{'up' if c.alive() else 'DOWN'}" for c in sup.children)
    )
    table.add_row("step / policy version", f"{fmt('step', 'd')} / {fmt('version', 'd')}")
    table.add_row(
        "staleness mean / max", f"{fmt('staleness_mean', '.2f')} / {fmt('staleness_max', 'd')}"
    )
    table.add_row("reward mean", fmt("reward_mean"))
    if accs:
        table.add_row(
            "held-out accuracy (first → last)",
            f"{accs[0]['accuracy']:.3f} → {accs[-1]['accuracy']:.3f}",
        )
    table.add_row(
        "loss balance (pos + neg)",
        f"{fmt('loss_balance', '+.2e')} "
        f"({fmt('loss_positive', '+.3f')} {fmt('loss_negative', '+.3f')})",
    )
    table.add_row(
        "groups trained / dropped stale",
        f"{fmt('groups_trained', 'd')} / {fmt('groups_dropped_stale', 'd')}",
    )
    table.add_row("tokens/s generated", f"{tokens_per_s:.0f}" if tokens_per_s is not None else "—")
    return table


def run_up(
    settings: Settings,
    redis_url: str,
    rollout_replicas: int = 1,
    ready_timeout_s: float = 300.0,
    live: bool = True,
    max_wall_s: float = 0.0,
) -> RunResult:
    """Start every service, follow the learner until it stops (max_steps) or Ctrl-C, stop all.

    ``settings`` must already name the model and the run directory. Raises LaunchError
    when a service fails to start or dies; every child is stopped in any case.
    """
    from rich.console import Console
    from rich.live import Live

    console = Console(stderr=True)
    config_path = write_run_config(settings)
    env = child_env(settings, config_path, redis_url)
    sup = Supervisor(Path(settings.run_dir), env, echo=None if live else console.print)
    interrupted = False
    previous_term = signal.getsignal(signal.SIGTERM)

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    try:
        for name in SERVICE_ORDER:
            replicas = rollout_replicas if name == "rollout" else 1
            for i in range(replicas):
                extra: dict[str, str] = {}
                http_port = getattr(settings, name).http_port
                label = name
                if name == "rollout" and replicas > 1:
                    label = f"rollout-{i}"
                    http_port, grpc_port = free_port(), free_port()
                    extra = {
                        "ASYMPO_ROLLOUT__HTTP_PORT": str(http_port),
                        "ASYMPO_ROLLOUT__GRPC_PORT": str(grpc_port),
                        "ASYMPO_ROLLOUT__REPLICA": label,
                    }
                console.print(f"starting {label} (logs: {sup.log_dir / (label + '.log')})")
                child = sup.start(label, service_argv(name), http_port, extra)
                if name != "learner":
                    sup.wait_ready(child, ready_timeout_s)
        learner = sup.children[-1]
        rollout_ports = [c.http_port for c in sup.children if c.name.startswith("rollout")]
        started = time.monotonic()
        window: deque[tuple[float, float]] = deque()  # (time, tokens) over the last ~10 s
        total = 0.0
        tokens_per_s: float | None = None

        def view() -> Any:
            return _status_table(
                sup, read_metrics(metrics_path(settings)), tokens_per_s, time.monotonic() - started
            )

        with Live(view(), console=console, refresh_per_second=2, transient=False) as screen:
            while learner.alive():
                for child in sup.children:
                    if not child.alive():
                        raise LaunchError(sup.describe_death(child))
                if max_wall_s and time.monotonic() - started > max_wall_s:
                    raise LaunchError(f"run exceeded --max-wall {max_wall_s:.0f}s")
                counts = [scrape_counter(p, "asympo_generated_tokens_total") for p in rollout_ports]
                total = sum(c for c in counts if c is not None)
                now = time.monotonic()
                window.append((now, total))
                while now - window[0][0] > 10.0:
                    window.popleft()
                if now > window[0][0]:
                    tokens_per_s = (total - window[0][1]) / (now - window[0][0])
                if live:
                    screen.update(view())
                time.sleep(1.0)
            tokens_per_s = total / max(time.monotonic() - started, 1e-9)  # run average
            screen.update(view())
        if learner.proc.returncode != 0:
            raise LaunchError(sup.describe_death(learner))
    except KeyboardInterrupt:
        interrupted = True
        console.print("interrupted: stopping every service ...")
    finally:
        sup.stop()
        signal.signal(signal.SIGTERM, previous_term)
    return summarise(settings, interrupted)
