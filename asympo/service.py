"""The skeleton every service process shares: logging, health, signals, supervised loops.

A service entry point reads as parse, build, run, close::

    def run(settings: Settings) -> None:
        configure_logging()
        with Service("rollout") as svc:                 # startup mistakes: one line, exit 2
            engine = create_engine(settings, model)
            svc.closing(engine.close)                   # closed in reverse order on exit
            svc.loop("rollout-loop", worker.step)       # supervised, see below
            svc.http(metrics.REGISTRY, settings, cfg.host, cfg.http_port)
            svc.serve()                                 # until SIGTERM/SIGINT or a loop dies

**The supervision contract** (docs/reliability.md): a loop's ``step`` is called over and
over on its own thread until the service stops. A *transient* error (Redis connection or
timeout, a gRPC peer unavailable or too slow, an OS-level connection error) is logged
and the step retried with capped exponential backoff; the service is not ready while it
is retrying. Any other exception is logged with its traceback and the loop is *dead*:
``/readyz`` and ``/healthz`` answer 503, the service stops, and the process exits with
status 1, so an orchestrator restarts it instead of leaving a live process that does
nothing. A mistake found while building the service (``STARTUP_ERRORS``) is logged as
one line and the process exits with status 2.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from types import TracebackType

import grpc
import redis
from prometheus_client import CollectorRegistry

from asympo.config import Settings
from asympo.engines.base import EngineError
from asympo.model.loading import ModelLoadError
from asympo.transport.redis_conn import RedisUnavailable
from asympo.transport.serving import HttpServer, make_http_app, wait_for_signal
from asympo.transport.weights_client import WeightsClientError

log = logging.getLogger("asympo.service")

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0)
EXIT_LOOP_DIED = 1
EXIT_STARTUP = 2

# A configuration the service cannot run with. ValueError covers ConfigError, TaskError,
# UnknownVerifierError and an unknown loss name; EngineError an engine that cannot start.
STARTUP_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    ModelLoadError,
    RedisUnavailable,
    EngineError,
)

_TRANSIENT_GRPC = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED}
)


def configure_logging(level: int = logging.INFO) -> None:
    """Log to stderr in the services' one format (a no-op if logging is already set up)."""
    logging.basicConfig(level=level, format=LOG_FORMAT)


def is_transient(exc: BaseException) -> bool:
    """Whether retrying the same step later can succeed: a peer is down or slow, not a bug."""
    if isinstance(exc, redis.ConnectionError | redis.TimeoutError | RedisUnavailable):
        return True
    if isinstance(exc, grpc.RpcError):
        code = exc.code() if callable(getattr(exc, "code", None)) else None
        return code in _TRANSIENT_GRPC
    if isinstance(exc, WeightsClientError):
        return exc.code in _TRANSIENT_GRPC
    return isinstance(exc, ConnectionError | TimeoutError)


class SupervisedLoop:
    """Calls ``step()`` on a thread until ``stop`` is set; see the module's contract.

    ``ready()`` is true once a step has returned and no transient failure is being
    retried; ``dead()`` once a step raised a non-transient error (kept in ``error``).
    ``on_death`` runs on the loop's thread right after it dies.
    """

    def __init__(
        self,
        name: str,
        step: Callable[[], object],
        stop: threading.Event,
        *,
        backoff_s: Sequence[float] = BACKOFF_S,
        transient: Callable[[BaseException], bool] = is_transient,
        on_death: Callable[[SupervisedLoop], None] | None = None,
    ) -> None:
        self.name = name
        self.step = step
        self.stop = stop
        self.backoff_s = tuple(backoff_s)
        self.transient = transient
        self.on_death = on_death
        self.error: BaseException | None = None
        self.failures = 0  # consecutive transient failures
        self._stepped = False
        self._died = threading.Event()
        self.join_timeout_s: float | None = 60.0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> SupervisedLoop:
        """Start the loop's thread."""
        self._thread.start()
        return self

    def ready(self) -> bool:
        """The loop runs, has completed a step, and is not retrying a failure."""
        return self._thread.is_alive() and self._stepped and self.failures == 0 and not self.dead()

    def dead(self) -> bool:
        """A step raised an error the loop cannot recover from."""
        return self._died.is_set()

    def join(self, timeout_s: float | None = None) -> bool:
        """Wait for the thread to end; True if it did (or never started)."""
        if self._thread.ident is None:
            return True
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                self.step()
            except Exception as exc:
                if self.transient(exc):
                    delay = self.backoff_s[min(self.failures, len(self.backoff_s) - 1)]
                    self.failures += 1
                    log.warning(
                        "%s: %s: %s; retry %d in %.1fs",
                        self.name,
                        type(exc).__name__,
                        exc,
                        self.failures,
                        delay,
                    )
                    self.stop.wait(delay)
                    continue
                self.error = exc
                log.critical("%s died: %s: %s", self.name, type(exc).__name__, exc, exc_info=exc)
                self._died.set()
                if self.on_death is not None:
                    self.on_death(self)
                return
            self._stepped = True
            if self.failures:
                log.info("%s: recovered after %d failed attempts", self.name, self.failures)
                self.failures = 0


class Service:
    """One service process: its supervised loops, HTTP health server, signals and closers.

    Use as a context manager. Inside, build the service (``closing``, ``loop``, ``http``)
    and call ``serve()``. On leaving: the closers run in reverse order; a startup error
    (``STARTUP_ERRORS`` raised before ``serve()``) becomes one log line and exit status
    2; a dead loop becomes exit status 1.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.stop = threading.Event()
        self.loops: list[SupervisedLoop] = []
        self._closers = contextlib.ExitStack()
        self._serving = False
        self.stop_reason = ""

    def __enter__(self) -> Service:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop.set()
        for loop in self.loops:  # already joined unless the body raised while serving
            loop.join(timeout_s=loop.join_timeout_s)
        self._closers.close()
        if exc is not None and not self._serving and isinstance(exc, STARTUP_ERRORS):
            log.error("%s cannot start: %s", self.name, exc)
            raise SystemExit(EXIT_STARTUP) from exc
        if exc is None and self.failed():
            dead = ", ".join(f"{loop.name} ({loop.error})" for loop in self.loops if loop.dead())
            log.error("%s exits: loop died: %s", self.name, dead)
            raise SystemExit(EXIT_LOOP_DIED)

    def closing(self, close: Callable[[], object]) -> None:
        """Run ``close()`` when the service ends (last registered, first closed)."""
        self._closers.callback(close)

    def loop(
        self, name: str, step: Callable[[], object], *, join_timeout_s: float | None = 60.0
    ) -> SupervisedLoop:
        """Register a supervised loop calling ``step``; it starts in ``serve()``.

        On stop the service waits ``join_timeout_s`` (None: as long as it takes) for the
        step in progress to end.
        """
        loop = SupervisedLoop(name, step, self.stop, on_death=lambda _loop: self.stop.set())
        loop.join_timeout_s = join_timeout_s
        self.loops.append(loop)
        return loop

    def ready(self) -> bool:
        """Every loop is ready (has stepped, and is not retrying a failure)."""
        return all(loop.ready() for loop in self.loops)

    def live(self) -> bool:
        """No loop has died."""
        return not self.failed()

    def failed(self) -> bool:
        """Some loop has died."""
        return any(loop.dead() for loop in self.loops)

    def http(
        self, registry: CollectorRegistry, settings: Settings, host: str, port: int
    ) -> HttpServer:
        """Start ``/healthz`` ``/readyz`` ``/metrics`` on ``host:port`` (closed on exit)."""
        server = HttpServer(
            make_http_app(registry, ready=self.ready, live=self.live, title=f"asympo {self.name}"),
            host,
            port,
            max_request_bytes=settings.http_max_request_bytes,
        ).start()
        self.closing(server.stop)
        return server

    def serve(self) -> bool:
        """Start the loops; block until SIGTERM/SIGINT, ``stop``, or a loop's death.

        Stops and joins the loops before returning. True when the service stopped
        cleanly (a signal or ``stop``), False when a loop died.
        """
        self._serving = True
        for loop in self.loops:
            loop.start()
        if threading.current_thread() is threading.main_thread():
            self.stop_reason = wait_for_signal(self.stop)
        else:  # signals reach the main thread only; whoever runs us there stops us
            self.stop.wait()
            self.stop_reason = "stop requested"
        self.stop.set()
        if self.failed():
            self.stop_reason = "loop died"
        log.info("%s stopping (%s)", self.name, self.stop_reason)
        for loop in self.loops:
            started = time.monotonic()
            if not loop.join(timeout_s=loop.join_timeout_s):
                log.warning(
                    "%s: %s still running after %.0fs",
                    self.name,
                    loop.name,
                    time.monotonic() - started,
                )
        return not self.failed()
