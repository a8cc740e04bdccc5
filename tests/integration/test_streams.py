"""asympo.transport.streams and redis_conn against a real Redis server (see conftest.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from prometheus_client import CollectorRegistry, Counter, Gauge

from asympo.config import StreamSettings
from asympo.transport.redis_conn import EmbeddedRedis, RedisUnavailable, connect, redact
from asympo.transport.streams import (
    REASON_DECODE_ERROR,
    REASON_MAX_DELIVERIES,
    REASON_MISSING_FIELD,
    REASON_TOO_LARGE,
    REASON_WRONG_TYPE,
    Consumer,
    Delivery,
    Producer,
    decode,
    lag,
    produce_and_ack,
    produce_and_ack_many,
    stream_metrics,
)
from asympo.transport.streams.metrics import _count_after
from asympo.v1 import records_pb2

REPO_ROOT = Path(__file__).resolve().parents[2]

# --------------------------------------------------------------------------- helpers


def populated(descriptor: Descriptor, depth: int = 0) -> Message:
    """A message of ``descriptor``'s type with every field set to a non-default value."""
    from google.protobuf import message_factory

    msg = message_factory.GetMessageClass(descriptor)()
    for field in descriptor.fields:
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            for i in range(2):
                getattr(msg, field.name)[f"k{i}"] = _scalar(value_field, i)
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            if depth > 3:
                continue
            for _ in range(2 if _is_repeated(field) else 1):
                child = populated(field.message_type, depth + 1)
                target = getattr(msg, field.name)
                if _is_repeated(field):
                    target.add().CopyFrom(child)
                else:
                    target.CopyFrom(child)
        elif _is_repeated(field):
            getattr(msg, field.name).extend(_scalar(field, i) for i in range(3))
        else:
            setattr(msg, field.name, _scalar(field, 7))
    return msg


def _is_repeated(field: FieldDescriptor) -> bool:
    if hasattr(field, "is_repeated"):  # protobuf >= 6 dropped ``label``
        return bool(field.is_repeated)
    return bool(field.label == FieldDescriptor.LABEL_REPEATED)


def _scalar(field: FieldDescriptor, i: int) -> Any:
    kind = field.cpp_type
    if kind == FieldDescriptor.CPPTYPE_STRING:
        return b"\x00\xffbytes%d" % i if field.type == FieldDescriptor.TYPE_BYTES else f"s{i}é"
    if kind == FieldDescriptor.CPPTYPE_BOOL:
        return True
    if kind in (FieldDescriptor.CPPTYPE_FLOAT, FieldDescriptor.CPPTYPE_DOUBLE):
        return 0.5 + i
    if kind == FieldDescriptor.CPPTYPE_ENUM:
        return field.enum_type.values[-1].number
    if kind in (FieldDescriptor.CPPTYPE_INT32, FieldDescriptor.CPPTYPE_INT64):
        return -(i + 1)  # negative varints are the expensive, error-prone case
    return i + 1


def rollout_group(i: int) -> records_pb2.RolloutGroup:
    """A small rollout group whose idempotency key is ``g<i>``."""
    return records_pb2.RolloutGroup(
        group_id=f"g{i}",
        prompt=records_pb2.PromptTask(prompt_id=str(i), prompt_text=f"{i}+{i}="),
        samples=[records_pb2.Sample(completion_tokens=[1, 2, 3], completion_text=str(2 * i))],
    )


def read_until(
    consumer: Consumer[Any], predicate: Any, timeout_s: float = 10.0, handle: Any = None
) -> list[Delivery[Any]]:
    """Read (and hand to ``handle``) until ``predicate()`` holds; returns every delivery."""
    seen: list[Delivery[Any]] = []
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out; got {[d.entry_id for d in seen]}"
        batch = consumer.read(count=8, block_ms=20)
        seen.extend(batch)
        for delivery in batch:
            if handle is not None:
                handle(delivery)
    return seen


def dead_letters(client: redis.Redis, key: str) -> list[records_pb2.DeadLetter]:
    return [decode(fields, records_pb2.DeadLetter) for _id, fields in client.xrange(key)]


def counter_value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


# --------------------------------------------------------------------------- round trip

RECORD_TYPES = sorted(records_pb2.DESCRIPTOR.message_types_by_name)


@pytest.mark.parametrize("type_name", RECORD_TYPES)
def test_every_record_type_round_trips(
    redis_client: redis.Redis, key_prefix: str, type_name: str
) -> None:
    descriptor = records_pb2.DESCRIPTOR.message_types_by_name[type_name]
    original = populated(descriptor)
    msg_cls = type(original)
    assert original.ByteSize() > 0
    stream = f"{key_prefix}{type_name}"
    entry_id = Producer(redis_client, stream, msg_cls).send(original)
    consumer = Consumer(redis_client, stream, "g", "c", msg_cls, f"{key_prefix}dl")
    [delivery] = consumer.read(count=10)
    assert (delivery.entry_id, delivery.deliveries, delivery.stream) == (entry_id, 1, stream)
    assert delivery.msg == original
    assert type(delivery.msg) is msg_cls
    assert consumer.ack(delivery) == 1
    assert redis_client.xpending(stream, "g")["pending"] == 0
    assert redis_client.xlen(f"{key_prefix}dl") == 0


def test_entry_format_is_msg_and_type_fields(redis_client: redis.Redis, key_prefix: str) -> None:
    stream = f"{key_prefix}prompts"
    task = records_pb2.PromptTask(prompt_id="0:1", prompt_text="1+1=")
    Producer(redis_client, stream, records_pb2.PromptTask).send(task)
    [(_id, fields)] = redis_client.xrange(stream)
    assert fields == {b"msg": task.SerializeToString(), b"type": b"asympo.v1.PromptTask"}


def test_producer_rejects_wrong_type_and_oversized(
    redis_client: redis.Redis, key_prefix: str
) -> None:
    producer = Producer(
        redis_client, f"{key_prefix}p", records_pb2.PromptTask, max_entry_bytes=1000
    )
    with pytest.raises(TypeError, match="PromptTask"):
        producer.send(records_pb2.Sample())  # type: ignore[arg-type]
    with pytest.raises(Exception, match="max_entry_bytes"):
        producer.send(records_pb2.PromptTask(prompt_text="x" * 2000))
    assert redis_client.xlen(f"{key_prefix}p") == 0


def test_group_reads_entries_produced_before_it_existed(
    redis_client: redis.Redis, key_prefix: str
) -> None:
    stream = f"{key_prefix}early"
    producer = Producer(redis_client, stream, records_pb2.RolloutGroup)
    ids = producer.send_many(rollout_group(i) for i in range(5))
    consumer = Consumer(redis_client, stream, "late", "c", records_pb2.RolloutGroup, "dl")
    got = consumer.read(count=3) + consumer.read(count=10)
    assert [d.entry_id for d in got] == ids
    assert consumer.read(count=10, block_ms=10) == []


# --------------------------------------------------------------------------- dead consumer

_DOOMED_WORKER = """
import sys, time
from asympo.config import StreamSettings
from asympo.transport.redis_conn import connect
from asympo.transport.streams import Consumer, Producer, produce_and_ack
from asympo.v1 import records_pb2 as pb
url, stream, out, dl, prefix = sys.argv[1:6]
r = connect(url)
consumer = Consumer(r, stream, "workers", "doomed", pb.RolloutGroup, dl, 5, 60_000)
output = Producer(r, out, pb.ScoredGroup)
batch = consumer.read(count=8)
for d in batch[:3]:  # fully processed: effect + ack in one script
    produce_and_ack([(output, pb.ScoredGroup(rollout=d.msg))], consumer, d,
                    once_key=prefix + "once:" + d.msg.group_id)
# the 4th: effect durable, then the process dies before acking it
d = batch[3]
produce_and_ack([(output, pb.ScoredGroup(rollout=d.msg))], consumer, [],
                once_key=prefix + "once:" + d.msg.group_id)
print("READY", len(batch), flush=True)
time.sleep(600)
"""


def test_killed_consumer_entries_are_reclaimed_and_applied_once(
    redis_client: redis.Redis, redis_url: str, key_prefix: str
) -> None:
    stream, out, dl = f"{key_prefix}rollouts", f"{key_prefix}scored", f"{key_prefix}dl"
    producer = Producer(redis_client, stream, records_pb2.RolloutGroup)
    producer.send_many(rollout_group(i) for i in range(20))
    worker = subprocess.Popen(
        [sys.executable, "-c", _DOOMED_WORKER, redis_url, stream, out, dl, key_prefix],
        stdout=subprocess.PIPE,
        cwd=REPO_ROOT,
    )
    try:
        assert worker.stdout is not None
        line = worker.stdout.readline().decode()
        assert line.split() == ["READY", "8"], line
        worker.send_signal(signal.SIGKILL)  # mid-batch: 5 of its 8 entries still pending
        worker.wait(timeout=10)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    pending = redis_client.xpending_range(stream, "workers", "-", "+", 100)
    assert len(pending) == 5 and {p["consumer"] for p in pending} == {b"doomed"}

    survivor = Consumer(
        redis_client, stream, "workers", "survivor", records_pb2.RolloutGroup, dl, 5, 200
    )
    output = Producer(redis_client, out, records_pb2.ScoredGroup)
    applied: list[str] = []

    def handle(delivery: Delivery[records_pb2.RolloutGroup]) -> None:
        committed = produce_and_ack(
            [(output, records_pb2.ScoredGroup(rollout=delivery.msg))],
            survivor,
            delivery,
            once_key=f"{key_prefix}once:{delivery.msg.group_id}",
        )
        if not committed.duplicate:
            applied.append(delivery.msg.group_id)

    seen = read_until(
        survivor,
        lambda: (
            redis_client.xpending(stream, "workers")["pending"] == 0
            and lag(redis_client, stream, "workers") == 0
        ),
        handle=handle,
    )
    reclaimed = [d for d in seen if d.deliveries > 1]
    assert len(reclaimed) == 5, [(d.msg.group_id, d.deliveries) for d in seen]
    assert all(d.deliveries == 2 for d in reclaimed)
    assert len(seen) == 17  # 5 reclaimed + 12 never read by the dead consumer
    # Each entry's effect exactly once: 20 outputs, one per group id (g3 was applied by
    # the dead worker and only acked by the survivor).
    outputs = [decode(f, records_pb2.ScoredGroup) for _i, f in redis_client.xrange(out)]
    assert sorted(s.rollout.group_id for s in outputs) == sorted(f"g{i}" for i in range(20))
    assert "g3" not in applied and len(applied) == 16
    assert redis_client.xlen(dl) == 0


# --------------------------------------------------------------------------- dead letters


def test_poison_entry_dead_lettered_after_max_deliveries(
    redis_client: redis.Redis, key_prefix: str
) -> None:
    stream, dl = f"{key_prefix}rollouts", f"{key_prefix}dl"
    registry = CollectorRegistry()
    producer = Producer(redis_client, stream, records_pb2.RolloutGroup)
    ids = producer.send_many(rollout_group(i) for i in range(6))
    poison_id = ids[2]
    consumer = Consumer(
        redis_client, stream, "g", "c", records_pb2.RolloutGroup, dl,
        max_deliveries=3, reclaim_idle_ms=30, registry=registry,
    )  # fmt: skip
    processed: list[str] = []
    attempts: list[int] = []

    def handle(delivery: Delivery[records_pb2.RolloutGroup]) -> None:
        if delivery.entry_id == poison_id:
            attempts.append(delivery.deliveries)
            return  # processing fails: no ack, so it is redelivered after the idle time
        processed.append(delivery.msg.group_id)
        consumer.ack(delivery)

    read_until(consumer, lambda: redis_client.xlen(dl) == 1, handle=handle)
    assert processed == ["g0", "g1", "g3", "g4", "g5"]  # the rest flowed meanwhile
    assert attempts == [1, 2, 3]
    [letter] = dead_letters(redis_client, dl)
    assert letter.origin_stream == stream and letter.origin_id == poison_id
    assert (letter.consumer_group, letter.consumer) == ("g", "c")
    assert letter.reason.startswith(REASON_MAX_DELIVERIES) and letter.deliveries == 4
    assert records_pb2.RolloutGroup.FromString(letter.payload).group_id == "g2"
    assert redis_client.xpending(stream, "g")["pending"] == 0
    assert (
        counter_value(
            registry, "asympo_dead_letters_total", stream=stream, reason=REASON_MAX_DELIVERIES
        )
        == 1
    )


def test_malformed_entries_dead_lettered_consumer_keeps_going(
    redis_client: redis.Redis, key_prefix: str
) -> None:
    stream, dl = f"{key_prefix}rollouts", f"{key_prefix}dl"
    registry = CollectorRegistry()
    producer = Producer(redis_client, stream, records_pb2.RolloutGroup)
    producer.send(rollout_group(0))
    bad_bytes = redis_client.xadd(
        stream, {b"msg": b"\xff\xff\xff", b"type": b"asympo.v1.RolloutGroup"}
    )
    wrong_type = redis_client.xadd(
        stream, {b"msg": records_pb2.Probe(tokens=[1]).SerializeToString(),
                 b"type": b"asympo.v1.Probe"},
    )  # fmt: skip
    no_msg = redis_client.xadd(stream, {b"type": b"asympo.v1.RolloutGroup"})
    pickled = redis_client.xadd(stream, {b"data": b"\x80\x04K\x01."})
    producer.send(rollout_group(1))
    consumer = Consumer(
        redis_client, stream, "g", "c", records_pb2.RolloutGroup, dl, registry=registry
    )
    got = consumer.read(count=100)
    assert [d.msg.group_id for d in got] == ["g0", "g1"]
    consumer.ack(got)
    letters = {letter.origin_id: letter for letter in dead_letters(redis_client, dl)}
    reasons = {i: letters[i.decode()].reason.split(":")[0] for i in
               (bad_bytes, wrong_type, no_msg, pickled)}  # fmt: skip
    assert reasons == {
        bad_bytes: REASON_DECODE_ERROR,
        wrong_type: REASON_WRONG_TYPE,
        no_msg: REASON_MISSING_FIELD,
        pickled: REASON_MISSING_FIELD,
    }
    assert letters[bad_bytes.decode()].payload == b"\xff\xff\xff"
    assert redis_client.xpending(stream, "g")["pending"] == 0
    assert (
        counter_value(
            registry, "asympo_dead_letters_total", stream=stream, reason=REASON_MISSING_FIELD
        )
        == 2
    )


def test_from_settings_uses_run_keys_and_entry_limit(
    redis_client: redis.Redis, stream_settings: StreamSettings, key_prefix: str
) -> None:
    streams = stream_settings.model_copy(update={"max_entry_bytes": 2048})
    producer = Producer.from_settings(
        redis_client, streams, streams.rollouts, records_pb2.RolloutGroup
    )
    assert producer.stream_key == f"{key_prefix}rollouts"
    producer.send(rollout_group(0))
    huge = records_pb2.RolloutGroup(group_id="huge", engine="x" * 4096).SerializeToString()
    redis_client.xadd(producer.stream_key, {b"msg": huge, b"type": b"asympo.v1.RolloutGroup"})
    consumer = Consumer.from_settings(
        redis_client, streams, streams.rollouts, "reward", "r0", records_pb2.RolloutGroup
    )
    assert consumer.dead_letter_key == f"{key_prefix}dead-letter"
    assert [d.msg.group_id for d in consumer.read(count=10)] == ["g0"]
    [letter] = dead_letters(redis_client, consumer.dead_letter_key)
    assert letter.reason.startswith(REASON_TOO_LARGE) and letter.payload == huge


def test_caller_can_dead_letter_an_entry(redis_client: redis.Redis, key_prefix: str) -> None:
    stream, dl = f"{key_prefix}scored", f"{key_prefix}dl"
    Producer(redis_client, stream, records_pb2.ScoredGroup).send(
        records_pb2.ScoredGroup(scorer="x")
    )
    consumer = Consumer(redis_client, stream, "g", "c", records_pb2.ScoredGroup, dl)
    [delivery] = consumer.read()
    consumer.dead_letter(delivery, "no_scores", "0 scores for 0 samples")
    [letter] = dead_letters(redis_client, dl)
    assert letter.reason == "no_scores: 0 scores for 0 samples"
    assert records_pb2.ScoredGroup.FromString(letter.payload).scorer == "x"
    assert redis_client.xpending(stream, "g")["pending"] == 0


# --------------------------------------------------------------------------- bounds, lag


def test_maxlen_is_respected(redis_client: redis.Redis, key_prefix: str) -> None:
    stream = f"{key_prefix}bounded"
    producer = Producer(redis_client, stream, records_pb2.PromptTask, maxlen=100)
    for start in range(0, 2000, 100):
        producer.send_many(records_pb2.PromptTask(seq=i) for i in range(start, start + 100))
    length = redis_client.xlen(stream)
    # Approximate trimming removes whole radix-tree nodes (100 entries by default).
    assert 100 <= length <= 300, length
    last = records_pb2.PromptTask.FromString(redis_client.xrevrange(stream, count=1)[0][1][b"msg"])
    assert last.seq == 1999


def test_pending_entries_trimmed_away_do_not_stay_pending(
    redis_client: redis.Redis, key_prefix: str
) -> None:
    stream = f"{key_prefix}trimmed"
    producer = Producer(redis_client, stream, records_pb2.PromptTask, maxlen=None)
    producer.send_many(records_pb2.PromptTask(seq=i) for i in range(5))
    dead = Consumer(redis_client, stream, "g", "dead", records_pb2.PromptTask, "dl")
    assert len(dead.read(count=3)) == 3  # then never acked
    redis_client.xtrim(stream, maxlen=0)  # the bound removed them while pending
    producer.send(records_pb2.PromptTask(seq=99))
    time.sleep(0.01)
    alive = Consumer(
        redis_client, stream, "g", "alive", records_pb2.PromptTask, "dl", reclaim_idle_ms=1
    )
    got = alive.read(count=10)
    assert [d.msg.seq for d in got] == [99]
    alive.ack(got)
    assert redis_client.xpending(stream, "g")["pending"] == 0


def test_ack_in_a_transaction_with_the_effect(redis_client: redis.Redis, key_prefix: str) -> None:
    src, out = f"{key_prefix}in", f"{key_prefix}out"
    Producer(redis_client, src, records_pb2.RolloutGroup).send(rollout_group(5))
    consumer = Consumer(redis_client, src, "g", "c", records_pb2.RolloutGroup, "dl")
    output = Producer(redis_client, out, records_pb2.ScoredGroup)
    [delivery] = consumer.read()
    pipe = redis_client.pipeline(transaction=True)
    output.queue(pipe, [records_pb2.ScoredGroup(rollout=delivery.msg)])
    assert consumer.ack(delivery, pipeline=pipe) == 0  # only queued
    assert redis_client.xpending(src, "g")["pending"] == 1
    pipe.execute()
    assert redis_client.xpending(src, "g")["pending"] == 0
    assert redis_client.xlen(out) == 1


def test_lag_is_readable(redis_client: redis.Redis, key_prefix: str) -> None:
    stream = f"{key_prefix}rollouts"
    registry = CollectorRegistry()
    assert lag(redis_client, stream, "g") == 0  # no stream yet
    Producer(redis_client, stream, records_pb2.RolloutGroup).send_many(
        rollout_group(i) for i in range(10)
    )
    consumer = Consumer(
        redis_client, stream, "g", "c", records_pb2.RolloutGroup, "dl", registry=registry
    )
    assert consumer.lag() == 10
    consumer.read(count=4)
    assert lag(redis_client, stream, "g") == 6
    last = redis_client.xinfo_groups(stream)[0]["last-delivered-id"].decode()
    assert _count_after(redis_client, stream, last, chunk=4) == 6  # the pre-7.0 fallback
    assert consumer.refresh_lag_metric() == 6
    value = registry.get_sample_value("asympo_stream_lag_entries", {"stream": stream, "group": "g"})
    assert value == 6
    # A second consumer on the same registry shares the collectors.
    Consumer(redis_client, stream, "g2", "c", records_pb2.RolloutGroup, "dl", registry=registry)


def test_produce_and_ack_skips_duplicates(redis_client: redis.Redis, key_prefix: str) -> None:
    src, out = f"{key_prefix}in", f"{key_prefix}out"
    Producer(redis_client, src, records_pb2.RolloutGroup).send_many(
        [rollout_group(1), rollout_group(1)]  # the same group twice (a producer retried)
    )
    consumer = Consumer(redis_client, src, "g", "c", records_pb2.RolloutGroup, "dl")
    output = Producer(redis_client, out, records_pb2.ScoredGroup, maxlen=None)
    results = [
        produce_and_ack(
            [(output, records_pb2.ScoredGroup(rollout=d.msg))],
            consumer,
            d,
            once_key=f"{key_prefix}once:{d.msg.group_id}",
        )
        for d in consumer.read(count=10)
    ]
    assert [r.duplicate for r in results] == [False, True]
    assert len(results[0].ids) == 1 and results[1].ids == []
    assert redis_client.xlen(out) == 1
    assert redis_client.xpending(src, "g")["pending"] == 0


def test_produce_and_ack_many_is_one_round_trip_of_atomic_commits(
    redis_client: redis.Redis, key_prefix: str
) -> None:
    src, out = f"{key_prefix}in", f"{key_prefix}out"
    Producer(redis_client, src, records_pb2.RolloutGroup).send_many(
        [rollout_group(1), rollout_group(2), rollout_group(1), rollout_group(3)]
    )
    consumer = Consumer(redis_client, src, "g", "c", records_pb2.RolloutGroup, "dl")
    output = Producer(redis_client, out, records_pb2.ScoredGroup, maxlen=None)
    deliveries = consumer.read(count=10)
    results = produce_and_ack_many(
        [
            (
                [(output, records_pb2.ScoredGroup(rollout=d.msg))],
                d,
                f"{key_prefix}o:{d.msg.group_id}",
            )
            for d in deliveries
        ],
        consumer,
    )
    assert [r.duplicate for r in results] == [False, False, True, False]
    got = [
        records_pb2.ScoredGroup.FromString(f[b"msg"]).rollout.group_id
        for _, f in redis_client.xrange(out)
    ]
    assert got == [deliveries[i].msg.group_id for i in (0, 1, 3)]
    assert [r.ids[0] for r in results if r.ids] == [i.decode() for i, _ in redis_client.xrange(out)]
    assert redis_client.xpending(src, "g")["pending"] == 0
    assert produce_and_ack_many([], consumer) == []


def test_produce_and_ack_many_survives_a_redis_script_cache_lost_mid_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Redis restart between the pipeline's script check and its EVALSHAs (the chaos
    test's rollout died of NOSCRIPT there): the batch is sent again, written once."""
    with EmbeddedRedis(tmp_path / "redis") as server:
        client = connect(server.url)
        src, out = "in", "out"
        Producer(client, src, records_pb2.RolloutGroup).send_many(
            [rollout_group(1), rollout_group(2)]
        )
        consumer = Consumer(client, src, "g", "c", records_pb2.RolloutGroup, "dl")
        output = Producer(client, out, records_pb2.ScoredGroup, maxlen=None)
        items = [
            ([(output, records_pb2.ScoredGroup(rollout=d.msg))], d, f"o:{d.msg.group_id}")
            for d in consumer.read(count=10)
        ]
        client.script_flush()  # what a restart does to the cache
        checks = []
        real = redis.client.Pipeline.load_scripts

        def checked_before_the_restart(pipe: Any) -> None:
            checks.append(1)
            if len(checks) > 1:  # only the first pipeline's check happened "before"
                real(pipe)

        monkeypatch.setattr(redis.client.Pipeline, "load_scripts", checked_before_the_restart)
        results = produce_and_ack_many(items, consumer)
        assert [r.duplicate for r in results] == [False, False]
        assert client.xlen(out) == 2 and client.xpending(src, "g")["pending"] == 0
        client.close()


# --------------------------------------------------------------------------- connection


def _process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # A zombie still answers kill(0); it no longer serves anything.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except OSError:
        return True


def test_embedded_server_starts_serves_and_stops(tmp_path: Path) -> None:
    with EmbeddedRedis(tmp_path / "redis") as server:
        pid = server.pid
        assert pid is not None and not _process_gone(pid)
        client = connect(server.url)  # the same code path as with a URL
        stream = "asympo:embedded:test"
        Producer(client, stream, records_pb2.PromptTask).send(records_pb2.PromptTask(seq=3))
        consumer = Consumer(client, stream, "g", "c", records_pb2.PromptTask, "dl")
        [delivery] = consumer.read()
        assert delivery.msg.seq == 3
        client.close()
        socket_path = Path(server.socket_path)
    assert _process_gone(pid)
    assert not socket_path.exists()
    with pytest.raises(RedisUnavailable):
        connect("unix://" + str(socket_path))


_EMBEDDED_CHILD = """
import sys
import threading
from asympo.config import StreamSettings
from asympo.transport.redis_conn import connect
client = connect("", sys.argv[1])
client.set("k", "v")
print(client.info("server")["process_id"], flush=True)
if sys.argv[2] == "hang":
    import time; time.sleep(600)
"""


@pytest.mark.parametrize("how", ["exit", "killed"])
def test_embedded_server_of_connect_dies_with_its_process(tmp_path: Path, how: str) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", _EMBEDDED_CHILD, str(tmp_path / "r"),
         "hang" if how == "killed" else "exit"],
        stdout=subprocess.PIPE,
        cwd=REPO_ROOT,
    )  # fmt: skip
    assert child.stdout is not None
    server_pid = int(child.stdout.readline())
    if how == "killed":
        child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    deadline = time.monotonic() + 10
    while not _process_gone(server_pid):
        assert time.monotonic() < deadline, f"redis-server {server_pid} outlived its owner"
        time.sleep(0.05)


def test_connect_errors_are_clear() -> None:
    with pytest.raises(RedisUnavailable, match=r"cannot reach Redis at redis://:\*\*\*@"):
        connect("redis://:hunter2@127.0.0.1:1/0")
    with pytest.raises(ValueError, match="must start with"):
        connect("http://127.0.0.1:6379")
    assert redact("rediss://user:pw@host:6380/1") == "rediss://user:***@host:6380/1"
    assert redact("unix:///tmp/r.sock?password=pw&db=2") == "unix:///tmp/r.sock?password=***&db=2"


def test_connect_with_password(redis_url: str, key_prefix: str, tmp_path: Path) -> None:
    """A password in the URL is used (on an embedded server we can configure)."""
    with EmbeddedRedis(tmp_path / "auth") as server:
        admin = connect(server.url)
        admin.config_set("requirepass", "s3cret")
        path = server.socket_path
        assert connect(f"unix://:s3cret@{path}").ping()
        with pytest.raises(RedisUnavailable, match=r"\*\*\*"):
            connect(f"unix://:wrong@{path}")
        with pytest.raises(RedisUnavailable):
            connect(f"unix://{path}")


def test_client_rides_out_a_redis_restart(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path / "restart").start()
    try:
        client = connect(server.url, retry_window_s=10)
        stream = "asympo:restart:s"
        producer = Producer(client, stream, records_pb2.PromptTask)
        producer.send(records_pb2.PromptTask(seq=1))
        server.stop()  # persistence is off: the data is gone, the client must reconnect
        restarter = threading.Timer(0.5, server.start)
        restarter.start()
        started = time.monotonic()
        producer.send(records_pb2.PromptTask(seq=2))  # retried until the server is back
        restarter.join()
        assert time.monotonic() - started >= 0.3
        consumer = Consumer(client, stream, "g", "c", records_pb2.PromptTask, "dl")
        assert [d.msg.seq for d in consumer.read(count=10)] == [2]
        client.close()
    finally:
        server.stop()


def test_stream_metrics_reuse_collectors_a_service_declared() -> None:
    registry = CollectorRegistry()
    declared = Counter(
        "asympo_dead_letters_total", "declared by a service", ["stream", "reason"],
        registry=registry,
    )  # fmt: skip
    metrics = stream_metrics(registry)
    assert metrics.dead_letters is declared
    assert stream_metrics(registry) is metrics
    clashing = CollectorRegistry()
    Gauge("asympo_stream_lag_entries", "wrong labels", ["stream"], registry=clashing)
    with pytest.raises(ValueError, match="labels"):
        stream_metrics(clashing)
