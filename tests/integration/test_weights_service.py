"""The weights service end to end over real gRPC (in-process) and as `asympo serve weights`."""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import httpx
import hypothesis
import pytest
import redis
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import strategies as st
from safetensors.torch import load_file
from transformers import Qwen2Config, Qwen2ForCausalLM

from asympo.config import Settings, StreamSettings
from asympo.transport.redis_conn import connect
from asympo.transport.streams import decode
from asympo.transport.weight_store import file_sha256, manifest_to_json, version_dirname
from asympo.transport.weights_client import (
    PARTIAL_MANIFEST_NAME,
    PublishRejected,
    WeightsClient,
    WeightsClientError,
    WeightsIntegrityError,
    WeightsNotFound,
    build_manifest,
    link_shared,
    open_shared,
    write_shards,
)
from asympo.v1 import records_pb2, weights_pb2, weights_pb2_grpc
from services.weights import metrics
from services.weights.server import StreamAnnouncer, WeightsService

TOKEN = "test-publish-token"


def tiny_qwen2(seed: int = 0) -> Qwen2ForCausalLM:
    """A real (random-init) Qwen2 model, small enough to build in a test."""
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    return Qwen2ForCausalLM(config)


def make_settings(tmp_path: Path, run_id: str = "default", keep_last: int = 3) -> Settings:
    return Settings(
        weights={  # type: ignore[arg-type]
            "store_dir": str(tmp_path / "store"),
            "publish_token": TOKEN,
            "keep_last": keep_last,
            "chunk_bytes": 64 * 1024,
            "max_publish_bytes": 64 << 20,
        },
        streams={"run_id": run_id},  # type: ignore[arg-type]
    )


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
    with WeightsClient(f"127.0.0.1:{service.grpc_port}", token=TOKEN, chunk_bytes=64 * 1024) as c:
        yield c


def small_state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(64, 64, generator=g), "b": torch.randn(64, generator=g)}


def test_publish_fetch_real_model_bit_identical(
    service: WeightsService,
    client: WeightsClient,
    tmp_path: Path,
    redis_client: redis.Redis,
    stream_settings: StreamSettings,
) -> None:
    model = tiny_qwen2().to(torch.bfloat16)
    probe = records_pb2.Probe(tokens=[1, 2, 3], logprobs=[-0.5, -1.25], tolerance=1e-3)
    sent = client.publish_state_dict(
        model.state_dict(), version=0, probe=probe, metadata={"step": "0"}, max_shard_bytes=100_000
    )
    assert len(sent.shards) > 1
    assert sent.dtypes["model.embed_tokens.weight"] == "BF16"
    path = client.fetch(0, tmp_path / "rollout")
    assert path == tmp_path / "rollout" / version_dirname(0)
    fetched: dict[str, torch.Tensor] = {}
    for shard in sorted(path.glob("*.safetensors")):
        fetched.update(load_file(shard))
    expected = model.state_dict()
    assert set(fetched) == set(expected)
    for name, tensor in expected.items():
        assert fetched[name].dtype == tensor.dtype
        assert torch.equal(fetched[name].view(torch.int16), tensor.view(torch.int16)), name
    # A saved HF directory publishes byte for byte.
    saved = tmp_path / "hf"
    tiny_qwen2(seed=1).save_pretrained(saved)
    client.publish_dir(saved, version=1, parent_version=0, probe=probe)
    out = client.fetch(-1, tmp_path / "rollout")
    assert (out / "model.safetensors").read_bytes() == (saved / "model.safetensors").read_bytes()
    latest = client.latest()
    assert latest is not None and latest.version == 1 and latest.parent_version == 0
    assert list(latest.probe.logprobs) == [-0.5, -1.25]
    # A resumed learner re-publishing an older version it already published (same bytes):
    # accepted, but not announced again, so watchers never see versions go backwards.
    client.publish_state_dict(
        model.state_dict(), version=0, probe=probe, metadata={"step": "0"}, max_shard_bytes=100_000
    )
    # Announced on the run's weights stream and on Watch.
    entries = redis_client.xrange(stream_settings.key(stream_settings.weights))
    announced = [decode(f, records_pb2.VersionAnnouncement) for _, f in entries]
    assert [a.version for a in announced] == [0, 1]
    assert announced[1].manifest.shards[0].sha256 == latest.shards[0].sha256
    seen = [a.version for a in client.watch(after_version=-1, timeout_s=1.0)]
    assert seen == [0, 1]
    # Fetching again is free: the verified local copy is reused.
    assert client.fetch_into(1, tmp_path / "rollout").bytes_received == 0


def test_corrupted_shard_detected_and_live_version_stays(
    service: WeightsService, client: WeightsClient, tmp_path: Path
) -> None:
    dest = tmp_path / "rollout"
    client.publish_state_dict(small_state(0), version=1)
    live = client.fetch(1, dest)
    live_bytes = {p.name: p.read_bytes() for p in live.iterdir()}
    client.publish_state_dict(small_state(1), version=2, parent_version=1)
    shard = next(service.store.path(2).glob("*.safetensors"))
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0x40
    shard.write_bytes(bytes(raw))
    os.utime(shard, ns=(1, 1))  # a rewrite changes mtime; do not depend on the clock tick
    before = metrics.INTEGRITY_ERRORS._value.get()
    with pytest.raises(WeightsIntegrityError, match="corrupted"):
        client.fetch(2, dest)
    assert metrics.INTEGRITY_ERRORS._value.get() == before + 1
    assert sorted(p.name for p in dest.iterdir() if not p.name.startswith(".")) == [
        version_dirname(1)
    ]
    assert {p.name: p.read_bytes() for p in live.iterdir()} == live_bytes
    # Bytes corrupted in flight are refused at publish time; the latest stays what it was.
    src = tmp_path / "src"
    src.mkdir()
    write_shards(small_state(3), src)
    manifest = build_manifest(sorted(src.glob("*.safetensors")), version=3, parent_version=2)
    manifest.shards[0].blake3 = "0" * 64
    with pytest.raises(PublishRejected, match="DATA_LOSS"):
        client.publish_manifest(manifest, src)
    latest = client.latest()
    assert latest is not None and latest.version == 2


def test_manifests_with_sha256_only_still_publish_and_fetch_verified(
    service: WeightsService, client: WeightsClient, tmp_path: Path
) -> None:
    # Versions stored before BLAKE3 carry a sha256 per shard: they stay readable.
    src = tmp_path / "src"
    src.mkdir()
    paths = write_shards(small_state(4), src)
    manifest = build_manifest(paths, version=1)
    assert all(s.blake3 and not s.sha256 for s in manifest.shards)
    for info, path in zip(manifest.shards, paths, strict=True):
        info.blake3 = ""
        info.sha256 = file_sha256(path)
    client.publish_manifest(manifest, src)
    fetched = client.fetch(1, tmp_path / "dest")
    assert (fetched / paths[0].name).read_bytes() == paths[0].read_bytes()
    manifest.version, manifest.shards[0].sha256 = 2, "0" * 64
    with pytest.raises(PublishRejected, match="DATA_LOSS"):
        client.publish_manifest(manifest, src)


def test_parallel_fetch_of_several_shards_is_bit_identical(
    service: WeightsService, client: WeightsClient, tmp_path: Path
) -> None:
    state = {f"t{i}": torch.randn(3000) for i in range(5)}
    client.publish_state_dict(state, version=1, max_shard_bytes=13_000)  # one shard each
    assert len(service.store.manifest(1).shards) == 5
    with WeightsClient(
        f"127.0.0.1:{service.grpc_port}", chunk_bytes=4096, parallel_streams=3
    ) as parallel:
        result = parallel.fetch_into(1, tmp_path / "dest")
    assert result.bytes_received == sum(s.size for s in result.manifest.shards)
    for info in result.manifest.shards:
        assert (result.path / info.name).read_bytes() == (
            service.store.path(1) / info.name
        ).read_bytes()
    loaded: dict[str, torch.Tensor] = {}
    for info in result.manifest.shards:
        loaded.update(load_file(str(result.path / info.name)))
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


def test_shared_volume_opens_a_stored_version_in_place_or_not_at_all(
    service: WeightsService, client: WeightsClient
) -> None:
    root = service.store.root
    assert open_shared(root, 1) is None  # not published
    client.publish_state_dict(small_state(5), version=1)
    opened = open_shared(root, 1)
    assert opened is not None and opened.path == service.store.path(1)
    assert opened.bytes_received == 0 and opened.manifest == service.store.manifest(1)
    loaded = load_file(str(opened.path / opened.manifest.shards[0].name))
    assert all(torch.equal(loaded[k], v) for k, v in small_state(5).items())
    shard = opened.path / opened.manifest.shards[0].name
    with shard.open("ab") as f:  # a shard that is not the declared size is not used
        f.write(b"x")
    assert open_shared(root, 1) is None


def test_linked_shared_version_outlives_the_store_retention(
    service: WeightsService, client: WeightsClient, tmp_path: Path
) -> None:
    """A replica's hard links to the version it serves survive the store deleting it."""
    client.publish_state_dict(small_state(5), version=1)
    opened = open_shared(service.store.root, 1)
    assert opened is not None
    linked = link_shared(opened, tmp_path / "rollout")
    assert linked is not None and linked.path != opened.path and linked.bytes_received == 0
    shard = linked.manifest.shards[0].name
    assert (linked.path / shard).stat().st_ino == (opened.path / shard).stat().st_ino
    for v in range(2, 2 + service.store.keep_last):  # enough newer versions to retire v1
        client.publish_state_dict(small_state(v), version=v)
    service.store.prune()
    assert open_shared(service.store.root, 1) is None  # gone from the store ...
    loaded = load_file(str(linked.path / shard))  # ... and still whole for the replica
    assert all(torch.equal(loaded[k], v) for k, v in small_state(5).items())
    assert link_shared(opened, tmp_path / "rollout") is not None  # again: already linked


def test_interrupted_publish_never_visible_and_concurrent_fetches_see_complete_versions(
    service: WeightsService, client: WeightsClient, tmp_path: Path
) -> None:
    client.publish_state_dict(small_state(0), version=1)
    src = tmp_path / "src"
    src.mkdir()
    write_shards(small_state(1), src)
    manifest = build_manifest(sorted(src.glob("*.safetensors")), version=2, parent_version=1)
    data = (src / manifest.shards[0].name).read_bytes()
    half = len(data) // 2
    stub = weights_pb2_grpc.WeightsStub(client.channel)
    metadata = (("authorization", f"Bearer {TOKEN}"),)

    def half_then_die() -> Iterator[weights_pb2.PublishChunk]:
        yield weights_pb2.PublishChunk(manifest=manifest)
        yield weights_pb2.PublishChunk(
            data=weights_pb2.ShardData(shard=manifest.shards[0].name, offset=0, data=data[:half])
        )
        raise ConnectionError("publisher crashed")

    with pytest.raises((grpc.RpcError, ConnectionError)):
        stub.Publish(half_then_die(), metadata=metadata)
    # A stream that just ends early is refused too.
    with pytest.raises(grpc.RpcError) as err:
        stub.Publish(itertools.islice(half_then_die(), 2), metadata=metadata)
    assert err.value.code() == grpc.StatusCode.DATA_LOSS
    assert service.store.versions() == [1]

    # A slow publish of version 2 while readers keep fetching "latest".
    release = threading.Event()

    def slow() -> Iterator[weights_pb2.PublishChunk]:
        yield weights_pb2.PublishChunk(manifest=manifest)
        step = 4096
        for offset in range(0, len(data), step):
            if offset >= half:
                release.wait(10)
            yield weights_pb2.PublishChunk(
                data=weights_pb2.ShardData(
                    shard=manifest.shards[0].name, offset=offset, data=data[offset : offset + step]
                )
            )

    publisher = threading.Thread(target=lambda: stub.Publish(slow(), metadata=metadata))
    publisher.start()
    seen: list[int] = []
    errors: list[BaseException] = []

    def reader(i: int) -> None:
        try:
            with WeightsClient(f"127.0.0.1:{service.grpc_port}") as reader_client:
                for round_ in range(6):
                    result = reader_client.fetch_into(-1, tmp_path / f"reader{i}-{round_}")
                    seen.append(result.manifest.version)
                    if round_ == 2:
                        release.set()
                        publisher.join(10)
        except BaseException as exc:
            errors.append(exc)

    readers = [threading.Thread(target=reader, args=(i,)) for i in range(3)]
    for t in readers:
        t.start()
    for t in readers:
        t.join(30)
    publisher.join(10)
    assert not errors, errors
    assert set(seen) <= {1, 2} and 1 in seen and 2 in seen
    assert service.store.versions() == [1, 2]


def test_unauthorised_publish_rejected(service: WeightsService, tmp_path: Path) -> None:
    target = f"127.0.0.1:{service.grpc_port}"
    for token, message in [("", "missing"), ("wrong", "invalid bearer token")]:
        with WeightsClient(target, token=token) as c, pytest.raises(PublishRejected) as err:
            c.publish_state_dict(small_state(0), version=0)
        assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
        assert message in str(err.value)
    assert service.store.versions() == []


def test_broadcast_rendezvous_needs_the_token_and_keeps_the_newest(
    service: WeightsService, client: WeightsClient
) -> None:
    target = f"127.0.0.1:{service.grpc_port}"
    assert client.broadcast_endpoint() is None  # no learner has registered yet
    with WeightsClient(target, token="wrong") as intruder, pytest.raises(WeightsClientError) as e:
        intruder.register_broadcast("10.0.0.9", 29600, "evil")
    assert e.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert client.broadcast_endpoint() is None
    client.register_broadcast("10.0.0.1", 29600, "first")
    client.register_broadcast("10.0.0.2", 29601, "second")  # a restarted learner
    endpoint = client.broadcast_endpoint()
    assert endpoint is not None
    assert (endpoint.host, endpoint.port, endpoint.epoch) == ("10.0.0.2", 29601, "second")
    with pytest.raises(WeightsClientError) as e:
        client.register_broadcast("", 0, "bad")
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_retention_spares_pinned_and_in_use_versions(
    service: WeightsService, client: WeightsClient
) -> None:
    # Version 0 is larger than gRPC's flow-control window, so its fetch stays open.
    client.publish_state_dict({"w": torch.randn(4 << 20)}, version=0)
    for v in range(1, 3):
        client.publish_state_dict(small_state(v), version=v, parent_version=v - 1)
    service.store.pin(1)
    stub = weights_pb2_grpc.WeightsStub(client.channel)
    # A fetch of version 0 in progress (one chunk read) holds it against retention.
    fetching = stub.Fetch(weights_pb2.FetchRequest(version=0, chunk_bytes=4096))
    first = next(fetching)
    assert first.manifest.version == 0
    next(fetching)
    for v in range(3, 6):
        client.publish_state_dict(small_state(v), version=v, parent_version=v - 1)
    assert service.store.versions() == [0, 1, 3, 4, 5]
    rest = list(fetching)  # the held version is still served completely
    assert sum(len(c.data.data) for c in rest) > 0
    deadline = time.monotonic() + 5
    client.publish_state_dict(small_state(6), version=6, parent_version=5)
    while 0 in service.store.versions() and time.monotonic() < deadline:
        time.sleep(0.05)
        service.store.prune()
    assert service.store.versions() == [1, 4, 5, 6]
    with pytest.raises(WeightsNotFound):
        client.fetch(0, "/nonexistent-never-created")


def test_fetch_resumes_a_partial_shard(
    service: WeightsService, client: WeightsClient, tmp_path: Path
) -> None:
    manifest = client.publish_state_dict(small_state(0), version=0)
    shard = manifest.shards[0]
    dest = tmp_path / "rollout"
    partial = dest / f".partial-{version_dirname(0)}"
    partial.mkdir(parents=True)
    source = service.store.path(0) / shard.name
    (partial / shard.name).write_bytes(source.read_bytes()[:5000])
    (partial / PARTIAL_MANIFEST_NAME).write_text(manifest_to_json(manifest))
    result = client.fetch_into(0, dest)
    assert result.bytes_received == shard.size - 5000
    assert (result.path / shard.name).read_bytes() == source.read_bytes()
    assert not partial.exists()
    # A partial file with wrong bytes ends in an integrity error, not in a wrong model.
    partial.mkdir()
    (partial / shard.name).write_bytes(b"\0" * 5000)
    (partial / PARTIAL_MANIFEST_NAME).write_text(manifest_to_json(manifest))
    shutil.rmtree(result.path)
    with pytest.raises(WeightsIntegrityError, match="blake3"):
        client.fetch(0, dest)
    assert client.fetch(0, dest) == result.path  # the bad partial was thrown away


def test_hostile_requests_get_clear_statuses(
    service: WeightsService, client: WeightsClient
) -> None:
    stub = weights_pb2_grpc.WeightsStub(client.channel)
    with pytest.raises(grpc.RpcError) as err:
        stub.Latest(weights_pb2.LatestRequest())
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    manifest = client.publish_state_dict(small_state(0), version=0)
    shard = manifest.shards[0].name

    def fetch_status(**kw: object) -> grpc.StatusCode:
        with pytest.raises(grpc.RpcError) as e:
            list(stub.Fetch(weights_pb2.FetchRequest(**kw)))  # type: ignore[arg-type]
        return e.value.code()  # type: ignore[no-any-return]

    assert fetch_status(version=-5) == grpc.StatusCode.INVALID_ARGUMENT
    assert fetch_status(version=2**62) == grpc.StatusCode.INVALID_ARGUMENT
    assert fetch_status(version=99) == grpc.StatusCode.NOT_FOUND
    assert fetch_status(version=0, shard=shard, offset=-1) == grpc.StatusCode.INVALID_ARGUMENT
    assert fetch_status(version=0, shard=shard, offset=1 << 40) == grpc.StatusCode.OUT_OF_RANGE
    assert fetch_status(version=0, offset=10) == grpc.StatusCode.INVALID_ARGUMENT
    assert fetch_status(version=0, shard="nope.safetensors") == grpc.StatusCode.NOT_FOUND
    assert fetch_status(version=0, chunk_bytes=-1) == grpc.StatusCode.INVALID_ARGUMENT
    assert fetch_status(version=0, chunk_bytes=2**31 - 1) == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Watch(weights_pb2.WatchRequest(after_version=-7)))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    metadata = (("authorization", f"Bearer {TOKEN}"),)

    def publish_status(*chunks: weights_pb2.PublishChunk) -> grpc.StatusCode:
        with pytest.raises(grpc.RpcError) as e:
            stub.Publish(iter(chunks), metadata=metadata)
        return e.value.code()  # type: ignore[no-any-return]

    data_first = weights_pb2.PublishChunk(data=weights_pb2.ShardData(shard=shard, data=b"x"))
    assert publish_status() == grpc.StatusCode.INVALID_ARGUMENT
    assert publish_status(data_first) == grpc.StatusCode.INVALID_ARGUMENT
    bad = records_pb2.WeightsManifest()
    bad.CopyFrom(manifest)
    bad.version = 1
    bad.shards[0].name = "../../etc/passwd.safetensors"
    assert publish_status(weights_pb2.PublishChunk(manifest=bad)) == (
        grpc.StatusCode.INVALID_ARGUMENT
    )
    bad.shards[0].name = shard
    bad.shards[0].size = 1 << 40
    assert publish_status(weights_pb2.PublishChunk(manifest=bad)) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED
    )
    stale = records_pb2.WeightsManifest()
    stale.CopyFrom(manifest)
    stale.shards[0].blake3 = "1" * 64
    assert publish_status(weights_pb2.PublishChunk(manifest=stale)) == (
        grpc.StatusCode.ALREADY_EXISTS
    )
    huge = weights_pb2.PublishChunk(
        data=weights_pb2.ShardData(shard=shard, data=b"\0" * (65 << 20))
    )
    good = records_pb2.WeightsManifest()
    good.CopyFrom(manifest)
    good.version = 1
    assert publish_status(weights_pb2.PublishChunk(manifest=good), huge) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED
    )
    assert service.store.versions() == [0]
    assert client.latest() is not None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_asympo_serve_weights_as_a_process(
    tmp_path: Path, redis_url: str, stream_settings: StreamSettings, redis_client: redis.Redis
) -> None:
    grpc_port, http_port = _free_port(), _free_port()
    env = {
        **os.environ,
        "REDIS_URL": redis_url,
        "ASYMPO_WEIGHTS__PUBLISH_TOKEN": TOKEN,
    }
    cmd = [
        str(Path(sys.executable).with_name("asympo")),
        "serve",
        "weights",
        "--set",
        f"weights.store_dir={tmp_path / 'store'}",
        "--set",
        f"weights.grpc_port={grpc_port}",
        "--set",
        f"weights.http_port={http_port}",
        "--set",
        f"streams.run_id={stream_settings.run_id}",
    ]
    log_path = tmp_path / "weights.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log_path.read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{http_port}/readyz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.2)
        with WeightsClient(f"127.0.0.1:{grpc_port}", token=TOKEN) as c:
            health = health_pb2_grpc.HealthStub(c.channel)
            reply = health.Check(health_pb2.HealthCheckRequest(service="asympo.v1.Weights"))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            c.publish_state_dict(small_state(0), version=7)
            path = c.fetch(7, tmp_path / "rollout")
            fetched = load_file(next(path.glob("*.safetensors")))
            assert torch.equal(fetched["w"], small_state(0)["w"])
        text = httpx.get(f"http://127.0.0.1:{http_port}/metrics").text
        assert "asympo_weights_latest_version 7.0" in text
        assert "asympo_weights_published_total 1.0" in text
        key = stream_settings.key(stream_settings.weights)
        assert redis_client.xlen(key) == 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0, log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


_ALLOWED = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.DATA_LOSS,
    grpc.StatusCode.UNAUTHENTICATED,
}
_i64 = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**63 - 1), st.integers(min_value=-3, max_value=3)
)
_names = st.one_of(
    st.sampled_from(["", "model-00001.safetensors", "../x.safetensors", "a" * 300]),
    st.text(max_size=20),
)


def _status(call: Callable[[], object]) -> grpc.StatusCode | None:
    try:
        result = call()
        if isinstance(result, Iterator):
            for _ in itertools.islice(result, 50):
                pass
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[no-any-return]
    return None


@hypothesis.settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[hypothesis.HealthCheck.function_scoped_fixture],
)
@hypothesis.given(
    version=_i64,
    shard=_names,
    offset=_i64,
    chunk=st.integers(min_value=-(2**31), max_value=2**31 - 1),
    after=_i64,
    size=_i64,
    sha=st.sampled_from(["", "0" * 64, "zz"]),
    garbage=st.binary(max_size=64),
)
def test_hostile_input_sweep_never_crashes_the_service(
    service: WeightsService,
    client: WeightsClient,
    version: int,
    shard: str,
    offset: int,
    chunk: int,
    after: int,
    size: int,
    sha: str,
    garbage: bytes,
) -> None:
    """Random field values on every method: a clear status (or success), never a crash."""
    if service.store.latest() is None:
        client.publish_state_dict(small_state(0), version=0)
    stub = weights_pb2_grpc.WeightsStub(client.channel)
    auth = (("authorization", f"Bearer {TOKEN}"),)
    fetch = weights_pb2.FetchRequest(version=version, shard=shard, offset=offset, chunk_bytes=chunk)
    assert _status(lambda: stub.Fetch(fetch, timeout=10)) in _ALLOWED | {None}
    watch = weights_pb2.WatchRequest(after_version=after)
    assert _status(lambda: stub.Watch(watch, timeout=0.1)) in _ALLOWED | {
        None,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    }
    manifest = records_pb2.WeightsManifest(version=version, parent_version=after)
    manifest.shards.add(name=shard, sha256=sha, size=size)
    chunks = [
        weights_pb2.PublishChunk(manifest=manifest),
        weights_pb2.PublishChunk(data=weights_pb2.ShardData(shard=shard, offset=offset, data=b"x")),
    ]
    assert _status(lambda: stub.Publish(iter(chunks), metadata=auth, timeout=10)) in _ALLOWED
    # Bytes that are not a valid message at all.
    raw = client.channel.unary_stream("/asympo.v1.Weights/Fetch")
    code = _status(lambda: raw(garbage, timeout=10))
    assert code in _ALLOWED | {None, grpc.StatusCode.INTERNAL}
    latest = client.latest()
    assert latest is not None and latest.version == 0  # still serving, nothing published
