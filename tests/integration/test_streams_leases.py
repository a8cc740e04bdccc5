"""Leases, own-pending re-reads and broadcast reads of asympo.transport.streams, on a real Redis."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, cast

import redis

from asympo.transport.streams import (
    REASON_TOO_LARGE,
    REASON_WRONG_TYPE,
    Consumer,
    Producer,
    Subscriber,
    decode,
    encode,
)
from asympo.v1 import records_pb2


def prompt(i: int, text: str = "") -> records_pb2.PromptTask:
    return records_pb2.PromptTask(prompt_id=f"p{i}", seq=i, prompt_text=text or f"q{i}")


def consumer(
    r: redis.Redis, stream: str, name: str, reclaim_idle_ms: int = 30_000, **kw: Any
) -> Consumer[records_pb2.PromptTask]:
    return Consumer(
        r, stream, "g", name, records_pb2.PromptTask, stream + ":dl",
        reclaim_idle_ms=reclaim_idle_ms, **kw,
    )  # fmt: skip


def idle_ms(r: redis.Redis, stream: str, entry_id: str) -> tuple[int, int, str]:
    """(idle ms, times delivered, owner) of a pending entry."""
    rows = cast("list[Any]", r.xpending_range(stream, "g", entry_id, entry_id, 1))
    row = rows[0]
    return int(row["time_since_delivered"]), int(row["times_delivered"]), row["consumer"].decode()


def dead_letters(r: redis.Redis, stream: str) -> list[records_pb2.DeadLetter]:
    return [decode(f, records_pb2.DeadLetter) for _, f in r.xrange(stream + ":dl")]


# --------------------------------------------------------------------------- renew


def test_renew_resets_idle_time_without_counting_a_delivery(
    redis_client: redis.Redis, key_prefix: str
) -> None:
    stream = f"{key_prefix}prompts"
    Producer(redis_client, stream, records_pb2.PromptTask).send_many([prompt(0), prompt(1)])
    c = consumer(redis_client, stream, "c")
    held = c.read(count=2)
    time.sleep(0.3)
    assert all(idle_ms(redis_client, stream, d.entry_id)[0] >= 250 for d in held)
    c.ack(held[1])
    assert c.renew(held) == [held[0].entry_id]  # the acked one is left alone
    idle, times, owner = idle_ms(redis_client, stream, held[0].entry_id)
    assert idle < 200 and times == 1 and owner == "c"
    assert c.renew([]) == []


def test_renew_due_renews_once_per_quarter_of_the_idle_time(
    redis_client: redis.Redis, key_prefix: str
) -> None:
    stream = f"{key_prefix}prompts"
    Producer(redis_client, stream, records_pb2.PromptTask).send(prompt(0))
    c = consumer(redis_client, stream, "c", reclaim_idle_ms=800)
    assert c.renew_every_s == 0.2
    held = c.read()
    assert not c.renew_due([])  # nothing held: nothing to renew, and no turn used
    assert c.renew_due(held)
    assert not c.renew_due(held)  # too soon
    time.sleep(0.25)
    assert c.renew_due(held)


def test_holding_keeps_slow_work_from_being_reclaimed_until_it_ends(
    redis_client: redis.Redis, key_prefix: str
) -> None:
    stream = f"{key_prefix}prompts"
    Producer(redis_client, stream, records_pb2.PromptTask).send_many([prompt(0), prompt(1)])
    slow = consumer(redis_client, stream, "slow", reclaim_idle_ms=300)
    other = consumer(redis_client, stream, "other", reclaim_idle_ms=300, reclaim_every_ms=1)
    held = slow.read(count=2)
    with slow.holding(held):
        deadline = time.monotonic() + 1.2  # four times the idle time
        while time.monotonic() < deadline:
            assert other.read(count=2) == [], "a held entry was reclaimed"
            time.sleep(0.05)
    time.sleep(0.4)  # no one renews any more: the entries now look abandoned
    taken = other.read(count=2)
    assert [d.entry_id for d in taken] == [d.entry_id for d in held]
    assert all(d.deliveries == 2 for d in taken)


def test_holding_nothing_runs_the_body(redis_client: redis.Redis, key_prefix: str) -> None:
    c = consumer(redis_client, f"{key_prefix}prompts", "c")
    ran = []
    with c.holding([]):
        ran.append(True)
    assert ran == [True]


# --------------------------------------------------------------------------- read_pending


def test_read_pending_returns_own_unacked_entries_in_order(
    redis_client: redis.Redis, key_prefix: str
) -> None:
    stream = f"{key_prefix}prompts"
    Producer(redis_client, stream, records_pb2.PromptTask).send_many(prompt(i) for i in range(7))
    before = consumer(redis_client, stream, "c")
    mine = before.read(count=5)
    before.ack(mine[1])
    consumer(redis_client, stream, "someone-else").read(count=2)  # not ours
    redis_client.xdel(stream, mine[3].entry_id)  # trimmed away while pending

    restarted = consumer(redis_client, stream, "c")
    again = restarted.read_pending(count=2)  # pages of 2
    assert [d.msg.seq for d in again] == [0, 2, 4]
    assert all(d.deliveries == 2 and d.stream == stream for d in again)
    pending = cast("list[Any]", redis_client.xpending_range(stream, "g", "-", "+", 10, "c"))
    assert [p["message_id"].decode() for p in pending] == [d.entry_id for d in again]
    assert restarted.read_pending() != []  # still ours until acked
    restarted.ack(again)
    assert restarted.read_pending() == []


def test_read_pending_does_not_count_restarts_against_max_deliveries(
    redis_client: redis.Redis, key_prefix: str
) -> None:
    # The owner resuming its own work is not a poison entry going round the group.
    stream = f"{key_prefix}prompts"
    Producer(redis_client, stream, records_pb2.PromptTask).send(prompt(0))
    consumer(redis_client, stream, "c", max_deliveries=2).read()
    for restart in range(4):
        again = consumer(redis_client, stream, "c", max_deliveries=2).read_pending()
        assert [d.deliveries for d in again] == [restart + 2]
    assert dead_letters(redis_client, stream) == []


def test_read_pending_decodes_like_read_and_dead_letters_what_fails(
    redis_client: redis.Redis, key_prefix: str
) -> None:
    stream = f"{key_prefix}prompts"
    Producer(redis_client, stream, records_pb2.PromptTask).send_many(
        [prompt(0), prompt(1, text="x" * 5000), prompt(2)]
    )
    fields = encode(records_pb2.DeadLetter(reason="not a prompt"))
    redis_client.xadd(stream, cast("dict[Any, Any]", fields))
    # Read before a restart by a process with no size limit (or a larger one).
    assert len(consumer(redis_client, stream, "c").read(count=10)) == 3  # wrong type: gone
    redis_client.xadd(stream, cast("dict[Any, Any]", fields))
    redis_client.xreadgroup("g", "c", {stream: ">"})  # read raw, left pending

    restarted = consumer(redis_client, stream, "c", max_entry_bytes=1000)
    assert [d.msg.seq for d in restarted.read_pending()] == [0, 2]
    reasons = [letter.reason.split(":")[0] for letter in dead_letters(redis_client, stream)]
    assert reasons == [REASON_WRONG_TYPE, REASON_TOO_LARGE, REASON_WRONG_TYPE]
    assert [d.msg.seq for d in restarted.read_pending()] == [0, 2]  # the failed ones: acked


def test_a_restarted_learner_refuses_an_oversize_pending_entry(
    redis_client: redis.Redis, run_id: str, key_prefix: str, tmp_path: Path
) -> None:
    from services.learner.learner import CONSUMER_GROUP, Learner
    from tests.integration.test_learner import scored_group, settings_for
    from tests.unit.test_learner_step import tiny_model

    settings = settings_for(run_id, tmp_path / "ckpt")
    streams = settings.streams
    key = streams.key(streams.scored)
    producer = Producer(redis_client, key, records_pb2.ScoredGroup)
    small = scored_group(run_id, 0, version=0)
    big = scored_group(run_id, 1, version=0)
    big.rollout.prompt.prompt_text = "x" * 4096
    ids = producer.send_many([small, big])
    # The learner before the restart read both (under a larger max_entry_bytes).
    redis_client.xgroup_create(key, CONSUMER_GROUP, id="0")
    redis_client.xreadgroup(CONSUMER_GROUP, "learner-0", {key: ">"})
    limit = len(small.SerializeToString()) + 100
    assert len(big.SerializeToString()) > limit

    settings = settings.model_copy(
        update={"streams": streams.model_copy(update={"max_entry_bytes": limit})}
    )
    learner = Learner(settings, redis_client, tiny_model())
    assert [h.delivery.entry_id for h in learner.intake.buffer] == [ids[0]]
    assert learner.intake.held_ids == {ids[0]}
    letters = [decode(f, records_pb2.DeadLetter) for _, f in redis_client.xrange(
        streams.key(streams.dead_letter))]  # fmt: skip
    assert [(d.origin_id, d.reason.split(":")[0]) for d in letters] == [(ids[1], REASON_TOO_LARGE)]


# --------------------------------------------------------------------------- subscriber


def test_subscribers_each_read_every_entry_once_in_order(
    redis_client: redis.Redis, key_prefix: str
) -> None:
    stream = f"{key_prefix}weights"
    producer = Producer(redis_client, stream, records_pb2.VersionAnnouncement)
    producer.send_many(records_pb2.VersionAnnouncement(version=v) for v in range(3))
    redis_client.xadd(stream, {b"msg": b"\xff", b"type": b"asympo.v1.VersionAnnouncement"})
    producer.send(records_pb2.VersionAnnouncement(version=3, source="y" * 500))
    producer.send(records_pb2.VersionAnnouncement(version=4))

    a = Subscriber(redis_client, stream, records_pb2.VersionAnnouncement, max_entry_bytes=200)
    b = Subscriber(redis_client, stream, records_pb2.VersionAnnouncement, max_entry_bytes=200)
    first = a.read(count=2)
    assert [e.msg.version for e in first] == [0, 1]
    assert [e.msg.version for e in a.read()] == [2, 4]  # bad bytes and oversize skipped
    assert [e.msg.version for e in b.read()] == [0, 1, 2, 4]  # b sees everything too
    assert a.read() == []
    assert redis_client.xlen(stream) == 6  # a broadcast stream is never consumed away

    started = time.monotonic()
    assert a.read(block_ms=200) == []
    assert time.monotonic() - started >= 0.15
    producer.send(records_pb2.VersionAnnouncement(version=5))
    assert [e.msg.version for e in a.read(block_ms=1000)] == [5]
    assert a.last_id == b.read()[-1].entry_id
