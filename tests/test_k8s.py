"""deploy/k8s: every manifest and every rendered overlay passes the Kubernetes schemas
(offline, ``kubernetes-validate``, strict: unknown fields fail), and the rendered objects
fit together: selectors, references, probes, the services' own flags, one GPU per worker,
and NetworkPolicies that allow exactly the data path.

Overlays are rendered by tests/kustomize_render.py (the subset of kustomize they use).
"""

from __future__ import annotations

import functools
import os
import re
import shutil

import kubernetes_validate
import kubernetes_validate.utils
import pytest
import yaml

from gridllm.common.grpc_utils import LIVENESS_SERVICE
from tests.kustomize_render import (
    UnsupportedError,
    find_kustomization,
    load_documents,
    render,
    strategic_merge,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
K8S = os.path.join(ROOT, "deploy", "k8s")
OVERLAYS = ("overlays/cpu", "overlays/gpu", "overlays/scaleout")
# The oldest Kubernetes the manifests promise (gRPC probes are GA from 1.27).
KUBERNETES_VERSION = "1.30"
SERVICE_MODULES = {"router": "router", "scheduler": "scheduler_svc", "worker": "worker_svc"}
# (from, to, port): the data path; "client" is anything outside the namespace.
DATA_PATH = {("client", "router", 50051), ("client", "router", 8000),
             ("router", "scheduler", 50052),
             ("scheduler", "worker", 50053), ("router", "redis", 6379),
             ("scheduler", "redis", 6379), ("worker", "redis", 6379)}


def validate(obj: dict) -> None:
    kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


@pytest.fixture(scope="module", autouse=True)
def _schemas_read_once():
    # validate() reads and parses the 1.4 MB schema definitions on every call; the files do
    # not change during a test run.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(kubernetes_validate.utils, "schema_contents", functools.lru_cache(
            maxsize=None)(kubernetes_validate.utils.schema_contents))
        yield


@pytest.fixture(scope="module")
def renders() -> dict[str, list[dict]]:
    return {name: render(os.path.join(K8S, name)) for name in ("base", *OVERLAYS)}


def _by_kind(objects: list[dict], kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def _workloads(objects: list[dict]) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objects
            if o["kind"] in ("Deployment", "StatefulSet")}


def _container(workload: dict) -> dict:
    (container,) = workload["spec"]["template"]["spec"]["containers"]
    return container


def _matches(selector: dict, labels: dict) -> bool:
    unknown = set(selector) - {"matchLabels"}
    assert not unknown, f"selector fields this test does not evaluate: {unknown}"
    return all(labels.get(k) == v for k, v in (selector.get("matchLabels") or {}).items())


# ----------------------------------------------------------------------- files and schemas
def test_every_file_is_a_kustomization_a_resource_or_a_patch():
    listed: set[str] = set()
    for directory, _, files in os.walk(K8S):
        if any(f.startswith("kustomization") for f in files):
            path = find_kustomization(directory)
            listed.add(path)
            with open(path) as f:
                kustomization = yaml.safe_load(f)
            for entry in kustomization.get("resources") or []:
                listed.add(os.path.normpath(os.path.join(directory, entry)))
            for patch in kustomization.get("patches") or []:
                listed.add(os.path.normpath(os.path.join(directory, patch["path"])))
    on_disk = {os.path.join(d, f) for d, _, files in os.walk(K8S) for f in files}
    assert on_disk - listed == set(), "files no kustomization uses"


def test_every_resource_file_validates_on_its_own():
    with open(find_kustomization(os.path.join(K8S, "base"))) as f:
        resources = yaml.safe_load(f)["resources"]
    assert resources
    for entry in resources:
        for doc in load_documents(os.path.join(K8S, "base", entry)):
            validate(doc)


@pytest.mark.parametrize("name", ("base", *OVERLAYS))
def test_rendered_overlay_validates(renders, name):
    objects = renders[name]
    assert len(objects) >= 15
    for obj in objects:
        validate(obj)
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == "gridllm", obj["metadata"]["name"]
        assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "gridllm"


def test_a_broken_manifest_fails(tmp_path):
    # A copy of deploy/k8s with one typo in the worker: the render still succeeds, the
    # schema check must not.
    copy = tmp_path / "k8s"
    shutil.copytree(K8S, copy)
    worker = copy / "base" / "worker.yaml"
    text = worker.read_text()
    assert "containerPort: 50053" in text
    worker.write_text(text.replace("containerPort: 50053", "containerport: 50053"))
    broken = [o for o in render(str(copy / "overlays" / "gpu")) if o["kind"] == "Deployment"
              and o["metadata"]["name"] == "worker"]
    with pytest.raises(kubernetes_validate.ValidationError, match="containerport"):
        validate(broken[0])
    # A value of the wrong type fails too.
    bad_replicas = dict(broken[0], spec={**broken[0]["spec"], "replicas": "two"})
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(bad_replicas)


# ----------------------------------------------------------------------- the objects fit
@pytest.mark.parametrize("name", ("base", *OVERLAYS))
def test_selectors_and_references_resolve(renders, name):
    objects = renders[name]
    workloads = _workloads(objects)
    assert set(workloads) == {"redis", "scheduler", "worker", "router"}
    config_maps, secrets = _by_kind(objects, "ConfigMap"), _by_kind(objects, "Secret")
    claims = _by_kind(objects, "PersistentVolumeClaim")
    for workload in workloads.values():
        spec = workload["spec"]
        template_labels = spec["template"]["metadata"]["labels"]
        assert _matches(spec["selector"], template_labels)
        pod = spec["template"]["spec"]
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for container in pod["containers"]:
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes, mount
            for source in container.get("envFrom", []):
                assert source["configMapRef"]["name"] in config_maps
        for volume in volumes.values():
            if "secret" in volume:
                assert volume["secret"]["secretName"] in secrets
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims
                assert volume["persistentVolumeClaim"]["readOnly"] is True
    for service in _by_kind(objects, "Service").values():
        targets = [w for w in workloads.values()
                   if _matches({"matchLabels": service["spec"]["selector"]},
                               w["spec"]["template"]["metadata"]["labels"])]
        assert len(targets) == 1, service["metadata"]["name"]
        port_names = {p.get("name") for p in _container(targets[0])["ports"]}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in port_names
    (budget,) = _by_kind(objects, "PodDisruptionBudget").values()
    assert _matches(budget["spec"]["selector"],
                    workloads["worker"]["spec"]["template"]["metadata"]["labels"])
    assert budget["spec"]["maxUnavailable"] == 1


def _expand(arg: str, env: dict[str, str]) -> str:
    def lookup(match: re.Match) -> str:
        assert match.group(1) in env, f"$({match.group(1)}) is not defined in the container"
        return env[match.group(1)]
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lookup, arg)


def _container_env(container: dict, config_maps: dict[str, dict]) -> dict[str, str]:
    env = {}
    for source in container.get("envFrom", []):
        env.update(config_maps[source["configMapRef"]["name"]]["data"])
    for var in container.get("env", []):
        env[var["name"]] = var.get("value", "10.0.0.7")  # fieldRef: a pod IP
    return env


@pytest.mark.parametrize("name", ("base", *OVERLAYS))
def test_commands_parse_with_the_services_own_flags_and_probes_hit_their_port(renders, name):
    import router.__main__ as router_main
    import scheduler_svc.__main__ as scheduler_main
    import worker_svc.__main__ as worker_main

    parsers = {"router": router_main.parse_args, "scheduler_svc": scheduler_main.parse_args,
               "worker_svc": worker_main.parse_args}
    objects = renders[name]
    config_maps = _by_kind(objects, "ConfigMap")
    workloads = _workloads(objects)
    models = set()
    for component, module in SERVICE_MODULES.items():
        container = _container(workloads[component])
        # The image's entrypoint checks and execs these: `args`, never `command`.
        assert "command" not in container
        env = _container_env(container, config_maps)
        args = [_expand(a, env) for a in container["args"]]
        assert args[:3] == ["python", "-m", module]
        parsed = parsers[module](args[3:])
        assert parsed.host == "0.0.0.0"
        # The router also serves HTTP (the OpenAI API and /metrics) on --http-port.
        http = [parsed.http_port] if component == "router" else []
        assert [p["containerPort"] for p in container["ports"]] == [parsed.port, *http]
        assert container["readinessProbe"]["grpc"]["port"] == parsed.port
        assert container["livenessProbe"]["grpc"] == {"port": parsed.port,
                                                      "service": LIVENESS_SERVICE}
        assert parsed.redis_url == "redis://redis:6379/0"
        if hasattr(parsed, "model"):
            models.add(parsed.model)
        if component != "router":
            # Routers and schedulers dial what is registered: the pod IP, not a hostname.
            assert parsed.advertise_host == "10.0.0.7"
    assert models == {config_maps["gridllm-config"]["data"]["GRIDLLM_MODEL"]}


def _image_uid() -> int:
    with open(os.path.join(ROOT, "Dockerfile")) as f:
        (uid,) = re.findall(r"^ARG APP_UID=(\d+)$", f.read(), re.MULTILINE)
    return int(uid)


@pytest.mark.parametrize("name", ("base", *OVERLAYS))
def test_pods_run_unprivileged(renders, name):
    for workload in _workloads(renders[name]).values():
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] != 0
        if workload["metadata"]["name"] != "redis":
            # The image's user, who owns its writable directories.
            assert pod["securityContext"]["runAsUser"] == _image_uid()
        assert pod["automountServiceAccountToken"] is False
        for container in pod["containers"]:
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False
            assert context["readOnlyRootFilesystem"] is True
            assert context["capabilities"]["drop"] == ["ALL"]


def test_gpu_overlay_gives_each_worker_one_gpu_and_cpu_overlay_none(renders):
    gpu = _container(_workloads(renders["overlays/gpu"])["worker"])
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert gpu["image"] == "gridllm:latest"
    # Only the worker asks for a GPU.
    for name, workload in _workloads(renders["overlays/gpu"]).items():
        if name != "worker":
            assert "nvidia.com/gpu" not in str(workload)
    cpu = _container(_workloads(renders["overlays/cpu"])["worker"])
    assert "nvidia.com/gpu" not in str(cpu)
    assert cpu["args"][cpu["args"].index("--device") + 1] == "cpu"
    assert cpu["image"] == "gridllm:latest-cpu"
    # The patch replaced args, so it must keep the base's flags.
    base = _container(_workloads(renders["base"])["worker"])
    assert cpu["args"][:len(base["args"])] == base["args"]


# ----------------------------------------------------------------------- network policy
def _peer_allows(peer: dict, source: str, labels: dict[str, dict]) -> bool:
    if source == "client":
        return "ipBlock" in peer
    if "namespaceSelector" in peer or "ipBlock" in peer:
        return False  # other namespaces / addresses: not one of this namespace's pods
    return _matches(peer["podSelector"], labels[source])


def _rule_allows(rule: dict, peer_field: str, other: str, port: int,
                 labels: dict[str, dict]) -> bool:
    ports = rule.get("ports")
    if ports is not None and not any(p.get("port") == port and
                                     p.get("protocol", "TCP") == "TCP" for p in ports):
        return False
    peers = rule.get(peer_field)
    return peers is None or any(_peer_allows(p, other, labels) for p in peers)


def _direction_allows(policies: list[dict], pod: str, direction: str, other: str, port: int,
                      labels: dict[str, dict]) -> bool:
    field, peer_field = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
    selecting = [p for p in policies if _matches(p["spec"]["podSelector"], labels[pod])
                 and direction in p["spec"]["policyTypes"]]
    if not selecting:
        return True  # no policy isolates this direction
    return any(_rule_allows(rule, peer_field, other, port, labels)
               for p in selecting for rule in p["spec"].get(field) or [])


def allowed_connections(objects: list[dict]) -> set[tuple[str, str, int]]:
    """Every (source, destination, port) the NetworkPolicies let through."""
    workloads = _workloads(objects)
    labels = {n: w["spec"]["template"]["metadata"]["labels"] for n, w in workloads.items()}
    ports = {n: [p["containerPort"] for p in _container(w)["ports"]]
             for n, w in workloads.items()}
    policies = list(_by_kind(objects, "NetworkPolicy").values())
    allowed = set()
    for source in ["client", *workloads]:
        for target in workloads:
            for port in ports[target]:
                is_in = _direction_allows(policies, target, "Ingress", source, port, labels)
                is_out = (source == "client" or _direction_allows(
                    policies, source, "Egress", target, port, labels))
                if is_in and is_out and source != target:
                    allowed.add((source, target, port))
    return allowed


@pytest.mark.parametrize("name", ("base", *OVERLAYS))
def test_network_policies_allow_exactly_the_data_path(renders, name):
    assert allowed_connections(renders[name]) == DATA_PATH


def test_policy_check_notices_an_opened_path(renders):
    # The evaluator must be able to fail: a worker ingress rule without `from` admits
    # clients; the router still cannot reach the worker, its egress does not allow it.
    objects = list(renders["base"])
    policy = _by_kind(objects, "NetworkPolicy")["worker"]
    opened = strategic_merge(policy, {"spec": {"ingress": [{"ports": [{"port": 50053}]}]}})
    objects[objects.index(policy)] = opened
    assert allowed_connections(objects) == DATA_PATH | {("client", "worker", 50053)}
    # Without its own policy, Redis is left to the default deny: nothing reaches it.
    del objects[objects.index(_by_kind(objects, "NetworkPolicy")["redis"])]
    assert allowed_connections(objects) == {
        c for c in DATA_PATH | {("client", "worker", 50053)} if c[1] != "redis"}


# ----------------------------------------------------------------------- the renderer
def _write(path, docs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump_all(docs) if isinstance(docs, list) else yaml.safe_dump(docs))


def _deployment(name: str, containers: list[dict]) -> dict:
    labels = {"app": name}
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
            "spec": {"selector": {"matchLabels": labels},
                     "template": {"metadata": {"labels": labels},
                                  "spec": {"containers": containers}}}}


def test_strategic_merge_follows_the_merge_keys():
    base = {"containers": [{"name": "a", "image": "x", "args": ["1", "2"],
                            "ports": [{"containerPort": 1, "name": "p"}]},
                           {"name": "b", "image": "y"}],
            "tolerations": [{"key": "k1"}], "keep": 1, "drop": 2}
    patch = {"containers": [{"name": "b", "image": "z"},
                            {"name": "a", "args": ["3"], "ports": [{"containerPort": 2}]},
                            {"name": "c", "image": "w"}],
             "tolerations": [{"key": "k2"}], "drop": None}
    merged = strategic_merge(base, patch)
    assert merged == {
        "containers": [{"name": "a", "image": "x", "args": ["3"],
                        "ports": [{"containerPort": 1, "name": "p"}, {"containerPort": 2}]},
                       {"name": "b", "image": "z"}, {"name": "c", "image": "w"}],
        "tolerations": [{"key": "k2"}], "keep": 1}
    assert base["drop"] == 2 and base["containers"][1]["image"] == "y"  # inputs untouched
    with pytest.raises(UnsupportedError):
        strategic_merge(base, {"containers": [{"name": "a", "$patch": "delete"}]})
    with pytest.raises(ValueError, match="merge key"):
        strategic_merge(base, {"containers": [{"image": "no-name"}]})


def test_render_applies_namespace_labels_images_and_patches(tmp_path):
    _write(tmp_path / "base" / "app.yaml",
           [_deployment("app", [{"name": "app", "image": "registry:5000/team/app:1"}]),
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "ns"}}])
    _write(tmp_path / "base" / "kustomization.yaml",
           {"resources": ["app.yaml"], "namespace": "ns",
            "labels": [{"pairs": {"tier": "x"}, "includeTemplates": True}]})
    _write(tmp_path / "over" / "patch.yaml",
           {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "app"},
            "spec": {"replicas": 3}})
    _write(tmp_path / "over" / "kustomization.yaml",
           {"resources": ["../base"], "patches": [{"path": "patch.yaml"}],
            "images": [{"name": "registry:5000/team/app", "newTag": "2"}]})
    deployment, namespace = render(str(tmp_path / "over"))
    assert deployment["metadata"] == {"name": "app", "namespace": "ns", "labels": {"tier": "x"}}
    assert deployment["spec"]["replicas"] == 3
    assert deployment["spec"]["template"]["metadata"]["labels"] == {"app": "app", "tier": "x"}
    assert deployment["spec"]["selector"]["matchLabels"] == {"app": "app"}
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"] == \
        "registry:5000/team/app:2"
    assert "namespace" not in namespace["metadata"]


@pytest.mark.parametrize("kustomization, error", [
    ({"resources": ["app.yaml"], "namePrefix": "x-"}, UnsupportedError),
    ({"resources": ["app.yaml"], "patchesStrategicMerge": ["p.yaml"]}, UnsupportedError),
    ({"resources": ["app.yaml"], "labels": [{"pairs": {"a": "b"}, "includeSelectors": True}]},
     UnsupportedError),
    ({"resources": ["app.yaml", "app.yaml"]}, ValueError),
    ({"resources": ["app.yaml"], "patches": [{"path": "missing-target.yaml"}]}, ValueError),
    ({"resources": ["https://example.com/x.yaml"]}, UnsupportedError),
])
def test_render_refuses_what_it_does_not_do(tmp_path, kustomization, error):
    _write(tmp_path / "app.yaml", _deployment("app", [{"name": "app", "image": "a"}]))
    _write(tmp_path / "missing-target.yaml",
           {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "other"}})
    _write(tmp_path / "kustomization.yaml", kustomization)
    with pytest.raises(error):
        render(str(tmp_path))


def test_scaleout_overlay_splits_the_workers_between_its_schedulers(renders):
    import scheduler_svc.__main__ as scheduler_main

    workloads = _workloads(renders["overlays/scaleout"])
    scheduler, worker = workloads["scheduler"], workloads["worker"]
    args = _container(scheduler)["args"]
    parsed = scheduler_main.parse_args(args[3:])
    assert scheduler["spec"]["replicas"] >= 2
    assert scheduler["spec"]["replicas"] * parsed.max_workers == worker["spec"]["replicas"]
    # The patch replaced args, so it must keep the base's flags; the GPU overlay below stays.
    base = _container(_workloads(renders["base"])["scheduler"])["args"]
    assert args[:len(base)] == base
    assert _container(worker) == _container(_workloads(renders["overlays/gpu"])["worker"])
    # The routers discover the schedulers (no fixed --scheduler).
    assert "--scheduler" not in _container(workloads["router"])["args"]
