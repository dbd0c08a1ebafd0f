"""The cluster and deployment definitions: checked offline, as `ray up` and `kubectl apply` would read them."""

import copy
from pathlib import Path

import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

PROJECT = Path(__file__).resolve().parents[2]
INFRA = PROJECT / "infra"


def cluster_config() -> dict:
    return yaml.safe_load((PROJECT / "ray_cluster.yaml").read_text())


def manifests(name: str) -> list[dict]:
    return [document for document in yaml.safe_load_all((INFRA / name).read_text()) if document]


def test_ray_cluster_file_passes_the_autoscaler_schema():
    prepared = prepare_config(copy.deepcopy(cluster_config()))
    validate_config(prepared)
    # The autoscaler's defaults install a nightly Ray on an old image; ours must not.
    commands = prepared["setup_commands"] + prepared["head_setup_commands"] + prepared["worker_setup_commands"]
    assert not any("ray-wheels" in command or "nightly" in command for command in commands)
    assert any("pip install -e /home/ubuntu/pairgan" in command for command in prepared["setup_commands"])
    assert any("torch==" in command for command in prepared["setup_commands"])
    assert prepared["file_mounts"]["/home/ubuntu/pairgan"] == "."


def test_every_node_type_pins_its_image_and_gpu_workers_have_their_own_role():
    config = cluster_config()
    node_types = config["available_node_types"]
    assert all(node["node_config"].get("ImageId", "").startswith("ami-") for node in node_types.values())
    gpu_types = {name: node for name, node in node_types.items() if node["resources"].get("GPU", 0) > 0}
    assert gpu_types, "no GPU worker node type"
    head_profile = node_types[config["head_node_type"]]["node_config"]["IamInstanceProfile"]["Arn"]
    for node in gpu_types.values():
        assert node["node_config"]["IamInstanceProfile"]["Arn"] != head_profile
        assert all(isinstance(value, int) for value in node["resources"].values())


def test_the_schema_check_rejects_fractional_resources_and_unknown_keys():
    # Proves the check above can fail: the two mistakes STACK.md warns about.
    fractional = cluster_config()
    fractional["available_node_types"]["gpu_worker"]["resources"]["GPU"] = 0.5
    with pytest.raises(Exception):
        validate_config(prepare_config(fractional))
    unknown = cluster_config()
    unknown["available_node_types"]["gpu_worker"]["gpus"] = 1
    with pytest.raises(Exception):
        validate_config(prepare_config(unknown))


def test_kuberay_job_runs_pairgan_train_on_gpu_workers_with_the_installed_ray():
    (job,) = manifests("rayjob-train.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert job["spec"]["entrypoint"].split()[:2] == ["pairgan", "train"]
    assert job["spec"]["rayClusterSpec"]["rayVersion"] == ray.__version__
    # Ray Train retries worker failures itself; a RayJob retry would start a second driver.
    assert job["spec"]["backoffLimit"] == 0
    (workers,) = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    container = workers["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_raycluster_autoscales_gpu_workers_from_zero():
    (cluster,) = manifests("raycluster.yaml")
    assert cluster["kind"] == "RayCluster" and cluster["spec"]["enableInTreeAutoscaling"] is True
    assert cluster["spec"]["rayVersion"] == ray.__version__
    (workers,) = cluster["spec"]["workerGroupSpecs"]
    assert workers["minReplicas"] == 0 and workers["maxReplicas"] >= 1


def test_scheduled_retraining_runs_dvc_repro_one_at_a_time():
    (cron,) = manifests("retrain-cronjob.yaml")
    assert cron["kind"] == "CronJob" and len(cron["spec"]["schedule"].split()) == 5
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    container = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    assert "dvc repro" in " ".join(container["command"] + container["args"])
    (cluster,) = manifests("raycluster.yaml")
    ray_address = {item["name"]: item.get("value") for item in container["env"]}["RAY_ADDRESS"]
    assert f"{cluster['metadata']['name']}-head-svc" in ray_address


def test_mlflow_server_uses_a_sql_backend_and_s3_artifacts_without_inline_secrets():
    deployment, service = manifests("mlflow-server.yaml")
    assert (deployment["kind"], service["kind"]) == ("Deployment", "Service")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    args = container["args"]
    assert any(arg.startswith("--artifacts-destination=s3://") for arg in args)
    backend = {item["name"]: item for item in container["env"]}["MLFLOW_BACKEND_STORE_URI"]
    assert "secretKeyRef" in backend["valueFrom"], "the database URL (with its password) must come from a Secret"
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"


@pytest.mark.parametrize("name", ["rayjob-train.yaml", "raycluster.yaml", "retrain-cronjob.yaml", "mlflow-server.yaml"])
def test_no_manifest_holds_a_literal_credential(name):
    text = (INFRA / name).read_text()

    def literal_secrets(node) -> list[str]:
        found = []
        if isinstance(node, dict):
            key = str(node.get("name", "")).upper()
            if "value" in node and any(word in key for word in ("PASSWORD", "SECRET", "TOKEN", "ACCESS_KEY")):
                found.append(key)
            for value in node.values():
                found += literal_secrets(value)
        elif isinstance(node, list):
            for value in node:
                found += literal_secrets(value)
        return found

    assert not [key for document in yaml.safe_load_all(text) for key in literal_secrets(document)]
    assert "AKIA" not in text  # an AWS access key id


def _rsync_excludes(pattern: str, path: str) -> bool:
    """rsync's --exclude matching for `path` (relative to the transfer root, '/'-separated):
    '**' spans folders, '*' and '?' do not; a leading '/' anchors at the root, otherwise the
    pattern matches the end of the path (any trailing run of whole components)."""
    import re

    anchored = pattern.startswith("/")
    body = pattern.strip("/")
    regex = "".join(
        ".*" if token == "**" else "[^/]*" if token == "*" else "[^/]" if token == "?" else re.escape(token)
        for token in re.split(r"(\*\*|\*|\?)", body)
        if token
    )
    return re.fullmatch(regex if anchored else f"(?:.*/)?{regex}", path) is not None


def test_rsync_excludes_leave_every_source_file_on_the_nodes():
    # file_mounts copies the project to every node and setup_commands `pip install -e` it there:
    # an exclude pattern that also matches a source folder (e.g. '**/data' and components/data)
    # gives nodes a project that fails at import.
    patterns = cluster_config()["rsync_exclude"]
    sources = [PROJECT / "pyproject.toml", *sorted((PROJECT / "components").rglob("*.py")),
               *sorted((PROJECT / "pipelines").rglob("*.py")), *sorted((PROJECT / "params").glob("*.yaml"))]
    dropped = []
    for source in sources:
        parts = source.relative_to(PROJECT).parts
        prefixes = ["/".join(parts[: end]) for end in range(1, len(parts) + 1)]
        dropped += [f"{prefix} (by {pattern!r})" for pattern in patterns for prefix in prefixes if _rsync_excludes(pattern, prefix)]
    assert not dropped, f"ray_cluster.yaml rsync_exclude drops project files: {sorted(set(dropped))}"
    # the checker itself tells the two kinds of pattern apart
    assert _rsync_excludes("**/data", "components/data") and not _rsync_excludes("/data", "components/data")
    assert _rsync_excludes("/data", "data")
