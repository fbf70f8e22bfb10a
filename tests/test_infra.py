"""infra/: what can be checked without Docker, a Kubernetes cluster or cloud VMs.

- Kubernetes built-in kinds are validated (strict: unknown fields are errors) against the
  official OpenAPI schemas bundled in the `kubernetes-validate` package.
- RayCluster is a KubeRay custom resource, whose CRD schema no installable package ships: its
  pod templates are validated as core PodTemplates (strict), and the RayCluster fields around
  them against RAYCLUSTER_SCHEMA below, a minimal schema written from KubeRay's ray.io/v1 API.
- The Ray cluster launcher config is validated with Ray's own schema and default filling.
- The Dockerfile is parsed with `dockerfile-parse`; its entrypoint scripts are run here.
Cross-file checks: one image everywhere, GPU resources only where they belong, volumes and
addresses that match, and every entrypoint, module and S2V_* variable named exists in the code.
"""

from __future__ import annotations

import ast
import copy
import importlib.util
import json
import os
import re
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from dockerfile_parse import DockerfileParser

from flows.settings import BatchSettings

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
DOCS = ROOT / "docs" / "deploy.md"
K8S_VERSION = "1.30.0"  # oldest Kubernetes minor the manifests target (all major clouds offer it)
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]
IMAGE_REPO = "registry.example.com/s2v/worker"
IMAGE = f"{IMAGE_REPO}:{VERSION}"
NAMESPACE = "s2v"
CHECKPOINT = "/models/Wan2.2-S2V-14B"


def _docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((INFRA / name).read_text()) if d is not None]


def _k8s_docs() -> list[tuple[str, dict]]:
    return [
        (n, d) for n in ("volumes.yaml", "prefect-worker.yaml", "kuberay-raycluster.yaml") for d in _docs(n)
    ]


def _one(kind: str, name: str | None = None) -> dict:
    found = [
        d for _, d in _k8s_docs() if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _raycluster() -> dict:
    return _one("RayCluster")


def _work_pool() -> dict:
    return json.loads((INFRA / "work-pools" / "kubernetes.json").read_text())


def _dockerfile() -> DockerfileParser:
    return DockerfileParser(path=str(INFRA / "worker.Dockerfile"))


def _containers(pod_spec: dict) -> list[dict]:
    return pod_spec.get("initContainers", []) + pod_spec["containers"]


# ---------------------------------------------------------------------------------------------
# Every YAML loads; Kubernetes kinds are valid


def test_every_yaml_loads_and_names_its_kind() -> None:
    files = sorted(INFRA.rglob("*.yaml")) + sorted(INFRA.rglob("*.yml"))
    assert {f.name for f in files} >= {"kuberay-raycluster.yaml", "ray-cluster.yaml", "prefect-worker.yaml"}
    for f in files:
        docs = [d for d in yaml.safe_load_all(f.read_text()) if d is not None]
        assert docs, f"{f} is empty"
        if f.name == "ray-cluster.yaml":
            continue  # a Ray launcher config, not a Kubernetes object
        for d in docs:
            assert {"apiVersion", "kind", "metadata"} <= d.keys(), f"{f}: {d.get('kind')}"
            assert d["metadata"].get("name"), f"{f}: {d['kind']} has no name"
            if d["kind"] != "Namespace":
                assert d["metadata"].get("namespace") == NAMESPACE, (
                    f"{f}: {d['kind']} {d['metadata']['name']}"
                )


def test_builtin_kinds_pass_the_kubernetes_schema_strictly() -> None:
    checked = []
    for name, doc in _k8s_docs():
        if doc["apiVersion"] == "ray.io/v1":
            continue
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        checked.append((name, doc["kind"]))
    kinds = {k for _, k in checked}
    expected = {"Namespace", "PersistentVolumeClaim", "ConfigMap", "ServiceAccount", "Role", "RoleBinding"}
    assert kinds >= expected | {"Deployment"}


def test_the_validator_rejects_what_it_should() -> None:
    # A typo'd field and a wrong type: proof that the checks above are not vacuous.
    deployment = copy.deepcopy(_one("Deployment", "prefect-worker"))
    deployment["spec"]["replica"] = deployment["spec"].pop("replicas")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)
    cluster = copy.deepcopy(_raycluster())
    cluster["spec"]["workerGroupSpecs"][0]["rayStartParams"]["num-gpus"] = 1  # KubeRay wants strings
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(cluster, RAYCLUSTER_SCHEMA)


# ---------------------------------------------------------------------------------------------
# KubeRay RayCluster

_RESOURCES = {"type": "object", "additionalProperties": False,
              "properties": {"requests": {"type": "object"}, "limits": {"type": "object"}}}  # fmt: skip
_START_PARAMS = {"type": "object", "additionalProperties": {"type": "string"}}
_TEMPLATE = {"type": "object", "required": ["spec"], "properties": {"metadata": {"type": "object"},
             "spec": {"type": "object", "required": ["containers"]}}}  # fmt: skip
# Written from KubeRay's ray.io/v1 RayCluster API (field names and types); only the fields this
# project may use are allowed, so a misspelt one fails here instead of being ignored.
RAYCLUSTER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "ray.io/v1"},
        "kind": {"const": "RayCluster"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["rayVersion", "headGroupSpec", "workerGroupSpecs"],
            "properties": {
                "rayVersion": {"type": "string", "pattern": r"^\d+\.\d+\.\d+$"},
                "enableInTreeAutoscaling": {"type": "boolean"},
                "autoscalerOptions": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "upscalingMode": {"enum": ["Default", "Aggressive", "Conservative"]},
                        "idleTimeoutSeconds": {"type": "integer", "minimum": 0},
                        "image": {"type": "string"},
                        "imagePullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]},
                        "resources": _RESOURCES,
                        "env": {"type": "array"},
                        "envFrom": {"type": "array"},
                        "securityContext": {"type": "object"},
                        "version": {"enum": ["v1", "v2"]},
                    },
                },
                "headGroupSpec": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["rayStartParams", "template"],
                    "properties": {
                        "serviceType": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
                        "enableIngress": {"type": "boolean"},
                        "rayStartParams": _START_PARAMS,
                        "template": _TEMPLATE,
                    },
                },
                "workerGroupSpecs": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["groupName", "rayStartParams", "template", "maxReplicas"],
                        "properties": {
                            "groupName": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
                            "replicas": {"type": "integer", "minimum": 0},
                            "minReplicas": {"type": "integer", "minimum": 0},
                            "maxReplicas": {"type": "integer", "minimum": 1},
                            "idleTimeoutSeconds": {"type": "integer", "minimum": 0},
                            "rayStartParams": _START_PARAMS,
                            "template": _TEMPLATE,
                        },
                    },
                },
            },
        },
    },
}


def test_raycluster_schema_and_pod_templates() -> None:
    cluster = _raycluster()
    jsonschema.validate(cluster, RAYCLUSTER_SCHEMA)
    groups = [cluster["spec"]["headGroupSpec"], *cluster["spec"]["workerGroupSpecs"]]
    for group in groups:
        pod_template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "check"},
                        "template": group["template"]}  # fmt: skip
        kubernetes_validate.validate(pod_template, K8S_VERSION, strict=True)


def test_gpu_workers_scale_between_bounds_and_the_head_has_no_gpu() -> None:
    spec = _raycluster()["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]
    assert head["rayStartParams"].get("num-gpus") == "0"
    for c in _containers(head["template"]["spec"]):
        for part in ("requests", "limits"):
            assert "nvidia.com/gpu" not in c.get("resources", {}).get(part, {}), c["name"]
        assert c["resources"]["requests"].get("cpu") and c["resources"]["requests"].get("memory")

    [gpu] = [g for g in spec["workerGroupSpecs"] if g["groupName"] == "gpu"]
    assert 0 <= gpu["minReplicas"] <= gpu.get("replicas", gpu["minReplicas"]) <= gpu["maxReplicas"]
    assert gpu["maxReplicas"] >= 1
    assert gpu["rayStartParams"]["num-gpus"] == "1"
    [worker] = gpu["template"]["spec"]["containers"]
    resources = worker["resources"]
    # One GPU per pod, requested and limited alike (Kubernetes requires equal GPU request/limit).
    assert resources["limits"]["nvidia.com/gpu"] == 1 == resources["requests"]["nvidia.com/gpu"]
    assert resources["requests"]["memory"] == resources["limits"]["memory"]
    assert any(t.get("key") == "nvidia.com/gpu" for t in gpu["template"]["spec"].get("tolerations", []))


def test_the_model_volume_is_mounted_read_only_where_the_image_expects_it() -> None:
    claims = {d["metadata"]["name"]: d for d in _docs("volumes.yaml") if d["kind"] == "PersistentVolumeClaim"}
    assert set(claims) == {"s2v-models", "s2v-work"}
    [gpu] = _raycluster()["spec"]["workerGroupSpecs"]
    pod = gpu["template"]["spec"]
    job = _work_pool()["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    for spec in (pod, job):
        volumes = {v["name"]: v for v in spec["volumes"]}
        [container] = spec["containers"]
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        models = mounts["/models"]
        assert models.get("readOnly") is True
        assert volumes[models["name"]]["persistentVolumeClaim"]["claimName"] == "s2v-models"
        # The driver and the GPU workers see the segment folders under the same path.
        assert volumes[mounts["/data"]["name"]]["persistentVolumeClaim"]["claimName"] == "s2v-work"
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert env["S2V_CHECKPOINT"] == CHECKPOINT == _dockerfile().envs["S2V_CHECKPOINT"]
    assert env["S2V_WORK_DIR"].startswith("/data/")


# ---------------------------------------------------------------------------------------------
# Prefect worker and work pool


def test_prefect_worker_polls_the_kubernetes_pool_with_the_rights_it_needs() -> None:
    deployment = _one("Deployment", "prefect-worker")
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    argv = container.get("command", []) + container["args"]
    assert argv[:3] == ["prefect", "worker", "start"]
    assert argv[argv.index("--pool") + 1] == "s2v-k8s" and argv[argv.index("--type") + 1] == "kubernetes"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health" and "--with-healthcheck" in argv

    sa = pod["serviceAccountName"]
    binding = _one("RoleBinding")
    assert {"kind": "ServiceAccount", "name": sa, "namespace": NAMESPACE} in binding["subjects"]
    role = _one("Role", binding["roleRef"]["name"])
    jobs = [r for r in role["rules"] if "batch" in r["apiGroups"] and "jobs" in r["resources"]]
    assert jobs and {"create", "get", "list", "watch", "delete"} <= set(jobs[0]["verbs"])
    pods = [r for r in role["rules"] if "" in r["apiGroups"] and "pods" in r["resources"]]
    assert pods and {"get", "list", "watch"} <= set(pods[0]["verbs"])

    env = {e["name"]: e for e in container["env"]}
    ref = env["PREFECT_API_URL"]["valueFrom"]["configMapKeyRef"]
    config = _one("ConfigMap", ref["name"])
    assert config["data"][ref["key"]].startswith("http") and config["data"][ref["key"]].endswith("/api")


def test_ray_address_points_at_the_kuberay_head_client_port() -> None:
    cluster = _raycluster()
    [head] = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"]
    client_port = next(p["containerPort"] for p in head["ports"] if p["name"] == "client")
    service = f"{cluster['metadata']['name']}-head-svc.{cluster['metadata']['namespace']}.svc.cluster.local"
    data = _one("ConfigMap", "s2v-config")["data"]
    assert data["S2V_RAY_ADDRESS"] == data["RAY_ADDRESS"] == f"ray://{service}:{client_port}"
    # The GPU group scales from zero, so the pool is told its size; more than the group's
    # maximum would leave workers waiting for GPUs that never come.
    [gpu] = cluster["spec"]["workerGroupSpecs"]
    assert 1 <= int(data["S2V_POOL_WORKERS"]) <= gpu["maxReplicas"]
    settings = BatchSettings(**{k[4:].lower(): v for k, v in data.items() if k.startswith("S2V_")})
    assert settings.ray_address == data["S2V_RAY_ADDRESS"] and settings.pool_workers == gpu["maxReplicas"]


_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


def _render(node: Any, values: dict[str, Any]) -> Any:
    """Fill Prefect's {{ var }} placeholders: a whole-string placeholder takes the value's type."""
    if isinstance(node, dict):
        return {k: _render(v, values) for k, v in node.items()}
    if isinstance(node, list):
        return [_render(v, values) for v in node]
    if isinstance(node, str):
        whole = _PLACEHOLDER.fullmatch(node.strip())
        if whole:
            return values[whole.group(1)]
        return _PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), node)
    return node


def test_work_pool_template_declares_its_variables_and_renders_a_valid_job() -> None:
    template = _work_pool()
    variables = template["variables"]
    jsonschema.Draft202012Validator.check_schema(variables)
    props = variables["properties"]
    used = set(_PLACEHOLDER.findall(json.dumps(template["job_configuration"])))
    assert used <= set(props), f"undeclared: {used - set(props)}"
    assert props["image"]["default"] == IMAGE
    assert props["namespace"]["default"] == NAMESPACE
    assert _one("ServiceAccount", props["service_account_name"]["default"])

    # What the Prefect worker does for a flow run: defaults filled, env as a list, argv as a list.
    values = {k: v.get("default") for k, v in props.items()}
    values.update(name="batch-nightly-abc12", labels={"prefect.io/flow-run-id": "abc12"},
                  env=[{"name": "PREFECT__FLOW_RUN_ID", "value": "abc12"}],
                  command=["prefect", "flow-run", "execute"])  # fmt: skip
    job = _render(template["job_configuration"]["job_manifest"], values)
    job["metadata"]["name"] = job["metadata"].pop("generateName") + "x"
    pod = job["spec"]["template"]["spec"]
    # The parts the Prefect Kubernetes worker insists on (it rejects templates without them),
    # including parallelism/completions under the pod spec, where its own base manifest has them:
    # they are not pod fields, and the API server drops them, so strict validation goes without.
    assert pod["restartPolicy"] == "Never" and pod["containers"][0]["name"] == "prefect-job"
    assert pod.pop("parallelism") == 1 and pod.pop("completions") == 1
    kubernetes_validate.validate(job, K8S_VERSION, strict=True)
    env_from = {e.get("configMapRef", e.get("secretRef"))["name"] for e in pod["containers"][0]["envFrom"]}
    assert "s2v-config" in env_from
    assert not any("nvidia.com/gpu" in str(c.get("resources")) for c in pod["containers"])  # the driver


# ---------------------------------------------------------------------------------------------
# Ray cluster launcher (plain VMs)


def test_ray_launcher_config_passes_rays_own_validation() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((INFRA / "ray-cluster.yaml").read_text())
    validate_config(prepare_config(copy.deepcopy(raw)))
    broken = copy.deepcopy(raw)
    broken["available_node_types"]["gpu_worker"]["min_workers"] = "two"
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(broken))

    assert raw["provider"]["type"] in {"aws", "gcp"}
    assert raw["docker"]["image"] == IMAGE
    types = raw["available_node_types"]
    head, gpu = types[raw["head_node_type"]], types["gpu_worker"]
    assert head["resources"].get("GPU", 0) == 0 and gpu["resources"]["GPU"] >= 1
    assert 0 <= gpu["min_workers"] <= gpu["max_workers"] <= raw["max_workers"]
    assert CHECKPOINT in raw["file_mounts"]
    assert any("--num-gpus=0" in c for c in raw["head_start_ray_commands"])
    setup = " ".join(raw["setup_commands"])
    assert "constraints.txt" in setup and "/opt/s2v" in setup
    assert raw["file_mounts"]["/opt/s2v"] == "."


# ---------------------------------------------------------------------------------------------
# The image


def test_dockerfile_base_user_volume_and_installs() -> None:
    df = _dockerfile()
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+(\.\d+)?-cudnn-runtime-ubuntu22\.04", df.baseimage), (
        df.baseimage
    )
    instructions = df.structure
    users = [i["value"].split(":")[0] for i in instructions if i["instruction"] == "USER"]
    assert users and users[-1] not in {"root", "0"}
    volumes = [v for i in instructions if i["instruction"] == "VOLUME" for v in json.loads(i["value"])]
    assert "/models" in volumes
    assert df.args["PYTHON"] == "python3.11"
    assert df.labels["org.opencontainers.image.version"] == VERSION

    runs = " ".join(i["value"] for i in instructions if i["instruction"] == "RUN")
    extras = set(re.findall(r'"\.\[([a-z,]+)\]"', runs))
    assert extras, "the project is installed with its extras"
    for group in extras:
        for extra in group.split(","):
            assert extra in PYPROJECT["project"]["optional-dependencies"], extra
    assert "model" in ",".join(extras)
    assert "ray[default]==${RAY_VERSION}" in runs and "constraints.txt" in runs
    assert "HF_HUB_OFFLINE" in df.envs  # nothing from a model hub at run time
    # First-party modules the build imports exist here.
    for module in re.findall(r"import ([\w., ]+)\"", runs)[0].replace(" ", "").split(","):
        if module.split(".")[0] in {"tasks", "flows", "model"}:
            assert importlib.util.find_spec(module) is not None, module
    assert "s2v-batch" in PYPROJECT["project"]["scripts"] and "s2v-batch --help" in runs


def test_dockerfile_copies_exist_and_are_not_ignored() -> None:
    df = _dockerfile()
    ignored = [ln.strip() for ln in (INFRA / "worker.Dockerfile.dockerignore").read_text().splitlines()
               if ln.strip() and not ln.startswith("#")]  # fmt: skip
    for i in df.structure:
        if i["instruction"] not in {"COPY", "ADD"}:
            continue
        parts = [p for p in i["value"].split() if not p.startswith("--")]
        for src in parts[:-1]:
            assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
            top = src.split("/")[0]
            assert top not in ignored and src not in ignored, f"COPY {src} is excluded by the .dockerignore"


def test_ray_version_is_one_everywhere() -> None:
    import ray

    image_ray = _dockerfile().args["RAY_VERSION"]
    assert _raycluster()["spec"]["rayVersion"] == image_ray
    assert image_ray in (INFRA / "ray-cluster.yaml").read_text()
    # The driver side the project is tested with; Ray Client needs the same version on both ends.
    assert ray.__version__ == image_ray


def test_one_image_everywhere() -> None:
    images = set()
    for _, doc in _k8s_docs():
        text = json.dumps(doc)
        images |= set(re.findall(r'"image": "([^"]+)"', text))
    images.add(_work_pool()["variables"]["properties"]["image"]["default"])
    images.add(yaml.safe_load((INFRA / "ray-cluster.yaml").read_text())["docker"]["image"])
    assert images == {IMAGE}
    build = f"docker build -f infra/worker.Dockerfile -t {IMAGE} ."
    assert build in (INFRA / "worker.Dockerfile").read_text()
    assert build in DOCS.read_text()


def _run(argv: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in {"RAY_HEAD_ADDRESS", "S2V_CHECKPOINT"}}
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, env={**clean, **(env or {})})


def test_entrypoint_runs_a_command_or_explains_what_is_missing(tmp_path: Path) -> None:
    script = str(INFRA / "entrypoint.sh")
    ran = _run(["bash", script, "echo", "hello from the image"])
    assert ran.returncode == 0 and ran.stdout.strip() == "hello from the image"

    bare = _run(["bash", script], env={"S2V_CHECKPOINT": str(tmp_path / "absent")})
    assert bare.returncode == 2
    assert "RAY_HEAD_ADDRESS" in bare.stderr and "S2V_CHECKPOINT" in bare.stderr

    for name in ("entrypoint.sh", "healthcheck.sh"):
        assert os.access(INFRA / name, os.X_OK), f"{name} is not executable"


def _isolated(script: str) -> subprocess.CompletedProcess:
    """Run `script` in fresh PID and network namespaces, as a container would see itself: no other
    test's Ray processes or ports leak in (needs root or user namespaces, as CI has)."""
    argv = ["unshare", "--pid", "--net", "--fork", "--mount-proc", "bash", "-c", script]
    done = _run(argv)
    assert "unshare" not in done.stderr, f"cannot isolate the healthcheck: {done.stderr}"
    return done


def test_healthcheck_follows_the_local_raylet(tmp_path: Path) -> None:
    check = str(INFRA / "healthcheck.sh")
    # No Ray node in the container (a flow run or a one-off command): healthy.
    assert _isolated(f"bash {check}").returncode == 0
    # A raylet process whose health endpoint does not answer: unhealthy.
    raylet = tmp_path / "raylet"
    raylet.write_bytes(Path("/bin/sleep").read_bytes())
    raylet.chmod(0o755)
    assert _isolated(f"{raylet} 20 & sleep 0.2; bash {check}").returncode != 0


# ---------------------------------------------------------------------------------------------
# Names that must exist in the code


_S2V_VAR = re.compile(r"\bS2V_[A-Z0-9_]+\b")


def _code_mentions(name: str) -> bool:
    """Whether the code (Python or prefect.yaml) reads the variable itself, not through settings."""
    sources = [*ROOT.glob("tasks/**/*.py"), *ROOT.glob("flows/**/*.py"), *ROOT.glob("model/**/*.py"),
               ROOT / "prefect.yaml"]  # fmt: skip
    return any(name in p.read_text() for p in sources)


def test_every_s2v_variable_named_is_a_setting_or_read_by_the_code() -> None:
    settings = {f"S2V_{name.upper()}" for name in BatchSettings.model_fields}
    files = [p for p in INFRA.rglob("*") if p.is_file()] + [DOCS]
    named = {var: p.name for p in files for var in _S2V_VAR.findall(p.read_text())}
    assert "S2V_CHECKPOINT" in named and "S2V_RAY_ADDRESS" in named
    unknown = {v: f for v, f in named.items() if v not in settings and not _code_mentions(v)}
    assert not unknown, f"S2V_* variables that nothing reads: {unknown}"


def test_prefect_entrypoints_and_modules_named_exist() -> None:
    prefect = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    entrypoints = {d["entrypoint"] for d in prefect["deployments"]}
    text = DOCS.read_text()
    entrypoints |= set(re.findall(r"\b(flows/[\w/]+\.py:\w+)", text))
    assert "flows/batch.py:batch" in entrypoints
    for entry in entrypoints:
        path, _, func = entry.partition(":")
        tree = ast.parse((ROOT / path).read_text())
        defined = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)}
        assert func in defined, entry
    for path in set(re.findall(r"\binfra/[\w./-]+\w", text)):
        assert (ROOT / path).exists(), f"docs/deploy.md names {path}, which does not exist"


def _flow_name(entrypoint: str) -> str:
    """The name given in the @flow(name=...) decorator of `path:function` (the function name if none)."""
    path, _, func = entrypoint.partition(":")
    for node in ast.walk(ast.parse((ROOT / path).read_text())):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name == func:
            for deco in node.decorator_list:
                if isinstance(deco, ast.Call) and getattr(deco.func, "id", None) == "flow":
                    for kw in deco.keywords:
                        if kw.arg == "name" and isinstance(kw.value, ast.Constant):
                            return str(kw.value.value)
            return func
    raise AssertionError(f"{entrypoint}: no such function")


def test_deployments_the_runbook_runs_exist() -> None:
    prefect = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    deployments = {d["name"]: _flow_name(d["entrypoint"]) for d in prefect["deployments"]}
    runs = re.findall(r"prefect deployment run '([\w-]+)/([\w-]+)'", DOCS.read_text())
    assert runs
    for flow_name, deployment in runs:
        assert deployments.get(deployment) == flow_name, f"docs/deploy.md runs {flow_name}/{deployment}"
    assert {"nightly", "on-demand"} <= set(deployments)
