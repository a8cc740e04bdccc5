"""The kube phase of `make test-deploy`: the cpu-dev overlay under ``podman kube play``.

``kubectl kustomize`` renders the overlay exactly as ``kubectl apply -k`` would; what
``podman kube play`` (4.3) cannot represent is translated, and nothing else changes:

* a StatefulSet is played as a one-replica Deployment with the same pod template, and
  each of its volumeClaimTemplates becomes the PersistentVolumeClaim a StatefulSet
  controller would create (``<template>-<name>-0``), mounted by the same volume name;
* Services are not played: each pod gets the Service names as ``hostAliases`` pointing
  at the static address (``--ip``) of the pod their selector matches, on a network of
  its own; Services, NetworkPolicies, HPAs and PDBs stay covered by the offline tests;
* the publish-token and Redis password Secrets, which users create themselves
  (docs/deployment.md), are created with random values, as ``kubectl create secret``
  would: as podman secrets in the form podman 4.3's ``secretKeyRef`` reads (JSON of
  base64 values);
* images are the locally built ones; podman runs no readiness probes (4.3), so this
  phase runs each container's own ``readinessProbe`` (httpGet against the pod address,
  exec in the container, tcpSocket) until every one passes.
"""

from __future__ import annotations

import base64
import copy
import ipaddress
import json
import secrets
import socket
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from asympo.transport.redis_acl import SERVICE_USERS
from tests.deploy.live.run import (
    IMAGE,
    REDIS_IMAGE,
    ROOT,
    DeployTestError,
    init_model,
    log,
    run,
    wait_for,
)

Doc = dict[str, Any]
OVERLAY = ROOT / "deploy/k8s/overlays/cpu-dev"
NETWORK = "asympo-deploytest-kube"
# The Secrets users create themselves (docs/deployment.md), with their keys.
SECRETS = {"asympo-publish-token": ("token",), "asympo-redis-passwords": SERVICE_USERS}
MODEL_CACHE = "asympo-model-cache"
SUBNET = ipaddress.ip_network("10.89.251.0/24")
NOT_PLAYED = {"Service", "NetworkPolicy", "HorizontalPodAutoscaler", "PodDisruptionBudget",
              "ServiceAccount", "PrometheusRule", "ServiceMonitor"}
IMAGES = {"asympo:slim": f"{IMAGE}:slim", "redis:7.4-alpine": REDIS_IMAGE}


def render() -> list[Doc]:
    """The overlay as ``kubectl kustomize`` renders it."""
    out = run(["kubectl", "kustomize", str(OVERLAY)], timeout=120, quiet=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def playable(docs: list[Doc]) -> tuple[list[Doc], dict[str, str]]:
    """The documents podman plays, and workload name -> its pod's static address."""
    workloads = [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]
    hosts = iter(SUBNET.hosts())
    next(hosts)  # .1 is the bridge's gateway
    address = {w["metadata"]["name"]: str(next(hosts)) for w in workloads}
    aliases: dict[str, list[str]] = {}
    for svc in (d for d in docs if d["kind"] == "Service"):
        selector = svc["spec"].get("selector", {})
        for w in workloads:
            if _matches(selector, w["spec"]["template"]["metadata"].get("labels", {})):
                aliases.setdefault(address[w["metadata"]["name"]], []).append(
                    svc["metadata"]["name"])
    host_aliases = [{"ip": ip, "hostnames": sorted(names)} for ip, names in aliases.items()]
    out: list[Doc] = []
    for doc in docs:
        kind = doc["kind"]
        if kind in NOT_PLAYED:
            continue
        if kind == "Secret" and doc["metadata"]["name"] in SECRETS:
            continue  # replaced below
        if kind not in ("Deployment", "StatefulSet"):
            out.append(doc)
            continue
        w = copy.deepcopy(doc)
        name = w["metadata"]["name"]
        spec = w["spec"]
        pod = spec["template"]["spec"]
        for claim in spec.pop("volumeClaimTemplates", []):
            claim_name = f"{claim['metadata']['name']}-{name}-0"
            out.append({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                        "metadata": {"name": claim_name}, "spec": claim["spec"]})
            pod.setdefault("volumes", []).append(
                {"name": claim["metadata"]["name"],
                 "persistentVolumeClaim": {"claimName": claim_name}})
        for key in ("serviceName", "podManagementPolicy", "updateStrategy",
                    "persistentVolumeClaimRetentionPolicy"):
            spec.pop(key, None)
        w["kind"] = "Deployment"
        spec["replicas"] = 1
        pod["hostAliases"] = host_aliases
        for c in pod.get("initContainers", []) + pod["containers"]:
            c["image"] = IMAGES.get(c["image"], c["image"])
            # podman 4.3 publishes every containerPort on the host (taken ports fail the
            # pod); pods reach each other by address, so nothing is published. The probes
            # read the ports from the rendered manifest.
            c.pop("ports", None)
        out.append(w)
    return out, address


def _fs_group(docs: list[Doc], claim: str) -> int:
    """The fsGroup of the pods that mount ``claim`` (they agree; 0 if none is set)."""
    groups = set()
    for d in docs:
        if d["kind"] != "Deployment":
            continue
        pod = d["spec"]["template"]["spec"]
        if any(v.get("persistentVolumeClaim", {}).get("claimName") == claim
               for v in pod.get("volumes", [])):
            groups.add(int(pod.get("securityContext", {}).get("fsGroup", 0)))
    if len(groups) > 1:
        raise DeployTestError(f"pods mounting {claim} disagree on fsGroup: {groups}")
    return groups.pop() if groups else 0


def _port(container: Doc, port: Any) -> int:
    if isinstance(port, int):
        return port
    for p in container.get("ports", []):
        if p.get("name") == port:
            return int(p["containerPort"])
    raise DeployTestError(f"{container['name']}: probe port {port!r} is not declared")


def _probe_passes(container_name: str, container: Doc, ip: str) -> bool:
    probe = container.get("readinessProbe")
    if probe is None:
        state = run(["podman", "inspect", "--format", "{{.State.Status}}", container_name],
                    timeout=60, check=False, quiet=True).stdout.strip()
        return state == "running"
    timeout = float(probe.get("timeoutSeconds", 1))
    if "httpGet" in probe:
        get = probe["httpGet"]
        url = f"http://{ip}:{_port(container, get['port'])}{get.get('path', '/')}"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:
                return 200 <= resp.status < 400
        except OSError:
            return False
    if "exec" in probe:
        return run(["podman", "exec", container_name, *probe["exec"]["command"]],
                   timeout=timeout + 30, check=False, quiet=True).returncode == 0
    if "tcpSocket" in probe:
        try:
            with socket.create_connection((ip, _port(container, probe["tcpSocket"]["port"])),
                                          timeout=timeout):
                return True
        except OSError:
            return False
    raise DeployTestError(f"{container['name']}: unsupported readiness probe {probe}")


def _containers_of(workload: str) -> dict[str, str]:
    """container name in the manifest -> podman container name, for the played pod."""
    pods = run(["podman", "pod", "ps", "--format", "{{.Name}}"], timeout=60,
               quiet=True).stdout.split()
    pod = next((p for p in pods if p == workload or p.startswith(f"{workload}-pod")), None)
    if pod is None:
        return {}
    names = run(["podman", "ps", "-a", "--filter", f"pod={pod}", "--format", "{{.Names}}"],
                timeout=60, quiet=True).stdout.split()
    return {n[len(pod) + 1:]: n for n in names if n.startswith(pod + "-")}


def kube_phase(work: Path, timeout: float, model_path: str = "",
               model_dir: Path | None = None) -> None:
    """Play the rendered cpu-dev overlay until every pod is ready; tear it down."""
    rendered = render()
    docs, address = playable(rendered)
    # The shared model cache starts with the tiny default model in it, as the compose
    # phase's volume does (else every pod would train it on 2 cores at once).
    # Every claim is provisioned here, as a cluster's provisioner would, and given to
    # the pod's fsGroup as the kubelet does (podman 4.3 applies no fsGroup).
    claims = [d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"]
    docs = [d for d in docs if d["kind"] != "PersistentVolumeClaim"]
    for claim in claims:
        run(["podman", "volume", "rm", "-f", claim], timeout=60, check=False, quiet=True)
    built = init_model(MODEL_CACHE, model_dir)
    for claim in claims:
        if claim != MODEL_CACHE:
            run(["podman", "volume", "create", claim], timeout=60, quiet=True)
        group = _fs_group(docs, claim)
        run(["podman", "run", "--rm", "--network", "none", "--user", "0", "-v",
             f"{claim}:/v", "--entrypoint", "sh", f"{IMAGE}:slim", "-c",
             f"chgrp -R {group} /v && chmod -R g+rwX /v && chmod g+s /v"], timeout=120,
            quiet=True)
    if model_path:
        config = next(d for d in docs if d["kind"] == "ConfigMap"
                      and d["metadata"]["name"] == "asympo-config")
        config["data"]["ASYMPO_MODEL__PATH"] = built if model_path == "built" else model_path
    for name, keys in (SECRETS.items()):
        secret_file = work / f"{name}.json"
        secret_file.write_text(json.dumps(
            {key: base64.b64encode(secrets.token_hex(32).encode()).decode() for key in keys}))
        run(["podman", "secret", "rm", name], timeout=60, check=False, quiet=True)
        run(["podman", "secret", "create", name, str(secret_file)], timeout=60, quiet=True)
    manifest = work / "cpu-dev.played.yaml"
    manifest.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    # Probes and ports as rendered (the played copies have no ports).
    workloads = {d["metadata"]["name"]: d for d in rendered
                 if d["kind"] in ("Deployment", "StatefulSet")}
    log(f"playing {sorted(workloads)} at {address}")
    run(["podman", "network", "rm", "-f", NETWORK], timeout=60, check=False, quiet=True)
    run(["podman", "network", "create", "--subnet", str(SUBNET), NETWORK], timeout=60)
    ips = [arg for name in workloads for arg in ("--ip", address[name])]
    try:
        run(["podman", "kube", "play", "--network", NETWORK, *ips, str(manifest)],
            timeout=600)
        start = time.monotonic()

        def all_ready() -> bool:
            waiting = []
            for name, w in workloads.items():
                played = _containers_of(name)
                for c in w["spec"]["template"]["spec"]["containers"]:
                    real = played.get(c["name"])
                    if real is None or not _probe_passes(real, c, address[name]):
                        waiting.append(f"{name}/{c['name']}")
            log(f"not ready yet: {waiting}" if waiting else
                f"every pod ready after {time.monotonic() - start:.0f}s")
            return not waiting

        def logs() -> str:
            out = []
            for name in workloads:
                for real in _containers_of(name).values():
                    text = run(["podman", "logs", "--tail", "30", real], timeout=60,
                               check=False, quiet=True).stdout
                    out.append(f"--- {real}\n{text}")
            return "\n".join(out)

        wait_for("every played pod to pass its readiness probe", all_ready,
                 timeout=timeout, every=10, on_timeout=logs)
    finally:
        run(["podman", "kube", "down", str(manifest)], timeout=300, check=False)
        for d in docs:
            if d["kind"] == "PersistentVolumeClaim":
                run(["podman", "volume", "rm", "-f", d["metadata"]["name"]], timeout=60,
                    check=False, quiet=True)
        run(["podman", "network", "rm", "-f", NETWORK], timeout=60, check=False, quiet=True)
        for name in SECRETS:
            run(["podman", "secret", "rm", name], timeout=60, check=False, quiet=True)
        for claim in claims:
            run(["podman", "volume", "rm", "-f", claim], timeout=60, check=False, quiet=True)
    left = [p for name in workloads for p in _containers_of(name).values()]
    if left:
        raise DeployTestError(f"`podman kube down` left containers behind: {left}")
