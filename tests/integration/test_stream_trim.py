"""Trimming acknowledged stream entries (asympo.transport.stream_trim), on the real Redis server.

The soak test pushes thousands of scored-group-sized entries through a stream read by
two consumer groups at different paces, one of which keeps some entries pending for a
long time, and checks after every round that (a) no entry some group has not
acknowledged is gone, and (b) the stream's memory (``MEMORY USAGE`` of the key: the
server is shared, so its total is not this test's) stays flat instead of growing with
the traffic as a MAXLEN-only stream does.
"""

from __future__ import annotations

import os
import time

import redis

from asympo.transport.stream_trim import trim_acknowledged
from asympo.transport.streams import Consumer, Producer
from asympo.v1 import records_pb2


def _ids(client: redis.Redis, key: str) -> set[str]:
    return {e[0].decode() for e in client.xrange(key, "-", "+")}


def test_trims_only_what_every_group_acknowledged(redis_client: redis.Redis,
                                                  key_prefix: str) -> None:
    key = f"{key_prefix}scored"
    ids = [redis_client.xadd(key, {b"n": str(i).encode()}).decode() for i in range(10)]
    assert trim_acknowledged(redis_client, key).min_id is None  # no group: left alone
    redis_client.xgroup_create(key, "fast", id="0")
    redis_client.xgroup_create(key, "slow", id="0")
    # fast: read all, acked all; slow: read 6, acked the first 2 and the 5th.
    redis_client.xreadgroup("fast", "c", {key: ">"}, count=10)
    redis_client.xack(key, "fast", *ids)
    redis_client.xreadgroup("slow", "c", {key: ">"}, count=6)
    redis_client.xack(key, "slow", ids[0], ids[1], ids[4])
    result = trim_acknowledged(redis_client, key)
    assert result.removed == 2 and result.min_id == ids[2]
    assert _ids(redis_client, key) == set(ids[2:])
    redis_client.xack(key, "slow", ids[2], ids[3], ids[5])
    # slow has nothing pending, last delivered ids[5]: ids[6:] were never delivered to it.
    assert trim_acknowledged(redis_client, key).removed == 4
    assert _ids(redis_client, key) == set(ids[6:])
    # A third group created at the start needs everything: nothing more goes.
    redis_client.xgroup_create(key, "late", id="0")
    assert trim_acknowledged(redis_client, key).removed == 0
    assert _ids(redis_client, key) == set(ids[6:])
    assert trim_acknowledged(redis_client, f"{key_prefix}missing").removed == 0


def test_soak_memory_flat_and_nothing_unacknowledged_trimmed(
    redis_client: redis.Redis, key_prefix: str
) -> None:
    """Thousands of 16 KiB groups through two consumer groups, trimmed as consumers go."""
    total = int(os.environ.get("ASYMPO_SOAK_GROUPS", "4000"))
    payload = os.urandom(16 * 1024)
    key = f"{key_prefix}scored"
    dead = f"{key_prefix}dead"
    producer: Producer[records_pb2.ScoredGroup] = Producer(redis_client, key,
                                                           records_pb2.ScoredGroup)
    fast: Consumer[records_pb2.ScoredGroup] = Consumer(
        redis_client, key, "learner", "l0", records_pb2.ScoredGroup, dead, trim_every_s=0.0)
    slow: Consumer[records_pb2.ScoredGroup] = Consumer(
        redis_client, key, "audit", "a0", records_pb2.ScoredGroup, dead,
        reclaim_idle_ms=3_600_000, trim_every_s=0.0)
    held: dict[str, int] = {}  # entry id -> round the slow group acks it in
    produced_ids: set[str] = set()
    acked = {"learner": set[str](), "audit": set[str]()}
    memory: list[int] = []
    lengths: list[int] = []
    batch = 50
    started = time.monotonic()
    for round_no in range(total // batch):
        produced_ids.update(producer.send(_group(payload, round_no, i)) for i in range(batch))
        got = fast.read(count=batch)
        fast.ack(got)
        acked["learner"].update(d.entry_id for d in got)
        for d in slow.read(count=batch):
            # Every 10th entry stays pending in the slow group for 5 rounds.
            if int(d.entry_id.split("-")[0]) % 10 == 0:
                held[d.entry_id] = round_no + 5
            else:
                slow.ack(d)
                acked["audit"].add(d.entry_id)
        due = [i for i, r in held.items() if r <= round_no]
        if due:
            slow.ack(due)
            acked["audit"].update(due)
            for i in due:
                del held[i]
        trim_acknowledged(redis_client, key)
        needed = produced_ids - (acked["learner"] & acked["audit"])
        missing = needed - _ids(redis_client, key)
        assert not missing, f"round {round_no}: unacknowledged entries trimmed: {missing}"
        memory.append(int(redis_client.memory_usage(key, samples=0) or 0))
        lengths.append(int(redis_client.xlen(key)))
    assert held, "the slow group never held anything back: the test checks nothing"
    slow.ack(list(held))
    trim_acknowledged(redis_client, key)
    elapsed = time.monotonic() - started
    produced = total * len(payload)
    half = len(memory) // 2
    early, late = max(memory[:half]), max(memory[half:])
    print(f"soak: {total} groups of {len(payload)} B in {elapsed:.1f}s; stream memory max "
          f"{max(memory) / 1e6:.2f} MB (first half {early / 1e6:.2f}, second {late / 1e6:.2f});"
          f" produced {produced / 1e6:.0f} MB; max length {max(lengths)}")
    assert max(lengths) <= 10 * batch, f"the stream grew to {max(lengths)} entries"
    assert late <= 1.5 * early + 64 * 1024, f"memory grew: {early} -> {late}"
    assert max(memory) < produced / 10, "the stream holds a large part of all traffic"
    assert redis_client.xlen(key) == 0


def _group(payload: bytes, round_no: int, i: int) -> records_pb2.ScoredGroup:
    """A scored group carrying ``payload`` (the size of a real one's token ids and text)."""
    group = records_pb2.ScoredGroup(scorer="soak", scored_at=float(round_no))
    group.rollout.group_id = f"soak/p{round_no}-{i}"
    group.rollout.engine = payload.hex()[: len(payload)]
    return group
