"""Verifier calls under a hard time limit, in worker processes that can be killed.

A thread-safe pool of ``size`` worker processes (forkserver on Linux, so a
replacement forks from a server that already imported sympy/math-verify; spawn
elsewhere). A call that overruns ``time_limit_s`` kills its worker (SIGKILL),
starts a replacement and returns reward 0 with reason ``"timeout"``; a worker that
dies mid-call gives a failed verdict ``"verifier crashed"``. Either way the pool
goes on. Workers die with their parent (PR_SET_PDEATHSIG on Linux).
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import queue
import signal
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from multiprocessing.context import BaseContext
from multiprocessing.process import BaseProcess

from asympo.verifiers.verdict import Verdict

TIMEOUT = "timeout"
CRASHED = "verifier crashed"
_PRELOAD = ["asympo.verifiers.registry"]


def _die_with_parent() -> None:
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _worker_main(conn: Connection, plugins: dict[str, str], format_reward: float) -> None:
    """Worker loop: receive (verifier, response, reference), reply with a verdict tuple."""
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when workers stop
    from asympo.verifiers.registry import UnknownVerifierError, resolve_verifier, run_verifier

    cache: dict[str, object] = {}
    conn.send(("ready",))
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return
        if job is None:
            return
        name, response, reference = job
        try:
            fn = cache.get(name) or resolve_verifier(name, plugins)
            cache[name] = fn
        except UnknownVerifierError as exc:
            conn.send(("verdict", 0.0, str(exc), False, True))
            continue
        verdict = run_verifier(fn, name, response, reference, format_reward)  # type: ignore[arg-type]
        conn.send(("verdict", verdict.reward, verdict.reason, verdict.timed_out, verdict.failed))


def _context() -> BaseContext:
    if sys.platform.startswith("linux"):
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(_PRELOAD)
        return ctx
    return multiprocessing.get_context("spawn")


class _Worker:
    """One worker process and the parent's end of its pipe."""

    def __init__(self, ctx: BaseContext, plugins: dict[str, str], format_reward: float) -> None:
        self.conn, child = ctx.Pipe()  # type: ignore[attr-defined]
        self.process: BaseProcess = ctx.Process(  # type: ignore[attr-defined]
            target=_worker_main, args=(child, plugins, format_reward), daemon=True
        )
        self.process.start()
        child.close()
        self.ready = False

    def wait_ready(self, timeout_s: float) -> bool:
        """Block until the worker finished its imports; False if it died or took too long."""
        if self.ready:
            return True
        try:
            if self.conn.poll(timeout_s) and self.conn.recv() == ("ready",):
                self.ready = True
        except (EOFError, OSError):
            return False
        return self.ready

    def kill(self) -> None:
        """SIGKILL the worker and reap it."""
        with contextlib.suppress(OSError, ValueError):
            self.process.kill()
        self.process.join(timeout=5)
        with contextlib.suppress(OSError):
            self.conn.close()

    def stop(self) -> None:
        """Ask the worker to exit; kill it if it does not."""
        with contextlib.suppress(OSError, ValueError, BrokenPipeError):
            self.conn.send(None)
        self.process.join(timeout=2)
        if self.process.is_alive():
            self.kill()
        with contextlib.suppress(OSError):
            self.conn.close()


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
        self._plugins = dict(plugins or {})
        self._format_reward = format_reward
        self._ctx = _context()
        self._idle: queue.Queue[_Worker] = queue.Queue()
        self._all: set[_Worker] = set()
        self._lock = threading.Lock()
        self._closed = False
        self._executor = ThreadPoolExecutor(max_workers=size, thread_name_prefix="verifier")
        self.timeouts = 0
        self.crashes = 0
        for _ in range(size):
            self._idle.put(self._new_worker())

    def _new_worker(self) -> _Worker:
        worker = _Worker(self._ctx, self._plugins, self._format_reward)
        with self._lock:
            self._all.add(worker)
        return worker

    def _replace(self, worker: _Worker) -> _Worker:
        worker.kill()
        with self._lock:
            self._all.discard(worker)
        return self._new_worker()

    def score(self, verifier: str, response: str, reference: str) -> Verdict:
        """Verify one response; returns within about ``time_limit_s`` once a worker is free."""
        if self._closed:
            raise RuntimeError("VerifierPool is closed")
        worker = self._idle.get()
        try:
            for attempt in range(2):
                if not worker.wait_ready(self.start_timeout_s):
                    worker = self._replace(worker)
                    continue
                try:
                    worker.conn.send((verifier, response, reference))
                except (OSError, ValueError):
                    # Died while idle: retry once on a fresh worker, the job never ran.
                    worker = self._replace(worker)
                    continue
                return self._await(worker, attempt)
            self.crashes += 1
            return Verdict(0.0, f"{CRASHED}: worker did not start", failed=True)
        finally:
            if self._closed:
                worker.stop()
            else:
                self._idle.put(worker)

    def _await(self, worker: _Worker, attempt: int) -> Verdict:
        started = time.monotonic()
        try:
            arrived = worker.conn.poll(self.time_limit_s)
            reply = worker.conn.recv() if arrived else None
        except (EOFError, OSError):
            reply, arrived = None, True
        elapsed = time.monotonic() - started
        if reply is None:
            self._swap_in(worker)
            if arrived:
                self.crashes += 1
                code = worker.process.exitcode
                return Verdict(0.0, f"{CRASHED} (exit code {code})", failed=True, elapsed_s=elapsed)
            self.timeouts += 1
            return Verdict(
                0.0, f"{TIMEOUT} after {elapsed:.1f}s", timed_out=True, elapsed_s=elapsed
            )
        _, reward, reason, timed_out, failed = reply
        elapsed = time.monotonic() - started
        return Verdict(float(reward), str(reason), bool(timed_out), bool(failed), elapsed)

    def _swap_in(self, worker: _Worker) -> None:
        """Replace a dead or hung worker in place (the caller returns the object to the queue)."""
        fresh = self._replace(worker)
        worker.conn, worker.process, worker.ready = fresh.conn, fresh.process, False
        with self._lock:
            self._all.discard(fresh)
            self._all.add(worker)

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
        with self._lock:
            self._all.clear()

    def __enter__(self) -> VerifierPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
