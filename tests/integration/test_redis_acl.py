"""The Redis ACL of a deployment (asympo/transport/redis_acl.py) on a real ``redis-server``.

The server is started the way the Redis container starts it: the deployment's start
script (``START_SCRIPT``) fills each user's password into the rendered rules and execs
``redis-server``. Each service then does its own stream work as its own user through the
services' real code paths (announcer, admitter, reward worker, consumers, the
produce-and-ack and trim scripts, dead-lettering, reclaiming), and is refused what it
must never do: rollout writing scored groups or prompts, reward writing rollouts or
FLUSHALL, anyone touching another service's keys or the server's configuration.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.exceptions import NoPermissionError

from asympo.config import RedisSettings, Settings, StreamSettings
from asympo.tasks import load_task
from asympo.transport.redis_acl import SERVICE_USERS, START_SCRIPT, render
from asympo.transport.redis_conn import connect
from asympo.transport.streams import Consumer, Producer, produce_and_ack_many
from asympo.v1 import records_pb2
from asympo.verifiers import VerifierPool
from services.learner.admission import Admitter
from services.learner.learner import CONSUMER_GROUP
from services.reward.worker import RewardWorker
from services.rollout.worker import PROMPTS_GROUP
from services.weights.server import StreamAnnouncer

pytestmark = pytest.mark.skipif(
    shutil.which("redis-server") is None, reason="needs the redis-server binary"
)

RUN_ID = "acl-test"


@dataclass
class AclServer:
    """A throwaway ACL-enforcing Redis on a unix socket, and the users' passwords."""

    socket: Path
    passwords: dict[str, str]

    def settings(self, user: str, **sections: Any) -> Settings:
        """Settings of service ``user``, credentials set as the manifests set them."""
        redis_section = RedisSettings(
            url=f"unix://{self.socket}", username=user, password=self.passwords.get(user, "")
        )
        return Settings(redis=redis_section, streams=StreamSettings(run_id=RUN_ID), **sections)

    def client(self, user: str) -> redis.Redis:
        """A connected client of ``user`` (through Settings.redis_url, as services do)."""
        return connect(self.settings(user).redis_url(), retry_window_s=0)


def start_script_env(tmp: Path, passwords: dict[str, str]) -> dict[str, str]:
    """The Redis container's environment: the rules and each user's password."""
    env = dict(os.environ, REDIS_ACL=render(), REDIS_ACL_OUT=str(tmp / "users.acl"))
    env.update({f"REDIS_PASSWORD_{u.upper()}": pw for u, pw in passwords.items()})
    return env


def start(tmp: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """Run the start script with a throwaway server's arguments."""
    return subprocess.Popen(
        ["sh", "-c", START_SCRIPT, "redis-acl", "--port", "0", "--unixsocket",
         str(tmp / "redis.sock"), "--dir", str(tmp), "--save", "", "--appendonly", "no"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AclServer]:
    tmp = tmp_path_factory.mktemp("acl")
    passwords = {u: secrets.token_hex(16) for u in SERVICE_USERS}
    proc = start(tmp, start_script_env(tmp, passwords))
    acl = AclServer(tmp / "redis.sock", passwords)
    try:
        deadline = time.monotonic() + 30
        while not acl.socket.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                out = proc.stdout.read().decode() if proc.stdout else ""
                pytest.fail(f"redis-server with the ACL did not start:\n{out[-3000:]}")
            time.sleep(0.05)
        yield acl
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def refused(call: Any, *args: Any, **kwargs: Any) -> str:
    """Run a Redis call that the ACL must refuse; returns the error text."""
    with pytest.raises(redis.ResponseError) as info:
        call(*args, **kwargs)
    text = str(info.value)
    # NOPERM for a command; inside a script: "The user executing the script can't ...".
    assert isinstance(info.value, NoPermissionError) or "executing the script can't" in text, text
    return text


def test_each_service_does_its_own_stream_work_as_its_own_user(server: AclServer) -> None:
    streams = StreamSettings(run_id=RUN_ID)
    # weights announces a version.
    StreamAnnouncer(lambda: server.client("weights"), streams.key(streams.weights),
                    streams.maxlen)(records_pb2.VersionAnnouncement(version=1))  # fmt: skip
    # The learner admits prompts (MULTI: XADDs + the counter) and reads its counter.
    learner_settings = server.settings(
        "learner", sampling={"num_samples": 2}, learner={"groups_per_step": 2}
    )
    learner = server.client("learner")
    admitter = Admitter(learner_settings, learner, load_task("arith", train_size=20, eval_size=2))
    assert admitter.admit(version=0, min_version=0) > 2
    assert admitter.admitted() > 2
    # Rollout: follows the weights stream, consumes prompts, produces groups atomically
    # with their acks (the produce-and-ack script), refreshes held entries, dead-letters.
    rollout = server.client("rollout")
    announced = rollout.xread({streams.key(streams.weights): "0-0"}, count=64, block=100)
    assert announced and len(announced[0][1]) == 1
    rollout_settings = server.settings("rollout")
    prompts = Consumer.from_settings(
        rollout, streams, streams.prompts, PROMPTS_GROUP, "r0", records_pb2.PromptTask
    )
    prompts.trim_every_s = 0.0
    out = Producer.from_settings(rollout, streams, streams.rollouts, records_pb2.RolloutGroup)
    held = prompts.read(count=64, block_ms=100)
    assert len(held) > 2
    rollout.xclaim(prompts.stream_key, prompts.group, prompts.consumer, min_idle_time=0,
                   message_ids=[d.entry_id for d in held], justid=True)  # fmt: skip
    prompts.dead_letter(held[-1], "unservable", "too long for the engine")
    groups = []
    for d in held[:-1]:
        group = records_pb2.RolloutGroup(group_id=f"g-{d.msg.prompt_id}", prompt=d.msg)
        for answer in (d.msg.reference_answer, "wrong"):
            group.samples.add(completion_text=answer)
        groups.append(group)
    once = [rollout_settings.streams.key(f"once:rollout:{g.group_id}") for g in groups]
    committed = produce_and_ack_many(
        [([(out, g)], d, k) for d, g, k in zip(held[:-1], groups, once, strict=True)], prompts
    )
    assert not any(c.duplicate for c in committed)
    assert prompts.maybe_trim() >= 0 and prompts.refresh_lag_metric() == 0
    # Reward: the real worker scores every group and produces scored groups.
    with VerifierPool(size=1, time_limit_s=5.0) as pool:
        worker = RewardWorker(server.settings("reward"), server.client("reward"), pool, "w0")
        result = worker.step(block_ms=100)
    assert result.scored == len(groups)
    worker.rollouts.trim_every_s = 0.0
    worker.rollouts.maybe_trim()
    # The learner consumes scored groups: its own pending first (as after a restart),
    # then reads, holds (XCLAIM), dead-letters one, acks the rest, trims.
    scored = Consumer.from_settings(
        learner, streams, streams.scored, CONSUMER_GROUP, "l0", records_pb2.ScoredGroup
    )
    scored.trim_every_s = 0.0
    assert learner.xreadgroup(CONSUMER_GROUP, "l0", {scored.stream_key: "0"}, count=8) is not None
    got = scored.read(count=64, block_ms=100)
    assert len(got) == len(groups)
    assert all(len(d.msg.scores) == 2 and d.msg.scores[0].reward == 1.0 for d in got)
    learner.xclaim(scored.stream_key, CONSUMER_GROUP, "l0", min_idle_time=0,
                   message_ids=[got[0].entry_id], justid=True)  # fmt: skip
    scored.dead_letter(got[0], "invalid_group", "test")
    assert scored.ack(got[1:]) == len(got) - 1
    assert scored.maybe_trim() >= 0 and scored.lag() == 0


def test_a_dead_consumers_entries_are_reclaimed_under_the_acl(server: AclServer) -> None:
    streams = StreamSettings(run_id=RUN_ID + "-reclaim")
    learner = server.client("learner")
    Producer.from_settings(learner, streams, streams.prompts, records_pb2.PromptTask).send(
        records_pb2.PromptTask(prompt_id="p")
    )
    rollout = server.client("rollout")

    def consumer(name: str) -> Consumer[records_pb2.PromptTask]:
        return Consumer(rollout, streams.key(streams.prompts), PROMPTS_GROUP, name,
                        records_pb2.PromptTask, streams.key(streams.dead_letter),
                        reclaim_idle_ms=100, reclaim_every_ms=1)  # fmt: skip

    assert len(consumer("dead").read(count=1)) == 1
    time.sleep(0.2)
    (again,) = consumer("alive").read(count=1)
    assert again.deliveries == 2


def test_what_each_service_must_never_do_is_refused(server: AclServer) -> None:
    s = StreamSettings(run_id=RUN_ID)
    fields = {"msg": b"forged", "type": b"asympo.v1.ScoredGroup"}
    rollout, reward = server.client("rollout"), server.client("reward")
    learner, weights = server.client("learner"), server.client("weights")
    # Each stream has one producer: nobody else may append to it.
    refused(rollout.xadd, s.key(s.scored), fields)
    refused(rollout.xadd, s.key(s.prompts), fields)
    refused(rollout.xadd, s.key(s.weights), fields)
    refused(reward.xadd, s.key(s.rollouts), fields)
    refused(reward.xadd, s.key(s.prompts), fields)
    refused(learner.xadd, s.key(s.scored), fields)
    refused(learner.xadd, s.key(s.rollouts), fields)
    refused(weights.xadd, s.key(s.prompts), fields)
    # Consumers cannot delete or rewrite their input, nor forge another's markers.
    refused(reward.delete, s.key(s.rollouts))
    refused(rollout.set, s.key("learner:admitted"), 0)
    refused(rollout.set, s.key("reward-done:g1"), 1)
    refused(reward.set, s.key("once:rollout:g1"), 1)
    # A script runs with its caller's rights: no forged XADD through EVAL either.
    forge = "return redis.call('XADD', KEYS[1], '*', 'msg', 'x')"
    refused(rollout.eval, forge, 1, s.key(s.scored))
    refused(rollout.eval, forge, 1, s.key(s.prompts))  # a key it may name, not XADD to it
    # Nobody administers the server or reads keys outside their own streams.
    for client in (rollout, reward, learner, weights):
        refused(client.flushall)
        refused(client.config_set, "appendonly", "no")
        refused(client.keys, "*")
        refused(client.get, "some-other-key")
    refused(reward.eval, "return redis.call('FLUSHALL')", 0)


def test_default_user_is_off_and_healthcheck_may_only_ping(server: AclServer) -> None:
    anonymous = redis.Redis(unix_socket_path=str(server.socket))
    with pytest.raises(redis.AuthenticationError):
        anonymous.ping()
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(unix_socket_path=str(server.socket), username="default", password="").ping()
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(
            unix_socket_path=str(server.socket), username="rollout", password="wrong"
        ).ping()
    probe = redis.Redis(
        unix_socket_path=str(server.socket), username="healthcheck", password="healthcheck"
    )
    assert probe.ping()
    refused(probe.get, "asympo:x:learner:admitted")
    refused(probe.xadd, "asympo:x:scored", {"msg": b"x"})


@pytest.mark.parametrize("bad", ["", "has space", "semi;colon"])
def test_start_script_refuses_a_missing_or_unsafe_password(tmp_path: Path, bad: str) -> None:
    passwords = {u: secrets.token_hex(8) for u in SERVICE_USERS}
    passwords["reward"] = bad
    proc = start(tmp_path, start_script_env(tmp_path, passwords))
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 78, out
    assert b"password of ACL user reward" in out
    assert not (tmp_path / "redis.sock").exists()
