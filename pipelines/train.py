"""Stage train: train the method of params/model.yaml on the prepared shards with Ray Train, tracked in MLflow.

Reads params/model.yaml, params/train.yaml (its `run:` section: Ray workers, checkpoints,
tracking) and from params/data.yaml the image size (the networks are built for it) and the
`loader:` section. Ray starts locally unless
RAY_ADDRESS is set; then the workers get the S3 endpoint and region and MLflow's settings
through the job's runtime_env (credentials come from each node), and a --data folder is copied
under an s3:// run.storage_path for them (once per data set). MLflow logs to
MLFLOW_TRACKING_URI, else to sqlite:///<cwd>/mlflow.db.
Running the stage again with the same run.storage_path and run.name resumes from the latest
checkpoint; an MLflow run that a killed training of that folder left RUNNING is closed as
FAILED first. One line per epoch on the console; -v/--verbose adds Ray's and MLflow's own
output. Exit status: 0 trained, 1 failed (after Ray's retries, or the folder is being trained
by another process), 2 invalid params or a checkpoint the params cannot resume, 3 training
diverged (not retried).
"""

import argparse
import dataclasses
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from components.atomic_files import copy_file_atomic
from components.config import load_params
from components.config.data import READS_SHARDS_ONLY, DataParams, check_prepared_size
from components.config.model import load_model_params
from components.config.train import TrainParams
from components.console import ConsoleOptions
from components.data.integrity import DataError
from components.data.manifest import ManifestError, load_manifest
from components.object_store import ObjectStoreError, is_s3_uri
from components.redaction import redact_text, redact_uri
from components.tracking import (
    TAG_DIVERGED,
    TAG_DIVERGENCE_REASON,
    TAG_DRIVER,
    TAG_DVC_EXPERIMENT,
    TAG_FAILURE,
    TAG_GIT_COMMIT,
    TAG_MANIFEST_CHECKSUM,
    TAG_PARAMS_HASH,
    TAG_RUN_FOLDER,
    TrackingUnavailable,
    check_tracking_reachable,
    close_interrupted_runs,
    driver_identity,
    epoch_history,
    finish_job_run,
    flatten_params,
    git_commit,
    job_run_name,
    method_label,
    params_hash,
    start_job_run,
)
from components.training.report import TrainReport, compared_metrics, write_train_report
from pipelines import environment
from pipelines.exit_status import ExitStatus
from pipelines.ray_connection import RayStartFailed, connect_ray, warn_if_auto_sees_no_gpu

if TYPE_CHECKING:
    from components.training.compatibility import ChangedKey

logger = logging.getLogger("pairgan.train")
# the start-weights file a run started from (PAIRGAN_START_WEIGHTS), on its MLflow run
TAG_START_WEIGHTS = "pairgan.start_weights"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data", default="data/prepared", help="prepared data: folder or s3://bucket/prefix (default: data/prepared)"
    )
    parser.add_argument(
        "--model-out", default="models/generator.pt", help="exported generator (default: models/generator.pt)"
    )
    parser.add_argument(
        "--report", default="reports/train.json",
        help="training report, a DVC metrics file (default: reports/train.json); train_info.json, "
        "train_curves.csv and train_validation.csv are written beside it",
    )


def _epoch_history(tracking_uri: str, run_id: str) -> list[dict[str, float]]:
    # The curves are a by-product: a store that cannot be read back costs them, not the model.
    from mlflow.exceptions import MlflowException

    try:
        return epoch_history(tracking_uri, run_id)
    except (MlflowException, OSError) as error:
        logger.warning("per-epoch curves not written: MLflow run %s could not be read (%s)", run_id, error)
        return []


def _incompatible_message(checkpoint_path: str, changes: "list[ChangedKey]", files: dict[str, Path | str],
                          data_path: Path) -> str:
    """The refusal, each changed key named in the params file that sets it."""
    # The model's sizes are set in data.yaml.
    sizes = {"model.image_size": (data_path, "image_size"),
             "model.load_size": (data_path, "loader.load_scale, the load size")}
    lines = []
    for change in changes:
        file, key = sizes.get(change.key) or (files[change.key.split(".", 1)[0]], change.key.split(".", 1)[1])
        lines.append(f"  {file}: {key}: checkpoint has {change.checkpoint}, now {change.now}")
    return (f"pairgan train: the unfinished run in {checkpoint_path} was trained with other params:\n"
            + "\n".join(lines)
            + f"\nrestore them to resume it, or start over: change run.name in {files['train']}, or delete that folder")


def run(args: argparse.Namespace) -> int:
    params_dir = Path(args.params_dir)
    model_path, train_path, data_path = params_dir / "model.yaml", params_dir / "train.yaml", params_dir / "data.yaml"
    console = ConsoleOptions(verbose=args.verbose, interactive=sys.stdout.isatty())
    data = load_params(data_path, DataParams, context=READS_SHARDS_ONLY)
    # The networks are built for the data's one image size (model.yaml has none).
    model = load_model_params(model_path, data, data_path)
    train = load_params(train_path, TrainParams)
    try:
        manifest = load_manifest(args.data)
        dataset_size = manifest.split("train").count
    except (ManifestError, KeyError, FileNotFoundError) as error:
        print(f"pairgan train: {error}", file=sys.stderr)
        return ExitStatus.FAILED
    check_prepared_size(data, manifest.image_size, data_path, args.data)
    start_weights = environment.start_weights()
    if start_weights is not None:
        # Imported here: it loads torch (seconds), which a params error above need not wait for.
        from components.training.warm_start import read_start_weights, start_weights_mismatch

        # Checked here, before Ray starts: a worker failing on it would only be retried.
        try:
            mismatch = start_weights_mismatch(read_start_weights(start_weights), model)
        except (OSError, ValueError, RuntimeError) as error:
            print(f"pairgan train: {environment.START_WEIGHTS}: {error}", file=sys.stderr)
            return ExitStatus.FAILED
        if mismatch:
            print(f"pairgan train: {environment.START_WEIGHTS}={start_weights} holds networks of other model params "
                  f"({', '.join(mismatch)} differ from {model_path})", file=sys.stderr)
            return ExitStatus.BAD_PARAMS

    tracking_uri = environment.tracking_uri()
    tracking = train.run.tracking
    try:
        check_tracking_reachable(tracking_uri, tracking.experiment)
    except TrackingUnavailable as error:
        print(f"pairgan train: {error}", file=sys.stderr)
        return ExitStatus.FAILED

    ray_address = environment.ray_address()
    ray_workers_environment = environment.ray_console(console, ray_address)
    # Imported here: Ray takes seconds to import, and params errors should not wait for it.
    import ray
    from ray.train import TrainingFailedError

    from components.training.checkpoints import GENERATOR_FILE
    from components.training.compatibility import CheckpointIncompatible, decide_resume, job_record
    from components.training.compile_cache import compile_cache_location
    from components.training.driver import run_training
    from components.training.job import TrainingJob
    from components.training.run_folder import latest_checkpoint_info, remove_unlisted_checkpoints
    from components.training.shared_data import share_prepared, shared_location

    config = {"model": model.model_dump(mode="json"), "train": train.model_dump(mode="json"),
              "data": {"image_size": data.image_size, "loader": data.loader.model_dump(mode="json")}}
    storage = environment.absolute_storage_path(train.run.storage_path)
    run_folder = f"{storage.rstrip('/')}/{train.run.name}"
    data_location = args.data if is_s3_uri(args.data) else str(Path(args.data).resolve())
    if not is_s3_uri(args.data) and ray_address != "local" and is_s3_uri(storage):
        # Workers on other nodes cannot read this machine's folder: they read a copy of the data
        # set under the job's shared storage, made once per data set.
        data_location = shared_location(storage, manifest)
        try:
            share_prepared(manifest, data_location, progress=console.interactive)
        except ObjectStoreError as error:
            print(f"pairgan train: the data set could not be copied for the workers: {error}", file=sys.stderr)
            return ExitStatus.FAILED
        logger.info("the workers read the data set from %s (a copy of %s)", data_location, args.data)
    # Equal hashes, equal training: train.yaml's run section says where and how, not what is trained.
    trained = {**config, "train": {key: value for key, value in config["train"].items() if key != "run"}}
    trained_hash = params_hash(trained)
    dvc_experiment = environment.dvc_experiment_name()
    run_name = job_run_name(tracking_uri, tracking.experiment, f"{method_label(model)} {dvc_experiment or trained_hash}")

    # A training killed before it could close its MLflow run (SIGKILL, a lost machine) left it
    # RUNNING, and maybe checkpoint folders Ray no longer tracks: close and clean up first.
    unfinished = close_interrupted_runs(tracking_uri, tracking.experiment, run_folder, f"run {run_name!r}")
    if unfinished.live:
        run_id, driver = unfinished.live[0]
        print(f"pairgan train: run folder {run_folder} is being trained right now (MLflow run {run_id}, process "
              f"{driver}); wait for it, or give this training another run.name in {train_path}", file=sys.stderr)
        return ExitStatus.FAILED
    for closed in unfinished.closed:
        logger.warning("MLflow run %s of %s was left RUNNING by a training that was killed: closed as FAILED",
                       closed, run_folder)
    removed = remove_unlisted_checkpoints(storage, train.run.name)
    if removed:
        logger.warning("removed %d checkpoint folder(s) of %s that Ray no longer tracks (left by a killed "
                       "training): %s", len(removed), run_folder, ", ".join(removed))

    job = TrainingJob(
        model=model, train=train, loader=data.loader,
        data_location=data_location,
        data_checksum=manifest.checksum, dataset_size=dataset_size,
        tracking_uri=tracking_uri, console=console, start_weights=start_weights,
        compile_cache=compile_cache_location(storage),
    )
    files = {"model": model_path, "train": train_path, "data": manifest.file_location()}
    # Params the run's unfinished checkpoint cannot continue with are refused here, before Ray
    # starts and before an MLflow run is opened; the workers, which load the checkpoint, decide
    # again (a checkpoint that could not be read here, or one written since).
    latest = latest_checkpoint_info(storage, train.run.name)
    if latest is not None:
        decision = decide_resume(latest.info, job_record(job), train.epochs, latest.path)
        if decision.action == "refuse":
            print(_incompatible_message(latest.path, decision.changes, files, data_path), file=sys.stderr)
            return ExitStatus.BAD_PARAMS

    # Started before the MLflow run: a Ray that does not start leaves no run behind.
    try:
        connect_ray(ray_address, ray_workers_environment, console.verbose)
    except RayStartFailed as error:
        print(f"pairgan train: {error}", file=sys.stderr)
        return ExitStatus.FAILED
    warn_if_auto_sees_no_gpu(train.run.scaling.use_gpu, ray_address, ray.cluster_resources(),
                             f"{train_path}: run.scaling.use_gpu")

    tags = {TAG_MANIFEST_CHECKSUM: manifest.checksum, "pairgan.method": model.method.name,
            TAG_PARAMS_HASH: trained_hash, TAG_RUN_FOLDER: run_folder, TAG_DRIVER: driver_identity()}
    if dvc_experiment:
        tags[TAG_DVC_EXPERIMENT] = dvc_experiment
    if start_weights is not None:
        tags[TAG_START_WEIGHTS] = start_weights
    commit = git_commit(Path.cwd())
    if commit:
        tags[TAG_GIT_COMMIT] = commit
    run_id = start_job_run(tracking_uri, tracking.experiment, run_name, flatten_params(config), tags)
    logger.info("MLflow: %s, experiment %r, run %r", redact_uri(tracking_uri), tracking.experiment, run_name)

    try:
        outcome = run_training(dataclasses.replace(job, mlflow_run_id=run_id), train.run, storage)
    except CheckpointIncompatible as error:
        finish_job_run(tracking_uri, run_id, "failed", {TAG_FAILURE: "checkpoint incompatible with params"})
        print(_incompatible_message(error.checkpoint_path, error.changes, files, data_path), file=sys.stderr)
        return ExitStatus.BAD_PARAMS
    except DataError as error:
        # a damaged shard: deterministic, so reported once instead of retried
        finish_job_run(tracking_uri, run_id, "failed", {"pairgan.failure": "data error"})
        print(f"pairgan train: data error: {error}", file=sys.stderr)
        return ExitStatus.FAILED
    except TrainingFailedError as error:
        # a worker's MLflow error can quote the tracking URI, password included
        failure = redact_text(str(error), tracking_uri)
        finish_job_run(tracking_uri, run_id, "failed",
                       {TAG_FAILURE: f"training failed after {train.run.max_failures} restart(s): {failure}"[:5000]})
        print(f"pairgan train: training failed after {train.run.max_failures} restart(s): {failure}", file=sys.stderr)
        return ExitStatus.FAILED
    except BaseException as error:
        # Anything else (Ctrl-C, Ray itself failing): close the run as failed, then let it surface.
        finish_job_run(tracking_uri, run_id, "failed", {TAG_FAILURE: f"stopped: {type(error).__name__}: {error}"[:5000]})
        raise

    report = TrainReport(
        metrics=compared_metrics(outcome.metrics, outcome.epoch),
        status=outcome.status,
        method=model.method.name,
        steps=outcome.step,
        data_checksum=manifest.checksum,
        mlflow_run_id=run_id,
        checkpoint=outcome.checkpoint.path if outcome.checkpoint is not None else None,
        divergence_reason=outcome.divergence_reason,
    )
    history = _epoch_history(tracking_uri, run_id)
    if outcome.status == "diverged":
        write_train_report(Path(args.report), report, history)
        finish_job_run(
            tracking_uri, run_id, "diverged",
            {TAG_DIVERGED: "true", TAG_DIVERGENCE_REASON: (outcome.divergence_reason or "")[:5000]},
        )
        print(f"pairgan train: training diverged: {outcome.divergence_reason}", file=sys.stderr)
        return ExitStatus.DIVERGED

    with outcome.checkpoint.as_directory() as folder:
        copy_file_atomic(Path(folder) / GENERATOR_FILE, Path(args.model_out))
    write_train_report(Path(args.report), report, history)
    finish_job_run(tracking_uri, run_id, "finished")
    logger.info("trained %d epochs (%d steps); generator written to %s", outcome.epoch, outcome.step, args.model_out)
    return ExitStatus.OK
