"""Loading the deployment files the way their tools do, for the deploy tests.

* Kubernetes: :func:`overlay` renders an overlay with ``kubectl kustomize`` (what users run).
* Compose: :func:`compose_file` loads docker-compose.yml with YAML merge keys and
  ``${VAR:-default}`` interpolation against a given environment, like ``docker compose``.
* :func:`effective_settings` resolves asympo.config.Settings under a container's env,
  exactly as the service in that container will.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from asympo.config import Settings, load_settings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("cpu-dev", "gpu")
SERVICES = ("weights", "reward", "rollout", "learner")
# Where the images hold configs/ (Dockerfile: COPY configs /app/configs).
IMAGE_CONFIGS = "/app/configs"

Doc = dict[str, Any]


def kustomize(path: Path) -> list[Doc]:
    """The objects ``kubectl kustomize path`` renders (fails clearly without kubectl)."""
    if shutil.which("kubectl") is None:
        raise RuntimeError("kubectl is not installed: the deploy tests render with it")
    result = subprocess.run(["kubectl", "kustomize", str(path)], capture_output=True,
                            text=True, timeout=120)
    if result.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {path} failed: {result.stderr.strip()}")
    return [d for d in yaml.safe_load_all(result.stdout) if d]


@functools.cache
def _overlay_text(name: str) -> str:
    return yaml.safe_dump_all(kustomize(K8S / "overlays" / name))


def overlay(name: str) -> list[Doc]:
    """The Kubernetes objects of overlay ``name`` (a fresh copy per call)."""
    return [d for d in yaml.safe_load_all(_overlay_text(name)) if d]


def prometheus_rule() -> Doc:
    """deploy/prometheus/alerts.yml as the Prometheus Operator's PrometheusRule."""
    groups = yaml.safe_load((ROOT / "deploy/prometheus/alerts.yml").read_text())["groups"]
    return {"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule",
            "metadata": {"name": "asympo", "labels": {"release": "kube-prometheus-stack"}},
            "spec": {"groups": groups}}


_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?-)([^}]*)|(:?\?)([^}]*))?\}")


def interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """Compose variable interpolation (``$$``, ``${X}``, ``${X:-d}``, ``${X-d}``, ``${X:?e}``)."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name, dash_op, default, err_op, message = m.groups()
        current = env.get(name)
        if dash_op == ":-":
            return current if current else default
        if dash_op == "-":
            return default if current is None else current
        if err_op and not current:
            raise ValueError(f"compose variable {name} is required: {message}")
        return current or ""

    return _VAR.sub(sub, value)


def compose_file(env: Mapping[str, str] | None = None) -> Doc:
    """docker-compose.yml as docker compose sees it (merge keys resolved, interpolated)."""
    data = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return dict(interpolate(data, env or {}))


def compose_env(service: Doc) -> dict[str, str]:
    """A compose service's environment as a dict (list or map form)."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


@contextmanager
def environment(env: Mapping[str, str]) -> Iterator[None]:
    """Run with exactly ``env``'s ASYMPO_* / REDIS_URL variables (others untouched)."""
    saved = dict(os.environ)
    for key in list(os.environ):
        if key.startswith("ASYMPO_") or key == "REDIS_URL":
            del os.environ[key]
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def effective_settings(env: Mapping[str, str]) -> Settings:
    """The Settings a service builds from ``env`` (raises ConfigError on unknown names).

    A Redis password file under /run/secrets (a compose secret) is read from a stand-in
    holding ``"<secret name>-password"``; callers check that the secret is mounted. A
    config file under :data:`IMAGE_CONFIGS` is read from this checkout's configs/ (the
    Dockerfile copies it there; test_compose checks).
    """
    env = dict(env)
    config = env.get("ASYMPO_CONFIG", "")
    if config.startswith(IMAGE_CONFIGS + "/"):
        env["ASYMPO_CONFIG"] = str(ROOT / "configs" / config.removeprefix(IMAGE_CONFIGS + "/"))
    secret = env.get("ASYMPO_REDIS__PASSWORD_FILE", "")
    with tempfile.TemporaryDirectory() as tmp:
        if secret.startswith("/run/secrets/"):
            stand_in = Path(tmp) / "password"
            stand_in.write_text(Path(secret).name + "-password")
            env["ASYMPO_REDIS__PASSWORD_FILE"] = str(stand_in)
        with environment(env):
            return load_settings()


def served(args: list[str]) -> str | None:
    """Which ASymPO service a container command line runs (``... serve <name>``)."""
    words = " ".join(args).replace('"', " ").split()
    for i, word in enumerate(words[:-1]):
        if word == "serve" and words[i + 1] in SERVICES:
            return words[i + 1]
    if args and args[0] in SERVICES:
        return args[0]
    return None


if __name__ == "__main__" and sys.argv[1:] == ["prometheus-rule"]:
    rule_file = K8S / "components/service-monitor/prometheus-rule.yaml"
    header = "".join(line + "\n" for line in rule_file.read_text().splitlines()
                     if line.startswith("#"))
    print(header + yaml.safe_dump(prometheus_rule(), sort_keys=False, width=100), end="")
