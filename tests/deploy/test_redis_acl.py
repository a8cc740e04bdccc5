"""The Redis ACL in docker-compose.yml and the Kubernetes manifests comes from one source.

asympo/transport/redis_acl.py renders the rules (deploy/k8s/base/redis-users.acl) and the Redis
container's start script; tests/integration/test_redis_acl.py runs both on a real server.
Here: the committed copies are current, Redis starts through that script in compose and
in every overlay, and each service logs in as its own user with its own secret.
"""

from __future__ import annotations

from typing import Any

import pytest

from asympo.transport.redis_acl import SERVICE_USERS, START_SCRIPT, render
from tests.deploy.manifests import K8S, OVERLAYS, compose_env, compose_file, overlay, served
from tests.deploy.test_compose import asympo_services
from tests.deploy.test_k8s import asympo_containers, find, workloads

Doc = dict[str, Any]
SECRET = "asympo-redis-passwords"


def test_users_acl_file_is_current() -> None:
    assert (K8S / "base/redis-users.acl").read_text() == render(), (
        "regenerate: python -m asympo.transport.redis_acl > deploy/k8s/base/redis-users.acl"
    )


def test_compose_redis_starts_through_the_acl_script() -> None:
    compose = compose_file()
    redis = compose["services"]["redis"]
    assert redis["entrypoint"][:3] == ["sh", "-c", START_SCRIPT]
    assert redis["user"] == "redis"  # the script must not run redis-server as root
    assert "./deploy/k8s/base/redis-users.acl:/etc/asympo/redis-users.acl:ro" in redis["volumes"]
    assert sorted(redis["secrets"]) == sorted(f"redis_password_{u}" for u in SERVICE_USERS)
    for user in SERVICE_USERS:
        assert compose["secrets"][f"redis_password_{user}"]["file"].endswith(
            f"/redis_password_{user}"
        )
    # A plain `redis-cli ping` passes on NOAUTH: the probe must log in and see PONG.
    assert "--user healthcheck" in redis["healthcheck"]["test"][1]
    assert "grep -q PONG" in redis["healthcheck"]["test"][1]


def test_each_compose_service_logs_in_as_its_own_user() -> None:
    compose = compose_file()
    services = asympo_services(compose)
    assert {service for service, _ in services.values()} == set(SERVICE_USERS)
    for name, (service, svc) in services.items():
        env = compose_env(svc)
        assert env["ASYMPO_REDIS__USERNAME"] == service, name
        assert env["ASYMPO_REDIS__PASSWORD_FILE"] == f"/run/secrets/redis_password_{service}"
        mounted = [s if isinstance(s, str) else s["source"] for s in svc["secrets"]]
        assert [s for s in mounted if s.startswith("redis_password_")] == [
            f"redis_password_{service}"
        ], f"{name} must mount its own Redis password and no other"


@pytest.mark.parametrize("name", OVERLAYS)
def test_k8s_redis_starts_through_the_acl_script(name: str) -> None:
    docs = overlay(name)
    (redis,) = [w for w in workloads(docs) if w["metadata"]["name"] == "redis"]
    (container,) = redis["spec"]["template"]["spec"]["containers"]
    assert container["command"][:3] == ["sh", "-c", START_SCRIPT]
    (source,) = container["envFrom"]
    acl = find(docs, "ConfigMap", source["configMapRef"]["name"])
    assert acl["data"]["REDIS_ACL"] == render()
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"]}
    assert refs == {
        f"REDIS_PASSWORD_{u.upper()}": {"name": SECRET, "key": u} for u in SERVICE_USERS
    }
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in redis["spec"]["template"]["spec"]["volumes"]}
    assert volumes[mounts["/tmp"]]["emptyDir"]["medium"] == "Memory"  # the filled-in file
    probe = " ".join(container["readinessProbe"]["exec"]["command"])
    assert "--user healthcheck" in probe and "grep -q PONG" in probe


@pytest.mark.parametrize("name", OVERLAYS)
def test_each_k8s_service_logs_in_as_its_own_user(name: str) -> None:
    docs = overlay(name)
    seen = set()
    for _workload, container, service in asympo_containers(docs):
        env = {e["name"]: e for e in container["env"]}
        assert env["ASYMPO_REDIS__USERNAME"]["value"] == service
        assert env["ASYMPO_REDIS__PASSWORD"]["valueFrom"]["secretKeyRef"] == {
            "name": SECRET,
            "key": service,
        }
        seen.add(served(container.get("command", []) + container.get("args", [])))
    assert seen == set(SERVICE_USERS)
