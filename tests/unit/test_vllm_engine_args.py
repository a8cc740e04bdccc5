"""rollout.engine_args: every name checked against the installed vLLM's AsyncEngineArgs."""

from __future__ import annotations

import pytest

from asympo.config import ConfigError, load_settings
from asympo.engines.vllm_engine import (
    RESERVED_ENGINE_ARGS,
    EngineArgsError,
    engine_arg_names,
    validate_engine_args,
)

pytest.importorskip("vllm")


@pytest.fixture(scope="module")
def names() -> list[str]:
    return engine_arg_names()


def test_the_fields_the_engine_sets_exist_in_the_installed_vllm(names: list[str]) -> None:
    assert set(RESERVED_ENGINE_ARGS) <= set(names)
    assert not any(n.startswith("_") for n in names)


def test_valid_names_pass_through(names: list[str]) -> None:
    args = {"max_num_batched_tokens": 8192, "block_size": 32, "kv_cache_dtype": "fp8"}
    assert validate_engine_args(args, names) == args
    assert validate_engine_args({}, names) == {}


def test_an_unknown_name_is_one_clear_error_listing_the_valid_ones(names: list[str]) -> None:
    with pytest.raises(EngineArgsError) as err:
        validate_engine_args({"max_num_batched_token": 8192}, names)
    message = str(err.value)
    assert "\n" not in message
    assert (
        "rollout.engine_args.max_num_batched_token is not a vLLM AsyncEngineArgs field" in message
    )
    assert "did you mean max_num_batched_tokens" in message
    valid = message.partition("valid: ")[2].split(", ")
    assert "block_size" in valid and "worker_extension_cls" not in valid


def test_a_name_set_by_a_setting_points_to_the_setting(names: list[str]) -> None:
    with pytest.raises(EngineArgsError, match=r"rollout\.tensor_parallel_size"):
        validate_engine_args({"tensor_parallel_size": 2}, names)
    with pytest.raises(EngineArgsError, match=r"rollout\.cuda_graphs"):
        validate_engine_args({"enforce_eager": False}, names)


def test_rollout_settings_take_engine_arguments() -> None:
    settings = load_settings(
        overrides=[
            "rollout.tensor_parallel_size=4",
            "rollout.max_model_len=8192",
            "rollout.cuda_graphs=false",
            "rollout.engine_args={max_num_batched_tokens: 8192, block_size: 32}",
        ]
    )
    ro = settings.rollout
    assert (ro.tensor_parallel_size, ro.max_model_len, ro.cuda_graphs) == (4, 8192, False)
    assert ro.engine_args == {"max_num_batched_tokens": 8192, "block_size": 32}
    with pytest.raises(ConfigError, match="tensor_parallel_size"):
        load_settings(overrides=["rollout.tensor_parallel_size=0"])
