"""cluster/*.yaml: Ray's own schema for the cluster-launcher files, structure for the KubeRay RayJob,
commands in the comments that `lora-search` accepts, and no credentials anywhere.

Files are found by glob, so a new YAML is checked as soon as it exists; each must be one of the two
kinds. Nothing here reaches a cloud: the provider-specific bootstrap of `ray up` (credentials, VPCs,
images, quotas) is not run.
"""

from __future__ import annotations

import ast
import copy
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_DIR = ROOT / "cluster"
KNOWN = {"local", "aws", "gcp", "kuberay-rayjob"}
FILES = sorted([*CLUSTER_DIR.glob("*.yaml"), *CLUSTER_DIR.glob("*.yml")])

AWS_KEY_ID = re.compile(r"(?<![A-Z0-9])(AKIA|ASIA)[A-Z0-9]{16}(?![A-Z0-9])")
SECRET_MARKERS = re.compile(r"aws_secret_access_key|-----BEGIN [A-Z ]*PRIVATE KEY-----|\"private_key\"\s*:", re.I)


def _docs(path: Path) -> list:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc is not None]


def _is_autoscaler(docs: list) -> bool:
    return len(docs) == 1 and isinstance(docs[0], dict) and "provider" in docs[0]


def _is_k8s(docs: list) -> bool:
    return bool(docs) and all(isinstance(d, dict) and "apiVersion" in d and "kind" in d for d in docs)


AUTOSCALER = [p for p in FILES if _is_autoscaler(_docs(p))]
K8S = [p for p in FILES if _is_k8s(_docs(p))]


def _ids(paths):
    return [p.name for p in paths]


def _ray_pin() -> str:
    """The Ray version pinned in pyproject.toml (a regex, not tomllib: the project supports Python 3.10)."""
    pins = re.findall(r'"ray(?:\[[^\]]*\])?==([^"\s;]+)"', (ROOT / "pyproject.toml").read_text())
    assert len(pins) == 1, f"expected one pinned ray in pyproject.toml, found {pins}"
    return pins[0]


def _ray_schema_errors(config: dict) -> None:
    """What `ray up` checks before it talks to a provider: defaults filled in, then the JSON schema."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(config)))


# ------------------------------------------------------------------ every file


def test_known_files_exist():
    stems = {p.stem for p in FILES}
    missing = KNOWN - stems
    assert not missing, f"cluster/ lacks {sorted(missing)}.yaml"


@pytest.mark.parametrize("path", FILES, ids=_ids(FILES))
def test_file_is_a_known_kind_with_a_header(path):
    docs = _docs(path)
    assert path in AUTOSCALER or path in K8S, (
        f"{path.name}: neither a Ray cluster-launcher config (one document with `provider`) nor Kubernetes "
        "manifests (documents with apiVersion and kind)")
    text = path.read_text(encoding="utf-8")
    header = "\n".join(line for line in text.splitlines()[:40] if line.startswith("#"))
    assert text.startswith("#"), f"{path.name}: must open with a comment header"
    if path in AUTOSCALER:
        for command in ("ray up ", "ray dashboard ", "ray job submit --address http://127.0.0.1:8265 --working-dir . --",
                        "lora-search run search_spaces/", "ray down "):
            assert command in header, f"{path.name}: header does not show `{command.strip()}`"
    else:
        assert f"kubectl apply -f cluster/{path.name}" in header, f"{path.name}: header lacks its kubectl apply"
    assert docs


@pytest.mark.parametrize("path", sorted(CLUSTER_DIR.rglob("*")), ids=lambda p: str(p.relative_to(CLUSTER_DIR)))
def test_no_credentials_in_cluster_files(path):
    if not path.is_file():
        return
    text = path.read_text(encoding="utf-8", errors="replace")
    assert not AWS_KEY_ID.search(text), f"{path.name}: holds something shaped like an AWS access key id"
    assert not SECRET_MARKERS.search(text), f"{path.name}: holds a secret key or a field for one"


def test_the_credential_patterns_catch_what_they_should():
    assert AWS_KEY_ID.search("key: AKIA" + "ABCDEFGHIJKLMNOP")
    assert SECRET_MARKERS.search("AWS_SECRET_ACCESS_KEY=x")
    assert not AWS_KEY_ID.search("# instance profile; AKIA... keys come from the environment")


def _commands(text: str) -> list[list[str]]:
    """Every `lora-search run ...` in a file, comment markers and backslash continuations removed."""
    lines = [re.sub(r"^\s*#\s?", "", line) for line in text.splitlines()]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    found = []
    for match in re.finditer(r"lora-search run [^\n`]*", joined):
        words = shlex.split(match.group(0).split("#")[0])
        found.append(words[2:])
    return found


@pytest.mark.parametrize("path", FILES, ids=_ids(FILES))
def test_lora_search_commands_in_the_file_are_accepted(path):
    """The search space exists and every concrete `key=value` override names a real field with a valid value."""
    from orchestrator.config import load_config

    commands = _commands(path.read_text(encoding="utf-8"))
    assert commands, f"{path.name}: shows no `lora-search run` command"
    for args in commands:
        space, overrides = args[0], [a for a in args[1:] if "=" in a and "<" not in a and not a.startswith("-")]
        assert (ROOT / space).is_file(), f"{path.name}: `lora-search run {space}`: no such search space"
        load_config(ROOT / space, overrides)  # raises UserError naming the bad field


# ------------------------------------------------------------------ Ray cluster-launcher configs


def test_the_three_launcher_configs_are_found():
    assert {p.stem for p in AUTOSCALER} >= {"local", "aws", "gcp"}


@pytest.mark.parametrize("path", AUTOSCALER, ids=_ids(AUTOSCALER))
def test_launcher_config_passes_rays_schema(path):
    import jsonschema

    config = _docs(path)[0]
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)                                  # the file as written
    _ray_schema_errors(config)                                           # as `ray up` sees it


def test_rays_validation_is_live():
    """A misspelt field must fail, or the test above would prove nothing."""
    import jsonschema

    config = _docs(CLUSTER_DIR / "aws.yaml")[0]
    broken = copy.deepcopy(config)
    broken["available_node_types"]["gpu-a10g"]["max_worker"] = 2
    with pytest.raises(jsonschema.ValidationError):
        _ray_schema_errors(broken)
    broken = copy.deepcopy(config)
    broken["available_node_types"]["gpu-a10g"]["resources"] = {"GPU": 0.5}
    with pytest.raises(jsonschema.ValidationError):
        _ray_schema_errors(broken)


@pytest.mark.parametrize("path", AUTOSCALER, ids=_ids(AUTOSCALER))
def test_launcher_config_installs_the_project_and_starts_ray_safely(path):
    config = _docs(path)[0]
    # Anything left out is filled from Ray's provider defaults (which install a nightly Ray wheel and
    # open the dashboard on 0.0.0.0), so every command list is written out.
    for key in ("setup_commands", "head_setup_commands", "worker_setup_commands",
                "head_start_ray_commands", "worker_start_ray_commands", "file_mounts"):
        assert key in config, f"{path.name}: `{key}` must be explicit"
    remote = [dst for dst, src in config["file_mounts"].items() if src in (".", "./")]
    assert remote, f"{path.name}: file_mounts must copy the repo ('.')"
    assert any("pip install" in c and f"-e {remote[0]}" in c for c in config["setup_commands"]), \
        f"{path.name}: setup_commands must `pip install -e {remote[0]}`"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in config[key] if "ray start" in c]
        assert starts, f"{path.name}: {key} has no `ray start`"
        for command in starts:
            assert "RAY_AUTH_MODE=disabled" in command and "RAY_USAGE_STATS_ENABLED=0" in command, \
                f"{path.name}: {key} must export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 for `ray start`"
    head = " ".join(config["head_start_ray_commands"])
    assert re.search(r"--dashboard-host[= ]127\.0\.0\.1\b", head), f"{path.name}: dashboard must bind 127.0.0.1"


@pytest.mark.parametrize("path", [p for p in AUTOSCALER if _docs(p)[0]["provider"]["type"] != "local"],
                         ids=lambda p: p.name)
def test_cloud_config_caps_cost_and_pins_rays_version(path):
    config = _docs(path)[0]
    assert isinstance(config.get("max_workers"), int), f"{path.name}: set a global max_workers (cost cap)"
    gpu_types = {name: t for name, t in config["available_node_types"].items() if t["resources"].get("GPU", 0) >= 1}
    assert gpu_types, f"{path.name}: no GPU node type"
    for name, node_type in config["available_node_types"].items():
        if name == config["head_node_type"]:
            continue
        assert "max_workers" in node_type, f"{path.name}: {name} needs its own max_workers (cost cap)"
        assert node_type.get("min_workers", 0) == 0, f"{path.name}: {name} would bill GPUs while idle"
    pin = _ray_pin()
    for key in ("image", "head_image", "worker_image"):
        if key in config.get("docker", {}):
            assert config["docker"][key].startswith(f"rayproject/ray:{pin}-"), \
                f"{path.name}: docker.{key} must match the ray=={pin} pin in pyproject.toml"


def test_aws_node_types_region_and_prices():
    config = _docs(CLUSTER_DIR / "aws.yaml")[0]
    text = (CLUSTER_DIR / "aws.yaml").read_text()
    assert config["provider"]["region"] == "us-west-2"
    kinds = {name: t["node_config"]["InstanceType"] for name, t in config["available_node_types"].items()}
    assert kinds[config["head_node_type"]] == "m7i.xlarge"
    assert {"g5.xlarge", "p4d.24xlarge"} <= set(kinds.values())
    prices = {m.group(1): float(m.group(2)) for m in re.finditer(r"^#\s+(\S+\.\S+)\s+(\d+\.\d+)\b", text, re.M)}
    assert prices == {"m7i.xlarge": 0.2016, "g5.xlarge": 1.006, "p4d.24xlarge": 32.77}
    assert "4.096" in text and abs(prices["p4d.24xlarge"] / 8 - 4.096) < 0.001
    from orchestrator.config import CostConfig

    assert CostConfig().price_per_device_hour["gpu"] == prices["g5.xlarge"], \
        "the cost model's default GPU price is the g5.xlarge (A10G) price listed in aws.yaml"


def test_gcp_project_and_gpu_workers():
    config = _docs(CLUSTER_DIR / "gcp.yaml")[0]
    # null on purpose: Ray *creates* a project it cannot find, so a made-up default would be dangerous.
    assert config["provider"]["project_id"] is None
    node_types = config["available_node_types"]
    assert node_types[config["head_node_type"]]["node_config"]["machineType"] == "n2-standard-4"
    gpu = [t for t in node_types.values() if t["node_config"]["machineType"].startswith("g2-standard-")]
    assert gpu and all(t["resources"]["GPU"] == 1 for t in gpu)
    assert all(t["node_config"]["scheduling"]["onHostMaintenance"] == "TERMINATE" for t in gpu)


def _workers(config: dict) -> dict:
    return {name: t for name, t in config["available_node_types"].items() if name != config["head_node_type"]}


def test_aws_workers_get_the_autoscalers_instance_profile():
    """Ray's AWS bootstrap gives its ray-autoscaler-v1 profile to the head only; the GPU workers upload the Train
    checkpoints to storage_path=s3://..., so each worker type names the profile itself."""
    config = _docs(CLUSTER_DIR / "aws.yaml")[0]
    for name, node_type in _workers(config).items():
        profile = node_type["node_config"].get("IamInstanceProfile", {})
        assert (profile.get("Name") == "ray-autoscaler-v1"
                or str(profile.get("Arn", "")).endswith(":instance-profile/ray-autoscaler-v1")), \
            f"aws.yaml: {name} lacks IamInstanceProfile ray-autoscaler-v1: its checkpoints could not reach S3"


def test_gcp_workers_get_the_autoscalers_service_account():
    """Likewise on GCP: Ray sets serviceAccounts (ray-autoscaler-sa-v1) on the head only; the project id in its
    email is filled in by the header's sed line, with provider.project_id."""
    text = (CLUSTER_DIR / "gcp.yaml").read_text(encoding="utf-8")
    config = _docs(CLUSTER_DIR / "gcp.yaml")[0]
    for name, node_type in _workers(config).items():
        accounts = node_type["node_config"].get("serviceAccounts", [])
        assert [a["email"] for a in accounts] == ["ray-autoscaler-sa-v1@<project_id>.iam.gserviceaccount.com"], \
            f"gcp.yaml: {name} lacks Ray's service account: its checkpoints could not reach gs://"
        assert accounts[0]["scopes"] == ["https://www.googleapis.com/auth/cloud-platform"]
    assert "s/<project_id>/$GCP_PROJECT/" in text, "gcp.yaml: the header's sed line must fill in <project_id>"


# ------------------------------------------------------------------ KubeRay RayJob


def _rayjob() -> dict:
    jobs = [d for p in K8S for d in _docs(p) if d["kind"] == "RayJob"]
    assert len(jobs) == 1, f"expected one RayJob under cluster/, found {len(jobs)}"
    return jobs[0]


def _pipeline_runtime_env_keys() -> set[str]:
    tree = ast.parse((ROOT / "orchestrator" / "pipeline.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "RUNTIME_ENV" for t in node.targets):
            return set(ast.literal_eval(node.value))
    raise AssertionError("orchestrator/pipeline.py no longer defines RUNTIME_ENV; update this test")


def _containers(template: dict) -> list[dict]:
    containers = template["spec"]["containers"]
    assert containers and all(c.get("name") and c.get("image") for c in containers)
    return containers


def _check_volumes(template: dict, where: str, claims: set[str]) -> None:
    volumes = {v["name"]: v for v in template["spec"].get("volumes", [])}
    for container in template["spec"]["containers"]:
        for mount in container.get("volumeMounts", []):
            assert mount["name"] in volumes, f"{where}: volumeMount {mount['name']} has no volume"
    for volume in volumes.values():
        if "persistentVolumeClaim" in volume:
            assert volume["persistentVolumeClaim"]["claimName"] in claims, \
                f"{where}: PVC {volume['persistentVolumeClaim']['claimName']} is not defined in cluster/"


def test_rayjob_structure():
    job = _rayjob()
    spec = job["spec"]
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert job["metadata"]["name"]
    assert spec["entrypoint"].startswith("lora-search "), spec["entrypoint"]
    assert spec["shutdownAfterJobFinishes"] is True

    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["working_dir"], "runtimeEnvYAML needs a working_dir"
    # KubeRay hands it to `ray job submit` in double quotes through bash: a ${...} would be expanded to nothing
    assert "$" not in spec["runtimeEnvYAML"]
    assert runtime_env["pip"]["packages"] == [f"lora-search @ {runtime_env['working_dir']}"]  # installs the project
    clash = set(runtime_env.get("env_vars", {})) & _pipeline_runtime_env_keys()
    assert not clash, f"ray.init in the pipeline sets {sorted(clash)} too; Ray rejects the job's duplicate"

    cluster = spec["rayClusterSpec"]
    pin = _ray_pin()
    assert cluster["rayVersion"] == pin
    claims = {d["metadata"]["name"] for p in K8S for d in _docs(p) if d["kind"] == "PersistentVolumeClaim"}

    head = cluster["headGroupSpec"]
    assert all(isinstance(v, str) for v in head["rayStartParams"].values()), "rayStartParams values must be strings"
    for container in _containers(head["template"]):
        assert container["image"].startswith(f"rayproject/ray:{pin}"), container["image"]
    _check_volumes(head["template"], "head", claims)

    workers = cluster["workerGroupSpecs"]
    assert len(workers) >= 1
    gpu_groups = 0
    for group in workers:
        assert group["groupName"]
        assert 0 <= group["minReplicas"] <= group["maxReplicas"]
        assert all(isinstance(v, str) for v in group.get("rayStartParams", {}).values())
        containers = _containers(group["template"])
        for container in containers:
            assert container["image"].startswith(f"rayproject/ray:{pin}"), container["image"]
        if any(int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0)) >= 1 for c in containers):
            gpu_groups += 1
        _check_volumes(group["template"], group["groupName"], claims)
    assert gpu_groups >= 1, "no worker group has a `nvidia.com/gpu` limit"


# Field names of KubeRay's ray.io/v1 Go types (rayjob_types.go, raycluster_types.go). The API server
# drops unknown fields with only a warning, so a misspelt shutdownAfterJobFinishes would leave GPU pods
# running; extend these sets when a newer KubeRay field is really used.
RAYJOB_SPEC = {"activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
               "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy", "entrypoint", "runtimeEnvYAML",
               "jobId", "submissionMode", "entrypointResources", "entrypointNumCpus", "entrypointNumGpus",
               "ttlSecondsAfterFinished", "shutdownAfterJobFinishes", "suspend", "schedule"}
RAYCLUSTER_SPEC = {"headGroupSpec", "workerGroupSpecs", "rayVersion", "enableInTreeAutoscaling", "autoscalerOptions",
                   "headServiceAnnotations", "suspend"}
HEAD_GROUP = {"serviceType", "headService", "enableIngress", "rayStartParams", "template"}
WORKER_GROUP = {"groupName", "replicas", "minReplicas", "maxReplicas", "numOfHosts", "rayStartParams", "template",
                "scaleStrategy"}
AUTOSCALER_OPTIONS = {"resources", "image", "imagePullPolicy", "env", "envFrom", "volumeMounts", "securityContext",
                      "idleTimeoutSeconds", "upscalingMode"}


def test_rayjob_uses_only_kuberay_fields():
    spec = _rayjob()["spec"]
    cluster = spec["rayClusterSpec"]
    for where, given, known in [("spec", spec, RAYJOB_SPEC), ("rayClusterSpec", cluster, RAYCLUSTER_SPEC),
                                ("headGroupSpec", cluster["headGroupSpec"], HEAD_GROUP),
                                ("autoscalerOptions", cluster.get("autoscalerOptions", {}), AUTOSCALER_OPTIONS),
                                *[(f"workerGroupSpecs[{g['groupName']}]", g, WORKER_GROUP)
                                  for g in cluster["workerGroupSpecs"]]]:
        unknown = set(given) - known
        assert not unknown, f"RayJob {where}: {sorted(unknown)} not KubeRay v1 fields (typo?)"


def test_kubernetes_pod_templates_match_the_kubernetes_schema():
    """Optional: the pod templates and the PVC against Kubernetes' own schema, when kubernetes-validate is
    installed (it is not a project dependency). The RayJob wrapper itself has no schema here."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    job = _rayjob()
    cluster = job["spec"]["rayClusterSpec"]
    templates = [cluster["headGroupSpec"]["template"], *[g["template"] for g in cluster["workerGroupSpecs"]]]
    if "submitterPodTemplate" in job["spec"]:
        templates.append(job["spec"]["submitterPodTemplate"])
    resources = [{"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"t{i}"}, "template": t}
                 for i, t in enumerate(templates)]
    resources += [d for p in K8S for d in _docs(p) if d["apiVersion"] == "v1"]
    for resource in resources:
        kubernetes_validate.validate(resource, kubernetes_validate.latest_version(), strict=True)


def test_the_working_dir_a_job_uploads_leaves_the_git_history_out(tmp_path):
    """`ray job submit --working-dir .` zips the checkout with every job; .rayignore keeps .git/ (most of its size)
    out, as Ray's own packaging reads it."""
    import zipfile

    from ray._private.runtime_env.packaging import create_package

    create_package(str(ROOT), tmp_path / "job.zip", include_gitignore=True, excludes=[])
    names = zipfile.ZipFile(tmp_path / "job.zip").namelist()
    assert not [n for n in names if n.split("/")[1:2] == [".git"] or n.startswith(".git/")]
    assert any(n.endswith("search_spaces/quickstart.yaml") for n in names)
