"""Hostile input on every gRPC method: a clear status, a live server, never a crash or hang.

Property-based (hypothesis) sweep over the real services, run in-process on free ports:
``Weights`` (Publish / Fetch / Latest / Watch, real store on disk) and ``Reward.Score``
(real verifier pool). Each method gets undecodable bytes and messages of other types
(sent through raw channels with identity serializers, so the server sees the bytes as
they are), well-typed messages with negative or absurd numbers, unknown versions,
unknown or dangerous verifier names, and messages over the size limit. Every call
carries a deadline; an answer must be OK or one of the client-error statuses below.
After each sweep the server still answers a valid request and its health check.

Not covered here: ``Rollout.Generate`` (needs the rollout service's engine package,
which does not import yet) and the learner (it serves HTTP only, no gRPC).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import torch
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asympo.config import Settings
from asympo.transport.serving import GrpcOptions, GrpcServer, bearer_metadata
from asympo.transport.weight_store import MAX_VERSION
from asympo.transport.weights_client import WeightsClient
from asympo.v1 import learner_pb2, records_pb2, reward_pb2, reward_pb2_grpc, weights_pb2
from asympo.verifiers import VerifierPool
from services.reward.server import SERVICE_NAME as REWARD_SERVICE
from services.reward.server import RewardServicer
from services.weights.server import WeightsService

TOKEN = "hostile-test-token"
MAX_MESSAGE_BYTES = 64 * 1024
DEADLINE_S = 10.0
# A Watch that is valid waits for new versions: cut it short, that wait is its contract.
WATCH_DEADLINE_S = 0.3

# What a caller's mistake may be answered with. INTERNAL / UNKNOWN (an unhandled
# exception), UNAVAILABLE (a dead server) and DEADLINE_EXCEEDED (a hang) are failures.
CLIENT_ERRORS = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.FAILED_PRECONDITION,
    }
)
# Publish also verifies the bytes it was sent against the manifest's sha256.
PUBLISH_ERRORS = CLIENT_ERRORS | {grpc.StatusCode.DATA_LOSS}

SWEEP = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

int64 = st.integers(-(2**63), 2**63 - 1)
int32 = st.integers(-(2**31), 2**31 - 1)
absurd_int64 = st.one_of(
    int64, st.sampled_from([-(2**63), -2, -1, 0, 1, MAX_VERSION, MAX_VERSION + 1, 2**63 - 1])
)
names = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["", "..", "../../etc/passwd", "/etc/passwd", "a/b", "\x00", "x" * 300]),
)
other_messages: st.SearchStrategy[Message] = st.one_of(
    st.builds(learner_pb2.LearnerStatus, version=int64, loss=st.text(max_size=20)),
    st.builds(records_pb2.PromptTask, prompt_id=st.text(max_size=20), num_samples=int32),
    st.builds(reward_pb2.ScoreItem, verifier=st.text(max_size=10), response=st.text(max_size=10)),
    st.builds(weights_pb2.FetchRequest, version=int64, shard=st.text(max_size=10)),
)
hostile_bytes = st.one_of(
    st.binary(max_size=512), other_messages.map(lambda m: m.SerializeToString())
)


def _identity(data: bytes) -> bytes:
    return data


@dataclass
class Outcome:
    """How one call ended: its status and, when OK, the responses it produced."""

    code: grpc.StatusCode
    details: str
    responses: list[bytes]


def call_raw(
    channel: grpc.Channel,
    method: str,
    kind: str,
    payload: bytes | list[bytes],
    metadata: tuple[tuple[str, str], ...] = (),
    timeout: float = DEADLINE_S,
) -> Outcome:
    """Call ``method`` with raw request bytes; ``kind`` is unary_unary/unary_stream/stream_unary."""
    try:
        if kind == "unary_unary":
            fn = channel.unary_unary(
                method, request_serializer=_identity, response_deserializer=_identity
            )
            responses = [fn(payload, timeout=timeout, metadata=metadata)]
        elif kind == "unary_stream":
            stream_fn = channel.unary_stream(
                method, request_serializer=_identity, response_deserializer=_identity
            )
            responses = list(stream_fn(payload, timeout=timeout, metadata=metadata))
        else:
            upload = channel.stream_unary(
                method, request_serializer=_identity, response_deserializer=_identity
            )
            chunks = payload if isinstance(payload, list) else [payload]
            responses = [upload(iter(chunks), timeout=timeout, metadata=metadata)]
    except grpc.RpcError as err:
        return Outcome(err.code(), err.details() or "", [])
    return Outcome(grpc.StatusCode.OK, "", responses)


def assert_clear(outcome: Outcome, allowed: frozenset[grpc.StatusCode] = CLIENT_ERRORS) -> None:
    """OK, or a client-error status that says what was wrong."""
    if outcome.code == grpc.StatusCode.OK:
        return
    assert outcome.code in allowed, f"{outcome.code}: {outcome.details}"
    assert outcome.details.strip(), f"{outcome.code} without a message"


def assert_serving(channel: grpc.Channel, service: str, valid_call: Callable[[], None]) -> None:
    """The server still answers its health check and a valid request."""
    health = health_pb2_grpc.HealthStub(channel)
    for name in ("", service):
        reply = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=DEADLINE_S)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    valid_call()


# ---------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------

WEIGHTS_METHODS = {
    "/asympo.v1.Weights/Publish": "stream_unary",
    "/asympo.v1.Weights/Fetch": "unary_stream",
    "/asympo.v1.Weights/Latest": "unary_unary",
    "/asympo.v1.Weights/Watch": "unary_stream",
}


@dataclass
class WeightsUnderTest:
    """A running weights service with version 0 published, and a client channel."""

    service: WeightsService
    client: WeightsClient
    manifest: records_pb2.WeightsManifest

    @property
    def channel(self) -> grpc.Channel:
        """The client's channel (plaintext, token-less unless metadata is passed)."""
        return self.client.channel

    def check_alive(self) -> None:
        """Health SERVING, and the published version still fetches and verifies."""

        def valid() -> None:
            latest = self.client.latest()
            assert latest is not None and latest.version >= 0
            first = call_raw(
                self.channel,
                "/asympo.v1.Weights/Fetch",
                "unary_stream",
                weights_pb2.FetchRequest(version=0).SerializeToString(),
            )
            assert first.code == grpc.StatusCode.OK, first.details
            chunk = weights_pb2.FetchChunk.FromString(first.responses[0])
            assert chunk.manifest == self.manifest

        assert_serving(self.channel, "asympo.v1.Weights", valid)


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WeightsUnderTest]:
    store = Path(tmp_path_factory.mktemp("hostile-weights"))
    cfg = Settings(
        weights={"store_dir": str(store), "publish_token": TOKEN},  # type: ignore[arg-type]
        grpc_max_message_bytes=MAX_MESSAGE_BYTES,
    )
    service = WeightsService(cfg, grpc_port=0, http_port=0).start()
    client = WeightsClient(
        f"127.0.0.1:{service.grpc_port}",
        token=TOKEN,
        chunk_bytes=4096,
        max_message_bytes=MAX_MESSAGE_BYTES,
    )
    state = {"w": torch.arange(16, dtype=torch.float32).reshape(4, 4)}
    manifest = client.publish_state_dict(state, version=0)
    yield WeightsUnderTest(service, client, manifest)
    client.close()
    service.stop(grace=0.5)


@SWEEP
@given(method=st.sampled_from(sorted(WEIGHTS_METHODS)), payload=hostile_bytes)
def test_weights_undecodable_or_mistyped_bytes(
    weights: WeightsUnderTest, method: str, payload: bytes
) -> None:
    kind = WEIGHTS_METHODS[method]
    timeout = WATCH_DEADLINE_S if method.endswith("/Watch") else DEADLINE_S
    outcome = call_raw(weights.channel, method, kind, payload, bearer_metadata(TOKEN), timeout)
    if method.endswith("/Watch") and outcome.code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return  # a well-formed subscription waiting for news
    assert_clear(outcome, PUBLISH_ERRORS if method.endswith("/Publish") else CLIENT_ERRORS)


@SWEEP
@given(
    version=absurd_int64,
    shard=st.one_of(st.just(""), st.just("model.safetensors"), names),
    offset=absurd_int64,
    chunk_bytes=st.one_of(int32, st.sampled_from([0, 1, 4096, MAX_MESSAGE_BYTES])),
)
def test_weights_fetch_absurd_fields(
    weights: WeightsUnderTest, version: int, shard: str, offset: int, chunk_bytes: int
) -> None:
    request = weights_pb2.FetchRequest(
        version=version, shard=shard, offset=offset, chunk_bytes=chunk_bytes
    )
    outcome = call_raw(
        weights.channel,
        "/asympo.v1.Weights/Fetch",
        "unary_stream",
        request.SerializeToString(),
    )
    assert_clear(outcome)
    if outcome.code == grpc.StatusCode.OK:
        # Only a real version with sane numbers streams: manifest first, bounded chunks.
        assert version in (-1, 0) and offset >= 0 and 0 <= chunk_bytes <= MAX_MESSAGE_BYTES
        first = weights_pb2.FetchChunk.FromString(outcome.responses[0])
        assert first.WhichOneof("kind") == "manifest"
    if not -1 <= version <= MAX_VERSION or offset < 0 or chunk_bytes < 0:
        assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT
    elif version > 0 and (not shard or shard == weights.manifest.shards[0].name):
        assert outcome.code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT)


@SWEEP
@given(after_version=absurd_int64)
def test_weights_watch_absurd_versions(weights: WeightsUnderTest, after_version: int) -> None:
    request = weights_pb2.WatchRequest(after_version=after_version).SerializeToString()
    outcome = call_raw(
        weights.channel, "/asympo.v1.Weights/Watch", "unary_stream", request, (), WATCH_DEADLINE_S
    )
    if -1 <= after_version <= MAX_VERSION:
        # Valid: announces version 0 if it is newer, else waits (cut short by the deadline).
        assert outcome.code in (grpc.StatusCode.OK, grpc.StatusCode.DEADLINE_EXCEEDED)
    else:
        assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT, outcome.details


shard_infos = st.builds(
    records_pb2.ShardInfo,
    name=st.one_of(st.just("model.safetensors"), names),
    size=absurd_int64,
    sha256=st.one_of(st.text(max_size=70), st.just("0" * 64)),
)
manifests = st.builds(
    records_pb2.WeightsManifest,
    version=absurd_int64,
    parent_version=absurd_int64,
    shards=st.lists(shard_infos, max_size=3),
    created_at=st.floats(allow_nan=True, allow_infinity=True),
)
shard_data = st.builds(
    weights_pb2.ShardData,
    shard=st.one_of(st.just("model.safetensors"), names),
    offset=absurd_int64,
    data=st.binary(max_size=256),
)
publish_streams = st.lists(
    st.one_of(
        manifests.map(lambda m: weights_pb2.PublishChunk(manifest=m)),
        shard_data.map(lambda d: weights_pb2.PublishChunk(data=d)),
        st.just(weights_pb2.PublishChunk()),
    ),
    max_size=4,
)


@SWEEP
@given(chunks=publish_streams, authorised=st.booleans())
def test_weights_publish_hostile_streams(
    weights: WeightsUnderTest, chunks: list[weights_pb2.PublishChunk], authorised: bool
) -> None:
    before = weights.service.store.versions()
    metadata = bearer_metadata(TOKEN) if authorised else bearer_metadata("not-the-token")
    outcome = call_raw(
        weights.channel,
        "/asympo.v1.Weights/Publish",
        "stream_unary",
        [c.SerializeToString() for c in chunks],
        metadata,
    )
    if not authorised:
        assert outcome.code == grpc.StatusCode.UNAUTHENTICATED
        assert weights.service.store.versions() == before
        return
    assert_clear(outcome, PUBLISH_ERRORS)
    if outcome.code != grpc.StatusCode.OK:
        # A refused publish leaves nothing visible behind.
        assert weights.service.store.versions() == before


def test_weights_oversized_messages_and_still_serving(weights: WeightsUnderTest) -> None:
    too_big = b"\x0a" + b"\xff" * (MAX_MESSAGE_BYTES + 10)
    for method, kind in WEIGHTS_METHODS.items():
        outcome = call_raw(weights.channel, method, kind, too_big, bearer_metadata(TOKEN))
        assert outcome.code == grpc.StatusCode.RESOURCE_EXHAUSTED, (method, outcome)
    weights.check_alive()


# ---------------------------------------------------------------------------------------
# Reward
# ---------------------------------------------------------------------------------------

SCORE = "/asympo.v1.Reward/Score"
BUILTIN_VERIFIERS = ["math", "gsm8k", "exact"]
# Names that must never resolve from a request: they would run code of the caller's choice.
DANGEROUS_VERIFIERS = ["os:popen", "os:system", "builtins:eval", "subprocess:getoutput"]


@dataclass
class RewardUnderTest:
    """A Reward gRPC server over a real verifier pool, and a plaintext channel to it."""

    server: GrpcServer
    channel: grpc.Channel

    def check_alive(self) -> None:
        """Health SERVING and a valid Score still scores."""

        def valid() -> None:
            stub = reward_pb2_grpc.RewardStub(self.channel)
            reply = stub.Score(
                reward_pb2.ScoreRequest(
                    items=[
                        reward_pb2.ScoreItem(
                            verifier="gsm8k", reference_answer="#### 7", response="#### 7"
                        )
                    ]
                ),
                timeout=DEADLINE_S,
            )
            assert [s.reward for s in reply.scores] == [1.0]

        assert_serving(self.channel, REWARD_SERVICE, valid)


@pytest.fixture(scope="module")
def reward() -> Iterator[RewardUnderTest]:
    pool = VerifierPool(size=1, time_limit_s=2.0)
    server = GrpcServer(
        GrpcOptions("127.0.0.1", 0, max_message_bytes=MAX_MESSAGE_BYTES),
        services=[REWARD_SERVICE],
    )
    reward_pb2_grpc.add_RewardServicer_to_server(RewardServicer(pool), server.server)
    port = server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield RewardUnderTest(server, channel)
    channel.close()
    server.stop(grace=0.5)
    pool.close()


@SWEEP
@given(payload=hostile_bytes)
def test_reward_undecodable_or_mistyped_bytes(reward: RewardUnderTest, payload: bytes) -> None:
    assert_clear(call_raw(reward.channel, SCORE, "unary_unary", payload))


score_items = st.builds(
    reward_pb2.ScoreItem,
    verifier=st.one_of(
        st.sampled_from(BUILTIN_VERIFIERS + DANGEROUS_VERIFIERS), st.text(max_size=20)
    ),
    reference_answer=st.one_of(st.text(max_size=40), st.sampled_from(["r", "#### 3", "1/0"])),
    response=st.one_of(
        st.text(max_size=80),
        st.sampled_from(["\\boxed{\\frac{1}{0}}", "#### 1e999999", "9" * 2000, "touch x"]),
    ),
)


@SWEEP
@given(items=st.lists(score_items, max_size=3))
def test_reward_score_hostile_items(
    reward: RewardUnderTest, items: list[reward_pb2.ScoreItem]
) -> None:
    request = reward_pb2.ScoreRequest(items=items)
    outcome = call_raw(reward.channel, SCORE, "unary_unary", request.SerializeToString())
    assert_clear(outcome)
    known = all(item.verifier in BUILTIN_VERIFIERS for item in items)
    if known:
        assert outcome.code == grpc.StatusCode.OK, outcome.details
        reply = reward_pb2.ScoreReply.FromString(outcome.responses[0])
        assert len(reply.scores) == len(items)
        assert all(math.isfinite(s.reward) and 0.0 <= s.reward <= 1.0 for s in reply.scores)
    else:
        # Checked in order: the first unusable item decides (empty name, then unknown name).
        first_bad = next(i for i in items if i.verifier not in BUILTIN_VERIFIERS)
        expected = (
            grpc.StatusCode.NOT_FOUND if first_bad.verifier else grpc.StatusCode.INVALID_ARGUMENT
        )
        assert outcome.code == expected, outcome.details


def test_reward_limits_and_still_serving(reward: RewardUnderTest) -> None:
    stub = reward_pb2_grpc.RewardStub(reward.channel)
    many = reward_pb2.ScoreRequest(items=[reward_pb2.ScoreItem(verifier="exact")] * 5000)
    with pytest.raises(grpc.RpcError) as err:
        stub.Score(many, timeout=DEADLINE_S)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    huge = reward_pb2.ScoreRequest(
        items=[reward_pb2.ScoreItem(verifier="exact", response="x" * (MAX_MESSAGE_BYTES + 1))]
    )
    with pytest.raises(grpc.RpcError) as err:
        stub.Score(huge, timeout=DEADLINE_S)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    reward.check_alive()


def test_weights_still_serving_after_every_sweep(weights: WeightsUnderTest) -> None:
    weights.check_alive()
