"""Weights service throughput next to a plain file copy, and publish-to-available latency.

Runs `asympo serve weights` as a separate process on this machine, builds a random
safetensors checkpoint (default 128 MB in 4 shards), then measures in one run:

* copy:      shutil.copyfile of the same shard files + fsync (the durable-copy baseline;
             ``copy_nofsync`` without the fsync, for reference)
* publish:   WeightsClient.publish_dir (client BLAKE3s the files, streams; the server
             verifies while receiving, fsyncs, renames)
* publish_mem: WeightsClient.publish_state_dict from tensors in memory (the learner's path)
* fetch:     WeightsClient.fetch into an empty directory (one stream per shard in parallel,
             BLAKE3-verified while receiving, renamed; ``fetch_1stream`` with one stream)
* shared:    open_shared — a replica that reads the store's volume opens it in place
* snapshot:  what the learner is blocked for per publish with the background publisher
             (state dict copied into reused host buffers)
* broadcast: rank 0 -> one receiver process over the standalone gloo group of
             asympo/transport/weight_broadcast.py (the direct path's transport)
* latency:   a watcher thread (Watch + fetch) — time from the start of a publish until the
             announcement arrives, and until the version sits verified on the fetching client.

Prints the medians and the throughput ratios (target: publish and fetch >= 0.5 x copy,
broadcast >= 1 x copy).
    .venv/bin/python bench/weights.py [--mb 128] [--shards 4] [--repeats 3] [--json]

``--swap`` instead measures the end-to-end swap per transport on a real vLLM replica (the
tiny default model, or a random Qwen2 of ``--swap-params`` parameters): from the start of
the learner's snapshot until the replica serves the version with its probe passed —
``store`` (publish, announce, fetch, load, probe) and ``broadcast`` (broadcast into the
engine's worker, load from its buffers, probe; the store is written meanwhile).
    .venv/bin/python bench/weights.py --swap [--swap-params 100e6] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import httpx
import torch

from asympo.config import WeightsSettings
from asympo.transport.redis_conn import reachable
from asympo.transport.weights_client import WeightsClient, open_shared, write_shards
from services.learner.publisher import snapshot_state

TOKEN = "bench-token"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_checkpoint(
    directory: Path, total_mb: int, shards: int
) -> tuple[int, dict[str, torch.Tensor]]:
    """Random float32 tensors of ``total_mb`` MB in ``shards`` files; (bytes, tensors)."""
    numel = total_mb * (1 << 20) // 4
    per = numel // shards
    g = torch.Generator().manual_seed(0)
    state = {f"layer{i}.weight": torch.randn(per, generator=g) for i in range(shards)}
    write_shards(state, directory, max_shard_bytes=per * 4)
    return sum(p.stat().st_size for p in directory.glob("*.safetensors")), state


RECEIVER = """
import json, sys, torch
from asympo.transport.weight_broadcast import BroadcastGroup, Layout
port, n = int(sys.argv[1]), int(sys.argv[2])
shapes = json.loads(sys.argv[3])
state = {k: torch.empty(v) for k, v in shapes.items()}
group = BroadcastGroup("127.0.0.1", port, 1, 2, Layout.of(state))
for _ in range(n):
    group.receive()
group.close()
"""


def broadcast_seconds(state: dict[str, torch.Tensor], repeats: int) -> list[float]:
    """Seconds per broadcast of ``state`` to one receiver process (after one warm-up)."""
    from asympo.transport.weight_broadcast import BroadcastGroup, Layout

    port = _free_port()
    shapes = json.dumps({k: list(v.shape) for k, v in state.items()})
    child = subprocess.Popen(
        [sys.executable, "-c", RECEIVER, str(port), str(repeats + 1), shapes],
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    try:
        group = BroadcastGroup("127.0.0.1", port, 0, 2, Layout.of(state))
        group.send(0, state)  # warm-up: connections, buffers
        times = []
        for rep in range(repeats):
            t = time.perf_counter()
            group.send(rep + 1, state)
            times.append(time.perf_counter() - t)
        child.wait(120)
        group.close()
        return times
    finally:
        if child.poll() is None:
            child.kill()


def plain_copy(src: Path, dst: Path, fsync: bool = True) -> None:
    """Copy every shard and fsync it (the weights service fsyncs what it stores too)."""
    dst.mkdir()
    for path in sorted(src.glob("*.safetensors")):
        target = dst / path.name
        shutil.copyfile(path, target)
        if fsync:
            with target.open("rb") as f:
                os.fsync(f.fileno())


def start_server(work: Path, run_id: str, chunk: int) -> tuple[subprocess.Popen[bytes], int, int]:
    grpc_port, http_port = _free_port(), _free_port()
    env = {**os.environ, "ASYMPO_WEIGHTS__PUBLISH_TOKEN": TOKEN}
    if not env.get("REDIS_URL") and reachable("redis://127.0.0.1:6379/0"):
        env["REDIS_URL"] = "redis://127.0.0.1:6379/0"
    cmd = [
        str(Path(sys.executable).with_name("asympo")),
        "serve",
        "weights",
        "--set",
        f"weights.store_dir={work / 'store'}",
        "--set",
        f"weights.grpc_port={grpc_port}",
        "--set",
        f"weights.http_port={http_port}",
        "--set",
        "weights.keep_last=2",
        "--set",
        f"weights.chunk_bytes={chunk}",
        "--set",
        f"streams.run_id={run_id}",
        "--set",
        f"redis.embedded_dir={work / 'redis'}",
    ]
    log = (work / "server.log").open("wb")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("weights server exited:\n" + (work / "server.log").read_text())
        try:
            if httpx.get(f"http://127.0.0.1:{http_port}/readyz").status_code == 200:
                return proc, grpc_port, http_port
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("weights server did not become ready")


def end_to_end_swaps(model_dir: Path, url: str, repeats: int, work: Path) -> dict[str, float]:
    """Median seconds from snapshot start to "served with the probe passed", per transport."""
    from transformers import AutoModelForCausalLM

    from asympo.config import Settings, StreamSettings
    from asympo.engines.vllm_engine import VLLMEngine
    from asympo.rl.probe import make_probe, probe_tokens
    from asympo.transport.redis_conn import connect
    from asympo.transport.weight_broadcast import BroadcastHub, Layout
    from services.learner.publisher import Snapshot, broadcast_sink, store_sink
    from services.rollout.swap import WeightSwapper
    from services.rollout.versions import BroadcastLink, VersionFollower
    from services.weights.server import StreamAnnouncer, WeightsService

    run_id = f"bench-swap-{uuid.uuid4().hex[:8]}"
    settings = Settings(
        streams=StreamSettings(run_id=run_id),
        weights={"store_dir": str(work / "store"), "publish_token": TOKEN},  # type: ignore[arg-type]
    )
    key = settings.streams.key("weights")
    announcer = StreamAnnouncer(lambda: connect(url), key, 1000)
    svc = WeightsService(settings, announce=announcer, grpc_port=0, http_port=0).start()
    client = WeightsClient(f"127.0.0.1:{svc.grpc_port}", token=TOKEN)
    rclient = connect(url)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    engine = VLLMEngine(str(model_dir), dtype="float32", max_model_len=256, kv_cache_gib=0.5)
    hub = BroadcastHub(Layout.of(model.state_dict()), 0, 60)
    swapper = WeightSwapper(engine, -1, model_dir)
    gen = torch.Generator().manual_seed(7)
    buffers: dict[str, torch.Tensor] | None = None
    version = 0
    out: dict[str, float] = {}
    threads: list[threading.Thread] = []
    stop = threading.Event()
    try:
        for transport in ("store", "broadcast"):
            link = (
                BroadcastLink(engine, client, 60, rejoin_s=0.2)
                if transport == "broadcast"
                else None
            )
            follower = VersionFollower(
                rclient, key, client, swapper, work / transport, 1e-3, None, link
            )
            swapper.fetch = follower.fetch
            sink = store_sink(client)
            if transport == "broadcast":

                def register() -> None:
                    client.register_broadcast("127.0.0.1", hub.port, hub.epoch)

                sink = broadcast_sink(hub, register, sink)
            stop = threading.Event()

            def follow(f: VersionFollower = follower, halt: threading.Event = stop) -> None:
                while not halt.is_set():
                    f.step(block_ms=50)

            thread = threading.Thread(target=follow, daemon=True)
            thread.start()
            threads.append(thread)
            if transport == "broadcast":
                register()
                deadline = time.monotonic() + 120
                while hub.members() < 1 and time.monotonic() < deadline:
                    time.sleep(0.05)
            totals: list[float] = []
            for rep in range(repeats + 1):  # the first swap of each path is a warm-up
                with torch.no_grad():
                    for p in model.parameters():
                        p.add_(0.02 * p.std() * torch.randn(p.shape, generator=gen))
                start = time.perf_counter()
                buffers = snapshot_state(model, buffers)
                probe = make_probe(model, probe_tokens(model.config.vocab_size), 1e-3)
                snap = Snapshot(version, buffers, probe)
                publisher = threading.Thread(target=sink, args=(snap,))
                publisher.start()
                with swapper.changed:
                    swapper.changed.wait_for(lambda v=version: swapper.version >= v, 300)
                served = time.perf_counter() - start
                publisher.join()
                deadline = time.monotonic() + 10  # the follower records the outcome just after
                while time.monotonic() < deadline and not (
                    follower.outcomes and follower.outcomes[-1].version == version
                ):
                    time.sleep(0.01)
                outcome = follower.outcomes[-1] if follower.outcomes else None
                if outcome is None or (outcome.version, outcome.source) != (version, transport):
                    raise RuntimeError(
                        f"{transport} swap of version {version}: serving {swapper.version}, "
                        f"{outcome}, follower alive: {thread.is_alive()}"
                    )
                if rep:
                    totals.append(served)
                print(f"  {transport:9s} v{version}: served {served:.3f} s after snapshot start")
                version += 1
            stop.set()
            thread.join(30)
            threads.remove(thread)
            out[f"swap_{transport}_s"] = round(statistics.median(totals), 3)
        out["parameters"] = sum(p.numel() for p in model.parameters())
        out["swap_mb"] = round(sum(t.numel() * t.element_size() for t in buffers.values()) / 1e6, 1)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
        hub.close()
        engine.close()
        client.close()
        svc.stop(grace=0.5)
        for k in rclient.scan_iter(match=f"asympo:{run_id}:*"):
            rclient.delete(k)
        rclient.close()
    return out


def swap_main(args: argparse.Namespace) -> None:
    """``--swap``: the end-to-end swap per transport."""
    from contextlib import ExitStack

    from rollout import build_random_qwen2, redis_url  # bench/rollout.py

    from asympo.config import Settings
    from asympo.model import ensure_default_model

    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    load = os.getloadavg()[0]
    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="asympo-bench-swap-")))
        url = redis_url(stack, work)
        model_dir = ensure_default_model(Settings())
        if args.swap_params > 0:
            built = build_random_qwen2(model_dir, work / "qwen2-random", args.swap_params)
            print(f"random Qwen2, {built / 1e6:.1f} M parameters")
            model_dir = work / "qwen2-random"
        result = end_to_end_swaps(model_dir, url, args.repeats, work)
    result["load_avg_1m_start"] = round(load, 2)
    result["load_avg_1m_end"] = round(os.getloadavg()[0], 2)
    print(
        f"end-to-end swap ({result['parameters'] / 1e6:.1f} M params, {result['swap_mb']} MB; "
        f"snapshot start -> served, probe passed), median of {args.repeats}: "
        f"store {result['swap_store_s']:.3f} s, broadcast {result['swap_broadcast_s']:.3f} s "
        f"(load {result['load_avg_1m_start']} -> {result['load_avg_1m_end']})"
    )
    print(json.dumps(result))


def main() -> None:
    """Run the benchmark and print its figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=int, default=128, help="checkpoint size in MB (>= 100)")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunk-kb", type=int, default=0, help="0 = weights.chunk_bytes default")
    parser.add_argument("--json", action="store_true", help="print only the JSON result")
    parser.add_argument(
        "--swap", action="store_true", help="end-to-end swap per transport on a vLLM replica"
    )
    parser.add_argument(
        "--swap-params", type=float, default=0, help="--swap on a random Qwen2 this big (0 = tiny)"
    )
    args = parser.parse_args()
    if args.swap:
        swap_main(args)
        return
    chunk = args.chunk_kb * 1024 or WeightsSettings().chunk_bytes
    run_id = f"bench-{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory(prefix="asympo-bench-weights-") as tmp:
        work = Path(tmp)
        src = work / "checkpoint"
        src.mkdir()
        nbytes, state = make_checkpoint(src, args.mb, args.shards)
        proc, grpc_port, _ = start_server(work, run_id, chunk)
        copy_s: list[float] = []
        copy_nofsync_s: list[float] = []
        publish_s: list[float] = []
        publish_mem_s: list[float] = []
        fetch_s: list[float] = []
        fetch1_s: list[float] = []
        shared_s: list[float] = []
        snapshot_s: list[float] = []
        announce_s: list[float] = []
        available_s: list[float] = []
        module = torch.nn.Module()
        for i, tensor in enumerate(state.values()):
            module.register_buffer(f"b{i}", tensor)  # a "model" whose state is the checkpoint
        buffers: dict[str, torch.Tensor] | None = None
        try:
            client = WeightsClient(f"127.0.0.1:{grpc_port}", token=TOKEN, chunk_bytes=chunk)
            watcher = WeightsClient(f"127.0.0.1:{grpc_port}", chunk_bytes=chunk)
            single = WeightsClient(f"127.0.0.1:{grpc_port}", chunk_bytes=chunk, parallel_streams=1)
            for rep in range(args.repeats):
                t = time.perf_counter()
                plain_copy(src, work / f"copy{rep}")
                copy_s.append(time.perf_counter() - t)
                shutil.rmtree(work / f"copy{rep}")
                t = time.perf_counter()
                plain_copy(src, work / f"copy{rep}", fsync=False)
                copy_nofsync_s.append(time.perf_counter() - t)
                shutil.rmtree(work / f"copy{rep}")
                t = time.perf_counter()
                buffers = snapshot_state(module, buffers)
                snapshot_s.append(time.perf_counter() - t)

                # Publish version 2*rep while a watcher fetches it as soon as it is announced.
                version = 2 * rep
                marks: dict[str, float] = {}

                def watch_and_fetch(v: int = version, m: dict[str, float] = marks) -> None:
                    for ann in watcher.watch(after_version=v - 1, timeout_s=120):
                        m["announced"] = time.perf_counter()
                        watcher.fetch(ann.version, work / "watcher")
                        m["available"] = time.perf_counter()
                        return

                thread = threading.Thread(target=watch_and_fetch)
                thread.start()
                time.sleep(0.2)  # the watch is open before the publish starts
                t = time.perf_counter()
                client.publish_dir(src, version=version, parent_version=version - 1)
                publish_s.append(time.perf_counter() - t)
                thread.join(120)
                announce_s.append(marks["announced"] - t)
                available_s.append(marks["available"] - t)
                shutil.rmtree(work / "watcher")

                # A second version from memory (the learner's path), then cold fetches
                # (fresh directories) of it: throughput alone.
                t = time.perf_counter()
                client.publish_state_dict(state, version=version + 1, parent_version=version)
                publish_mem_s.append(time.perf_counter() - t)
                t = time.perf_counter()
                client.fetch(version + 1, work / f"fetch{rep}")
                fetch_s.append(time.perf_counter() - t)
                shutil.rmtree(work / f"fetch{rep}")
                t = time.perf_counter()
                single.fetch(version + 1, work / f"fetch{rep}")
                fetch1_s.append(time.perf_counter() - t)
                shutil.rmtree(work / f"fetch{rep}")
                t = time.perf_counter()
                assert open_shared(work / "store", version + 1) is not None
                shared_s.append(time.perf_counter() - t)
            client.close()
            watcher.close()
            single.close()
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
            _drop_stream(run_id)
        bcast_s = broadcast_seconds(state, args.repeats)

    mb = nbytes / 1e6
    copy, pub, fet = (statistics.median(x) for x in (copy_s, publish_s, fetch_s))
    pub_mem, fet1, bcast = (statistics.median(x) for x in (publish_mem_s, fetch1_s, bcast_s))
    result = {
        "checkpoint_mb": round(mb, 1),
        "shards": args.shards,
        "repeats": args.repeats,
        "chunk_kb": chunk // 1024,
        "cpus": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "copy_mb_s": round(mb / copy, 1),
        "publish_mb_s": round(mb / pub, 1),
        "fetch_mb_s": round(mb / fet, 1),
        "publish_vs_copy": round(copy / pub, 3),
        "fetch_vs_copy": round(copy / fet, 3),
        "copy_nofsync_mb_s": round(mb / statistics.median(copy_nofsync_s), 1),
        "publish_mem_mb_s": round(mb / pub_mem, 1),
        "publish_mem_vs_copy": round(copy / pub_mem, 3),
        "fetch_1stream_mb_s": round(mb / fet1, 1),
        "fetch_1stream_vs_copy": round(copy / fet1, 3),
        "shared_open_s": round(statistics.median(shared_s), 4),
        "snapshot_s": round(statistics.median(snapshot_s), 4),
        "snapshot_mb_s": round(mb / statistics.median(snapshot_s), 1),
        "broadcast_mb_s": round(mb / bcast, 1),
        "broadcast_vs_copy": round(copy / bcast, 3),
        "publish_to_announced_s": round(statistics.median(announce_s), 3),
        "publish_to_available_on_client_s": round(statistics.median(available_s), 3),
    }
    if args.json:
        print(json.dumps(result))
        return
    print(
        f"checkpoint: {mb:.1f} MB in {args.shards} safetensors shards, {args.repeats} repeats "
        f"({result['cpus']} CPUs, load {result['load_avg_1m']})"
    )
    print(f"plain copy+fsync : {result['copy_mb_s']:8.1f} MB/s")
    print(
        f"publish          : {result['publish_mb_s']:8.1f} MB/s "
        f"(ratio {result['publish_vs_copy']:.3f})"
    )
    print(
        f"fetch (verified) : {result['fetch_mb_s']:8.1f} MB/s (ratio {result['fetch_vs_copy']:.3f})"
    )
    print(
        f"publish_state_dict: {result['publish_mem_mb_s']:8.1f} MB/s "
        f"(ratio {result['publish_mem_vs_copy']:.3f}; from memory, the learner's path)"
    )
    print(
        f"fetch, 1 stream  : {result['fetch_1stream_mb_s']:8.1f} MB/s "
        f"(ratio {result['fetch_1stream_vs_copy']:.3f})"
    )
    print(
        f"broadcast (gloo) : {result['broadcast_mb_s']:8.1f} MB/s "
        f"(ratio {result['broadcast_vs_copy']:.3f})"
    )
    print(
        f"learner blocked per publish (snapshot): {result['snapshot_s']:.4f} s "
        f"({result['snapshot_mb_s']:.0f} MB/s); shared-volume open: {result['shared_open_s']} s"
    )
    print(
        f"publish start -> announced on Watch: {result['publish_to_announced_s']:.3f} s; "
        f"-> fetched+verified on a watching client: "
        f"{result['publish_to_available_on_client_s']:.3f} s"
    )
    print(json.dumps(result))


def _drop_stream(run_id: str) -> None:
    """Remove the benchmark's weights stream key from the local Redis, if one was used."""
    url = os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0"
    if not reachable(url):
        return
    import redis

    client = redis.Redis.from_url(url)
    for key in client.scan_iter(match=f"asympo:{run_id}:*"):
        client.delete(key)
    client.close()


if __name__ == "__main__":
    main()
