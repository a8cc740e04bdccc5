"""Supervised service loops (asympo.service), on real threads, processes, HTTP and Redis.

A loop that raises a non-transient error turns ``/readyz`` and ``/healthz`` to 503 and
the process exits with status 1; a transient error (Redis unreachable) is retried with
backoff and readiness comes back. Faults are real: a stream key overwritten with a
string (every stream command then fails with WRONGTYPE), a Redis port nothing listens on.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import redis
from prometheus_client import CollectorRegistry

from asympo.config import Settings
from asympo.service import Service, SupervisedLoop, is_transient
from tests.unit.test_preflight import fake_tiny_cache

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def status(port: int, path: str) -> int:
    try:
        return httpx.get(f"http://127.0.0.1:{port}{path}", timeout=2).status_code
    except httpx.HTTPError:
        return 0


def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def poison(client: redis.Redis, key: str) -> None:
    """Replace a stream by a string: every stream command on it fails with WRONGTYPE."""
    pipe = client.pipeline(transaction=True)
    pipe.delete(key)
    pipe.set(key, b"not a stream")
    pipe.execute()


def test_transient_and_fatal_errors_are_told_apart(
    redis_client: redis.Redis, key_prefix: str
) -> None:
    dead = redis.Redis(port=free_port(), socket_connect_timeout=0.5)
    with pytest.raises(redis.ConnectionError) as refused:
        dead.ping()
    assert is_transient(refused.value)
    key = f"{key_prefix}wrongtype"
    poison(redis_client, key)
    with pytest.raises(redis.ResponseError) as wrongtype:
        redis_client.xadd(key, {b"a": b"b"})
    assert not is_transient(wrongtype.value)
    assert not is_transient(RuntimeError("bug"))


def test_transient_errors_are_retried_and_readiness_comes_back(
    redis_client: redis.Redis, key_prefix: str
) -> None:
    dead = redis.Redis(port=free_port(), socket_connect_timeout=0.5)
    calls = {"n": 0}
    ready_while_failing: list[bool] = []

    def step() -> None:
        calls["n"] += 1
        if calls["n"] <= 3:  # the first attempts go to a Redis that is not there
            dead.ping()
        ready_while_failing.append(loop.ready())
        redis_client.ping()

    stop = threading.Event()
    loop = SupervisedLoop("flaky", step, stop, backoff_s=(0.05, 0.1))
    loop.start()
    try:
        wait_for(lambda: calls["n"] >= 3 and not loop.ready(), 10, "the failures")
        wait_for(loop.ready, 10, "readiness after the retries")
        assert not loop.dead() and loop.error is None
        assert ready_while_failing[0] is False  # not ready before one step succeeded
    finally:
        stop.set()
        assert loop.join(5)


def test_dead_loop_turns_readiness_and_health_off_and_exits_1(
    redis_client: redis.Redis, key_prefix: str
) -> None:
    key = f"{key_prefix}work"
    redis_client.xgroup_create(key, "g", id="0", mkstream=True)
    seen: dict[str, tuple[int, int]] = {}

    def step() -> None:
        redis_client.xreadgroup("g", "c", {key: ">"}, count=1, block=50)

    with pytest.raises(SystemExit) as exit_info, Service("test") as svc:
        svc.loop("stream-loop", step)
        port = svc.http(CollectorRegistry(), Settings(), "127.0.0.1", 0).port

        def break_the_stream() -> None:
            wait_for(svc.ready, 10, "readiness")
            seen["before"] = (status(port, "/readyz"), status(port, "/healthz"))
            poison(redis_client, key)

        breaker = threading.Thread(target=break_the_stream)
        breaker.start()
        assert svc.serve() is False
        breaker.join()
        seen["after"] = (status(port, "/readyz"), status(port, "/healthz"))
    assert exit_info.value.code == 1
    assert seen == {"before": (200, 200), "after": (503, 503)}
    assert isinstance(svc.loops[0].error, redis.ResponseError)


def start_service(argv: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ASYMPO_")}
    env["PYTHONPATH"] = str(ROOT)
    with log_path.open("wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "asympo.cli", "serve", *argv],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def assert_dies_with_status_1(
    proc: subprocess.Popen[bytes],
    http_port: int,
    log_path: Path,
    loop: str,
    fault: Callable[[], None],
) -> None:
    """Ready first; after ``fault()``, never ready again, then exit status 1 and its log line."""
    wait_for(lambda: proc.poll() is not None or status(http_port, "/readyz") == 200, 180, "ready")
    assert proc.poll() is None, log_path.read_text()
    fault()
    statuses: list[int] = []
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        statuses.append(status(http_port, "/readyz"))
        time.sleep(0.05)
    assert proc.wait(30) == 1, log_path.read_text()
    assert 200 not in statuses[2:], statuses  # a request already in flight may see 200
    log = log_path.read_text()
    # WRONGTYPE, or UNBLOCKED when the delete ends a blocking read: both are fatal.
    assert f"{loop} died: ResponseError" in log
    assert "exits: loop died" in log


@pytest.mark.timeout(240)
def test_reward_process_exits_1_when_its_loop_dies(
    redis_url: str,
    redis_client: redis.Redis,
    run_id: str,
    key_prefix: str,
    tmp_path: Path,
    processes: list[subprocess.Popen[bytes]],
) -> None:
    http_port = free_port()
    log_path = tmp_path / "reward.log"
    argv = ["reward"]
    for item in (
        f"redis.url={redis_url}",
        f"streams.run_id={run_id}",
        f"reward.http_port={http_port}",
        f"reward.grpc_port={free_port()}",
        "reward.pool_size=1",
    ):
        argv += ["--set", item]
    processes.append(proc := start_service(argv, log_path))
    assert_dies_with_status_1(
        proc,
        http_port,
        log_path,
        "reward-loop",
        lambda: poison(redis_client, f"{key_prefix}rollouts"),
    )


@pytest.mark.timeout(300)
def test_rollout_serves_the_default_model_and_exits_1_when_its_loop_dies(
    redis_url: str,
    redis_client: redis.Redis,
    run_id: str,
    key_prefix: str,
    tmp_path: Path,
    processes: list[subprocess.Popen[bytes]],
) -> None:
    """Empty model.path = the (already built) tiny default, as the learner resolves it."""
    cache = tmp_path / "models"
    fake_tiny_cache(cache)
    http_port = free_port()
    log_path = tmp_path / "rollout.log"
    argv = ["rollout"]
    for item in (
        "model.path=",
        f"model.cache_dir={cache}",
        "rollout.engine=transformers",
        f"rollout.work_dir={tmp_path / 'work'}",
        f"redis.url={redis_url}",
        f"streams.run_id={run_id}",
        f"rollout.http_port={http_port}",
        f"rollout.grpc_port={free_port()}",
        f"weights.grpc_port={free_port()}",  # no weights service: the follower waits
    ):
        argv += ["--set", item]
    processes.append(proc := start_service(argv, log_path))
    assert_dies_with_status_1(
        proc,
        http_port,
        log_path,
        "rollout-loop",
        lambda: poison(redis_client, f"{key_prefix}prompts"),
    )
    assert str(cache) in log_path.read_text()  # it served the cached default


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    ("service", "overrides", "needle"),
    [
        ("rollout", ["sampling.max_tokens=5000"], "sampling.max_tokens=5000 plus a prompt"),
        ("learner", ["sampling.max_tokens=5000"], "sampling.max_tokens=5000 plus the longest"),
        ("rollout", ["model.path=/nonexistent/model"], "no model directory"),
    ],
)
def test_a_service_refuses_settings_its_model_cannot_serve_in_one_line(
    redis_url: str,
    tmp_path: Path,
    service: str,
    overrides: list[str],
    needle: str,
) -> None:
    """Checked at each service's own start too: a service may be started without `up`."""
    cache = tmp_path / "models"
    fake_tiny_cache(cache)
    argv = [service]
    for item in (
        f"model.cache_dir={cache}",
        f"redis.url={redis_url}",
        f"{service}.http_port={free_port()}",
        f"{service}.grpc_port={free_port()}",
        *overrides,
    ):
        argv += ["--set", item]
    log_path = tmp_path / f"{service}.log"
    proc = start_service(argv, log_path)
    try:
        assert proc.wait(240) == 2, log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
    log = log_path.read_text()
    errors = [line for line in log.splitlines() if f"{service} cannot start" in line]
    assert len(errors) == 1 and needle in errors[0], log
    assert "Traceback" not in log
