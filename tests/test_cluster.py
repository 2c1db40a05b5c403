"""cluster/ checked without a cluster: what a team applies must parse, name real kinds, run the
Ray that pyproject pins, run the README's commands and hold no secret values."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

REPO = Path(__file__).parents[1]
CLUSTER = REPO / "cluster"
CLUSTER_README = (CLUSTER / "README.md").read_text()
README = (REPO / "README.md").read_text()
PIPELINE_COMMAND = "unclip run pipelines/configs/laion.yaml"
RETRAIN_COMMAND = "unclip retrain pipelines/configs/laion.yaml --new-urls s3://my-bucket/unclip-incoming/"

# The kinds a manifest here may use, with the apiVersion that defines them.
# ray.io/v1 RayCluster, RayJob, RayCronJob: the CRDs of KubeRay v1.6.0,
#   github.com/ray-project/kuberay/tree/v1.6.0/ray-operator/config/crd/bases/ray.io_{rayclusters,rayjobs,raycronjobs}.yaml
#   (spec.group: ray.io, served and storage version v1; raycronjobs.ray.io is new in v1.6.0, behind
#   the RayCronJob feature gate, ray-operator/pkg/features/features.go).
# The rest: the Kubernetes API reference (kubernetes.io/docs/reference/kubernetes-api/), GA groups:
#   core v1, apps/v1, batch/v1 (CronJob GA since 1.21), rbac.authorization.k8s.io/v1, networking.k8s.io/v1.
KNOWN_KINDS = {
    "RayCluster": "ray.io/v1",
    "RayJob": "ray.io/v1",
    "RayCronJob": "ray.io/v1",
    "Namespace": "v1",
    "ServiceAccount": "v1",
    "PersistentVolumeClaim": "v1",
    "ConfigMap": "v1",
    "Service": "v1",
    "Deployment": "apps/v1",
    "StatefulSet": "apps/v1",
    "CronJob": "batch/v1",
    "Role": "rbac.authorization.k8s.io/v1",
    "RoleBinding": "rbac.authorization.k8s.io/v1",
    "NetworkPolicy": "networking.k8s.io/v1",
}


def pinned(package: str) -> str:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    return next(re.fullmatch(rf"{package}(\[.*\])?==(\S+)", d).group(2) for d in deps if re.fullmatch(rf"{package}(\[.*\])?==\S+", d))


RAY_VERSION = pinned("ray")
MLFLOW_VERSION = pinned("mlflow")


def manifests() -> list[tuple[str, dict[str, Any]]]:
    """(file, document) for every Kubernetes document, including RayJobs held in ConfigMaps."""
    docs = []
    for path in sorted((CLUSTER / "kuberay").glob("*.yaml")) + sorted((CLUSTER / "mlflow").glob("*.yaml")):
        if path.name == "operator-values.yaml":  # Helm values, not a manifest
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is None:
                continue
            docs.append((path.name, doc))
            if doc["kind"] == "ConfigMap":
                docs += [(f"{path.name}:{key}", yaml.safe_load(text)) for key, text in doc.get("data", {}).items()
                         if key.endswith(".yaml")]
    return docs


def launchers() -> dict[str, dict[str, Any]]:
    return {p.name: yaml.safe_load(p.read_text()) for p in sorted((CLUSTER / "launcher").glob("*.yaml"))}


def walk(node: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    yield path, node
    if isinstance(node, dict):
        for key, value in node.items():
            yield from walk(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from walk(value, f"{path}[{i}]")


def cluster_specs() -> dict[str, dict[str, Any]]:
    """Every Ray cluster spec: of the RayCluster, of each RayJob and of the RayCronJob's template."""
    specs = {}
    for name, doc in manifests():
        if doc["kind"] == "RayCluster":
            specs[name] = doc["spec"]
        elif doc["kind"] == "RayJob":
            specs[name] = doc["spec"]["rayClusterSpec"]
        elif doc["kind"] == "RayCronJob":
            specs[name] = doc["spec"]["jobTemplate"]["rayClusterSpec"]
    return specs


def test_every_yaml_parses_and_uses_kinds_kubernetes_and_kuberay_define():
    files = sorted(CLUSTER.rglob("*.yaml"))
    assert len(files) >= 8
    for path in files:
        assert list(yaml.safe_load_all(path.read_text())), path  # parses, not empty
    kinds = set()
    for name, doc in manifests():
        kind = doc["kind"]
        assert kind in KNOWN_KINDS, f"{name}: unknown kind {kind}"
        assert doc["apiVersion"] == KNOWN_KINDS[kind], f"{name}: {kind} is {KNOWN_KINDS[kind]}, not {doc['apiVersion']}"
        meta = doc["metadata"]
        assert meta.get("name") or meta.get("generateName"), name
        if kind != "Namespace":
            assert meta.get("namespace") in ("unclip", "mlflow"), f"{name}: {kind} without its namespace"
        kinds.add(kind)
    assert {"RayCluster", "RayJob", "RayCronJob", "CronJob", "Deployment", "StatefulSet", "NetworkPolicy"} <= kinds


def test_issue_paths_exist_and_readmes_name_only_files_that_exist():
    for path in ("kuberay/rayjob-pipeline.yaml", "kuberay/raycronjob-retrain.yaml", "kuberay/cronjob-retrain.yaml",
                 "mlflow/mlflow.yaml", "launcher/aws.yaml", "launcher/gcp.yaml", "Dockerfile"):
        assert (CLUSTER / path).is_file(), path
    for text in (README, CLUSTER_README):
        for path in re.findall(r"(?:-f|ray up|ray down|ray dashboard) (cluster/\S+)", text):
            assert (REPO / path).is_file(), path


def test_images_and_ray_versions_are_the_pinned_ones():
    images = []
    for name, doc in manifests():
        images += [(name, path, value) for path, value in walk(doc) if path.endswith(".image")]
    for name, config in launchers().items():
        images += [(name, path, value) for path, value in walk(config) if path.endswith(("image", "worker_image"))]
    ours = [(name, path, image) for name, path, image in images if "/unclip-pipeline:" in image]
    assert len(ours) >= 14
    for name, path, image in ours:
        assert image.rsplit(":", 1)[1] in (f"{RAY_VERSION}-cpu", f"{RAY_VERSION}-gpu"), f"{name}{path}: {image}"
    for name, spec in cluster_specs().items():
        assert spec["rayVersion"] == RAY_VERSION, name
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert f"ARG RAY_VERSION={RAY_VERSION}\n" in dockerfile
    assert "FROM rayproject/ray:${RAY_VERSION}-py311-${VARIANT}" in dockerfile
    assert "WORKDIR /home/ray/unclip" in dockerfile and "COPY --chown=ray:users pipelines pipelines" in dockerfile
    mlflow_images = [image for _, _, image in images if "/unclip-mlflow:" in image]
    assert mlflow_images and all(image.endswith(f":{MLFLOW_VERSION}") for image in mlflow_images)
    assert f"ARG MLFLOW_VERSION={MLFLOW_VERSION}\n" in (CLUSTER / "mlflow" / "Dockerfile").read_text()


def test_ray_clusters_have_a_driving_head_a_cpu_group_and_a_tolerated_gpu_group_that_autoscale():
    specs = cluster_specs()
    assert set(specs) == {"raycluster.yaml", "rayjob-pipeline.yaml", "raycronjob-retrain.yaml", "cronjob-retrain.yaml:rayjob.yaml"}
    first = next(iter(specs.values()))
    for name, spec in specs.items():  # one cluster, four places: they must not drift apart
        assert spec == first, f"{name}'s cluster spec differs from {next(iter(specs))}'s"
    spec = first
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert spec["enableInTreeAutoscaling"] is True
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}

    def limits(group):
        return group["template"]["spec"]["containers"][0]["resources"]["limits"]

    gpu = [g for g in groups.values() if "nvidia.com/gpu" in limits(g)]
    cpu = [g for g in groups.values() if "nvidia.com/gpu" not in limits(g)]
    assert len(gpu) == 1 and len(cpu) == 1
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in gpu[0]["template"]["spec"]["tolerations"]
    assert gpu[0]["template"]["spec"]["containers"][0]["image"].endswith("-gpu")
    for group in groups.values():
        assert group["minReplicas"] == 0 < group["maxReplicas"]
    for pod in [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in groups.values()]:
        mounts = pod["containers"][0]["volumeMounts"]
        assert {"name": "storage", "mountPath": "/mnt/cluster_storage"} in mounts  # where laion.yaml's storage lives


def test_entrypoints_are_the_readme_commands():
    from pipelines.config import load_config

    entrypoints = {}
    for name, doc in manifests():
        if doc["kind"] == "RayJob":
            entrypoints[name] = doc["spec"]["entrypoint"]
        elif doc["kind"] == "RayCronJob":
            entrypoints[name] = doc["spec"]["jobTemplate"]["entrypoint"]
    assert entrypoints == {"rayjob-pipeline.yaml": PIPELINE_COMMAND, "raycronjob-retrain.yaml": RETRAIN_COMMAND,
                           "cronjob-retrain.yaml:rayjob.yaml": RETRAIN_COMMAND}
    assert f"-- {PIPELINE_COMMAND}" in README and f"-- {PIPELINE_COMMAND}" in CLUSTER_README
    assert RETRAIN_COMMAND in CLUSTER_README
    assert "unclip" in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    cfg = load_config(REPO / PIPELINE_COMMAND.split()[-1], [])  # the config the jobs run is valid ...
    assert cfg.storage.startswith("/mnt/cluster_storage/")  # ... and writes to the shared volume
    assert cfg.mlflow.tracking_uri == "http://mlflow.mlflow.svc.cluster.local:5000"  # the Service in mlflow.yaml


SECRET_NAME = re.compile(r"PASSWORD|PASSWD|SECRET|TOKEN|CREDENTIAL|ACCESS_KEY|PRIVATE_KEY|API_KEY", re.I)
CREDENTIALS_IN_URI = re.compile(r"://[^/\s:@]+:([^@\s]+)@")


def test_no_secret_values_in_manifests_dockerfiles_or_launchers():
    for name, doc in manifests():
        assert doc["kind"] != "Secret", f"{name}: Secrets are created with kubectl, not committed"
        for path, node in walk(doc):
            if re.search(r"\.env\[\d+\]$", path):  # a container's environment variable
                if SECRET_NAME.search(node["name"]):
                    assert "secretKeyRef" in node.get("valueFrom", {}), f"{name}{path}: {node['name']} must come from a Secret"
                if match := CREDENTIALS_IN_URI.search(str(node.get("value", ""))):
                    assert re.fullmatch(r"\$\([A-Z_]+\)", match.group(1)), f"{name}{path}: a password written in a URI"
            elif isinstance(node, dict):  # e.g. a `password: ...` field anywhere else
                for key, value in node.items():
                    if SECRET_NAME.search(key) and isinstance(value, (str, int)) and key not in ("secretName",):
                        pytest.fail(f"{name}{path}.{key}: a secret-looking field with a literal value")
            elif isinstance(node, str) and re.search(r"\.(args|command)\[\d+\]$", path):
                assert not re.search(r"--(password|secret|token)\S*=", node, re.I), f"{name}{path}: a secret on a command line"
    for path in [CLUSTER / "Dockerfile", CLUSTER / "mlflow" / "Dockerfile"]:
        for line in path.read_text().splitlines():
            if line.startswith(("ENV", "ARG")) or line.startswith("    "):
                assert not SECRET_NAME.search(line.split("#")[0]), f"{path}: {line}"
    for name, config in launchers().items():
        text = json.dumps(config)
        assert not re.search(r"AKIA[0-9A-Z]{16}|aws_secret_access_key|private_key|password", text, re.I), name


def test_mlflow_server_uses_postgres_and_s3_and_is_not_exposed():
    docs = {(doc["kind"], doc["metadata"]["name"]): doc for name, doc in manifests() if name == "mlflow.yaml"}
    assert not any(kind == "Ingress" for kind, _ in docs)
    for (kind, name), doc in docs.items():
        if kind == "Service":
            assert doc["spec"].get("type", "ClusterIP") == "ClusterIP", name
    server = docs[("Deployment", "mlflow")]["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in server["env"]}
    assert env["MLFLOW_BACKEND_STORE_URI"]["value"].startswith("postgresql://")
    assert any(arg.startswith("--artifacts-destination=s3://") for arg in server["args"])
    assert {"secretRef": {"name": "mlflow-artifacts"}} in server["envFrom"]
    assert ("StatefulSet", "mlflow-postgres") in docs
    # every Host name the pipeline uses to reach the server is allowed (MLflow rejects others)
    allowed = next(arg for arg in server["args"] if arg.startswith("--allowed-hosts=")).split("=", 1)[1].split(",")
    assert "mlflow.mlflow.svc.cluster.local:5000" in allowed


def test_raycronjob_is_marked_alpha_and_its_feature_gate_is_enabled_by_the_operator_values():
    gates = {g["name"]: g["enabled"] for g in yaml.safe_load((CLUSTER / "kuberay" / "operator-values.yaml").read_text())["featureGates"]}
    assert gates["RayCronJob"] is True
    assert "alpha" in CLUSTER_README.lower() and "--feature-gates=RayCronJob=true" in CLUSTER_README
    assert "ALPHA" in (CLUSTER / "kuberay" / "raycronjob-retrain.yaml").read_text()
    cron = [doc for name, doc in manifests() if doc["kind"] == "RayCronJob"][0]
    fallback = [doc for name, doc in manifests() if doc["kind"] == "RayJob" and name.startswith("cronjob-retrain")][0]
    assert fallback["spec"] == cron["spec"]["jobTemplate"]  # the fallback runs exactly the same job
    schedule = [doc for name, doc in manifests() if doc["kind"] == "CronJob"][0]["spec"]["schedule"]
    assert schedule == cron["spec"]["schedule"]


def test_launcher_configs_define_the_node_types_they_use_and_pass_rays_own_checks():
    import ray.autoscaler
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    configs = launchers()
    assert {c["provider"]["type"] for c in configs.values()} == {"aws", "gcp"}
    for name, config in configs.items():
        jsonschema.validate(config, schema)
        types = config["available_node_types"]
        assert config["head_node_type"] in types, name
        assert types[config["head_node_type"]]["resources"] == {"CPU": 0}, name
        gpu = [t for t in types.values() if t["resources"].get("GPU")]
        cpu = [t for n, t in types.items() if n != config["head_node_type"] and not t["resources"].get("GPU")]
        assert gpu and cpu, name
        assert all(t["docker"]["worker_image"].endswith("-gpu") for t in gpu), name
        validate_config(prepare_config(config))  # what `ray up` runs first (fills defaults, checks types)


def test_readme_local_head_commands_match_the_makefile():
    """Part of `ray job submit` from a checkout: the README's commands and the make target they use."""
    assert "make ray-head" in README and "make ray-stop" in README
    assert ".venv/bin/ray job submit --address http://127.0.0.1:8265 --working-dir . -- unclip run pipelines/configs/quick.yaml" in README
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    dry = subprocess.run(["make", "--no-print-directory", "-n", "-o", "install", "ray-head", "VENV=/opt/venv"], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "MAKEFLAGS": ""}, check=True).stdout
    # jobs run with the head's environment: the venv's bin must come first on its PATH
    assert dry.strip().startswith('PATH="/opt/venv/bin:$PATH" /opt/venv/bin/ray start --head --dashboard-host 127.0.0.1')
