"""`pairgan train` on Ray Train with 2 CPU workers (gloo DDP): training, recovery, divergence, MLflow.
(Resuming a stopped run, and refusing params its checkpoint cannot continue with:
tests/training/test_interrupted_runs.py; every resume decision: test_resume_decisions.py.)

One local Ray instance serves every test of this module (its start-up is the expensive part);
each test uses its own storage folder and MLflow store. The data is the session's small
prepared built-in set (13 training pairs, 32 px): 2 workers x batch 2 = 3 steps per epoch.
"""

import csv
import functools
import io
import json
import os
import signal
import sys
import time
from pathlib import Path

import boto3
import pyarrow.fs
import pytest
import torch
from mlflow import MlflowClient

from components.data.loaders import owned_indices
from components.data.manifest import load_manifest
from components.methods.translator import load_translator
from components.tracking import TAG_DIVERGED, TAG_MANIFEST_CHECKSUM, TAG_OUTCOME
from components.training.checkpoints import INFO_FILE, STATE_FILE
from components.training.driver import run_training
from components.training.job import TrainingJob
from components.training.report import read_train_report
from components.training.run_folder import latest_checkpoint_info
from pipelines.cli import main as pairgan
from pipelines.environment import LOCAL_RAY_WORKER_ENV
from support.params import shipped, write_shipped

pytestmark = pytest.mark.slow

STEPS_PER_EPOCH = 3  # (13 pairs // 2 workers) // batch 2

TINY_PIX2PIX = {
    "method": {
        "name": "pix2pix",
        "generator": {"ngf": 8, "max_multiplier": 2, "norm": "instance"},
        "discriminator": {"ndf": 8, "n_layers": 2, "norm": "instance"},
    },
}
TINY_ATME = {
    "method": {
        "name": "atme",
        "generator": {"width": 8, "channel_multipliers": [1, 2], "attention_levels": [], "blocks_per_level": 1,
                      "groups": 4, "attention_heads": 1, "attention_head_dim": 8},
        "discriminator": {"ndf": 8, "n_layers": 2, "norm": "instance"},
        "w": {"channels": [8, 8, 8], "groups": 4},
    },
}


@pytest.fixture(scope="module")
def ray_local(s3_endpoint):
    import ray
    import ray.cloudpickle

    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    # The step hooks below are functions of this test module, which the workers cannot import.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    # Workers reach the moto S3 server through the standard AWS variables (pyarrow and boto3
    # read AWS_ENDPOINT_URL), as they would reach MinIO; credentials come from s3_endpoint.
    if ray.is_initialized():  # another module's Ray, without the S3 endpoint the workers need
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=True,
             runtime_env={"env_vars": {"AWS_ENDPOINT_URL": s3_endpoint, "MLFLOW_DISABLE_TELEMETRY": "true",
                                       **LOCAL_RAY_WORKER_ENV}})
    yield
    ray.shutdown()


def train_params(storage: Path, **overrides) -> dict:
    params = {
        "epochs": 2,
        "batch_size": 2,
        "run": {
            "name": "tiny",
            "storage_path": str(storage),
            "max_failures": 1,
            "scaling": {"num_workers": 2, "use_gpu": False},
            "checkpoint": {"every_epochs": 1, "num_to_keep": 2},
            "tracking": {"experiment": "tests", "sample_grid_every_epochs": 1, "sample_grid_pairs": 2,
                         "system_metrics": False},
        },
    }
    for key, value in overrides.items():
        params[key] = {**params[key], **value} if isinstance(value, dict) and key in params else value
    return params


def write_stage_params(folder: Path, write_params, model: dict, train: dict) -> Path:
    write_params(folder)  # 32 px, load size 36
    write_shipped(folder, "model", **model)
    write_shipped(folder, "train", **train)
    return folder


def cli_train(params_dir: Path, data: Path, out: Path) -> int:
    return pairgan(["train", "--params-dir", str(params_dir), "--data", str(data),
                    "--model-out", str(out / "generator.pt"), "--report", str(out / "train.json")])


def job_for(data: Path, model: dict, train: dict, tracking_uri: str | None = None, run_id: str | None = None,
            step_hook=None) -> TrainingJob:
    manifest = load_manifest(data)
    return TrainingJob(
        model=shipped("model", image_size=32, load_size=36, **model), train=shipped("train", **train),
        loader=shipped("data", loader={"load_scale": 1.125, "num_threads": 1}).loader, data_location=str(data),
        data_checksum=manifest.checksum, dataset_size=manifest.split("train").count,
        tracking_uri=tracking_uri, mlflow_run_id=run_id, step_hook=step_hook,
    )


def latest_state(storage: Path | str, name: str) -> tuple[dict, dict]:
    """The info and state of the run's latest checkpoint, read where Ray put it (local or S3)."""
    filesystem, root = pyarrow.fs.FileSystem.from_uri(str(storage))

    def read(*parts: str) -> bytes:
        with filesystem.open_input_file("/".join([root, name, *parts])) as handle:
            return handle.read()

    snapshot = json.loads(read("checkpoint_manager_snapshot.json"))
    folder = snapshot["latest_checkpoint_result"]["checkpoint_dir_name"]
    state = torch.load(io.BytesIO(read(folder, STATE_FILE)), weights_only=True)
    return json.loads(read(folder, INFO_FILE)), state


def epochs_logged(tracking_uri: str, run_id: str) -> list[int]:
    history = MlflowClient(tracking_uri=tracking_uri).get_metric_history(run_id, "epoch")
    return sorted(int(point.value) for point in history)


# --- fault injection, run inside the workers ------------------------------------------


def _wait_for_registered_checkpoint(storage: str, name: str, epoch: int) -> None:
    # Ray registers a reported checkpoint at its next poll of the workers (about every 2 s);
    # failing before that would lose it. Wait until Ray's own record names it.
    # Read as the stage reads it: Ray rewrites its snapshot in place, so a poll can find it half written.
    for _ in range(600):
        latest = latest_checkpoint_info(storage, name)
        if latest is not None and latest.info["epoch"] >= epoch:
            return
        time.sleep(0.1)
    raise AssertionError(f"checkpoint of epoch {epoch} never registered")


def kill_worker_once(rank: int, step: int, *, at_step: int, after_checkpoint: int, storage: str, name: str,
                     marker: str) -> None:
    if rank == 1 and step == at_step and not os.path.exists(marker):
        _wait_for_registered_checkpoint(storage, name, after_checkpoint)
        Path(marker).touch()
        os.kill(os.getpid(), signal.SIGKILL)


def record_steps(rank: int, step: int, *, log: str) -> None:
    with open(log, "a") as handle:
        handle.write(f"{rank} {step}\n")


# --- tests --------------------------------------------------------------------------


def test_two_workers_train_atme_with_ddp_checkpoints_in_s3_export_and_mlflow(
    mlflow_store, ray_local, tmp_path, monkeypatch, write_params, prepared_builtin, s3_endpoint
):
    tracking_uri = mlflow_store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="pairgan-runs")
    storage = "s3://pairgan-runs/checkpoints"
    params = write_stage_params(tmp_path / "params", write_params, TINY_ATME, train_params(storage))

    assert cli_train(params, prepared_builtin, tmp_path / "out") == 0

    report = read_train_report(tmp_path / "out/train.json")
    assert report.status == "finished" and report.metrics["epoch"] == 2 and report.steps == 2 * STEPS_PER_EPOCH
    with open(tmp_path / "out/train_curves.csv", newline="") as curves:
        assert [row["epoch"] for row in csv.DictReader(curves)] == ["1", "2"]  # every epoch, from the MLflow run
    translator = load_translator(tmp_path / "out/generator.pt")
    assert translator.method == "atme"
    with torch.no_grad():
        assert translator(torch.zeros(1, 3, 32, 32)).shape == (1, 3, 32, 32)

    # Checkpoints: num_to_keep = 2 of the 2 epochs, the latest with the complete state.
    info, state = latest_state(storage, "tiny")
    assert info["epoch"] == 2 and state["step"] == 2 * STEPS_PER_EPOCH and set(state["networks"]) == {"G", "D", "W"}

    # ATME's memory, gathered: every trained sample's entry comes from the rank that saw it.
    # Untouched entries keep their U[0, 1) start; a written entry holds D's logits, which are
    # not all in [0, 1) (36 cells each), so rank 1's samples prove the gather reached rank 0.
    memory = state["method"]["memory"]
    count = load_manifest(prepared_builtin).split("train").count
    owned = memory["owned"]
    for rank in (0, 1):
        indices = list(owned_indices(count, rank, 2))
        assert owned[indices].sum() >= 2 * 2  # at least two batches of this rank's samples
        for index in torch.nonzero(owned).flatten().tolist():
            if index in indices:
                assert ((memory["maps"][index] < 0) | (memory["maps"][index] >= 1)).any(), f"sample {index} not written"

    # MLflow: one run with the config as params, per-epoch metrics incl. health, grids, tags.
    client = MlflowClient(tracking_uri=tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags[TAG_OUTCOME] == "finished"
    assert run.data.tags[TAG_MANIFEST_CHECKSUM] == load_manifest(prepared_builtin).checksum
    assert run.data.params["model.method.name"] == "atme" and run.data.params["train.run.scaling.num_workers"] == "2"
    assert {"loss/G", "loss/D", "health/D_entropy", "health/V_gap", "throughput/images_per_s"} <= set(run.data.metrics)
    assert epochs_logged(tracking_uri, run.info.run_id) == [1, 2]
    grids = [item.path for item in client.list_artifacts(run.info.run_id, "samples")]
    assert grids == ["samples/epoch_0001.png", "samples/epoch_0002.png"]
    assert not any("password" in key.lower() or "secret" in key.lower() for key in run.data.params)


def test_a_killed_worker_recovers_from_the_last_checkpoint(mlflow_store, ray_local, tmp_path, prepared_builtin):
    from components.tracking import start_job_run

    tracking_uri = mlflow_store
    storage = tmp_path / "checkpoints"
    train = train_params(storage, epochs=4, run={"checkpoint": {"every_epochs": 2, "num_to_keep": 2}})
    # Killed in epoch 4, after the checkpoint of epoch 2 (epoch 3 was trained but not saved).
    hook = functools.partial(kill_worker_once, at_step=3 * STEPS_PER_EPOCH + 1, after_checkpoint=2,
                             storage=str(storage), name="tiny", marker=str(tmp_path / "killed"))
    run_id = start_job_run(tracking_uri, "tests", "tiny", {}, {})
    job = job_for(prepared_builtin, TINY_PIX2PIX, train, tracking_uri, run_id, step_hook=hook)

    outcome = run_training(job, job.train.run, str(storage))

    assert (tmp_path / "killed").exists(), "the worker was never killed"
    assert outcome.status == "finished" and outcome.epoch == 4 and outcome.step == 4 * STEPS_PER_EPOCH
    # Epochs 1 and 2 (up to the checkpoint) ran once; epoch 3, done after it, ran again.
    assert epochs_logged(tracking_uri, run_id) == [1, 2, 3, 3, 4]


def test_divergence_ends_the_job_with_exit_3_and_a_tag_without_retry(
    mlflow_store, ray_local, tmp_path, monkeypatch, write_params, prepared_builtin, capfd
):
    tracking_uri = mlflow_store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    # Any D loss is below this floor: the detector fires at the first check on every rank.
    train = train_params(tmp_path / "checkpoints", epochs=3,
                         health={"check_interval": 1, "d_loss_floor": 1e9, "patience_steps": 1},
                         run={"max_failures": 2})
    params = write_stage_params(tmp_path / "params", write_params, TINY_PIX2PIX, train)

    assert cli_train(params, prepared_builtin, tmp_path / "out") == 3

    output = capfd.readouterr()
    assert "diverged" in output.err and "discriminator loss" in output.err
    assert "RETRY" not in output.out + output.err  # Ray's failure policy never saw an error
    assert not (tmp_path / "out/generator.pt").exists()
    report = read_train_report(tmp_path / "out/train.json")
    assert report.status == "diverged" and report.steps == 1
    client = MlflowClient(tracking_uri=tracking_uri)
    run = client.get_run(report.mlflow_run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags[TAG_DIVERGED] == "true" and run.data.tags[TAG_OUTCOME] == "diverged"


def test_unreachable_tracking_server_stops_before_any_training(tmp_path, monkeypatch, write_params, prepared_builtin, capsys):
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    storage = tmp_path / "checkpoints"
    params = write_stage_params(tmp_path / "params", write_params, TINY_PIX2PIX, train_params(storage))

    assert cli_train(params, prepared_builtin, tmp_path / "out") == 1

    assert "not reachable" in capsys.readouterr().err
    assert not storage.exists() and not (tmp_path / "out").exists()


def test_the_image_size_is_data_yamls_and_must_be_the_prepared_one(tmp_path, write_params, prepared_builtin, capsys):
    # model.yaml has no size: one there is refused, naming the file that sets it.
    params = write_stage_params(tmp_path / "params", write_params, {**TINY_PIX2PIX, "image_size": 32},
                                train_params(tmp_path / "checkpoints"))
    assert cli_train(params, prepared_builtin, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "model.yaml: image_size: the image size is set once, in" in err and "data.yaml" in err
    # data.yaml at 64 px, the data prepared at 32: nothing trains at a size the data is not.
    write_stage_params(tmp_path / "params", write_params, TINY_PIX2PIX, train_params(tmp_path / "checkpoints"))
    write_params(tmp_path / "params", image_size=64)
    assert cli_train(params, prepared_builtin, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "data.yaml: image_size: is 64, but" in err and "prepared at 32 px" in err and "pairgan prepare" in err
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "out").exists()
