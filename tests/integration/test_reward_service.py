"""Reward service against real Redis, with workers as real processes (`asympo serve reward`).

Covers: two workers score every group exactly once; a SIGKILLed worker's pending groups
are reclaimed by the other, nothing lost or scored twice; a hanging verifier is cut off
and the worker goes on; a plug-in verifier configured by name is used; a verifier that
crashes dead-letters its group with the reason; gRPC Score and /metrics.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import grpc
import httpx
import pytest
import redis

from asympo.config import StreamSettings
from asympo.transport.redis_conn import connect
from asympo.transport.streams import Producer, decode
from asympo.v1 import records_pb2, reward_pb2, reward_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]
RECLAIM_IDLE_MS = 1500
TIME_LIMIT_S = 1.0
PLUGINS = (
    '{"loud": "tests.verifier_plugins:shouting", "sleepy": "tests.verifier_plugins:sleepy", '
    '"hang": "tests.verifier_plugins:hang_on_marker", "crash": "tests.verifier_plugins:crash"}'
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Worker:
    """One `asympo serve reward` process."""

    process: subprocess.Popen[bytes]
    http_port: int
    grpc_port: int
    log_path: Path

    @property
    def name(self) -> str:
        return f"{socket.gethostname()}-{self.process.pid}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return int(self.process.returncode)


def start_worker(redis_url: str, run_id: str, log_dir: Path, *extra: str) -> Worker:
    """Start a worker and wait until its /readyz answers 200."""
    http_port, grpc_port = _free_port(), _free_port()
    sets = [
        f"redis.url={redis_url}",
        f"streams.run_id={run_id}",
        f"streams.reclaim_idle_ms={RECLAIM_IDLE_MS}",
        f"reward.http_port={http_port}",
        f"reward.grpc_port={grpc_port}",
        "reward.pool_size=2",
        f"reward.time_limit_s={TIME_LIMIT_S}",
        "reward.batch=4",
        f"reward.plugins={PLUGINS}",
        *extra,
    ]
    command = [sys.executable, "-m", "asympo.cli", "serve", "reward"]
    for item in sets:
        command += ["--set", item]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env = {k: v for k, v in env.items() if not k.startswith("ASYMPO_")}
    log_path = log_dir / f"worker-{uuid.uuid4().hex[:6]}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    worker = Worker(process, http_port, grpc_port, log_path)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"worker exited with {process.returncode}:\n{worker.log()}")
        try:
            if httpx.get(f"http://127.0.0.1:{http_port}/readyz", timeout=1).status_code == 200:
                return worker
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    worker.stop()
    raise AssertionError(f"worker not ready in 90s:\n{worker.log()}")


def make_group(
    run_id: str, index: int, verifier: str, responses: list[str]
) -> records_pb2.RolloutGroup:
    """A rollout group whose reference answer is ``#### <index>``."""
    prompt = records_pb2.PromptTask(
        run_id=run_id,
        prompt_id=f"0:{index}",
        task="arith",
        prompt_text=f"{index}+0=",
        reference_answer=f"#### {index}",
        verifier=verifier,
        num_samples=len(responses),
    )
    return records_pb2.RolloutGroup(
        group_id=f"{run_id}/0:{index}",
        prompt=prompt,
        samples=[
            records_pb2.Sample(
                completion_text=text,
                finish_reason="stop",
                version=records_pb2.VersionRange(start=0, end=0),
            )
            for text in responses
        ],
        engine="test",
    )


def entries(client: redis.Redis, key: str) -> list[tuple[str, dict[bytes, bytes]]]:
    """Every (entry id, fields) of stream ``key``, oldest first."""
    rows = cast("list[tuple[bytes, dict[bytes, bytes]]]", client.xrange(key))
    return [(entry_id.decode(), fields) for entry_id, fields in rows]


def scored_groups(client: redis.Redis, streams: StreamSettings) -> list[records_pb2.ScoredGroup]:
    """Every ScoredGroup on the scored stream, oldest first."""
    rows = entries(client, streams.key(streams.scored))
    return [decode(fields, records_pb2.ScoredGroup) for _, fields in rows]


def wait_for(
    predicate: Callable[[], bool], timeout_s: float, what: str, workers: list[Worker]
) -> None:
    """Poll ``predicate`` until true; fail with the workers' logs after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    logs = "\n---\n".join(w.log() for w in workers)
    raise AssertionError(f"timed out waiting for {what}\n{logs}")


def reward_pending(client: redis.Redis, streams: StreamSettings) -> int:
    """Rollout entries delivered to the reward group and not yet acked."""
    summary = client.xpending(streams.key(streams.rollouts), "reward")
    return int(summary["pending"])


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[list[Worker]]:
    """Workers a test starts; all stopped at the end."""
    started: list[Worker] = []
    yield started
    for worker in started:
        worker.stop()


def _assert_exactly_once(scored: list[records_pb2.ScoredGroup], expected: set[str]) -> None:
    ids = [g.rollout.group_id for g in scored]
    assert len(ids) == len(set(ids)), "a group was scored twice"
    assert set(ids) == expected, "a group was lost"


def test_two_workers_score_every_group_exactly_once(
    redis_url: str,
    redis_client: redis.Redis,
    stream_settings: StreamSettings,
    workers: list[Worker],
    tmp_path: Path,
) -> None:
    run_id = stream_settings.run_id
    workers += [start_worker(redis_url, run_id, tmp_path) for _ in range(2)]
    producer = Producer(redis_client, stream_settings.key("rollouts"), records_pb2.RolloutGroup)
    # 4 groups x 4 samples x 0.25 s / 2 verifier processes = 2 s per batch, longer than
    # reclaim_idle_ms: in-flight groups must be kept, not reclaimed and verified twice.
    responses = lambda i: [str(i), f"#### {i + 1}", str(i), "none"]  # noqa: E731
    groups = [make_group(run_id, i, "sleepy", responses(i)) for i in range(20)]
    producer.send_many(groups)

    wait_for(
        lambda: len(scored_groups(redis_client, stream_settings)) >= len(groups),
        60,
        "all groups scored",
        workers,
    )
    time.sleep(0.5)  # anything scored twice would show up by now
    scored = scored_groups(redis_client, stream_settings)
    _assert_exactly_once(scored, {g.group_id for g in groups})
    assert reward_pending(redis_client, stream_settings) == 0
    assert {g.scorer for g in scored} == {w.name for w in workers}, "both workers took part"
    for group in scored:
        assert [s.reward for s in group.scores] == [1.0, 0.0, 1.0, 0.0]
        assert [s.reason for s in group.scores] == [
            "correct",
            "wrong answer",
            "correct",
            "no answer",
        ]
        assert group.rollout.samples[0].completion_text == group.rollout.prompt.prompt_id[2:]
    text = httpx.get(f"http://127.0.0.1:{workers[0].http_port}/metrics").text
    assert 'asympo_reward_groups_total{task="arith"}' in text
    assert 'asympo_reward_mean_by_task{task="arith"} 0.5' in text
    assert "asympo_verifier_seconds_bucket" in text
    assert "asympo_stream_lag_entries" in text
    for worker in workers:
        text = httpx.get(f"http://127.0.0.1:{worker.http_port}/metrics").text
        assert "asympo_reward_duplicate_groups_total 0.0" in text, "a group was verified twice"
    assert [w.stop() for w in workers] == [0, 0], "SIGTERM stops a worker cleanly"


def test_killed_worker_pending_groups_are_reclaimed(
    redis_url: str,
    redis_client: redis.Redis,
    stream_settings: StreamSettings,
    workers: list[Worker],
    tmp_path: Path,
) -> None:
    run_id = stream_settings.run_id
    victim = start_worker(redis_url, run_id, tmp_path)
    survivor = start_worker(redis_url, run_id, tmp_path)
    workers += [victim, survivor]
    rollouts = stream_settings.key("rollouts")
    producer = Producer(redis_client, rollouts, records_pb2.RolloutGroup)
    groups = [make_group(run_id, i, "sleepy", [str(i), "nope"]) for i in range(16)]
    producer.send_many(groups)

    def victim_pending() -> list[str]:
        rows = redis_client.xpending_range(rollouts, "reward", "-", "+", 100, victim.name)
        return [bytes(r["message_id"]).decode() for r in cast("list[dict[str, Any]]", rows)]

    wait_for(lambda: bool(victim_pending()), 30, "the victim to hold a batch", workers)
    victim.process.send_signal(signal.SIGKILL)
    victim.process.wait(timeout=10)
    orphaned = set(victim_pending())
    assert orphaned, "the victim died holding unacked groups"

    wait_for(
        lambda: len(scored_groups(redis_client, stream_settings)) >= len(groups),
        60,
        "the survivor to score everything",
        workers,
    )
    time.sleep(0.5)
    scored = scored_groups(redis_client, stream_settings)
    _assert_exactly_once(scored, {g.group_id for g in groups})
    assert reward_pending(redis_client, stream_settings) == 0
    by_entry = {
        entry_id: decode(fields, records_pb2.RolloutGroup).group_id
        for entry_id, fields in entries(redis_client, rollouts)
    }
    scorer_of = {g.rollout.group_id: g.scorer for g in scored}
    assert {scorer_of[by_entry[e]] for e in orphaned} == {survivor.name}


@pytest.fixture(scope="module")
def plugin_worker(
    redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Worker, StreamSettings]]:
    """One worker with plug-ins configured by name, on its own run (keys removed after)."""
    streams = StreamSettings(run_id=f"test-{uuid.uuid4().hex[:12]}")
    worker = start_worker(redis_url, streams.run_id, tmp_path_factory.mktemp("reward"))
    yield worker, streams
    worker.stop()
    client = connect(redis_url)
    keys = list(client.scan_iter(match=f"asympo:{streams.run_id}:*"))
    if keys:
        client.delete(*keys)
    client.close()


def _send_and_wait(
    client: redis.Redis, worker: Worker, streams: StreamSettings, group: records_pb2.RolloutGroup
) -> records_pb2.ScoredGroup:
    Producer(client, streams.key("rollouts"), records_pb2.RolloutGroup).send(group)

    def found() -> records_pb2.ScoredGroup | None:
        for scored in scored_groups(client, streams):
            if scored.rollout.group_id == group.group_id:
                return scored
        return None

    wait_for(lambda: found() is not None, 30, f"group {group.group_id} scored", [worker])
    result = found()
    assert result is not None
    return result


def test_hanging_verifier_is_cut_off_and_worker_goes_on(
    plugin_worker: tuple[Worker, StreamSettings], redis_client: redis.Redis
) -> None:
    worker, streams = plugin_worker
    started = time.monotonic()
    hung = _send_and_wait(
        redis_client,
        worker,
        streams,
        make_group(streams.run_id, 1, "hang", ["HANG", "1"]),
    )
    assert time.monotonic() - started < TIME_LIMIT_S + 10
    assert hung.scores[0].timed_out and hung.scores[0].reward == 0.0
    assert hung.scores[0].reason.startswith("timeout")
    assert not hung.scores[1].timed_out and hung.scores[1].reward == 1.0
    after = _send_and_wait(
        redis_client, worker, streams, make_group(streams.run_id, 2, "gsm8k", ["2", "3"])
    )
    assert [s.reward for s in after.scores] == [1.0, 0.0]
    text = httpx.get(f"http://127.0.0.1:{worker.http_port}/metrics").text
    assert 'asympo_verifier_timeouts_total{verifier="hang"} 1.0' in text


def test_plugin_verifier_configured_by_name_is_used(
    plugin_worker: tuple[Worker, StreamSettings], redis_client: redis.Redis
) -> None:
    worker, streams = plugin_worker
    scored = _send_and_wait(
        redis_client, worker, streams, make_group(streams.run_id, 3, "loud", ["HEY", "hey"])
    )
    assert [(s.reward, s.reason) for s in scored.scores] == [(1.0, "loud"), (0.0, "quiet")]
    with grpc.insecure_channel(f"127.0.0.1:{worker.grpc_port}") as channel:
        reply = reward_pb2_grpc.RewardStub(channel).Score(
            reward_pb2.ScoreRequest(
                items=[
                    reward_pb2.ScoreItem(verifier="loud", response="YES"),
                    reward_pb2.ScoreItem(
                        verifier="math", reference_answer="0.5", response="\\boxed{\\frac{1}{2}}"
                    ),
                    reward_pb2.ScoreItem(verifier="gsm8k", reference_answer="#### 3", response="4"),
                ]
            ),
            timeout=30,
        )
    assert [(s.reward, s.reason) for s in reply.scores] == [
        (1.0, "loud"),
        (1.0, "correct"),
        (0.0, "wrong answer"),
    ]


def test_broken_verifier_dead_letters_the_group(
    plugin_worker: tuple[Worker, StreamSettings], redis_client: redis.Redis
) -> None:
    worker, streams = plugin_worker
    producer = Producer(redis_client, streams.key("rollouts"), records_pb2.RolloutGroup)
    crashing = make_group(streams.run_id, 4, "crash", ["4"])
    unknown = make_group(streams.run_id, 5, "no_such_verifier", ["5"])
    # Code named on the stream, not configured by the operator, is never imported.
    injected = make_group(streams.run_id, 7, "os:system", ["7"])
    producer.send_many([crashing, unknown, injected])
    good = _send_and_wait(
        redis_client, worker, streams, make_group(streams.run_id, 6, "gsm8k", ["6"])
    )
    assert good.scores[0].reward == 1.0
    dead_key = streams.key(streams.dead_letter)
    wait_for(lambda: redis_client.xlen(dead_key) >= 3, 20, "three dead letters", [worker])
    letters = [decode(f, records_pb2.DeadLetter) for _, f in entries(redis_client, dead_key)]
    by_group = {records_pb2.RolloutGroup.FromString(d.payload).group_id: d for d in letters}
    assert by_group[crashing.group_id].reason.startswith("verifier_failed")
    assert "verifier crashed" in by_group[crashing.group_id].reason
    assert "unknown verifier" in by_group[unknown.group_id].reason
    assert by_group[injected.group_id].reason.startswith("untrusted_verifier")
    ids = {g.rollout.group_id for g in scored_groups(redis_client, streams)}
    assert crashing.group_id not in ids and unknown.group_id not in ids
    text = httpx.get(f"http://127.0.0.1:{worker.http_port}/metrics").text
    assert 'reason="verifier_failed"' in text
