"""Weights service throughput next to a plain file copy, and publish-to-available latency.

Runs `asympo serve weights` as a separate process on this machine, builds a random
safetensors checkpoint (default 128 MB in 4 shards), then measures in one run:

* copy:    shutil.copyfile of the same shard files + fsync (the durable-copy baseline)
* publish: WeightsClient.publish_dir (client hashes, streams; server verifies, fsyncs, renames)
* fetch:   WeightsClient.fetch into an empty directory (hash-verified, fsynced, renamed)
* latency: a watcher thread (Watch + fetch) — time from the start of a publish until the
           announcement arrives, and until the version sits verified on the fetching client.

Prints the medians and the throughput ratios (target: publish and fetch >= 0.5 x copy).
    .venv/bin/python bench/weights.py [--mb 128] [--shards 4] [--repeats 3]
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
from asympo.redis_conn import reachable
from asympo.weights_client import WeightsClient, write_shards

TOKEN = "bench-token"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_checkpoint(directory: Path, total_mb: int, shards: int) -> int:
    """Random float32 tensors of ``total_mb`` MB in ``shards`` files; returns the bytes."""
    numel = total_mb * (1 << 20) // 4
    per = numel // shards
    g = torch.Generator().manual_seed(0)
    state = {f"layer{i}.weight": torch.randn(per, generator=g) for i in range(shards)}
    write_shards(state, directory, max_shard_bytes=per * 4)
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


def plain_copy(src: Path, dst: Path) -> None:
    """Copy every shard and fsync it (the weights service fsyncs what it stores too)."""
    dst.mkdir()
    for path in sorted(src.glob("*.safetensors")):
        target = dst / path.name
        shutil.copyfile(path, target)
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


def main() -> None:
    """Run the benchmark and print its figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=int, default=128, help="checkpoint size in MB (>= 100)")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunk-kb", type=int, default=0, help="0 = weights.chunk_bytes default")
    args = parser.parse_args()
    chunk = args.chunk_kb * 1024 or WeightsSettings().chunk_bytes
    run_id = f"bench-{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory(prefix="asympo-bench-weights-") as tmp:
        work = Path(tmp)
        src = work / "checkpoint"
        src.mkdir()
        nbytes = make_checkpoint(src, args.mb, args.shards)
        proc, grpc_port, _ = start_server(work, run_id, chunk)
        copy_s: list[float] = []
        publish_s: list[float] = []
        fetch_s: list[float] = []
        announce_s: list[float] = []
        available_s: list[float] = []
        try:
            client = WeightsClient(f"127.0.0.1:{grpc_port}", token=TOKEN, chunk_bytes=chunk)
            watcher = WeightsClient(f"127.0.0.1:{grpc_port}", chunk_bytes=chunk)
            for rep in range(args.repeats):
                t = time.perf_counter()
                plain_copy(src, work / f"copy{rep}")
                copy_s.append(time.perf_counter() - t)
                shutil.rmtree(work / f"copy{rep}")

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

                # A cold fetch (fresh directory) of a second version: throughput alone.
                client.publish_dir(src, version=version + 1, parent_version=version)
                t = time.perf_counter()
                client.fetch(version + 1, work / f"fetch{rep}")
                fetch_s.append(time.perf_counter() - t)
                shutil.rmtree(work / f"fetch{rep}")
            client.close()
            watcher.close()
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
            _drop_stream(run_id)

    mb = nbytes / 1e6
    copy, pub, fet = (statistics.median(x) for x in (copy_s, publish_s, fetch_s))
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
        "publish_to_announced_s": round(statistics.median(announce_s), 3),
        "publish_to_available_on_client_s": round(statistics.median(available_s), 3),
    }
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
