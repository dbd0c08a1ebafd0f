"""A training killed without warning (SIGKILL, a lost machine): the next start closes its MLflow run
as FAILED and removes the checkpoint folders Ray no longer tracks, refuses params the checkpoint
cannot continue with, and resumes with its own; runs are named after what they train."""

import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest
from mlflow import MlflowClient

from components.config.model import ModelParams
from components.tracking import (
    TAG_DRIVER,
    TAG_FAILURE,
    TAG_OUTCOME,
    TAG_RUN_FOLDER,
    close_interrupted_runs,
    job_run_name,
    method_label,
    params_hash,
)
from components.training.checkpoints import INFO_FILE
from components.training.report import read_train_report
from components.training.run_folder import SNAPSHOT_FILE, latest_checkpoint_info, remove_unlisted_checkpoints
from support.params import shipped_yaml, write_shipped
from support.process_trees import kill_every_process_marked, marked

PROJECT = Path(__file__).resolve().parents[2]


@pytest.fixture
def tracking(mlflow_store, tmp_path) -> tuple[str, MlflowClient, str]:
    uri = mlflow_store
    client = MlflowClient(tracking_uri=uri)
    return uri, client, client.create_experiment("pairgan", artifact_location=(tmp_path / "artifacts").as_uri())


def running_run(client: MlflowClient, experiment_id: str, folder: str, driver: str, name: str = "r") -> str:
    return client.create_run(experiment_id, run_name=name, tags={TAG_RUN_FOLDER: folder, TAG_DRIVER: driver}).info.run_id


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


# --- run names ------------------------------------------------------------------------


def test_run_names_say_the_method_and_count_the_runs_of_one_experiment(tracking):
    uri, client, experiment_id = tracking
    assert job_run_name(uri, "pairgan", "pix2pix 0a1b2c3d") == "pix2pix 0a1b2c3d #1"
    client.create_run(experiment_id, run_name="pix2pix 0a1b2c3d #1")
    client.create_run(experiment_id, run_name="atme-dg fussy-bran #1")
    assert job_run_name(uri, "pairgan", "pix2pix 0a1b2c3d") == "pix2pix 0a1b2c3d #2"
    assert job_run_name(uri, "pairgan", "atme-dg fussy-bran") == "atme-dg fussy-bran #2"
    assert job_run_name(uri, "pairgan", "pix2pix ffffffff") == "pix2pix ffffffff #1"
    assert job_run_name(uri, "new-experiment", "pix2pix 0a1b2c3d") == "pix2pix 0a1b2c3d #1"


def test_method_label_names_diffusion_gan_and_the_params_hash_follows_the_params():
    diffusion_gan = {"t_min": 5, "t_max": 500, "beta_start": 1.0e-4, "beta_end": 2.0e-2, "sigma": 0.05,
                     "t_distribution": "priority", "update_interval": 4, "ada_kimg": 100, "d_target": 0.6}
    sizes = {"image_size": 32, "load_size": 36}
    plain = shipped_yaml("model")
    assert method_label(ModelParams.model_validate({**plain, **sizes})) == "pix2pix"
    with_dg = shipped_yaml("model", method={"diffusion_gan": diffusion_gan})
    assert method_label(ModelParams.model_validate({**with_dg, **sizes})) == "pix2pix-dg"
    assert params_hash(plain) == params_hash(shipped_yaml("model"))
    assert params_hash(plain) != params_hash(with_dg)
    assert len(params_hash(plain)) == 8


# --- closing runs a killed training left RUNNING --------------------------------------


def test_a_run_whose_training_process_is_gone_is_closed_as_failed_with_the_reason(tracking):
    uri, client, experiment_id = tracking
    host = socket.gethostname()
    killed = running_run(client, experiment_id, "/store/job", f"{host}:{dead_pid()}")
    elsewhere = running_run(client, experiment_id, "/store/job", "other-host:4242")
    other_folder = running_run(client, experiment_id, "/store/other-job", f"{host}:{dead_pid()}")
    finished = running_run(client, experiment_id, "/store/job", f"{host}:{dead_pid()}")
    client.set_terminated(finished, status="FINISHED")

    unfinished = close_interrupted_runs(uri, "pairgan", "/store/job", "run 'pix2pix 0a1b2c3d #3'")

    assert sorted(unfinished.closed) == sorted([killed, elsewhere]) and unfinished.live == []
    for run_id in (killed, elsewhere):
        run = client.get_run(run_id)
        assert run.info.status == "FAILED" and run.info.end_time is not None
        assert run.data.tags[TAG_OUTCOME] == "failed"
        assert "interrupted" in run.data.tags[TAG_FAILURE] and "pix2pix 0a1b2c3d #3" in run.data.tags[TAG_FAILURE]
    assert client.get_run(other_folder).info.status == "RUNNING"  # another job's folder: not ours to close
    assert client.get_run(finished).info.status == "FINISHED"
    assert close_interrupted_runs(uri, "missing-experiment", "/store/job", "x").closed == []


def test_a_run_whose_training_process_still_runs_here_is_left_alone(tracking):
    uri, client, experiment_id = tracking
    host = socket.gethostname()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        time.sleep(0.2)
        running = running_run(client, experiment_id, "/store/job", f"{host}:{live.pid}")
        time.sleep(1.5)
        # A process that started after the run did is a reused pid, not the run's training.
        reused = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        try:
            stale = client.create_run(experiment_id, run_name="r", start_time=int((time.time() - 10) * 1000),
                                      tags={TAG_RUN_FOLDER: "/store/job", TAG_DRIVER: f"{host}:{reused.pid}"}).info.run_id
            unfinished = close_interrupted_runs(uri, "pairgan", "/store/job", "run 'x'")
        finally:
            reused.kill()
            reused.wait()
    finally:
        live.kill()
        live.wait()
    assert unfinished.live == [(running, f"{host}:{live.pid}")]
    assert unfinished.closed == [stale]
    assert client.get_run(running).info.status == "RUNNING"


def test_train_refuses_a_run_folder_another_live_training_is_using(mlflow_store, tmp_path, prepared_builtin, monkeypatch, capsys):
    from pipelines.cli import main

    monkeypatch.chdir(tmp_path)
    params = tmp_path / "params"
    write_shipped(params, "model", method={"generator": {"ngf": 8}, "discriminator": {"ndf": 8}})
    write_shipped(params, "train", run={"name": "job", "storage_path": str(tmp_path / "checkpoints")})
    write_shipped(params, "data", image_size=32)
    client = MlflowClient(tracking_uri=mlflow_store)
    experiment_id = client.create_experiment("pairgan", artifact_location=(tmp_path / "artifacts").as_uri())
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        time.sleep(0.2)
        other = running_run(client, experiment_id, str(tmp_path / "checkpoints" / "job"), f"{socket.gethostname()}:{live.pid}")
        status = main(["train", "--params-dir", str(params), "--data", str(prepared_builtin),
                       "--model-out", str(tmp_path / "generator.pt"), "--report", str(tmp_path / "train.json")])
    finally:
        live.kill()
        live.wait()
    assert status == 1
    error = capsys.readouterr().err
    assert f"run folder {tmp_path / 'checkpoints' / 'job'} is being trained right now" in error and str(live.pid) in error
    assert client.get_run(other).info.status == "RUNNING"
    assert [run.info.run_id for run in client.search_runs([experiment_id])] == [other]  # no new run
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "train.json").exists()


# --- checkpoint folders Ray no longer tracks ------------------------------------------


def write_run_folder(folder: Path, listed: list[str], latest: str, orphans: list[str]) -> None:
    folder.mkdir(parents=True)
    for name in [*listed, *orphans]:
        (folder / name).mkdir()
        (folder / name / "state.pt").write_bytes(b"weights")
    snapshot = {"ray_version": "2.60.0", "checkpoint_results": [{"checkpoint_dir_name": name, "metrics": {}} for name in listed],
                "latest_checkpoint_result": {"checkpoint_dir_name": latest, "metrics": {}},
                "pending_training_results": []}
    (folder / SNAPSHOT_FILE).write_text(json.dumps(snapshot))


def test_checkpoints_missing_from_rays_list_are_removed_and_listed_ones_kept(tmp_path):
    folder = tmp_path / "checkpoints" / "job"
    listed = ["checkpoint_2026-01-01_00-00-02.000000", "checkpoint_2026-01-01_00-00-03.000000"]
    orphans = ["checkpoint_2026-01-01_00-00-01.000000", "checkpoint_2026-01-01_00-00-04.000000"]
    write_run_folder(folder, listed, listed[-1], orphans)
    (folder / "notes").mkdir()

    assert remove_unlisted_checkpoints(str(tmp_path / "checkpoints"), "job") == orphans
    assert sorted(path.name for path in folder.iterdir()) == sorted([*listed, SNAPSHOT_FILE, "notes"])
    assert remove_unlisted_checkpoints(str(tmp_path / "checkpoints"), "job") == []
    assert remove_unlisted_checkpoints(str(tmp_path / "checkpoints"), "never-ran") == []


@pytest.mark.parametrize("snapshot", [None, "{not json", '{"checkpoint_results": "?"}'],
                         ids=["no-list", "unreadable", "unexpected"])
def test_without_a_readable_list_nothing_is_deleted(tmp_path, caplog, snapshot):
    folder = tmp_path / "job"
    write_run_folder(folder, ["checkpoint_a"], "checkpoint_a", ["checkpoint_b"])
    if snapshot is None:
        (folder / SNAPSHOT_FILE).unlink()
    else:
        (folder / SNAPSHOT_FILE).write_text(snapshot)
    assert remove_unlisted_checkpoints(str(tmp_path), "job") == []
    assert {"checkpoint_a", "checkpoint_b"} <= {path.name for path in folder.iterdir()}
    if snapshot is not None:
        assert "cannot read Ray's checkpoint_manager_snapshot.json" in caplog.text


def write_info(checkpoint: Path, epoch: int) -> None:
    info = {"job": {"model.method.name": '"pix2pix"'}, "method": "pix2pix", "epoch": epoch, "step": 6 * epoch,
            "final": False}
    (checkpoint / INFO_FILE).write_text(json.dumps(info))


def test_the_driver_reads_the_record_of_the_checkpoint_ray_resumes_from(tmp_path):
    folder = tmp_path / "job"
    write_run_folder(folder, ["checkpoint_a", "checkpoint_b"], "checkpoint_a", ["checkpoint_c"])
    for epoch, name in enumerate(["checkpoint_a", "checkpoint_b", "checkpoint_c"], start=1):
        write_info(folder / name, epoch)
    # Ray's latest, not the newest folder nor the last one in its list
    latest = latest_checkpoint_info(str(tmp_path), "job")
    assert latest is not None and latest.path == str(folder / "checkpoint_a") and latest.info["epoch"] == 1
    assert latest_checkpoint_info(str(tmp_path), "never-ran") is None


@pytest.mark.parametrize("damage", ["no-latest", "no-info", "unreadable-info", "unreadable-list"])
def test_a_checkpoint_record_the_driver_cannot_read_leaves_the_decision_to_the_workers(tmp_path, caplog, damage):
    folder = tmp_path / "job"
    write_run_folder(folder, ["checkpoint_a"], "checkpoint_a", [])
    write_info(folder / "checkpoint_a", 1)
    if damage == "no-latest":
        snapshot = json.loads((folder / SNAPSHOT_FILE).read_text())
        (folder / SNAPSHOT_FILE).write_text(json.dumps({**snapshot, "latest_checkpoint_result": None}))
    elif damage == "no-info":
        (folder / "checkpoint_a" / INFO_FILE).unlink()
    elif damage == "unreadable-info":
        (folder / "checkpoint_a" / INFO_FILE).write_text("{cut sho")
    else:
        (folder / SNAPSHOT_FILE).write_text("{cut sho")
    with caplog.at_level(logging.INFO, logger="components.training.run_folder"):
        assert latest_checkpoint_info(str(tmp_path), "job") is None
    assert ("the workers decide whether to resume it" in caplog.text) == damage.startswith("unreadable")


def test_unlisted_checkpoints_are_removed_from_s3_storage(tmp_path, s3_endpoint, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)  # pyarrow's S3 reads it, as Ray's storage does
    bucket = boto3.client("s3", endpoint_url=s3_endpoint)
    bucket.create_bucket(Bucket="runs")
    local = tmp_path / "job"
    write_run_folder(local, ["checkpoint_a"], "checkpoint_a", ["checkpoint_b"])
    for path in local.rglob("*"):
        if path.is_file():
            bucket.put_object(Bucket="runs", Key=f"prefix/job/{path.relative_to(local).as_posix()}", Body=path.read_bytes())

    assert remove_unlisted_checkpoints("s3://runs/prefix", "job") == ["checkpoint_b"]
    # (pyarrow leaves an empty "prefix/job/" marker object where it deleted inside a folder)
    keys = sorted(item["Key"] for item in bucket.list_objects_v2(Bucket="runs")["Contents"] if not item["Key"].endswith("/"))
    assert keys == ["prefix/job/checkpoint_a/state.pt", f"prefix/job/{SNAPSHOT_FILE}"]

    # the checkpoint's record, read where Ray's S3 storage keeps it (Checkpoint.path: bucket/prefix/...)
    bucket.put_object(Bucket="runs", Key=f"prefix/job/checkpoint_a/{INFO_FILE}", Body=json.dumps({"epoch": 3}).encode())
    latest = latest_checkpoint_info("s3://runs/prefix", "job")
    assert latest is not None and (latest.path, latest.info) == ("runs/prefix/job/checkpoint_a", {"epoch": 3})


# --- the whole story with a real `pairgan train` and a real SIGKILL --------------------


@pytest.mark.slow
def test_after_a_sigkill_the_next_training_closes_the_run_cleans_up_and_resumes(mlflow_store, tmp_path, prepared_builtin):
    storage = tmp_path / "checkpoints"
    params = tmp_path / "params"
    params.mkdir()

    def write_model(generator_width: int) -> None:
        write_shipped(params, "model", method={"generator": {"ngf": generator_width, "max_multiplier": 2},
                                               "discriminator": {"ndf": 8, "n_layers": 2}})

    write_model(8)
    write_shipped(params, "data", image_size=32, loader={"load_scale": 1.125, "num_threads": 1})

    def write_train(epochs: int) -> None:
        # one worker: what is tested is the run's record and its checkpoints, not DDP
        write_shipped(params, "train", epochs=epochs, batch_size=2,
                      run={"name": "job", "storage_path": str(storage), "scaling": {"num_workers": 1, "use_gpu": False},
                           "checkpoint": {"every_epochs": 1, "num_to_keep": 2},
                           "tracking": {"sample_grid_every_epochs": 0, "system_metrics": False}})

    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT), os.environ.get("PYTHONPATH")]))}
    for name in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS"):
        env.pop(name, None)
    command = [sys.executable, "-m", "pipelines.cli", "train", "--params-dir", str(params), "--data",
               str(prepared_builtin), "--model-out", str(tmp_path / "generator.pt"), "--report", str(tmp_path / "train.json")]

    # Far more epochs than it will get: killed, with everything it started, once Ray lists a checkpoint.
    write_train(epochs=1000)
    log = (tmp_path / "killed.log").open("w")
    killed_env, tree = marked(env)
    killed = subprocess.Popen([*command[:3], "--verbose", *command[3:]], cwd=tmp_path, env=killed_env, stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 300
    try:
        # Read as the stage reads it: Ray rewrites the snapshot in place, so a poll can find it half written.
        while latest_checkpoint_info(str(storage), "job") is None:
            assert killed.poll() is None and time.monotonic() < deadline, (tmp_path / "killed.log").read_text()
            time.sleep(0.2)
    finally:  # also when the wait fails: a training of 1000 epochs must not outlive the test
        kill_every_process_marked(tree)
        killed.wait()
        log.close()
    # --verbose shows what Ray Train says about itself.
    assert "Setting up process group" in (tmp_path / "killed.log").read_text()

    client = MlflowClient(tracking_uri=mlflow_store)
    [interrupted] = client.search_runs(client.get_experiment_by_name("pairgan").experiment_id)
    assert interrupted.info.status == "RUNNING" and interrupted.info.run_name.endswith(" #1")
    # What a kill during an upload leaves: a checkpoint folder Ray's list does not name.
    orphan = storage / "job" / "checkpoint_2000-01-01_00-00-00.000000"
    orphan.mkdir()
    (orphan / "state.pt").write_bytes(b"half-written")

    # The next starts, with epochs set to those of the newest checkpoint written (a checkpoint
    # Ray had not listed yet may be among them), so that it resumes at or before it and finishes
    # within an epoch or two (an unfinished run may not be cut below what it trained).
    written = [json.loads(info.read_text())["epoch"] for info in (storage / "job").glob("checkpoint_*/checkpoint.json")]
    write_train(epochs=max(written))

    # First with a wider generator, which these weights cannot continue: it closes the
    # interrupted run and removes the orphan (and a checkpoint written after Ray's last list,
    # also unlisted), then refuses with the file and the key, the listed checkpoints left as
    # they were and no model written.
    checkpoints = {path: path.read_bytes() for path in (storage / "job").glob("checkpoint_*/*")}
    latest_listed = Path(latest_checkpoint_info(str(storage), "job").path)
    write_model(16)
    refused = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    # refused before any work: no Ray started, no MLflow run opened for it
    assert "MLflow:" not in refused.stderr and "Ray worker(s)" not in refused.stderr
    assert [run.info.run_id for run in client.search_runs(interrupted.info.experiment_id)] == [interrupted.info.run_id]
    assert f"{params / 'model.yaml'}: method.generator.ngf: checkpoint has 8, now 16" in refused.stderr
    assert "run.name" in refused.stderr
    assert f"MLflow run {interrupted.info.run_id} of {storage / 'job'} was left RUNNING" in refused.stderr
    assert not orphan.exists()
    kept = {path: path.read_bytes() for path in (storage / "job").glob("checkpoint_*/*")}
    assert latest_listed in {path.parent for path in kept} and set(kept) <= set(checkpoints)
    assert all(content == checkpoints[path] for path, content in kept.items())
    assert not (tmp_path / "generator.pt").exists()
    closed = client.get_run(interrupted.info.run_id)
    assert closed.info.status == "FAILED"
    assert closed.data.tags[TAG_OUTCOME] == "failed" and "interrupted" in closed.data.tags[TAG_FAILURE]

    # Then with the run's own params: it continues after a checkpoint instead of starting over.
    write_model(8)
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "resumed from" in result.stdout + result.stderr
    report = read_train_report(tmp_path / "train.json")
    # 13 training pairs on one worker, batch 2: 6 steps an epoch, the resumed ones counted on
    assert report.status == "finished" and report.metrics["epoch"] == max(written) and report.steps == 6 * max(written)
    finished = client.get_run(report.mlflow_run_id)
    assert finished.info.status == "FINISHED" and finished.info.run_name.startswith("pix2pix ")
    trained = sorted(int(point.value) for point in client.get_metric_history(report.mlflow_run_id, "epoch"))
    assert 1 not in trained and trained == list(range(max(written) - len(trained) + 1, max(written) + 1)), trained
