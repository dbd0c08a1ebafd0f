"""The training job on Ray Train (V2): one worker process per replica, G, D and W each under DDP.

The driver (`run_training`) builds a `TorchTrainer`; every worker runs `train_worker`:

    loader (its rank's share of the shards) -> TrainingSession(wrap=DDP) -> per epoch:
        train_step for every batch, end_epoch (statistics reduced over all workers),
        every `checkpoint.every_epochs` and at the end: gather ATME's memory, rank 0 writes
        the complete state, and every worker calls `ray.train.report` (a barrier).

Recovery: a worker that dies makes Ray restart the whole group (up to `max_failures`); the
new workers load `ray.train.get_checkpoint()` and continue with the epoch after it, so no
epoch before the checkpoint is trained twice. Running the job again with the same storage
path and run name resumes the same way.

Divergence is caught in the worker and reported; the worker then returns normally, so Ray's
FailureConfig never retries a diverged run. The detector's check runs at the same step on
every rank and first takes the maximum of its flags over all ranks (`AgreeingDetector`), so
every rank stops at the same point and the reports stay in step.
A checkpoint is resumed only by the same job (`job_record`: model params, the training
params that shape the trajectory, the data). If they changed and the checkpoint's job had
finished, this is a new job and trains from scratch (what `dvc repro` after a params change
means); if it had not finished, the workers report it like a divergence and the driver
raises `CheckpointIncompatible` naming the changed keys: hours of training are never thrown
away, or continued with other params, without the user saying so.

ATME's per-sample memory: each worker writes the entries of the samples it trains on (its
`owned` mask); at a checkpoint the memories of all ranks are gathered and merged, entry by
entry from the rank that owns it, so the checkpoint holds the complete memory and a resumed
run (with any number of workers) starts from it.
"""

import json
import logging
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch

from components.config.data import LoaderParams
from components.config.model import ModelParams
from components.config.run import RunParams
from components.config.train import TrainParams
from components.data.batch import Batch
from components.training.health import DivergenceDetector, TrainingDiverged

if TYPE_CHECKING:
    from ray.train import Checkpoint

logger = logging.getLogger(__name__)

STATE_FILE = "state.pt"
GENERATOR_FILE = "generator.pt"
INFO_FILE = "checkpoint.json"

# A step hook is called on every worker after every training step as hook(world_rank, step);
# tests use it to kill a worker mid-epoch. It must be picklable (a module-level function).
StepHook = Callable[[int, int], None]


@dataclass(frozen=True)
class TrainingJob:
    """Everything a worker needs; sent to the workers, so only absolute paths (they change directory)."""

    model: ModelParams
    train: TrainParams
    loader: LoaderParams
    data_dir: str
    data_checksum: str
    dataset_size: int
    # repr=False: Ray Train V2 shows str(train_loop_config) in its run state (dashboard, export
    # events), and a tracking URI may carry user:password.
    tracking_uri: str | None = field(default=None, repr=False)
    mlflow_run_id: str | None = None
    step_hook: StepHook | None = None


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


@dataclass(frozen=True)
class ChangedKey:
    key: str
    checkpoint: str
    now: str


class CheckpointIncompatible(Exception):
    """The run's latest, unfinished checkpoint belongs to a job with other params."""

    def __init__(self, checkpoint_path: str, changes: Sequence[ChangedKey]):
        self.checkpoint_path = checkpoint_path
        self.changes = list(changes)
        lines = [f"  {change.key}: checkpoint has {change.checkpoint}, now {change.now}" for change in changes]
        super().__init__(
            f"the checkpoint {checkpoint_path} cannot be resumed with the current params:\n"
            + "\n".join(lines)
            + "\nrestore those values to resume it, or start over: change run.name (or run.storage_path) "
            "in params/train.yaml, or delete the run's folder"
        )


# ---------------------------------------------------------------------------------------
# Compatibility of a checkpoint with the current params


def job_record(job: TrainingJob) -> dict[str, str]:
    """What makes two trainings the same job, flattened to strings: a checkpoint is resumed
    only by the same job.

    The model params (every tensor shape, the method), the training params that shape the
    trajectory (seed, batch size, optimiser, LR schedule) and the data (checksum and size).
    Left out: `epochs` (raising it continues a job), `run` (where and how it runs),
    `performance` and `health` (speed switches and the detector's thresholds).
    """
    trajectory = job.train.model_dump(mode="json", exclude={"epochs", "run", "performance", "health"})
    record = {f"model.{key}": value for key, value in _flatten(job.model.model_dump(mode="json")).items()}
    record.update({f"train.{key}": value for key, value in _flatten(trajectory).items()})
    record["data.checksum"] = json.dumps(job.data_checksum)
    record["data.train_samples"] = str(job.dataset_size)
    return record


def _flatten(config: dict, prefix: str = "") -> dict[str, str]:
    flat: dict[str, str] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = json.dumps(value)
    return flat


def compare_records(saved: dict[str, str], current: dict[str, str]) -> list[ChangedKey]:
    """Keys whose values differ (a key only one side has counts as changed)."""
    missing = "(absent)"
    return [
        ChangedKey(key, saved.get(key, missing), current.get(key, missing))
        for key in sorted(saved.keys() | current.keys())
        if saved.get(key, missing) != current.get(key, missing)
    ]


# ---------------------------------------------------------------------------------------
# The worker


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce(values: torch.Tensor, op_name: Literal["sum", "max"] = "sum") -> torch.Tensor:
    """`values` combined over all workers (a new tensor; every rank gets the same result)."""
    import torch.distributed as dist

    reduced = values.detach().clone()
    if _distributed():
        dist.all_reduce(reduced, op=dist.ReduceOp.SUM if op_name == "sum" else dist.ReduceOp.MAX)
    return reduced


def _all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    return _all_reduce(values, "sum")


class AgreeingDetector(DivergenceDetector):
    """The divergence detector with one verdict for all workers.

    Each rank sees its own losses, so a NaN or a streak can show on one rank a step before the
    others; a rank that stopped alone would leave the others waiting in DDP's all-reduce. The
    check (already a host sync, every `check_interval` steps, at the same step on every rank)
    first takes the maximum of each flag over the workers.
    """

    def check(self, step: int) -> None:
        flags = torch.stack([self.nonfinite.long(), self.low_loss_streak, self.perfect_d_streak])
        flags = _all_reduce(flags, "max")
        self.nonfinite.copy_(flags[0].bool())
        self.low_loss_streak.copy_(flags[1])
        self.perfect_d_streak.copy_(flags[2])
        super().check(step)


def _ddp_wrap(module: torch.nn.Module) -> torch.nn.Module:
    from ray.train.torch import prepare_model

    # broadcast_buffers=False: D runs on the real and the fake batch before one backward;
    # re-broadcasting its buffers between those calls is the in-place error STACK.md warns of.
    # Modules without trainable parameters (nothing to all-reduce) stay as they are.
    if not any(parameter.requires_grad for parameter in module.parameters()):
        return module
    return prepare_model(module, parallel_strategy_kwargs={"broadcast_buffers": False})


def _checkpoint_due(epoch: int, epochs: int, every: int) -> bool:
    return epoch == epochs or epoch % every == 0


def _load_state(checkpoint, device: torch.device) -> tuple[dict, dict]:
    with checkpoint.as_directory() as folder:
        info = json.loads((Path(folder) / INFO_FILE).read_text())
        state = torch.load(Path(folder) / STATE_FILE, map_location=device, weights_only=True)
    return info, state


class _OutcomeBox:
    """A Ray actor holding how the workers ended when that is not a trained epoch.

    Ray's Result carries the metrics of the latest *checkpoint* only, so a report without one
    (diverged, incompatible checkpoint) would never reach the driver; rank 0 leaves it here.
    """

    def __init__(self) -> None:
        self.outcome: dict = {}

    def set(self, outcome: dict) -> None:
        self.outcome = outcome

    def get(self) -> dict:
        return self.outcome


def _end_early(box, rank: int, outcome: dict) -> None:
    """Record why the job stops (rank 0), then the last report of every rank, keeping them in step."""
    import ray

    if rank == 0:
        ray.get(box.set.remote(outcome))
    _report(outcome)


def _report(metrics: dict, checkpoint_folder: str | None = None) -> None:
    import ray.train

    checkpoint = ray.train.Checkpoint.from_directory(checkpoint_folder) if checkpoint_folder else None
    ray.train.report(metrics, checkpoint=checkpoint)


class _ObservedLoader:
    """The rank's loader, keeping the first batch it yields (the sample-grid pairs) and
    calling the step hook after each step (the loop asks for the next batch after a step)."""

    def __init__(self, loader, rank: int, step_hook: StepHook | None, session) -> None:
        self.loader, self.rank, self.step_hook, self.session = loader, rank, step_hook, session
        self.first_batch: Batch | None = None

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        # A resumed run must get the draws of the epoch it resumes at, not those of epoch 0 again.
        self.loader.set_epoch(self.session.epoch)
        for batch in self.loader:
            if self.first_batch is None:
                self.first_batch = {key: value.detach().cpu().clone() for key, value in batch.items()}
            yield batch
            if self.step_hook is not None:
                self.step_hook(self.rank, self.session.step)


def _gathered_memory(memory, written_before: torch.Tensor | None) -> dict | None:
    """ATME's memory merged over all ranks, each entry from the rank that wrote it (a collective).

    written_before: the entries the resumed checkpoint already held, still marked as written.
    """
    from components.methods.atme import merge_memories

    if memory is None:
        return None
    maps, owned = merge_memories(memory.maps, memory.owned, _all_reduce_sum)
    if written_before is not None:
        owned = owned | written_before
    return {"maps": maps, "owned": owned}


def _write_checkpoint(folder: Path, session, memory: dict | None, info: dict, with_generator: bool) -> None:
    from components.methods.translator import save_translator

    state = session.state_dict()
    if memory is not None:
        state["method"]["memory"] = memory
    torch.save(state, folder / STATE_FILE)
    if with_generator:
        save_translator(folder / GENERATOR_FILE, session)
    # final: the job's last epoch, with the exported generator.
    (folder / INFO_FILE).write_text(json.dumps({**info, "final": with_generator}, indent=2))


def _configure_worker_logging(rank: int) -> None:
    # Ray forwards a worker's stdout to the driver. One progress line per epoch, from rank 0:
    # the statistics are reduced over all workers, so the other ranks' lines would repeat it.
    package_logger = logging.getLogger("components")
    if not package_logger.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        package_logger.addHandler(handler)
        package_logger.propagate = False
    package_logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)


def train_worker(config: dict) -> None:
    """Ray Train's per-worker function: train the job's epochs, reporting (and checkpointing) each one."""
    import ray.train
    import ray.train.torch

    from components.data.loaders import make_loader
    from components.methods.atme import ATME
    from components.tracking import EpochLogger
    from components.training.loop import TrainingSession, run_epochs

    job: TrainingJob = config["job"]
    run: RunParams = job.train.run
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    _configure_worker_logging(rank)
    device = ray.train.torch.get_device()

    session = TrainingSession(job.model, job.train, job.dataset_size, device, wrap=_ddp_wrap, reduce=_all_reduce_sum)
    session.detector = AgreeingDetector(job.train.health, session.device)
    memory = session.method.memory if isinstance(session.method, ATME) else None
    record = job_record(job)
    written_before = None

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        saved_info, state = _load_state(checkpoint, session.device)
        changes = compare_records(saved_info["job"], record)
        if not changes:
            session.load_state_dict(state)
            if memory is not None:
                # `owned` means "written by this process since it started": the loaded entries
                # are the gathered ones, the same on every rank; the next gather must not re-count them.
                written_before = memory.owned.clone()
                memory.owned.zero_()
            if rank == 0:
                logger.info("resumed from %s at epoch %d, step %d", checkpoint.path, session.epoch, session.step)
        elif not saved_info["final"]:
            # An unfinished job whose params changed: refuse rather than silently throw away
            # (or silently continue) hours of training. Every rank sees the same, so all stop here.
            incompatible = json.dumps([change.__dict__ for change in changes])
            _end_early(config["outcome"], rank, {"incompatible": incompatible, "checkpoint": checkpoint.path})
            return
        elif rank == 0:
            # That job finished; with other params this is a new job (what `dvc repro` after a
            # params change means): train from scratch. Its checkpoints replace the old ones.
            logger.info("the finished run in %s had other params (%s): training a new model from scratch",
                        checkpoint.path, ", ".join(change.key for change in changes))

    loader = _ObservedLoader(
        make_loader(job.data_dir, "train", job.loader, job.train.batch_size, train=True,
                    rank=rank, world_size=world_size, seed=job.train.seed, device=session.device),
        rank, job.step_hook, session,
    )
    epoch_logger = None
    if rank == 0 and job.tracking_uri and job.mlflow_run_id:
        epoch_logger = EpochLogger(job.tracking_uri, job.mlflow_run_id, run.tracking.system_metrics,
                                   run.tracking.system_metrics_interval_s)
    epochs = job.train.epochs
    grid_every = run.tracking.sample_grid_every_epochs
    info = {"job": record, "method": job.model.method.name}

    def save_and_report(metrics: dict, final: bool) -> None:
        memory_state = _gathered_memory(memory, written_before)  # every rank takes part
        with tempfile.TemporaryDirectory(prefix="pairgan-checkpoint-") as folder:
            if rank == 0:
                epoch_info = {**info, "epoch": session.epoch, "step": session.step}
                _write_checkpoint(Path(folder), session, memory_state, epoch_info, with_generator=final)
            _report(metrics, folder if rank == 0 else None)

    def on_epoch_end(session, metrics: dict[str, float]) -> None:
        epoch = session.epoch
        metrics = {**metrics, "throughput/images_per_s_all_workers": metrics["throughput/images_per_s"] * world_size,
                   "epoch": epoch, "step": session.step}
        if epoch_logger is not None:
            epoch_logger.log_epoch(epoch, metrics)
            if (grid_every and epoch % grid_every == 0) or epoch == epochs:
                pairs = {key: value[: run.tracking.sample_grid_pairs] for key, value in loader.first_batch.items()}
                epoch_logger.log_sample_grid(epoch, pairs["source"], session.sample(pairs["source"]), pairs["target"])
        if _checkpoint_due(epoch, epochs, run.checkpoint.every_epochs):
            save_and_report(metrics, final=epoch >= epochs)
        else:
            _report(metrics)

    first_epoch = session.epoch
    try:
        run_epochs(session, loader, epochs, on_epoch_end)
    except TrainingDiverged as diverged:
        # Reported, not raised: a raise would make Ray retry the run from its last checkpoint.
        _end_early(config["outcome"], rank, {"diverged": 1, "divergence_reason": diverged.reason,
                                             "epoch": session.epoch, "step": session.step})
        return
    finally:
        if epoch_logger is not None:
            epoch_logger.close()
    if session.epoch == first_epoch:
        # Nothing to train (the checkpoint is already at `epochs` or past it): report the state
        # once more, with the exported generator, so the job ends with a final checkpoint.
        save_and_report({"epoch": session.epoch, "step": session.step}, final=True)


# ---------------------------------------------------------------------------------------
# The driver


def _use_gpu(setting: bool | Literal["auto"]) -> bool:
    import ray

    if setting == "auto":
        return ray.cluster_resources().get("GPU", 0) >= 1
    return setting


def run_training(job: TrainingJob, run: RunParams, storage_path: str) -> TrainingOutcome:
    """Fit the job on the connected Ray cluster (call `ray.init` first).

    storage_path: absolute local folder or s3://; with `run.name` it identifies the run, so a
    second call with the same pair resumes. Raises CheckpointIncompatible, or Ray's
    TrainingFailedError once `run.max_failures` restarts are used up.
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    scaling = run.scaling
    use_gpu = _use_gpu(scaling.use_gpu)
    resources = {"CPU": scaling.cpus_per_worker, **({"GPU": scaling.gpus_per_worker} if use_gpu else {})}
    box = ray.remote(num_cpus=0)(_OutcomeBox).remote()
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"job": job, "outcome": box},
        scaling_config=ScalingConfig(num_workers=scaling.num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=run.name,
            storage_path=storage_path,
            checkpoint_config=CheckpointConfig(num_to_keep=run.checkpoint.num_to_keep),
            failure_config=FailureConfig(max_failures=run.max_failures),
        ),
    )
    logger.info(
        "training %s on %d Ray worker(s) (%s), run %r in %s",
        job.model.method.name, scaling.num_workers, "GPU" if use_gpu else "CPU", run.name, storage_path,
    )
    try:
        result = trainer.fit()
        early = ray.get(box.get.remote())
    finally:
        ray.kill(box)
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
