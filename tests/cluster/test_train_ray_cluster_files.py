"""The cluster and deployment definitions: checked offline, as `ray up` and `kubectl apply` would read them."""

import copy
from pathlib import Path

import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

PROJECT = Path(__file__).resolve().parents[2]
INFRA = PROJECT / "infra"
# the image the Dockerfile builds, as every cluster definition names it (a placeholder registry)
PROJECT_IMAGE = "ghcr.io/example/pairgan:0.1.0"


def cluster_config() -> dict:
    return yaml.safe_load((PROJECT / "ray_cluster.yaml").read_text())


def manifests(name: str) -> list[dict]:
    return [document for document in yaml.safe_load_all((INFRA / name).read_text()) if document]


def test_ray_cluster_file_passes_the_autoscaler_schema():
    prepared = prepare_config(copy.deepcopy(cluster_config()))
    validate_config(prepared)
    # The autoscaler's defaults install a nightly Ray on an old image; ours installs nothing:
    # every node runs the project's image.
    commands = prepared["setup_commands"] + prepared["head_setup_commands"] + prepared["worker_setup_commands"]
    assert commands == []
    assert prepared["docker"]["image"] == PROJECT_IMAGE
    assert "--gpus all" in prepared["docker"]["worker_run_options"]
    assert not prepared["file_mounts"]  # no code copied onto the nodes beside the image's


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
    # Proves the check above can fail: fractional resources and a key the autoscaler does not know.
    fractional = cluster_config()
    fractional["available_node_types"]["gpu_worker"]["resources"]["GPU"] = 0.5
    with pytest.raises(Exception):
        validate_config(prepare_config(fractional))
    unknown = cluster_config()
    unknown["available_node_types"]["gpu_worker"]["gpus"] = 1
    with pytest.raises(Exception):
        validate_config(prepare_config(unknown))


def volumes_of(spec: dict) -> list[dict]:
    return spec["template"]["spec"].get("volumes", [])


def test_kuberay_job_runs_pairgan_train_on_gpu_workers_with_the_installed_ray():
    (job,) = manifests("rayjob-train.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    entrypoint = job["spec"]["entrypoint"].split()
    assert entrypoint[:2] == ["pairgan", "train"]
    assert entrypoint[entrypoint.index("--data") + 1].startswith("s3://")  # no volume shared between pods
    groups = [job["spec"]["rayClusterSpec"]["headGroupSpec"], *job["spec"]["rayClusterSpec"]["workerGroupSpecs"]]
    assert not [volume for group in groups for volume in volumes_of(group) if "persistentVolumeClaim" in volume]
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
    groups = [cluster["spec"]["headGroupSpec"], workers]
    assert not [volume for group in groups for volume in volumes_of(group) if "persistentVolumeClaim" in volume]
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {port["containerPort"] for port in head["ports"]} >= {8265}  # job submission
    remote = {item["name"]: item.get("value") for item in head["env"]}["PAIRGAN_DVC_REMOTE_URL"]
    assert remote.startswith("s3://")  # the retrain state outlives the head pod


def test_scheduled_retraining_submits_pairgan_retrain_to_the_cluster_head_one_at_a_time():
    (cron,) = manifests("retrain-cronjob.yaml")
    assert cron["kind"] == "CronJob" and len(cron["spec"]["schedule"].split()) == 5
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    container = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    command = container["command"] + container["args"]
    assert command[:3] == ["ray", "job", "submit"]
    entrypoint = " ".join(command[command.index("--") + 1:])
    assert entrypoint.endswith("pairgan retrain") and "dvc " not in entrypoint
    (cluster,) = manifests("raycluster.yaml")
    address = next(part for part in command if part.startswith("--address="))
    assert address == f"--address=http://{cluster['metadata']['name']}-head-svc:8265"


def test_mlflow_server_uses_a_sql_backend_and_s3_artifacts_without_inline_secrets():
    deployment, service = manifests("mlflow-server.yaml")
    assert (deployment["kind"], service["kind"]) == ("Deployment", "Service")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    args = container["args"]
    assert any(arg.startswith("--artifacts-destination=s3://") for arg in args)
    backend = {item["name"]: item for item in container["env"]}["MLFLOW_BACKEND_STORE_URI"]
    assert "secretKeyRef" in backend["valueFrom"], "the database URL (with its password) must come from a Secret"
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    assert any(arg.startswith("--allowed-hosts=") for arg in args)  # else in-cluster clients get 403


def images_in(node) -> list[str]:
    if isinstance(node, dict):
        found = [node["image"]] if isinstance(node.get("image"), str) else []
        return found + [image for value in node.values() for image in images_in(value)]
    if isinstance(node, list):
        return [image for value in node for image in images_in(value)]
    return []


def test_every_definition_runs_the_one_project_image_of_this_version():
    import tomllib

    version = tomllib.loads((PROJECT / "pyproject.toml").read_text())["project"]["version"]
    assert PROJECT_IMAGE.endswith(f":{version}")
    found = images_in(cluster_config())
    for name in ("rayjob-train.yaml", "raycluster.yaml", "retrain-cronjob.yaml", "mlflow-server.yaml"):
        found += [image for document in manifests(name) for image in images_in(document)]
    assert found and set(found) == {PROJECT_IMAGE}


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
