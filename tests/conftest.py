"""Shared pytest configuration: keep runs offline and deterministic."""

from __future__ import annotations

import os

# Tests never download: no model hub, no dataset hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Real-Redis fixtures (redis_url, redis_client, run_id, key_prefix, stream_settings) for
# the integration and end-to-end tests.
pytest_plugins = ["tests.redis_fixtures"]
