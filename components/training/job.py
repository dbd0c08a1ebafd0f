"""What the driver sends every worker (`TrainingJob`) and what it learns back (`TrainingOutcome`)."""

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from components.config.data import LoaderParams
from components.config.model import ModelParams
from components.config.train import TrainParams
from components.console import ConsoleOptions

if TYPE_CHECKING:
    from ray.train import Checkpoint

# A step hook is called on every worker after every training step as hook(world_rank, step);
# tests use it to kill a worker mid-epoch. It must be picklable (a module-level function).
StepHook = Callable[[int, int], None]


@dataclass(frozen=True)
class TrainingJob:
    """Everything a worker needs; sent to the workers, so only absolute paths (they change directory) or
    s3:// URIs, never a path that exists only on the driver's machine."""

    model: ModelParams
    train: TrainParams
    loader: LoaderParams
    data_location: str  # the prepared data set: an absolute path every node sees, or s3://bucket/prefix
    data_checksum: str
    dataset_size: int
    # repr=False: Ray Train V2 shows str(train_loop_config) in its run state (dashboard, export
    # events), and a tracking URI may carry user:password.
    tracking_uri: str | None = field(default=None, repr=False)
    mlflow_run_id: str | None = None
    step_hook: StepHook | None = None
    # A start-weights file (components/training/warm_start.py; a path every node sees, or s3://)
    # the networks start from when the job does not resume a checkpoint of its own.
    start_weights: str | None = None
    # The folder of the compile caches (components/training/compile_cache.py; absolute or s3://),
    # used where performance.compile and compile_cache are on; None: no cache.
    compile_cache: str | None = None
    console: ConsoleOptions = ConsoleOptions()  # what the workers print, decided by the command


@dataclass(frozen=True)
class TrainingOutcome:
    """What the driver learns from a finished job."""

    status: Literal["finished", "diverged"]
    epoch: int
    step: int
    metrics: dict[str, float]
    divergence_reason: str | None = None
    # The latest checkpoint; for a finished run it holds GENERATOR_FILE.
    checkpoint: "Checkpoint | None" = None
