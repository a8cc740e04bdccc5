"""Child processes of `asympo up`: start each service in its own process group, keep its log,
wait for its ``/readyz``, and guarantee on ``stop()`` that no child (or grandchild) survives.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from asympo.config import Settings

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


def service_argv(name: str) -> list[str]:
    """The command line that runs one service in the foreground."""
    return [sys.executable, "-m", "asympo.cli", "serve", name]


def with_free_ports(settings: Settings) -> Settings:
    """``settings`` with every busy configured port moved to a free one."""
    moved = assign_ports(settings)
    return settings.model_copy(
        update={
            name: getattr(settings, name).model_copy(update=ports) for name, ports in moved.items()
        }
    )
