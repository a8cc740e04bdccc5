"""A small offline kustomize renderer for the features deploy/k8s uses.

Supported kustomization fields: ``resources`` (files and kustomization dirs),
``components``, ``namespace``, ``labels`` (metadata labels only), ``images``,
``replicas`` and ``patches`` (strategic-merge documents or JSON6902 op lists, by
``path`` or inline ``patch``, with an optional ``target``). Anything else raises,
so a manifest never silently relies on a feature this renderer ignores. When the
real ``kubectl kustomize`` is installed, tests/deploy/test_k8s.py checks that both
render identical objects.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import yaml

Doc = dict[str, Any]

SUPPORTED = {
    "apiVersion", "kind", "resources", "components", "namespace", "labels", "images",
    "replicas", "patches",
}
CLUSTER_SCOPED = {
    "Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition",
    "PersistentVolume", "StorageClass", "PriorityClass", "RuntimeClass",
    "ValidatingWebhookConfiguration", "MutatingWebhookConfiguration",
}
WITH_REPLICAS = {"Deployment", "StatefulSet", "ReplicaSet", "ReplicationController"}
# Strategic-merge list merge keys (patchMergeKey in the Kubernetes API) for the lists we patch.
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "volumes": "name",
    "env": "name",
    "volumeMounts": "mountPath",
    "imagePullSecrets": "name",
}


class KustomizeError(ValueError):
    """The kustomization uses something this renderer does not implement, or is wrong."""


def _kustomization(directory: Path) -> Doc:
    for name in ("kustomization.yaml", "kustomization.yml", "Kustomization"):
        path = directory / name
        if path.is_file():
            data = yaml.safe_load(path.read_text()) or {}
            unknown = set(data) - SUPPORTED
            if unknown:
                raise KustomizeError(f"{path}: unsupported fields {sorted(unknown)}")
            return dict(data)
    raise KustomizeError(f"no kustomization in {directory}")


def _load_docs(path: Path) -> list[Doc]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _pod_spec(doc: Doc) -> Doc | None:
    spec = doc.get("spec") or {}
    if doc["kind"] == "CronJob":
        spec = spec.get("jobTemplate", {}).get("spec", {})
    template = spec.get("template")
    if isinstance(template, dict):
        return dict(template.get("spec") or {})
    return None


def strategic_merge(base: Any, patch: Any, field: str = "") -> Any:
    """Merge ``patch`` into ``base`` the way a strategic-merge patch does for our fields.

    Maps merge key by key (``null`` deletes), lists with a merge key merge item by
    item, every other list is replaced.
    """
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for key, value in patch.items():
            if value is None:
                out.pop(key, None)
            elif key in out:
                out[key] = strategic_merge(out[key], value, key)
            else:
                out[key] = _drop_nulls(value)
        return out
    if isinstance(base, list) and isinstance(patch, list) and field in MERGE_KEYS:
        # Like kustomize (kyaml): the patch's items come first, in patch order, each merged
        # into its namesake; base items the patch does not name follow in their order.
        key = MERGE_KEYS[field]
        by_key = {b.get(key): b for b in base}
        merged = [
            strategic_merge(by_key[item.get(key)], item, field)
            if item.get(key) in by_key
            else _drop_nulls(item)
            for item in patch
        ]
        named = {p.get(key) for p in patch}
        return merged + [b for b in base if b.get(key) not in named]
    return _drop_nulls(copy.deepcopy(patch))


def _drop_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value


def _json_pointer(path: str) -> list[str]:
    return [p.replace("~1", "/").replace("~0", "~") for p in path.lstrip("/").split("/")]


def json6902(doc: Doc, ops: list[Doc]) -> Doc:
    """Apply RFC 6902 ``add``/``replace``/``remove`` operations to a copy of ``doc``."""
    out = copy.deepcopy(doc)
    for op in ops:
        parts = _json_pointer(op["path"])
        node: Any = out
        for part in parts[:-1]:
            node = node[int(part)] if isinstance(node, list) else node[part]
        last = parts[-1]
        kind = op["op"]
        if isinstance(node, list):
            if kind == "add":
                node.insert(len(node) if last == "-" else int(last), op["value"])
            elif kind == "replace":
                node[int(last)] = op["value"]
            elif kind == "remove":
                del node[int(last)]
            else:
                raise KustomizeError(f"unsupported JSON patch op {kind}")
        else:
            if kind in ("add", "replace"):
                if kind == "replace" and last not in node:
                    raise KustomizeError(f"replace of missing path {op['path']}")
                node[last] = op["value"]
            elif kind == "remove":
                del node[last]
            else:
                raise KustomizeError(f"unsupported JSON patch op {kind}")
    return out


def _matches(doc: Doc, target: Doc) -> bool:
    for field, value in target.items():
        if field == "kind":
            actual = doc["kind"]
        elif field == "name":
            actual = doc["metadata"]["name"]
        elif field == "namespace":
            actual = doc["metadata"].get("namespace", "")
        elif field == "group":
            actual = doc["apiVersion"].rpartition("/")[0]
        elif field == "version":
            actual = doc["apiVersion"].rpartition("/")[2]
        else:
            raise KustomizeError(f"unsupported patch target field {field}")
        if not re.fullmatch(str(value), actual):
            return False
    return True


def _apply_patch(docs: list[Doc], entry: Doc, base_dir: Path) -> list[Doc]:
    text = (base_dir / entry["path"]).read_text() if "path" in entry else entry["patch"]
    parsed = list(yaml.safe_load_all(text))
    target = entry.get("target")
    if len(parsed) == 1 and isinstance(parsed[0], list):
        if target is None:
            raise KustomizeError("a JSON6902 patch needs a target")
        return [json6902(d, parsed[0]) if _matches(d, target) else d for d in docs]
    out = docs
    for patch in (p for p in parsed if p):
        sel = target or {"kind": patch["kind"], "name": re.escape(patch["metadata"]["name"])}
        hits = [d for d in out if _matches(d, sel)]
        if not hits:
            raise KustomizeError(f"patch {entry} matches no resource")
        out = [strategic_merge(d, patch) if _matches(d, sel) else d for d in out]
    return out


def _set_image(container: Doc, images: list[Doc]) -> None:
    image = container.get("image", "")
    name = re.split(r"[@:]", image.split("/")[-1], maxsplit=1)[0]
    repo = image[: image.rfind("/") + 1] + name if "/" in image else name
    for rule in images:
        if rule["name"] != repo:
            continue
        new = rule.get("newName", repo)
        if "digest" in rule:
            container["image"] = f"{new}@{rule['digest']}"
        else:
            tag = rule.get("newTag")
            rest = image[len(repo) :]
            container["image"] = f"{new}:{tag}" if tag else f"{new}{rest}"


def _transform(docs: list[Doc], k: Doc, directory: Path) -> list[Doc]:
    for entry in k.get("patches", []):
        docs = _apply_patch(docs, entry, directory)
    if "namespace" in k:
        for d in docs:
            if d["kind"] not in CLUSTER_SCOPED:
                d["metadata"]["namespace"] = k["namespace"]
    for label_set in k.get("labels", []):
        if label_set.get("includeSelectors") or label_set.get("includeTemplates"):
            raise KustomizeError("labels with includeSelectors/includeTemplates unsupported")
        for d in docs:
            d["metadata"].setdefault("labels", {}).update(label_set["pairs"])
    for rep in k.get("replicas", []):
        for d in docs:
            if d["kind"] in WITH_REPLICAS and d["metadata"]["name"] == rep["name"]:
                d["spec"]["replicas"] = rep["count"]
    if k.get("images"):
        for d in docs:
            pod = _pod_spec(d)
            if pod is None:
                continue
            for c in pod.get("containers", []) + pod.get("initContainers", []):
                _set_image(c, k["images"])
    return docs


def render(directory: Path) -> list[Doc]:
    """Render the kustomization in ``directory`` into a list of Kubernetes objects."""
    directory = directory.resolve()
    k = _kustomization(directory)
    docs: list[Doc] = []
    for res in k.get("resources", []):
        path = directory / res
        docs.extend(render(path) if path.is_dir() else _load_docs(path))
    for comp in k.get("components", []):
        comp_dir = (directory / comp).resolve()
        ck = _kustomization(comp_dir)
        if ck.get("kind") != "Component":
            raise KustomizeError(f"{comp_dir} is not a kustomize Component")
        for res in ck.get("resources", []):
            docs.extend(_load_docs(comp_dir / res))
        docs = _transform(docs, ck, comp_dir)
    docs = _transform(copy.deepcopy(docs), k, directory)
    seen: set[tuple[str, str, str]] = set()
    for d in docs:
        ident = (d["kind"], d["metadata"].get("namespace", ""), d["metadata"]["name"])
        if ident in seen:
            raise KustomizeError(f"duplicate resource {ident}")
        seen.add(ident)
    return docs
