"""Transport throughput: rollout groups/s through asympo.transport.streams vs raw redis-py, one run.

Each round pushes N realistic RolloutGroups (default 8 samples x 1,000 tokens each, with
their text) through produce -> consume -> ack with each contender, in rotating order:

* ``streams``: ``Producer.send`` (serialises the protobuf), ``Consumer.read`` (XAUTOCLAIM
  check, XREADGROUP, type check and parse) and ``Consumer.ack``;
* ``raw``: redis-py XADD / XREADGROUP / XACK of the same pre-serialised bytes, no parsing;
* ``raw+pb``: the raw calls plus SerializeToString / FromString written by hand, which
  separates the cost of protobuf itself from the library's own overhead.

It prints the median groups/s of each and the ratio streams / raw (target >= 0.8), plus
streams / raw+pb.
Uses REDIS_URL, else 127.0.0.1:6379 if it answers, else an embedded server; all keys
live under a unique ``asympo:bench-<id>:`` prefix and are deleted at the end.

    python bench/transport.py [--groups 1000] [--rounds 5] [--batch 32] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import string
import sys
import time
import uuid
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

import redis

from asympo.transport.redis_conn import EmbeddedRedis, RedisUnavailable, connect, reachable
from asympo.transport.streams import Consumer, Producer
from asympo.v1 import records_pb2

LOCAL_URL = "redis://127.0.0.1:6379/0"
TARGET_RATIO = 0.8


def make_group(
    i: int, samples: int, tokens: int, rng: random.Random, logprobs: bool
) -> records_pb2.RolloutGroup:
    """A rollout group shaped like a real one: G samples of ``tokens`` tokens plus text."""
    prompt_tokens = [rng.randrange(150_000) for _ in range(120)]
    alphabet = string.ascii_letters + string.digits + " +-*/=.\n"
    group = records_pb2.RolloutGroup(
        group_id=f"bench/{i}",
        prompt=records_pb2.PromptTask(
            run_id="bench",
            prompt_id=f"0:{i}",
            seq=i,
            task="gsm8k",
            prompt_text="".join(rng.choices(alphabet, k=500)),
            reference_answer="42",
            verifier="gsm8k",
            num_samples=samples,
            sampling=records_pb2.SamplingParams(temperature=1.0, top_p=1.0, max_tokens=tokens),
        ),
        prompt_tokens=prompt_tokens,
        engine="vllm",
        replica="rollout-0",
        started_at=time.time(),
        finished_at=time.time(),
    )
    for _ in range(samples):
        sample = group.samples.add()
        sample.completion_tokens.extend(rng.randrange(150_000) for _ in range(tokens))
        sample.completion_text = "".join(rng.choices(alphabet, k=4 * tokens))
        sample.finish_reason = "length"
        sample.version.start = sample.version.end = 7
        if logprobs:
            sample.behaviour_logprobs.extend(-rng.random() * 5 for _ in range(tokens))
    return group


def run_streams(
    client: redis.Redis, key: str, groups: list[records_pb2.RolloutGroup], batch: int
) -> float:
    """Seconds to send, read and ack every group through asympo.transport.streams."""
    producer = Producer(client, key, records_pb2.RolloutGroup, maxlen=len(groups) + 1000)
    consumer = Consumer(
        client, key, "bench", "c0", records_pb2.RolloutGroup, key + ":dl", reclaim_idle_ms=30_000
    )
    start = time.perf_counter()
    for group in groups:
        producer.send(group)
    received = 0
    while received < len(groups):
        deliveries = consumer.read(count=batch, block_ms=1000)
        if not deliveries:
            raise RuntimeError(f"streams: only {received} of {len(groups)} groups arrived")
        received += len(deliveries)
        consumer.ack(deliveries)
    return time.perf_counter() - start


def run_raw(client: redis.Redis, key: str, payloads: list[bytes], batch: int) -> float:
    """Seconds to XADD, XREADGROUP and XACK the same bytes with plain redis-py."""
    type_name = records_pb2.RolloutGroup.DESCRIPTOR.full_name.encode()
    maxlen = len(payloads) + 1000
    client.xgroup_create(key, "bench", id="0", mkstream=True)
    start = time.perf_counter()
    for payload in payloads:
        client.xadd(key, {b"msg": payload, b"type": type_name}, maxlen=maxlen, approximate=True)
    received = 0
    while received < len(payloads):
        reply: Any = client.xreadgroup("bench", "c0", {key: ">"}, count=batch, block=1000)
        if not reply:
            raise RuntimeError(f"raw: only {received} of {len(payloads)} groups arrived")
        ids = [entry_id for entry_id, _fields in reply[0][1]]
        received += len(ids)
        client.xack(key, "bench", *ids)
    return time.perf_counter() - start


def run_raw_protobuf(
    client: redis.Redis, key: str, groups: list[records_pb2.RolloutGroup], batch: int
) -> float:
    """Like :func:`run_raw`, but serialising and parsing the protobuf by hand.

    Not the target's baseline (that is the same bytes without any protobuf work); it
    separates the cost of protobuf itself from the cost of the library around it.
    """
    type_name = records_pb2.RolloutGroup.DESCRIPTOR.full_name.encode()
    maxlen = len(groups) + 1000
    client.xgroup_create(key, "bench", id="0", mkstream=True)
    start = time.perf_counter()
    for group in groups:
        fields = {b"msg": group.SerializeToString(), b"type": type_name}
        client.xadd(key, fields, maxlen=maxlen, approximate=True)  # type: ignore[arg-type]
    received = 0
    while received < len(groups):
        reply: Any = client.xreadgroup("bench", "c0", {key: ">"}, count=batch, block=1000)
        if not reply:
            raise RuntimeError(f"raw+pb: only {received} of {len(groups)} groups arrived")
        ids = []
        for entry_id, fields in reply[0][1]:
            records_pb2.RolloutGroup.FromString(fields[b"msg"])
            ids.append(entry_id)
        received += len(ids)
        client.xack(key, "bench", *ids)
    return time.perf_counter() - start


def redis_url(arg: str) -> tuple[str, EmbeddedRedis | None]:
    """The URL to benchmark against and the embedded server started for it, if any."""
    url = arg or os.environ.get("REDIS_URL", "")
    if url:
        return url, None
    if reachable(LOCAL_URL):
        return LOCAL_URL, None
    server = EmbeddedRedis(".cache/redis-bench").start()
    return server.url, server


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; prints one line per round and the summary (or JSON)."""
    parser = argparse.ArgumentParser(
        description="Rollout groups/s through asympo.transport.streams vs raw redis-py (same run).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--url", default="", help="Redis URL (default: REDIS_URL/local/embedded)")
    parser.add_argument("--groups", type=int, default=1000, help="groups per round")
    parser.add_argument("--samples", type=int, default=8, help="samples per group (G)")
    parser.add_argument("--tokens", type=int, default=1000, help="completion tokens per sample")
    parser.add_argument("--batch", type=int, default=32, help="entries per XREADGROUP")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds of each")
    parser.add_argument("--logprobs", action="store_true", help="attach behaviour log-probs")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if min(args.groups, args.samples, args.tokens, args.batch, args.rounds) < 1:
        parser.error("--groups, --samples, --tokens, --batch and --rounds must be >= 1")

    rng = random.Random(0)
    # A pool of distinct groups reused round-robin: building 1,000 x 8,000 tokens per round
    # would dominate the setup time without changing what is measured.
    pool = [make_group(i, args.samples, args.tokens, rng, args.logprobs) for i in range(64)]
    groups = [pool[i % len(pool)] for i in range(args.groups)]
    payloads = [g.SerializeToString() for g in groups]
    entry_bytes = statistics.mean(len(p) for p in payloads)

    with ExitStack() as stack:
        try:
            url, server = redis_url(args.url)
            if server is not None:
                stack.callback(server.stop)
            client = connect(url)
        except (RedisUnavailable, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        prefix = f"asympo:bench-{uuid.uuid4().hex[:8]}:"
        stack.callback(_delete_prefix, client, prefix)
        runners: dict[str, Callable[[str], float]] = {
            "streams": lambda key: run_streams(client, key, groups, args.batch),
            "raw": lambda key: run_raw(client, key, payloads, args.batch),
            "raw+pb": lambda key: run_raw_protobuf(client, key, groups, args.batch),
        }
        timings: dict[str, list[float]] = {name: [] for name in runners}
        for round_no in range(args.rounds):
            # Rotate the order so drift in machine load does not favour one contender.
            names = list(runners)
            order = names[round_no % 3 :] + names[: round_no % 3]
            for name in order:
                key = f"{prefix}{name}:{round_no}"
                seconds = runners[name](key)
                client.delete(key, key + ":dl")
                timings[name].append(seconds)
                if not args.json:
                    print(
                        f"round {round_no} {name:8s} {args.groups / seconds:9.1f} groups/s",
                        flush=True,
                    )

    rate = {name: args.groups / statistics.median(ts) for name, ts in timings.items()}
    ratio = rate["streams"] / rate["raw"]
    library_ratio = rate["streams"] / rate["raw+pb"]
    result = {
        "groups_per_round": args.groups,
        "samples": args.samples,
        "tokens": args.tokens,
        "entry_bytes": round(entry_bytes),
        "batch": args.batch,
        "rounds": args.rounds,
        "streams_groups_per_s": round(rate["streams"], 1),
        "raw_groups_per_s": round(rate["raw"], 1),
        "raw_protobuf_groups_per_s": round(rate["raw+pb"], 1),
        "ratio": round(ratio, 3),
        "ratio_vs_raw_protobuf": round(library_ratio, 3),
        "target": TARGET_RATIO,
        "meets_target": ratio >= TARGET_RATIO,
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"entry {entry_bytes / 1024:.1f} KiB ({args.samples} x {args.tokens} tokens), "
            f"batch {args.batch}, median of {args.rounds} rounds of {args.groups} groups"
        )
        print(f"asympo.transport.streams : {rate['streams']:9.1f} groups/s")
        print(f"raw redis-py   : {rate['raw']:9.1f} groups/s  (same bytes, no protobuf work)")
        print(f"raw + protobuf : {rate['raw+pb']:9.1f} groups/s  (hand-written, for reference)")
        verdict = "meets" if ratio >= TARGET_RATIO else "BELOW"
        print(f"ratio          : {ratio:.3f} ({verdict} the {TARGET_RATIO} target; streams / raw)")
        print(f"library only   : {library_ratio:.3f} (streams / raw + protobuf)")
    return 0


def _delete_prefix(client: redis.Redis, prefix: str) -> None:
    keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
    if keys:
        client.delete(*keys)


if __name__ == "__main__":
    sys.exit(main())
