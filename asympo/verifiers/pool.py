"""Verifier calls under a hard time limit, in worker processes that can be killed.

A thread-safe pool of ``size`` worker processes (``python -m asympo.verifiers.worker``,
JSON lines over pipes; see that module). A call that overruns ``time_limit_s`` kills
its worker (SIGKILL), starts a replacement and returns reward 0 with reason
``"timeout"``; a worker that dies mid-call gives a failed verdict ``"verifier
crashed"``. Either way the pool goes on. Workers are separate interpreters (exec, not
fork), so the pool is safe in a process with threads or an initialised accelerator,
and the time limit only counts from the moment a ready worker receives the request.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import queue
import select
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from asympo.verifiers.verdict import Verdict

TIMEOUT = "timeout"
CRASHED = "verifier crashed"


class _Worker:
    """One worker process and the parent's ends of its pipes."""

    def __init__(self, config_line: bytes) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "asympo.verifiers.worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            close_fds=True,
        )
        assert self.process.stdin is not None and self.process.stdout is not None
        self._stdin = self.process.stdin
        self._stdout_fd = self.process.stdout.fileno()
        self._buffer = b""
        self.ready = False
        self.send_line(config_line)

    def send_line(self, line: bytes) -> None:
        """Write one protocol line; raises OSError/ValueError if the worker is gone."""
        self._stdin.write(line)
        self._stdin.flush()

    def read_line(self, timeout_s: float) -> bytes | None:
        """The next protocol line, None after ``timeout_s``; EOFError if the worker died."""
        deadline = time.monotonic() + timeout_s
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            readable, _, _ = select.select([self._stdout_fd], [], [], remaining)
            if not readable:
                return None
            chunk = os.read(self._stdout_fd, 1 << 16)
            if not chunk:
                raise EOFError("worker closed its output")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line

    def wait_ready(self, timeout_s: float) -> bool:
        """Block until the worker finished its imports; False if it died or took too long."""
        if not self.ready:
            try:
                line = self.read_line(timeout_s)
            except (EOFError, OSError):
                return False
            self.ready = line is not None and json.loads(line).get("ready") is True
        return self.ready

    def kill(self) -> None:
        """SIGKILL the worker and reap it."""
        with contextlib.suppress(OSError):
            self.process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=5)
        self._close_pipes()

    def stop(self) -> None:
        """Close its input (the worker exits at EOF); kill it if it does not."""
        with contextlib.suppress(OSError, ValueError):
            self._stdin.close()
        try:
            self.process.wait(timeout=2)
        except subprocess.TimeoutExpired:
            self.kill()
        self._close_pipes()

    def _close_pipes(self) -> None:
        for pipe in (self.process.stdin, self.process.stdout):
            with contextlib.suppress(OSError, ValueError):
                if pipe is not None:
                    pipe.close()


class VerifierPool:
    """Run verifiers in ``size`` killable worker processes with a per-call time limit.

    Thread-safe: ``score`` may be called from many threads; at most ``size`` calls
    run at once. Use as a context manager or call ``close()``.
    """

    def __init__(
        self,
        size: int = 2,
        time_limit_s: float = 5.0,
        plugins: Mapping[str, str] | None = None,
        format_reward: float = 0.0,
        start_timeout_s: float = 120.0,
    ) -> None:
        if size < 1:
            raise ValueError("VerifierPool size must be >= 1")
        if time_limit_s <= 0:
            raise ValueError("VerifierPool time_limit_s must be > 0")
        self.size = size
        self.time_limit_s = time_limit_s
        self.start_timeout_s = start_timeout_s
        config = {
            "plugins": dict(plugins or {}),
            "format_reward": format_reward,
            "sys_path": [p for p in sys.path if p],
        }
        self._config_line = json.dumps(config).encode() + b"\n"
        self._idle: queue.Queue[_Worker] = queue.Queue()
        self._closed = False
        self._executor = ThreadPoolExecutor(max_workers=size, thread_name_prefix="verifier")
        self._counter_lock = threading.Lock()
        self.timeouts = 0
        self.crashes = 0
        for _ in range(size):
            self._idle.put(_Worker(self._config_line))

    def score(self, verifier: str, response: str, reference: str) -> Verdict:
        """Verify one response; returns within about ``time_limit_s`` once a worker is free."""
        if self._closed:
            raise RuntimeError("VerifierPool is closed")
        request = (
            json.dumps(
                {"verifier": verifier, "response": response, "reference": reference}
            ).encode()
            + b"\n"
        )
        worker = self._idle.get()
        try:
            for _attempt in range(2):
                if not worker.wait_ready(self.start_timeout_s):
                    worker = self._replace(worker)
                    continue
                try:
                    worker.send_line(request)
                except (OSError, ValueError):
                    # Died while idle: retry once on a fresh worker, the job never ran.
                    worker = self._replace(worker)
                    continue
                verdict, worker = self._await(worker)
                return verdict
            self._count("crashes")
            return Verdict(0.0, f"{CRASHED}: worker did not start", failed=True)
        finally:
            if self._closed:
                worker.stop()
            else:
                self._idle.put(worker)

    def _replace(self, worker: _Worker) -> _Worker:
        worker.kill()
        return _Worker(self._config_line)

    def _count(self, name: str) -> None:
        with self._counter_lock:
            setattr(self, name, getattr(self, name) + 1)

    def _await(self, worker: _Worker) -> tuple[Verdict, _Worker]:
        """The worker's verdict, or a timeout/crash verdict and a replacement worker."""
        started = time.monotonic()
        try:
            line = worker.read_line(self.time_limit_s)
            died = False
        except (EOFError, OSError):
            line, died = None, True
        elapsed = time.monotonic() - started
        if line is None:
            if died:
                worker.kill()
                self._count("crashes")
                code = worker.process.returncode
                verdict = Verdict(0.0, f"{CRASHED} (exit code {code})", failed=True)
            else:
                self._count("timeouts")
                verdict = Verdict(0.0, f"{TIMEOUT} after {elapsed:.1f}s", timed_out=True)
            return _with_elapsed(verdict, elapsed), self._replace(worker)
        reply: dict[str, Any] = json.loads(line)
        verdict = Verdict(
            float(reply["reward"]),
            str(reply["reason"]),
            bool(reply["timed_out"]),
            bool(reply["failed"]),
            elapsed,
            bool(reply.get("shaped", False)),
        )
        return verdict, worker

    def score_many(self, items: Sequence[tuple[str, str, str]]) -> list[Verdict]:
        """Verify ``(verifier, response, reference)`` items in parallel; verdicts in order."""
        futures = [self._executor.submit(self.score, *item) for item in items]
        return [f.result() for f in futures]

    def close(self) -> None:
        """Stop every worker (idle ones now, busy ones when their call returns)."""
        self._closed = True
        self._executor.shutdown(wait=False, cancel_futures=True)
        while True:
            try:
                self._idle.get_nowait().stop()
            except queue.Empty:
                break

    def __enter__(self) -> VerifierPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _with_elapsed(verdict: Verdict, elapsed: float) -> Verdict:
    return dataclasses.replace(verdict, elapsed_s=elapsed)
