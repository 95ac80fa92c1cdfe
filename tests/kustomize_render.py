"""Renders the kustomize subset deploy/k8s uses, for machines without a kustomize binary.

Kustomization fields understood: ``apiVersion``, ``kind``, ``resources`` (files, and
directories holding a kustomization.yaml), ``namespace``, ``labels`` (``pairs``,
``includeTemplates``; ``includeSelectors`` only false), ``images`` (``name``, ``newName``,
``newTag``) and ``patches`` (``path`` of a strategic-merge patch). Anything else raises
UnsupportedError: a kustomization this renderer would render differently from kustomize
fails here instead of passing.

Transformers run in kustomize's order: patches, namespace, labels, images.
Strategic merge follows the API server's rules for the fields these manifests use: maps
merge key by key, ``null`` deletes a key, lists of objects with a patch merge key
(containers by name, volumeMounts by mountPath, ports by containerPort or port, ...) merge
item by item, every other list is replaced whole.
"""

from __future__ import annotations

import os
from typing import Any

import yaml

KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
SUPPORTED_FIELDS = {"apiVersion", "kind", "resources", "namespace", "labels", "images",
                    "patches"}
CLUSTER_SCOPED_KINDS = {"Namespace", "PersistentVolume", "StorageClass", "ClusterRole",
                        "ClusterRoleBinding", "CustomResourceDefinition", "PriorityClass",
                        "IngressClass"}
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}
# Patch merge keys of the Kubernetes API types (x-kubernetes-patch-merge-key), by field name.
MERGE_KEYS = {"containers": "name", "initContainers": "name", "ephemeralContainers": "name",
              "volumes": "name", "env": "name", "volumeMounts": "mountPath",
              "volumeDevices": "devicePath", "imagePullSecrets": "name", "hostAliases": "ip",
              "topologySpreadConstraints": "topologyKey", "resourceClaims": "name"}


class UnsupportedError(ValueError):
    """The kustomization uses something this renderer does not implement."""


def _unshared(value: Any) -> Any:
    """A deep copy in which nothing is shared: YAML aliases (and deepcopy) share objects,
    and a transformer editing one place must not edit another."""
    if isinstance(value, dict):
        return {k: _unshared(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unshared(v) for v in value]
    return value


def load_documents(path: str) -> list[dict]:
    with open(path) as f:
        docs = [_unshared(d) for d in yaml.safe_load_all(f) if d is not None]
    for doc in docs:
        if not isinstance(doc, dict) or "kind" not in doc or "apiVersion" not in doc:
            raise ValueError(f"{path}: every document needs apiVersion and kind")
    return docs


def find_kustomization(directory: str) -> str:
    for name in KUSTOMIZATION_FILES:
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"{directory}: no kustomization.yaml")


def resource_id(obj: dict) -> tuple[str, str, str, str]:
    group = obj["apiVersion"].rpartition("/")[0]
    meta = obj.get("metadata") or {}
    return group, obj["kind"], meta.get("namespace", ""), meta.get("name", "")


def render(directory: str) -> list[dict]:
    """The objects ``kustomize build directory`` prints, in order."""
    path = find_kustomization(directory)
    with open(path) as f:
        kustomization = yaml.safe_load(f) or {}
    unknown = set(kustomization) - SUPPORTED_FIELDS
    if unknown:
        raise UnsupportedError(f"{path}: unsupported fields {sorted(unknown)}")
    objects: list[dict] = []
    for entry in kustomization.get("resources") or []:
        if "://" in entry or entry.startswith("github.com/"):
            raise UnsupportedError(f"{path}: remote resource {entry!r}")
        target = os.path.normpath(os.path.join(directory, entry))
        objects += render(target) if os.path.isdir(target) else load_documents(target)
    seen: set[tuple] = set()
    for obj in objects:
        if resource_id(obj) in seen:
            raise ValueError(f"{path}: {resource_id(obj)} defined twice")
        seen.add(resource_id(obj))
    for patch in kustomization.get("patches") or []:
        if set(patch) != {"path"}:
            raise UnsupportedError(f"{path}: patches support `path` only, got {sorted(patch)}")
        for doc in load_documents(os.path.join(directory, patch["path"])):
            apply_patch(objects, doc, patch["path"])
    if "namespace" in kustomization:
        set_namespace(objects, kustomization["namespace"])
    for labels in kustomization.get("labels") or []:
        add_labels(objects, labels)
    for image in kustomization.get("images") or []:
        set_image(objects, image)
    return objects


def apply_patch(objects: list[dict], patch: dict, source: str) -> None:
    name = (patch.get("metadata") or {}).get("name")
    namespace = (patch.get("metadata") or {}).get("namespace")
    group = patch["apiVersion"].rpartition("/")[0]
    matches = [i for i, obj in enumerate(objects)
               if resource_id(obj)[:2] == (group, patch["kind"])
               and obj["metadata"].get("name") == name
               and (namespace is None or obj["metadata"].get("namespace") == namespace)]
    if len(matches) != 1:
        raise ValueError(f"patch {source}: {patch['kind']}/{name} matches {len(matches)} "
                         "resources, not one")
    objects[matches[0]] = strategic_merge(objects[matches[0]], patch)


def _merge_key(field: str | None, items: list) -> str | None:
    if field == "ports":
        dicts = [i for i in items if isinstance(i, dict)]
        if dicts and all("containerPort" in i for i in dicts):
            return "containerPort"
        if dicts and all("port" in i for i in dicts):
            return "port"
        return None
    return MERGE_KEYS.get(field or "")


def strategic_merge(base: Any, patch: Any, field: str | None = None) -> Any:
    """``base`` with ``patch`` merged in (neither is modified)."""
    if isinstance(base, dict) and isinstance(patch, dict):
        merged = _unshared(base)
        for key, value in patch.items():
            if key.startswith("$"):
                raise UnsupportedError(f"patch directive {key!r}")
            if value is None:
                merged.pop(key, None)
            elif key in merged:
                merged[key] = strategic_merge(merged[key], value, key)
            else:
                merged[key] = strategic_merge({}, value, key) if isinstance(
                    value, dict) else _unshared(value)
        return merged
    if isinstance(base, list) and isinstance(patch, list):
        key = _merge_key(field, base + patch)
        if key is None:
            return _unshared(patch)
        merged_list = _unshared(base)
        for item in patch:
            if not isinstance(item, dict) or key not in item:
                raise ValueError(f"{field}: a patch item without its merge key {key!r}")
            at = next((i for i, b in enumerate(merged_list) if b.get(key) == item[key]), None)
            if at is None:
                merged_list.append(strategic_merge({}, item, field))
            else:
                merged_list[at] = strategic_merge(merged_list[at], item, field)
        return merged_list
    return _unshared(patch)


def set_namespace(objects: list[dict], namespace: str) -> None:
    for obj in objects:
        if obj["kind"] == "Namespace":
            # kustomize may rename a Namespace object; keep to the case where that is moot.
            if obj["metadata"]["name"] != namespace:
                raise UnsupportedError(f"Namespace {obj['metadata']['name']!r} beside "
                                       f"namespace: {namespace!r}")
        elif obj["kind"] not in CLUSTER_SCOPED_KINDS:
            obj["metadata"]["namespace"] = namespace


def add_labels(objects: list[dict], spec: dict) -> None:
    unknown = set(spec) - {"pairs", "includeSelectors", "includeTemplates"}
    if unknown or spec.get("includeSelectors"):
        raise UnsupportedError(f"labels: only pairs and includeTemplates, got {sorted(spec)}")
    pairs = spec.get("pairs") or {}
    for obj in objects:
        obj["metadata"].setdefault("labels", {}).update(pairs)
        if spec.get("includeTemplates") and obj["kind"] in WORKLOAD_KINDS:
            template = obj["spec"]["template"].setdefault("metadata", {})
            template.setdefault("labels", {}).update(pairs)


def split_image(image: str) -> tuple[str, str | None]:
    """``(name, tag)``; a registry's port is part of the name."""
    if "@" in image:
        raise UnsupportedError(f"image digests ({image!r})")
    name, sep, tag = image.rpartition(":")
    if not sep or "/" in tag:
        return image, None
    return name, tag


def _containers(obj: Any):
    if isinstance(obj, dict):
        for key, value in obj.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                yield from value
            else:
                yield from _containers(value)
    elif isinstance(obj, list):
        for item in obj:
            yield from _containers(item)


def set_image(objects: list[dict], spec: dict) -> None:
    unknown = set(spec) - {"name", "newName", "newTag"}
    if unknown:
        raise UnsupportedError(f"images: unsupported fields {sorted(unknown)}")
    for obj in objects:
        for container in _containers(obj.get("spec")):
            name, tag = split_image(container["image"])
            if name != spec["name"]:
                continue
            name = spec.get("newName", name)
            tag = spec.get("newTag", tag)
            container["image"] = f"{name}:{tag}" if tag else name
