"""The learner's prefetch thread: the training thread stops reading Redis, and still
trains every group exactly once (real Redis, the real Learner and Consumer)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import redis

from services.learner.learner import Learner
from services.learner.prefetch import Prefetcher
from tests.integration.test_learner import fill, settings_for, train_until
from tests.unit.test_learner_step import tiny_model


def test_steps_take_what_the_prefetch_thread_read_and_train_each_group_once(
    redis_client: redis.Redis, run_id: str, key_prefix: str, tmp_path: Path
) -> None:
    settings = settings_for(run_id, tmp_path / "ckpt", checkpoint_every=3)
    fill(redis_client, settings, run_id, 12)
    learner = Learner(settings, redis_client, tiny_model())
    prefetcher = Prefetcher(learner.consumer, count=2, max_queued=4)
    learner.prefetcher = prefetcher
    readers: set[str] = set()
    real_read = learner.consumer.read

    def read_and_note_thread(*args: object, **kwargs: object) -> object:
        readers.add(threading.current_thread().name)
        return real_read(*args, **kwargs)  # type: ignore[arg-type]

    learner.consumer.read = read_and_note_thread  # type: ignore[method-assign]
    stop = threading.Event()

    def intake() -> None:
        while not stop.is_set():
            prefetcher.step()

    thread = threading.Thread(target=intake, name="learner-intake", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while prefetcher.queued() < 4:  # it reads ahead, up to its bound, on its own
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(0.3)
        assert prefetcher.queued() == 4  # and no further
        trained = train_until(learner, 6)
    finally:
        stop.set()
        thread.join(5)
    assert readers == {"learner-intake"}  # the training thread never read the stream
    assert sorted(trained) == sorted(f"{run_id}/0:{i}" for i in range(12))  # each once
    assert prefetcher.take(timeout_s=0.01) == []  # nothing left behind in the queue
    with pytest.raises(ValueError, match="count <= max_queued"):
        Prefetcher(learner.consumer, count=4, max_queued=3)

