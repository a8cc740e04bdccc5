"""The direct weights path end to end: the learner's broadcast sink, the weights service's
rendezvous, and a rollout replica on the real vLLM CPU engine whose worker receives each
version straight into the model (weights.transport=broadcast).

Real parts only: gloo groups over TCP, the weights service over gRPC, Redis for the
announcements, vLLM's engine. The learner side is the sink the learner's publisher runs
(services/learner/publisher.py), called here directly with snapshots of models whose
weights differ version to version (the warm-started tiny model, perturbed), so a stale
engine could not pass the checks. Failures are real too: weights that do not match their
probe on the wire, and a learner process whose group goes away.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from asympo.config import StreamSettings
from asympo.rl.probe import make_probe, probe_tokens
from asympo.transport.redis_conn import connect
from asympo.transport.weight_broadcast import BroadcastHub, Layout
from asympo.transport.weights_client import WeightsClient
from services.learner.publisher import (
    Snapshot,
    SnapshotSink,
    broadcast_sink,
    probe_data,
    store_sink,
)
from services.rollout.swap import WeightSwapper
from services.rollout.versions import BroadcastLink, VersionFollower
from services.weights.server import StreamAnnouncer, WeightsService
from tests.integration.test_engine_swap import (
    TOL,
    assert_engine_matches,
    base_dir,  # noqa: F401 (a fixture)
    engine,  # noqa: F401 (a fixture)
    greedy_requests,
    tokenizer,  # noqa: F401 (a fixture)
    variant,
)
from tests.integration.test_weights_service import TOKEN, make_settings

pytestmark = pytest.mark.vllm
pytest.importorskip("vllm")

TIMEOUT_S = 10.0  # of a broadcast join or send


@pytest.fixture
def service(
    tmp_path: Path, redis_url: str, stream_settings: StreamSettings
) -> Iterator[WeightsService]:
    settings = make_settings(tmp_path, stream_settings.run_id)
    announcer = StreamAnnouncer(
        lambda: connect(redis_url), stream_settings.key(stream_settings.weights), 1000
    )
    svc = WeightsService(settings, announce=announcer, grpc_port=0, http_port=0).start()
    yield svc
    svc.stop(grace=0.5)


@pytest.fixture
def client(service: WeightsService) -> Iterator[WeightsClient]:
    with WeightsClient(f"127.0.0.1:{service.grpc_port}", token=TOKEN, chunk_bytes=1 << 20) as c:
        yield c


class Learner:
    """The learner's side: a broadcast hub and the sink its publisher runs."""

    def __init__(self, client: WeightsClient, layout: Layout) -> None:
        self.client = client
        self.hub = BroadcastHub(layout, 0, TIMEOUT_S)
        self.store: SnapshotSink = store_sink(client, retry_s=10)
        self.sink = broadcast_sink(self.hub, self.register, self.store)
        self.register()

    def register(self) -> None:
        self.client.register_broadcast("127.0.0.1", self.hub.port, self.hub.epoch)

    def close(self) -> None:
        self.hub.close()


def snapshot(model: Any, version: int) -> Snapshot:
    """What the learner's publisher hands its sink for ``model`` as ``version``."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    probe = make_probe(model, probe_tokens(model.config.vocab_size), TOL)
    return Snapshot(version, state, probe)


def replica(
    engine: Any,  # noqa: F811 (the fixture)
    base: Path,
    client: WeightsClient,
    redis_client: redis.Redis,
    stream_settings: StreamSettings,
    work_dir: Path,
) -> VersionFollower:
    """A starting rollout replica on ``engine``, as services/rollout/main.py wires it."""
    swapper = WeightSwapper(engine, -1, base)
    link = BroadcastLink(engine, client, TIMEOUT_S, rejoin_s=0.2)
    key = stream_settings.key(stream_settings.weights)
    follower = VersionFollower(redis_client, key, client, swapper, work_dir, TOL, None, link)
    swapper.fetch = follower.fetch
    return follower


def run_until(follower: VersionFollower, done: Callable[[], bool], timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, f"timed out; outcomes {follower.outcomes}"
        follower.step(block_ms=50)


def served(engine: Any, tok: Any, vocab_size: int) -> tuple[list[Any], list[float]]:  # noqa: F811
    """Greedy tokens and log-probs of the test prompts, and the learner's probe log-probs."""
    outs = [(c.tokens, c.logprobs) for (c,) in engine.generate(greedy_requests(tok))]
    return outs, engine.probe_logprobs(probe_tokens(vocab_size))


def fetched_versions(work_dir: Path) -> list[str]:
    return sorted(p.name for p in work_dir.glob("*") if p.name.isdigit())


def test_three_broadcast_swaps_match_a_load_from_files(
    engine: Any,  # noqa: F811
    base_dir: Path,  # noqa: F811
    tokenizer: Any,  # noqa: F811
    client: WeightsClient,
    redis_client: redis.Redis,
    stream_settings: StreamSettings,
    tmp_path: Path,
) -> None:
    learner = Learner(client, Layout.of(variant(base_dir, 0).state_dict()))
    try:
        follower = replica(engine, base_dir, client, redis_client, stream_settings, tmp_path / "r")
        run_until(follower, lambda: learner.hub.members() == 1)
        for version, seed in enumerate((11, 12, 13)):
            model = variant(base_dir, seed)
            learner.sink(snapshot(model, version))
            run_until(follower, lambda v=version: follower.swapper.version == v)
            outcome = follower.outcomes[-1]
            assert (outcome.version, outcome.accepted, outcome.source) == (
                version,
                True,
                "broadcast",
            ), follower.outcomes
            assert_engine_matches(engine, model, tokenizer)  # = transformers on these weights
            by_broadcast = served(engine, tokenizer, model.config.vocab_size)
            # The same version loaded from the store's files gives the very same numbers.
            engine.load_weights(client.fetch(version, tmp_path / "check"))
            assert served(engine, tokenizer, model.config.vocab_size) == by_broadcast
        # Every version came over the broadcast: the replica fetched nothing.
        assert fetched_versions(tmp_path / "r") == []
        assert [o.source for o in follower.outcomes] == ["broadcast"] * 3
    finally:
        learner.close()


def test_a_broadcast_failure_falls_back_to_the_store(
    engine: Any,  # noqa: F811
    base_dir: Path,  # noqa: F811
    tokenizer: Any,  # noqa: F811
    client: WeightsClient,
    redis_client: redis.Redis,
    stream_settings: StreamSettings,
    tmp_path: Path,
) -> None:
    learner = Learner(client, Layout.of(variant(base_dir, 0).state_dict()))
    follower = replica(engine, base_dir, client, redis_client, stream_settings, tmp_path / "r")
    try:
        run_until(follower, lambda: learner.hub.members() == 1)
        # 1. Weights that are not the ones the probe was taken on arrive over the wire:
        # the probe refuses them, the replica takes the version from the store.
        model = variant(base_dir, 21)
        snap = snapshot(model, 0)
        assert learner.hub.send(0, variant(base_dir, 22).state_dict(), probe_data(snap.probe)) == 1
        learner.store(snap)
        run_until(follower, lambda: follower.swapper.version == 0)
        assert [(o.source, o.accepted, o.reason) for o in follower.outcomes] == [
            ("broadcast", False, "probe mismatch"),
            ("store", True, "ok"),
        ]
        assert_engine_matches(engine, model, tokenizer)

        # 2. The learner's group goes away (its process died): the next version comes
        # from the store; a new learner registers and the replica joins it again.
        learner.close()
        model = variant(base_dir, 23)
        learner.store(snapshot(model, 1))
        run_until(follower, lambda: follower.swapper.version == 1)
        assert follower.outcomes[-1].source == "store"
        assert_engine_matches(engine, model, tokenizer)
        learner = Learner(client, Layout.of(model.state_dict()))
        run_until(follower, lambda: learner.hub.members() == 1, timeout_s=3 * TIMEOUT_S + 30)
        model = variant(base_dir, 24)
        learner.sink(snapshot(model, 2))
        run_until(follower, lambda: follower.swapper.version == 2)
        assert (follower.outcomes[-1].source, follower.outcomes[-1].accepted) == (
            "broadcast",
            True,
        )
        assert_engine_matches(engine, model, tokenizer)
    finally:
        learner.close()


def test_a_late_joiner_gets_the_current_version_from_the_store(
    engine: Any,  # noqa: F811
    base_dir: Path,  # noqa: F811
    tokenizer: Any,  # noqa: F811
    client: WeightsClient,
    redis_client: redis.Redis,
    stream_settings: StreamSettings,
    tmp_path: Path,
) -> None:
    learner = Learner(client, Layout.of(variant(base_dir, 0).state_dict()))
    try:
        for version, seed in enumerate((31, 32)):  # broadcast to nobody, stored
            learner.sink(snapshot(variant(base_dir, seed), version))
        follower = replica(engine, base_dir, client, redis_client, stream_settings, tmp_path / "r")
        run_until(follower, lambda: follower.swapper.version == 1)
        assert [(o.version, o.source) for o in follower.outcomes] == [(1, "store")]
        assert_engine_matches(engine, variant(base_dir, 32), tokenizer)
        run_until(follower, lambda: learner.hub.members() == 1)
        model = variant(base_dir, 33)
        learner.sink(snapshot(model, 2))
        run_until(follower, lambda: follower.swapper.version == 2)
        assert (follower.outcomes[-1].version, follower.outcomes[-1].source) == (2, "broadcast")
        assert_engine_matches(engine, model, tokenizer)
    finally:
        learner.close()


def test_two_replicas_receive_every_version(
    engine: Any,  # noqa: F811
    base_dir: Path,  # noqa: F811
    tokenizer: Any,  # noqa: F811
    client: WeightsClient,
    redis_client: redis.Redis,
    stream_settings: StreamSettings,
    tmp_path: Path,
) -> None:
    from asympo.engines.vllm_engine import VLLMEngine

    second = VLLMEngine(str(base_dir), dtype="float32", max_model_len=256, kv_cache_gib=0.25)
    learner = Learner(client, Layout.of(variant(base_dir, 0).state_dict()))
    try:
        followers = [
            replica(e, base_dir, client, redis_client, stream_settings, tmp_path / f"r{i}")
            for i, e in enumerate((engine, second))
        ]

        def all_until(done: Callable[[], bool]) -> None:
            deadline = time.monotonic() + 180
            while not done():
                assert time.monotonic() < deadline, [f.outcomes for f in followers]
                for f in followers:
                    f.step(block_ms=20)

        all_until(lambda: learner.hub.members() == 2)
        for version, seed in enumerate((41, 42, 43)):
            model = variant(base_dir, seed)
            learner.sink(snapshot(model, version))
            all_until(lambda v=version: all(f.swapper.version == v for f in followers))
            for f, e in zip(followers, (engine, second), strict=True):
                assert (f.outcomes[-1].accepted, f.outcomes[-1].source) == (True, "broadcast")
                assert_engine_matches(e, model, tokenizer)
        for i in range(2):
            assert fetched_versions(tmp_path / f"r{i}") == []
    finally:
        learner.close()
        second.close()


def test_stale_receive_buffers_are_refused_not_served(engine: Any) -> None:  # noqa: F811
    # A version the workers no longer hold (never received, or overwritten) fails to
    # load with a clear error instead of loading whatever the buffers contain.
    from asympo.engines.base import EngineError

    with pytest.raises(EngineError, match="no longer staged"):
        engine.load_broadcast(10**6)
