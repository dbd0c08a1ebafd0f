"""The driver side of a training job: build Ray Train's `TorchTrainer`, fit it, and say how it ended."""

import json
import logging
from collections.abc import Sequence
from typing import Literal

from components.config.run import RunParams
from components.data.integrity import DataError
from components.training.compatibility import ChangedKey, CheckpointIncompatible
from components.training.job import TrainingJob, TrainingOutcome
from components.training.outcome import DATA_ERROR, OutcomeBox
from components.training.worker import train_worker

logger = logging.getLogger(__name__)


def resolve_use_gpu(setting: bool | Literal["auto"], cluster: dict[str, float]) -> bool:
    """`use_gpu` (params): "auto" is one GPU per worker when the cluster's resources hold a GPU."""
    if setting == "auto":
        return cluster.get("GPU", 0) >= 1
    return setting


def run_training(job: TrainingJob, run: RunParams, storage_path: str, callbacks: Sequence = ()) -> TrainingOutcome:
    """Fit the job on the connected Ray cluster (call `ray.init` first).

    storage_path: absolute local folder or s3://; with `run.name` it identifies the run, so a
    second call with the same pair resumes. callbacks: Ray Train callbacks (a sweep's trial
    passes Tune's report callback). Raises CheckpointIncompatible, DataError (a damaged shard,
    never retried), or Ray's TrainingFailedError once `run.max_failures` restarts are used up.
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    scaling = run.scaling
    use_gpu = resolve_use_gpu(scaling.use_gpu, ray.cluster_resources())
    resources = {"CPU": scaling.cpus_per_worker, **({"GPU": scaling.gpus_per_worker} if use_gpu else {})}
    box = ray.remote(num_cpus=0)(OutcomeBox).remote()
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"job": job, "outcome": box},
        scaling_config=ScalingConfig(num_workers=scaling.num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=run.name,
            storage_path=storage_path,
            checkpoint_config=CheckpointConfig(num_to_keep=run.checkpoint.num_to_keep),
            failure_config=FailureConfig(max_failures=run.max_failures),
            # Ray Train's own progress (resources, worker group, every report and checkpoint)
            # is for debugging; a failure still reaches the driver as an exception.
            logging_config=LoggingConfig(log_level="INFO" if job.console.verbose else "ERROR"),
            callbacks=list(callbacks),
        ),
    )
    logger.info(
        "training %s on %d Ray worker(s) (%s), run %r in %s",
        job.model.method.name, scaling.num_workers, "GPU" if use_gpu else "CPU", run.name, storage_path,
    )
    try:
        try:
            result = trainer.fit()
        except ray.train.TrainingFailedError:
            # the attempt that met a damaged shard mid-epoch failed on purpose (see outcome.py)
            if DATA_ERROR in (recorded := ray.get(box.get.remote())):
                raise DataError(recorded[DATA_ERROR]) from None
            raise
        early = ray.get(box.get.remote())
    finally:
        ray.kill(box)
    if DATA_ERROR in early:
        raise DataError(early[DATA_ERROR])
    if "incompatible" in early:
        changes = [ChangedKey(**change) for change in json.loads(early["incompatible"])]
        raise CheckpointIncompatible(early["checkpoint"], changes)
    metrics = early or dict(result.metrics or {})
    status: Literal["finished", "diverged"] = "diverged" if metrics.get("diverged") else "finished"
    numeric = {key: float(value) for key, value in metrics.items() if isinstance(value, int | float)}
    return TrainingOutcome(
        status=status,
        epoch=int(metrics.get("epoch", 0)),
        step=int(metrics.get("step", 0)),
        metrics=numeric,
        divergence_reason=metrics.get("divergence_reason"),
        checkpoint=result.checkpoint,
    )
