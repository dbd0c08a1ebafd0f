"""How a training job runs: Ray scaling, checkpoints, failures, MLflow tracking (params/train.yaml `run:`)."""

import re
from typing import Literal

from pydantic import Field, field_validator

from components.config.loading import StrictModel

# Ray uses the run name as a folder under storage_path and MLflow shows it as the run name:
# keep it to characters that are safe in both and in S3 keys.
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def one_gpu_per_worker(gpus: int) -> int:
    """A worker is one DDP process on one device: a second GPU reserved for it would stay idle."""
    if gpus != 1:
        raise ValueError(f"is {gpus}, but a worker trains on one GPU (one DDP process each; more would stay idle): "
                         "keep 1, and set num_workers to the number of GPUs")
    return gpus


class ScalingParams(StrictModel):
    """Ray Train workers: one process per worker, each holding a full replica of G, D (and W) under DDP."""

    num_workers: int = Field(ge=1, le=1024)
    # "auto": use one GPU per worker when the Ray cluster has GPUs, else run on CPUs (gloo).
    use_gpu: Literal["auto", True, False]
    # Ray resource requests must be whole numbers in cluster files; keep the same rule here.
    cpus_per_worker: int = Field(ge=1, le=256)
    gpus_per_worker: int

    check_gpus_per_worker = field_validator("gpus_per_worker")(one_gpu_per_worker)


class CheckpointParams(StrictModel):
    """When the complete training state goes to the run's storage (a checkpoint is always written at the end)."""

    every_epochs: int = Field(ge=1)
    # Older checkpoints beyond this many are deleted by Ray; at least one is needed to resume.
    num_to_keep: int = Field(ge=1)


class TrackingParams(StrictModel):
    """MLflow: one run per training job, logged by worker rank 0 only."""

    experiment: str = Field(min_length=1, max_length=200)
    # source | generated | target grids as image artifacts; 0 logs only the final epoch's grid.
    sample_grid_every_epochs: int = Field(ge=0)
    sample_grid_pairs: int = Field(ge=1, le=32)
    system_metrics: bool
    system_metrics_interval_s: int = Field(ge=1, le=3600)


class RunParams(StrictModel):
    """The `run:` section of params/train.yaml."""

    # A run is identified by storage_path + name: running again with both unchanged resumes
    # from the latest checkpoint instead of starting over.
    name: str
    # A local folder (relative paths are taken from the directory `pairgan train` runs in;
    # DVC keeps it with `persist: true`) or s3://bucket/prefix (needed for multi-node clusters).
    storage_path: str
    # Worker crashes survived by restarting from the latest checkpoint. Divergence is never retried.
    max_failures: int = Field(ge=0, le=100)
    scaling: ScalingParams
    checkpoint: CheckpointParams
    tracking: TrackingParams

    @field_validator("name")
    @classmethod
    def _name_is_a_safe_folder(cls, value: str) -> str:
        if not _NAME_PATTERN.match(value):
            raise ValueError(
                "must start with a letter or digit and use only letters, digits, '.', '_' and '-' (at most 100)"
            )
        return value

    @field_validator("storage_path")
    @classmethod
    def _storage_is_local_or_s3(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must be a local folder or s3://bucket/prefix, found an empty string")
        if "://" in value and not value.startswith("s3://"):
            scheme = value.split("://", 1)[0]
            raise ValueError(f"scheme '{scheme}://' is not supported: use a local folder or s3://bucket/prefix")
        if value.startswith("s3://") and not value.removeprefix("s3://").split("/", 1)[0]:
            raise ValueError("s3:// path needs a bucket name: s3://bucket/prefix")
        return value
