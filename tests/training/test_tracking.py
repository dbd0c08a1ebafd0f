"""MLflow tracking of a training job: reachability before training, params, metrics, grids, tags."""

import socket
import threading

import pytest
import torch
from mlflow import MlflowClient
from PIL import Image

from components.redaction import redact_uri
from components.tracking import (
    TAG_DIVERGED,
    TAG_GIT_COMMIT,
    TAG_MANIFEST_CHECKSUM,
    TAG_OUTCOME,
    EpochLogger,
    TrackingUnavailable,
    check_tracking_reachable,
    default_tracking_uri,
    ensure_experiment,
    finish_job_run,
    flatten_params,
    start_job_run,
)


@pytest.fixture(autouse=True)
def _no_telemetry(monkeypatch):
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")


def closed_port() -> int:
    # Bind and release: nothing listens on the port afterwards, so a connection is refused.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_unreachable_server_fails_at_once_with_the_address_and_what_to_do():
    uri = f"http://127.0.0.1:{closed_port()}"
    with pytest.raises(TrackingUnavailable) as caught:
        check_tracking_reachable(uri, "pairgan", timeout_s=2)
    message = str(caught.value)
    assert uri in message and "not reachable" in message
    assert "MLFLOW_TRACKING_URI" in message


def test_credentials_in_the_uri_never_reach_the_message():
    uri = f"http://alice:s3cret@127.0.0.1:{closed_port()}"
    with pytest.raises(TrackingUnavailable) as caught:
        check_tracking_reachable(uri, "pairgan", timeout_s=2)
    assert "s3cret" not in str(caught.value) and "alice" not in str(caught.value)
    assert redact_uri("https://bob:pw@mlflow.example.com:8443/x") == "https://mlflow.example.com:8443/x"


def test_sqlite_store_in_a_missing_folder_is_reported(tmp_path):
    uri = f"sqlite:///{tmp_path / 'absent' / 'mlflow.db'}"
    with pytest.raises(TrackingUnavailable, match="absent"):
        check_tracking_reachable(uri, "pairgan")


def test_default_store_is_sqlite_in_the_working_dir(tmp_path):
    uri = default_tracking_uri(tmp_path)
    assert uri == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    check_tracking_reachable(uri, "pairgan")
    assert MlflowClient(tracking_uri=uri).get_experiment_by_name("pairgan") is not None


def test_an_experiment_created_between_lookup_and_create_is_used(tmp_path):
    # Two stages started at once on a new store (two registers, as the registry's concurrency
    # test runs them, or a sweep's first trials): each looks the experiment up, finds none and
    # creates it. Here the lookup misses one another process creates just after, for certain.
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    created_elsewhere = MlflowClient(tracking_uri=uri).create_experiment("pairgan")

    class LateLookup(MlflowClient):
        lookups = 0

        def get_experiment_by_name(self, name):
            LateLookup.lookups += 1
            return None if LateLookup.lookups == 1 else super().get_experiment_by_name(name)

    assert ensure_experiment(LateLookup(tracking_uri=uri), uri, "pairgan") == created_elsewhere
    assert LateLookup.lookups == 2


def test_flattened_config_becomes_dotted_params():
    flat = flatten_params({"train": {"epochs": 3, "run": {"scaling": {"num_workers": 2}}}, "model": {"method": {"name": "atme"}}})
    assert flat == {"train.epochs": "3", "train.run.scaling.num_workers": "2", "model.method.name": "atme"}


def test_job_run_holds_params_epoch_metrics_grids_and_tags(tmp_path):
    uri = default_tracking_uri(tmp_path)
    check_tracking_reachable(uri, "exp")
    run_id = start_job_run(
        uri, "exp", "job-1", {"train.epochs": "2", "model.method.name": "pix2pix"},
        {TAG_MANIFEST_CHECKSUM: "abc123", TAG_GIT_COMMIT: "deadbeef"},
    )
    epoch_logger = EpochLogger(uri, run_id, system_metrics=False, system_metrics_interval_s=1)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    for epoch in (1, 2):
        epoch_logger.log_epoch(epoch, {"Loss/G/L1": 1.0 / epoch, "health/d_entropy": 0.69, "images_per_s": 10.0})
    epoch_logger.log_sample_grid(2, images, images.flip(0), images)
    epoch_logger.close()
    finish_job_run(uri, run_id, "finished")

    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "job-1"
    assert run.data.params == {"train.epochs": "2", "model.method.name": "pix2pix"}
    assert run.data.tags[TAG_MANIFEST_CHECKSUM] == "abc123" and run.data.tags[TAG_GIT_COMMIT] == "deadbeef"
    assert run.data.tags[TAG_OUTCOME] == "finished"
    history = client.get_metric_history(run_id, "Loss/G/L1")
    assert [(point.step, point.value) for point in history] == [(1, 1.0), (2, 0.5)]
    assert "health/d_entropy" in run.data.metrics
    artifacts = [item.path for item in client.list_artifacts(run_id, "samples")]
    assert artifacts == ["samples/epoch_0002.png"]
    # Artifacts live next to the database, wherever the logging process ran.
    assert (tmp_path / "mlartifacts").is_dir()
    grid = Image.open(client.download_artifacts(run_id, "samples/epoch_0002.png", str(tmp_path / "download")))
    # two rows of source | generated | target
    assert grid.width >= 3 * 16 and grid.height >= 2 * 16


def test_a_diverged_run_is_failed_and_tagged(tmp_path):
    uri = default_tracking_uri(tmp_path)
    run_id = start_job_run(uri, "exp", "job-2", {}, {})
    finish_job_run(uri, run_id, "diverged", {TAG_DIVERGED: "true"})
    run = MlflowClient(tracking_uri=uri).get_run(run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags[TAG_OUTCOME] == "diverged" and run.data.tags[TAG_DIVERGED] == "true"


def test_system_metrics_are_logged_by_the_worker_logger(tmp_path):
    uri = default_tracking_uri(tmp_path)
    run_id = start_job_run(uri, "exp", "job-3", {}, {})
    epoch_logger = EpochLogger(uri, run_id, system_metrics=True, system_metrics_interval_s=1)
    client = MlflowClient(tracking_uri=uri)
    # The monitor logs from its own thread; wait for the first sample rather than for a time.
    for _ in range(200):
        if any(key.startswith("system/") for key in client.get_run(run_id).data.metrics):
            break
        threading.Event().wait(0.05)
    epoch_logger.close()
    assert any(key.startswith("system/cpu") for key in client.get_run(run_id).data.metrics)


def test_mlflow_can_log_the_gpus_of_a_gpu_machine():
    # MLflow's GPU monitor needs nvidia-ml-py; without it, a GPU run's system metrics hold no GPU
    # and MLflow says so only in a debug line. Here, without a GPU, only NVML's start may fail.
    from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor

    try:
        GPUMonitor()
    except RuntimeError as error:
        assert "Failed to initialize NVML" in str(error)


def test_a_tracking_uri_with_a_password_never_reaches_rays_run_state():
    # Ray Train V2 stringifies train_loop_config into its run state (dashboard, export events)
    from ray.train.v2._internal.state.schema import _to_json_serializable_value

    from components.training.job import TrainingJob
    from support.params import shipped

    job = TrainingJob(
        model=shipped("model"), train=shipped("train"), loader=shipped("data").loader, data_location="/data", data_checksum="abc",
        dataset_size=4, tracking_uri="https://alice:s3cret-token@mlflow.example.com", mlflow_run_id="run1",
    )
    shown = str(_to_json_serializable_value({"job": job, "outcome": None}))
    assert "s3cret-token" not in shown and "run1" in shown
