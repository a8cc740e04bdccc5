"""The background publisher against a real weights service (in-process gRPC) and store.

What it must guarantee (services/learner/publisher.py): the learner only snapshots;
a queued snapshot is replaced by a newer one, never published twice; a crash mid-publish
never makes a partial version visible; a version counts as published only when the store
holds it verified.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from asympo.config import StreamSettings
from asympo.rl.probe import make_probe, probe_tokens
from asympo.transport.weight_store import WeightStore
from asympo.transport.weights_client import WeightsClient
from services.learner.publisher import BackgroundPublisher, Snapshot, store_sink
from services.weights.server import WeightsService
from tests.integration.test_weights_service import TOKEN, make_settings, tiny_qwen2


@pytest.fixture
def service(tmp_path: Path, stream_settings: StreamSettings) -> Iterator[WeightsService]:
    settings = make_settings(tmp_path, stream_settings.run_id, keep_last=10)
    svc = WeightsService(settings, grpc_port=0, http_port=0).start()
    yield svc
    svc.stop(grace=0.5)


@pytest.fixture
def client(service: WeightsService) -> Iterator[WeightsClient]:
    with WeightsClient(f"127.0.0.1:{service.grpc_port}", token=TOKEN, chunk_bytes=64 * 1024) as c:
        yield c


def _perturb(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.01)


def test_queued_snapshot_is_replaced_not_published_twice(
    service: WeightsService, client: WeightsClient, tmp_path: Path
) -> None:
    model = tiny_qwen2()
    tokens = probe_tokens(96)
    gate = threading.Event()
    started = threading.Event()
    real = store_sink(client, retry_s=5)

    def gated(snap: Snapshot) -> None:
        started.set()
        assert gate.wait(30)
        real(snap)

    publisher = BackgroundPublisher(gated, lambda m: make_probe(m, tokens, 1e-3))
    try:
        publisher.submit(0, model)
        assert started.wait(10)  # version 0 is in flight, held at the gate
        expected: dict[int, dict[str, torch.Tensor]] = {}
        for version in (1, 2, 3):
            _perturb(model, version)
            publisher.submit(version, model)
            expected[version] = {k: v.clone() for k, v in model.state_dict().items()}
        assert publisher.published() == -1  # nothing counts before the store has it
        assert publisher.replaced == 2  # 1 by 2, 2 by 3
        gate.set()
        assert publisher.wait(30)
    finally:
        publisher.close()
    assert publisher.published_versions == [0, 3]
    assert publisher.published() == 3
    assert service.store.versions() == [0, 3]
    manifest = service.store.manifest(3)
    assert manifest.parent_version == 0
    # The store holds the weights of the newest submit, in the model's dtype, bit for bit,
    # with the probe of those weights.
    stored: dict[str, torch.Tensor] = {}
    for shard in manifest.shards:
        stored.update(load_file(str(service.store.path(3) / shard.name)))
    for name, tensor in expected[3].items():
        assert stored[name].dtype == tensor.dtype
        assert torch.equal(stored[name], tensor), name
    assert list(manifest.probe.logprobs) == list(make_probe(model, tokens, 1e-3).logprobs)


def test_snapshot_is_taken_at_submit_not_when_published(
    service: WeightsService, client: WeightsClient
) -> None:
    model = tiny_qwen2()
    gate = threading.Event()
    real = store_sink(client, retry_s=5)

    def gated(snap: Snapshot) -> None:
        assert gate.wait(30)
        real(snap)

    publisher = BackgroundPublisher(gated)
    try:
        publisher.submit(0, model)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        _perturb(model, 7)  # training goes on while version 0 is being published
        gate.set()
        assert publisher.wait(30)
    finally:
        publisher.close()
    stored = load_file(str(service.store.path(0) / service.store.manifest(0).shards[0].name))
    assert all(torch.equal(stored[k], before[k]) for k in stored)


def test_a_failed_publish_is_raised_in_the_learner_thread(tmp_path: Path) -> None:
    # No service listens here: the sink gives up after its retries and the learner hears it.
    with WeightsClient("127.0.0.1:9", token=TOKEN) as dead:
        publisher = BackgroundPublisher(store_sink(dead, retry_s=0.5))
        try:
            publisher.submit(0, tiny_qwen2())
            with pytest.raises(Exception, match=r"not reachable|UNAVAILABLE|failed"):
                publisher.wait(30)
            assert publisher.published() == -1
        finally:
            publisher.close()


CHILD = """
import sys, time, torch
from asympo.transport.weights_client import WeightsClient
from services.learner.publisher import BackgroundPublisher, store_sink
port, token = sys.argv[1], sys.argv[2]
client = WeightsClient(f"127.0.0.1:{port}", token=token, chunk_bytes=64 * 1024)
model = torch.nn.Linear(2048, 2048)  # 16 MB of float32: long enough to be killed mid-way
with torch.no_grad():
    model.weight.fill_(1.0)
publisher = BackgroundPublisher(store_sink(client, retry_s=5))
publisher.submit(0, model)
publisher.wait(60)
print("published 0", flush=True)
with torch.no_grad():
    model.weight.fill_(2.0)
publisher.submit(1, model)
time.sleep(600)  # killed while version 1 is on its way
"""


def test_a_crash_mid_publish_never_exposes_a_partial_version(
    service: WeightsService, tmp_path: Path
) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(service.grpc_port), TOKEN],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        assert child.stdout is not None
        line = child.stdout.readline().decode()
        assert "published 0" in line, line + child.stdout.read().decode()
        staging = service.store.staging_dir
        deadline = time.monotonic() + 30
        # Kill it once version 1's bytes are arriving in the store's staging area.
        while time.monotonic() < deadline:
            sizes = [f.stat().st_size for f in staging.rglob("*.safetensors") if f.is_file()]
            if any(s > 0 for s in sizes):
                break
            time.sleep(0.002)
        else:
            pytest.fail("version 1 never started arriving")
        assert service.store.versions() == [0]
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)
    deadline = time.monotonic() + 10
    while any(service.store.staging_dir.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.05)  # the server aborts the broken upload and drops its staging dir
    assert service.store.versions() == [0]
    assert not any(service.store.staging_dir.iterdir())
    # A restarted service over the same directory sees version 0 only, still verified.
    service.store.verify(0)
    again = WeightStore(service.store.root)
    assert again.versions() == [0]
    assert not any(again.staging_dir.iterdir())
