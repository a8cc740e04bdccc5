"""The kube phase of `make test-deploy` changes only what podman kube play cannot follow.

Offline and fast: the rendered cpu-dev overlay, translated by tests/deploy/live/kube.py,
keeps every pod spec (commands, env, probes, security contexts, volumes) and maps each
Service name to the static address of the one pod it selects.
"""

from __future__ import annotations

import copy

from tests.deploy.live.kube import IMAGES, NOT_PLAYED, playable
from tests.deploy.manifests import overlay


def test_translation_keeps_pods_and_resolves_services() -> None:
    rendered = overlay("cpu-dev")
    played, address = playable(copy.deepcopy(rendered))
    kinds = {d["kind"] for d in played}
    assert kinds <= {"ConfigMap", "Deployment", "PersistentVolumeClaim"}, kinds
    assert not kinds & NOT_PLAYED
    originals = {d["metadata"]["name"]: d for d in rendered
                 if d["kind"] in ("Deployment", "StatefulSet")}
    deployments = {d["metadata"]["name"]: d for d in played if d["kind"] == "Deployment"}
    assert set(deployments) == set(originals) and set(address) == set(originals)
    assert len(set(address.values())) == len(address)
    services = {d["metadata"]["name"] for d in rendered if d["kind"] == "Service"}
    for name, played_w in deployments.items():
        pod = played_w["spec"]["template"]["spec"]
        original = originals[name]["spec"]["template"]["spec"]
        aliases = {h: a["ip"] for a in pod["hostAliases"] for h in a["hostnames"]}
        assert set(aliases) == services
        for c, oc in zip(pod["containers"], original["containers"], strict=True):
            assert c["image"] == IMAGES.get(oc["image"], oc["image"])
            assert "ports" not in c
            for key in ("command", "args", "env", "envFrom", "readinessProbe",
                        "securityContext", "volumeMounts"):
                assert c.get(key) == oc.get(key), f"{name}: {key} changed"
        assert pod["securityContext"] == original["securityContext"]
        for claim in originals[name]["spec"].get("volumeClaimTemplates", []):
            claim_name = f"{claim['metadata']['name']}-{name}-0"
            assert any(d["kind"] == "PersistentVolumeClaim"
                       and d["metadata"]["name"] == claim_name for d in played)
    # Each Service name points at the pod its selector picks.
    assert aliases["redis"] == address["redis"] and aliases["weights"] == address["weights"]
