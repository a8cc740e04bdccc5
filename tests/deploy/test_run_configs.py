"""The GPU deployments run the ready configs (configs/) unchanged.

The images carry configs/ at ``IMAGE_CONFIGS``; compose's gpu profile and the Kubernetes
gpu overlay select one with ``ASYMPO_CONFIG``. ``ASYMPO_*`` variables beat a config file
key by key, so every setting a config file makes must come out of the container's
environment exactly as the file says: nothing in the manifests may override it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from asympo.config import Settings
from tests.deploy.manifests import (
    IMAGE_CONFIGS,
    ROOT,
    compose_env,
    compose_file,
    effective_settings,
    overlay,
)
from tests.deploy.test_k8s import container_env, find, pod_spec

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
GPU_SERVICES = ("rollout", "learner")


def leaves(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"section.key": value}`` for every value a config file sets."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key != "plugins" and not key.endswith("_args"):
            out.update(leaves(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def dotted(settings: Settings, key: str) -> Any:
    node: Any = settings.model_dump(mode="json")
    for part in key.split("."):
        node = node[part]
    return node


def assert_file_wins(settings: Settings, config: Path, where: str) -> None:
    """Every setting ``config`` makes is what ``settings`` (a container's) resolved."""
    alone = effective_settings({"ASYMPO_CONFIG": str(config)})
    keys = leaves(yaml.safe_load(config.read_text()))
    assert keys, config
    beaten = {k: (dotted(settings, k), dotted(alone, k)) for k in keys
              if dotted(settings, k) != dotted(alone, k)}  # fmt: skip
    assert not beaten, f"{where}: the environment overrides {config.name}: {beaten}"


def image_config(env: dict[str, str]) -> Path:
    path = env["ASYMPO_CONFIG"]
    assert path.startswith(IMAGE_CONFIGS + "/"), path
    return ROOT / "configs" / path.removeprefix(IMAGE_CONFIGS + "/")


def test_both_images_carry_the_configs() -> None:
    stages = re.split(r"^FROM .* AS (\w+)$", (ROOT / "Dockerfile").read_text(), flags=re.M)
    by_stage = dict(zip(stages[1::2], stages[2::2], strict=True))
    for stage in ("slim", "gpu"):
        assert f"COPY configs {IMAGE_CONFIGS}\n" in by_stage[stage], stage
    dockerignore = (ROOT / ".dockerignore").read_text().split()
    assert "configs" not in dockerignore and "configs/" not in dockerignore


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_compose_gpu_profile_runs_each_config_unchanged(config: Path) -> None:
    compose = compose_file({"ASYMPO_GPU_CONFIG": config.stem})
    for name in GPU_SERVICES:
        env = compose_env(compose["services"][name])
        assert image_config(env) == config
        assert_file_wins(effective_settings(env), config, f"compose {name}")


def test_compose_gpu_profile_default_config_exists() -> None:
    env = compose_env(compose_file()["services"]["rollout"])
    assert image_config(env).is_file()
    # The cpu profile has no config file: the tiny model, set by its own variables.
    cpu = compose_env(compose_file()["services"]["rollout-cpu"])
    assert "ASYMPO_CONFIG" not in cpu and "ASYMPO_MODEL__PATH" in cpu


def test_k8s_gpu_overlay_runs_its_config_unchanged() -> None:
    docs = overlay("gpu")
    for kind, name in (("Deployment", "rollout"), ("StatefulSet", "learner")):
        (container,) = [c for c in pod_spec(find(docs, kind, name))["containers"]]
        env = container_env(docs, container)
        config = image_config(env)
        assert config.is_file(), config
        assert_file_wins(effective_settings(env), config, f"gpu overlay {name}")
    cpu = find(overlay("cpu-dev"), "ConfigMap", "asympo-config")["data"]
    assert not cpu.get("ASYMPO_CONFIG") and cpu["ASYMPO_TASK__NAME"] == "arith"
