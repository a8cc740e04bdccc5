"""`asympo up`: run every service as a child process on one machine, with a live view.

The launcher owns process lifetimes only. Services talk to each other through Redis
and gRPC exactly as they would on a cluster; the launcher just starts them with one
resolved configuration, keeps their logs (prefixed, in ``<run_dir>/logs``), shows the
learner's metrics as they arrive, and stops everything — no child survives it.

Three parts: ``supervisor`` (child processes, their logs and readiness, stop),
``run_dir`` (per-run defaults, the resolved config file, the summary) and ``live``
(the table). ``run_up`` below ties them together.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

from asympo.config import Settings
from asympo.launcher.live import TokenRate, scrape_counter, status_table
from asympo.launcher.run_dir import (
    RunResult,
    child_env,
    metrics_path,
    summarise,
    with_run_defaults,
    write_run_config,
)
from asympo.launcher.supervisor import (
    SERVICE_ORDER,
    Child,
    LaunchError,
    Supervisor,
    assign_ports,
    free_port,
    port_is_free,
    service_argv,
    with_free_ports,
)
from asympo.run_log import read_metrics

__all__ = [
    "SERVICE_ORDER",
    "Child",
    "LaunchError",
    "RunResult",
    "Supervisor",
    "assign_ports",
    "child_env",
    "free_port",
    "metrics_path",
    "port_is_free",
    "run_up",
    "scrape_counter",
    "service_argv",
    "summarise",
    "with_free_ports",
    "with_run_defaults",
    "write_run_config",
]


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
        rate = TokenRate([c.http_port for c in sup.children if c.name.startswith("rollout")])

        def view() -> Any:
            return status_table(
                sup,
                read_metrics(metrics_path(settings)),
                rate.per_s,
                time.monotonic() - rate.started,
            )

        with Live(view(), console=console, refresh_per_second=2, transient=False) as screen:
            while learner.alive():
                for child in sup.children:
                    if not child.alive():
                        raise LaunchError(sup.describe_death(child))
                if max_wall_s and time.monotonic() - rate.started > max_wall_s:
                    raise LaunchError(f"run exceeded --max-wall {max_wall_s:.0f}s")
                rate.sample()
                if live:
                    screen.update(view())
                time.sleep(1.0)
            rate.finish()
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
