"""deploy/k8s: every overlay renders, validates against the Kubernetes schemas, and
agrees with asympo/config.py on ports, env var names and service names."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import kubernetes_validate
import pytest
import yaml

from asympo.config import Settings
from asympo.transport.redis_acl import SERVICE_USERS
from tests.deploy.manifests import (
    K8S,
    OVERLAYS,
    SERVICES,
    effective_settings,
    overlay,
    prometheus_rule,
    served,
)

Doc = dict[str, Any]
# Oldest and newest Kubernetes minor versions the manifests must be valid for.
K8S_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())
WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "Job"}
# Secrets the manifests reference but do not ship: users create them (docs/deployment.md,
# deploy/k8s/base/config.yaml), so that `kubectl apply` never overwrites a real token.
# Each with the keys the pods may read.
USER_SECRETS = {"asympo-publish-token": ("token",), "asympo-hf-token": ("token",),
                "asympo-redis-passwords": SERVICE_USERS}


def ident(doc: Doc) -> tuple[str, str, str]:
    """(kind, namespace, name) of an object."""
    return doc["kind"], doc["metadata"].get("namespace", ""), doc["metadata"]["name"]


def workloads(docs: list[Doc]) -> list[Doc]:
    """The pod-owning objects."""
    return [d for d in docs if d["kind"] in WORKLOADS]


def pod_spec(doc: Doc) -> Doc:
    """The pod spec of a workload's template."""
    return dict(doc["spec"]["template"]["spec"])


def find(docs: list[Doc], kind: str, name: str) -> Doc:
    """The one object of ``kind`` named ``name``."""
    hits = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(hits) == 1, f"expected one {kind}/{name}, found {len(hits)}"
    return hits[0]


def selects(selector: Doc, labels: dict[str, str]) -> bool:
    """Does a LabelSelector (matchLabels + matchExpressions) select ``labels``?"""
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def container_env(docs: list[Doc], container: Doc) -> dict[str, str]:
    """The env a container sees: envFrom ConfigMaps/Secrets, then env (which wins)."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(find(docs, "ConfigMap", source["configMapRef"]["name"])["data"])
        if "secretRef" in source:
            env.update(find(docs, "Secret", source["secretRef"]["name"]).get("stringData", {}))
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = str(var["value"])
        elif "secretKeyRef" in var.get("valueFrom", {}):
            ref = var["valueFrom"]["secretKeyRef"]
            if ref["name"] in USER_SECRETS:
                assert not [d for d in docs if d["kind"] == "Secret"
                            and d["metadata"]["name"] == ref["name"]], f"{ref['name']} shipped"
                assert ref["key"] in USER_SECRETS[ref["name"]], ref
                env[var["name"]] = f"{ref['name']}-{ref['key']}"
                continue
            secret = find(docs, "Secret", ref["name"])
            data = {**secret.get("data", {}), **secret.get("stringData", {})}
            assert ref["key"] in data, f"secret {ref['name']} has no key {ref['key']}"
            env[var["name"]] = data[ref["key"]]
        elif "fieldRef" in var.get("valueFrom", {}):
            env[var["name"]] = "pod-0"
        else:
            raise AssertionError(f"unsupported env source {var}")
    return env


def asympo_containers(docs: list[Doc]) -> list[tuple[Doc, Doc, str]]:
    """(workload, container, service name) for every container running an ASymPO service."""
    out = []
    for w in workloads(docs):
        for c in pod_spec(w)["containers"]:
            name = served(c.get("command", []) + c.get("args", []))
            if name:
                out.append((w, c, name))
    return out


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request: pytest.FixtureRequest) -> tuple[str, list[Doc]]:
    """(overlay name, rendered objects)."""
    return request.param, overlay(request.param)


# ----------------------------------------------------------------- rendering


def test_every_object_validates_against_kubernetes_schemas(rendered: tuple[str, list[Doc]]) -> None:
    name, docs = rendered
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "StatefulSet", "Service", "ConfigMap", "PersistentVolumeClaim",
            "HorizontalPodAutoscaler", "NetworkPolicy", "PodDisruptionBudget"} <= kinds
    assert "Secret" not in kinds  # users create theirs (USER_SECRETS)
    for doc in docs:
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a CRD: checked structurally in test_service_monitor_scrapes_every_service
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{name}: {ident(doc)} invalid for Kubernetes {version}: "
                            f"{str(exc).splitlines()[0]}")


def test_overlays_set_namespace_and_images(rendered: tuple[str, list[Doc]]) -> None:
    name, docs = rendered
    namespaces = {d["metadata"].get("namespace") for d in docs}
    assert len(namespaces) == 1 and None not in namespaces, namespaces
    for w in workloads(docs):
        for c in pod_spec(w)["containers"]:
            assert re.fullmatch(r"[\w./-]+:[\w.-]+", c["image"]), f"{name}: unpinned {c['image']}"
            assert not c["image"].startswith("asympo-"), f"{name}: image placeholder left"


# ----------------------------------------------------------------- wiring


def test_selectors_probes_and_references_are_consistent(rendered: tuple[str, list[Doc]]) -> None:
    _, docs = rendered
    pods = {w["metadata"]["name"]: w["spec"]["template"]["metadata"]["labels"]
            for w in workloads(docs)}
    for w in workloads(docs):
        assert selects(w["spec"]["selector"], pods[w["metadata"]["name"]]), ident(w)
        if w["kind"] == "StatefulSet":
            svc = find(docs, "Service", w["spec"]["serviceName"])
            assert selects({"matchLabels": svc["spec"]["selector"]}, pods[w["metadata"]["name"]])
        spec = pod_spec(w)
        volumes = {v["name"] for v in spec.get("volumes", [])}
        volumes |= {t["metadata"]["name"] for t in w["spec"].get("volumeClaimTemplates", [])}
        for c in spec["containers"]:
            port_names = {p["name"] for p in c.get("ports", [])}
            for mount in c.get("volumeMounts", []):
                assert mount["name"] in volumes, f"{ident(w)} mounts unknown {mount['name']}"
            for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                port = (c.get(probe, {}).get("httpGet") or c.get(probe, {}).get("tcpSocket")
                        or {}).get("port")
                if isinstance(port, str):
                    assert port in port_names, f"{ident(w)} {probe} names unknown port {port}"
            res = c.get("resources", {})
            assert res.get("requests") and res.get("limits"), f"{ident(w)}: requests and limits"
            assert "memory" in res["limits"], f"{ident(w)}: a memory limit"
            container_env(docs, c)  # every ConfigMap / Secret reference resolves
    for svc in (d for d in docs if d["kind"] == "Service"):
        selector = {"matchLabels": svc["spec"]["selector"]}
        backing = [w for w in workloads(docs) if selects(selector, pods[w["metadata"]["name"]])]
        assert len(backing) == 1, f"Service {svc['metadata']['name']} selects {len(backing)}"
        names = {p.get("name") for c in pod_spec(backing[0])["containers"] for p in c["ports"]}
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in names, f"{svc['metadata']['name']}: {port['targetPort']}"
    hpa = find(docs, "HorizontalPodAutoscaler", "reward")
    assert hpa["spec"]["scaleTargetRef"]["name"] == find(docs, "Deployment", "reward")[
        "metadata"]["name"]


def test_ports_env_and_names_agree_with_settings(rendered: tuple[str, list[Doc]]) -> None:
    """One source of truth: each container's ports, probes and scrape annotation equal the
    ports its service binds, resolved by asympo.config from that container's own env."""
    name, docs = rendered
    seen = set()
    for w, c, service in asympo_containers(docs):
        seen.add(service)
        settings = effective_settings(container_env(docs, c))  # unknown ASYMPO_* names fail here
        section = getattr(settings, service)
        assert section.host == "0.0.0.0", f"{service} must listen on all interfaces in a pod"
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports == {"grpc": section.grpc_port, "http": section.http_port}, service
        assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
        annotations = w["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert int(annotations["prometheus.io/port"]) == section.http_port
        assert annotations["prometheus.io/path"] == "/metrics"
        svc = find(docs, "Service", service)
        assert {p["name"]: p["port"] for p in svc["spec"]["ports"]} == ports
        labels = w["spec"]["template"]["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == f"asympo-{service}"  # the Prometheus job
        assert labels["app.kubernetes.io/component"] == service
        # Clients find the weight store and Redis through the Services of those names.
        if service != "weights":
            weights_svc = find(docs, "Service", settings.weights.host)
            assert {p["port"] for p in weights_svc["spec"]["ports"]} >= {
                settings.weights.grpc_port}
        redis = urlparse(settings.redis_url())
        redis_svc = find(docs, "Service", redis.hostname or "")
        assert redis.port in {p["port"] for p in redis_svc["spec"]["ports"]}
        assert settings.streams.run_id
    assert seen == set(SERVICES), f"{name}: services deployed {seen}"


def test_publish_token_only_in_weights_and_learner(rendered: tuple[str, list[Doc]]) -> None:
    _, docs = rendered
    holders = set()
    for _w, c, service in asympo_containers(docs):
        for var in c.get("env", []):
            ref = var.get("valueFrom", {}).get("secretKeyRef")
            if ref and ref["name"] == "asympo-publish-token":
                assert var["name"] == "ASYMPO_WEIGHTS__PUBLISH_TOKEN"
                holders.add(service)
    assert holders == {"weights", "learner"}


def test_gpu_shapes(rendered: tuple[str, list[Doc]]) -> None:
    name, docs = rendered
    rollout = pod_spec(find(docs, "Deployment", "rollout"))["containers"][0]
    learner_sts = find(docs, "StatefulSet", "learner")
    learner = pod_spec(learner_sts)["containers"][0]
    env = {e["name"]: e.get("value") for e in learner["env"]}
    if name == "gpu":
        assert find(docs, "Deployment", "rollout")["spec"]["replicas"] >= 2
        assert rollout["resources"]["limits"]["nvidia.com/gpu"] == "1"
        gpus = learner["resources"]["limits"]["nvidia.com/gpu"]
        assert learner["command"][:2] == ["sh", "-c"]
        assert 'exec torchrun --standalone --nproc-per-node="$LEARNER_GPUS"' in (
            learner["command"][2])
        assert env["LEARNER_GPUS"] == gpus, "torchrun must start one process per GPU"
        assert effective_settings(container_env(docs, rollout)).rollout.engine == "vllm"
        for spec in (pod_spec(find(docs, "Deployment", "rollout")), pod_spec(learner_sts)):
            assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
    else:
        for c in (rollout, learner):
            assert "nvidia.com/gpu" not in c["resources"].get("limits", {})
            assert "nvidia.com/gpu" not in c["resources"].get("requests", {})
        assert effective_settings(container_env(docs, rollout)).rollout.engine == "transformers"
        assert effective_settings(container_env(docs, learner)).learner.device == "cpu"
    for sts in ("weights", "learner", "redis"):
        assert find(docs, "StatefulSet", sts)["spec"]["volumeClaimTemplates"], sts
    redis = pod_spec(find(docs, "StatefulSet", "redis"))["containers"][0]
    assert "--appendonly" in redis["args"] and redis["args"][redis["args"].index(
        "--appendonly") + 1] == "yes"


# ----------------------------------------------------------------- network policies


def ingress_allowed(docs: list[Doc], src: dict[str, str], dst: dict[str, str], port: int) -> bool:
    """NetworkPolicy semantics (same namespace, TCP): is src -> dst:port allowed?"""
    policies = [p for p in docs if p["kind"] == "NetworkPolicy"
                and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
                and selects(p["spec"]["podSelector"], dst)]
    if not policies:
        return True
    for policy in policies:
        for rule in policy["spec"].get("ingress", []):
            peers = rule.get("from")
            peer_ok = peers is None or any(
                "podSelector" in peer and "namespaceSelector" not in peer
                and selects(peer["podSelector"], src) for peer in peers)
            ports = rule.get("ports")
            port_ok = ports is None or any(p.get("port") == port for p in ports)
            if peer_ok and port_ok:
                return True
    return False


def test_network_policies(rendered: tuple[str, list[Doc]]) -> None:
    _, docs = rendered
    settings = Settings()
    pods = {w["metadata"]["name"]: w["spec"]["template"]["metadata"]["labels"]
            for w in workloads(docs)}
    stranger = {"app": "something-else"}
    publish = settings.weights.grpc_port
    assert ingress_allowed(docs, pods["learner"], pods["weights"], publish)
    assert ingress_allowed(docs, pods["rollout"], pods["weights"], publish)  # Fetch / Watch
    assert not ingress_allowed(docs, pods["reward"], pods["weights"], publish)
    assert not ingress_allowed(docs, stranger, pods["weights"], publish)
    for service in SERVICES:
        assert ingress_allowed(docs, pods[service], pods["redis"], 6379), service
        http = getattr(settings, service).http_port
        assert ingress_allowed(docs, stranger, pods[service], http)  # probes, Prometheus
    assert not ingress_allowed(docs, stranger, pods["redis"], 6379)
    assert not ingress_allowed(docs, pods["redis"], pods["redis"], 6379)


def test_service_monitor_scrapes_every_service() -> None:
    docs = overlay("gpu")
    monitor = find(docs, "ServiceMonitor", "asympo")
    spec = monitor["spec"]
    assert spec["jobLabel"] == "app.kubernetes.io/name"
    scraped = set()
    for svc in (d for d in docs if d["kind"] == "Service"):
        if selects(spec["selector"], svc["metadata"]["labels"]):
            scraped.add(svc["metadata"]["name"])
            port_names = {p["name"] for p in svc["spec"]["ports"]}
            for endpoint in spec["endpoints"]:
                assert endpoint["port"] in port_names
                assert endpoint["path"] == "/metrics"
            assert svc["metadata"]["labels"]["app.kubernetes.io/name"] == (
                f"asympo-{svc['metadata']['name']}")
    assert scraped == set(SERVICES)
    assert set(spec) <= {"jobLabel", "selector", "endpoints", "namespaceSelector"}


def test_base_kustomization_is_not_an_overlay() -> None:
    k = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())
    assert "namespace" not in k  # overlays choose the namespace
    assert all((K8S / "base" / r).is_file() for r in k["resources"])
    assert Path(K8S / "overlays").is_dir()


# ----------------------------------------------------------------- security and operations


def test_pods_meet_restricted_pod_security(rendered: tuple[str, list[Doc]]) -> None:
    """Pod Security Standard "restricted", plus a read-only root and probe timeouts."""
    name, docs = rendered
    for w in workloads(docs):
        spec = pod_spec(w)
        where = f"{name}: {ident(w)}"
        assert spec.get("automountServiceAccountToken") is False, where
        psc = spec["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["runAsUser"] > 0, where
        assert psc["seccompProfile"] == {"type": "RuntimeDefault"}, where
        for c in spec["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["capabilities"]["drop"] == ["ALL"], where
            assert sc["readOnlyRootFilesystem"] is True, where
            for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                if probe in c:
                    assert c[probe].get("timeoutSeconds", 1) >= 3, f"{where} {probe}"
        assert not [v for v in spec.get("volumes", []) if "hostPath" in v], where


def test_shared_model_cache_hf_token_and_pdbs(rendered: tuple[str, list[Doc]]) -> None:
    name, docs = rendered
    pvc = find(docs, "PersistentVolumeClaim", "asympo-model-cache")
    assert pvc["spec"]["accessModes"] == (["ReadWriteOnce"] if name == "cpu-dev"
                                          else ["ReadWriteMany"])
    for w, c, service in asympo_containers(docs):
        cache = {v["name"]: v for v in pod_spec(w)["volumes"]}["cache"]
        assert cache == {"name": "cache",
                         "persistentVolumeClaim": {"claimName": "asympo-model-cache"}}, service
        mounts = {m["mountPath"] for m in c["volumeMounts"]}
        assert {"/cache", "/tmp", "/home/asympo"} <= mounts, service
        hf = [e for e in c.get("env", []) if e["name"] == "HF_TOKEN"]
        if service in ("rollout", "learner"):
            assert hf and hf[0]["valueFrom"]["secretKeyRef"] == {
                "name": "asympo-hf-token", "key": "token", "optional": True}, service
        else:
            assert not hf, service
    for target in ("reward", "rollout"):
        pdb = find(docs, "PodDisruptionBudget", target)
        labels = find(docs, "Deployment", target)["spec"]["template"]["metadata"]["labels"]
        assert selects(pdb["spec"]["selector"], labels)
        assert pdb["spec"]["maxUnavailable"] == 1


def test_publish_token_holders_refuse_an_empty_token(
    rendered: tuple[str, list[Doc]], tmp_path: Path
) -> None:
    """The weights and learner commands stop with a message when the Secret is empty."""
    _, docs = rendered
    stub = tmp_path / "bin"
    stub.mkdir()
    for exe in ("asympo", "torchrun"):
        (stub / exe).write_text('#!/bin/sh\necho "started with $ASYMPO_WEIGHTS__PUBLISH_TOKEN"\n')
        (stub / exe).chmod(0o755)
    for _w, c, service in asympo_containers(docs):
        if service not in ("weights", "learner"):
            continue
        cmd = c["command"]
        assert cmd[:2] == ["sh", "-c"], service
        for token, ok in (("t0ken", True), ("", False)):
            env = {"PATH": f"{stub}:/usr/bin:/bin", "ASYMPO_WEIGHTS__PUBLISH_TOKEN": token,
                   "LEARNER_GPUS": "1"}
            result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=30)
            if ok:
                assert result.returncode == 0 and "started with t0ken" in result.stdout
            else:
                assert result.returncode == 78 and "asympo-publish-token" in result.stderr


def test_prometheus_rule_matches_the_alert_rules() -> None:
    """The PrometheusRule ships exactly the groups of deploy/prometheus/alerts.yml."""
    shipped = yaml.safe_load(
        (K8S / "components/service-monitor/prometheus-rule.yaml").read_text())
    assert shipped == prometheus_rule(), (
        "regenerate: python -m tests.deploy.manifests prometheus-rule > "
        "deploy/k8s/components/service-monitor/prometheus-rule.yaml")
    gpu = overlay("gpu")
    assert find(gpu, "PrometheusRule", "asympo")["spec"]["groups"] == shipped["spec"]["groups"]
    dash = find(gpu, "ConfigMap", "asympo-grafana-dashboard")
    assert dash["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dash["data"]["asympo.json"])["panels"]


def _bytes(quantity: str) -> int:
    """A Kubernetes memory quantity (Gi/Mi) or a Redis size (gb/mb) in bytes."""
    units = {"Gi": 2**30, "Mi": 2**20, "gb": 2**30, "mb": 2**20}
    for suffix, factor in units.items():
        if quantity.endswith(suffix):
            return int(float(quantity[: -len(suffix)]) * factor)
    return int(quantity)


def test_redis_memory_is_bounded_without_eviction(rendered: tuple[str, list[Doc]]) -> None:
    """maxmemory under the container's limit, and noeviction (never drop a stream)."""
    _, docs = rendered
    redis = pod_spec(find(docs, "StatefulSet", "redis"))["containers"][0]
    args = redis["args"]
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
    maxmemory = _bytes(args[args.index("--maxmemory") + 1])
    assert maxmemory < _bytes(redis["resources"]["limits"]["memory"]) * 0.8
