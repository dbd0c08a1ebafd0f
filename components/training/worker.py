"""Ray Train's per-worker function: one process per replica, G, D (and W) each under DDP.

    resume or start  -> the rank's loader -> per epoch: a train_step per batch, end_epoch
    (statistics reduced over all workers), the validation score and MLflow logging on rank 0, and every
    `checkpoint.every_epochs` and at the end a checkpoint (the method's per-worker state
    gathered from all ranks, rank 0 writes) with `ray.train.report`, a barrier every rank reaches.

Recovery: a worker that dies makes Ray restart the whole group (up to `max_failures`); the new
workers load `ray.train.get_checkpoint()` and continue with the epoch after it, so no epoch
before the checkpoint is trained twice. Divergence is caught here and reported, and the worker
returns normally, so Ray's FailureConfig never retries a diverged run. The detector's check
runs at the same step on every rank and first takes the maximum of its flags over all ranks
(`AgreeingDetector`), so every rank stops at the same point and the reports stay in step.

Per-worker method state (ATME's memory: each worker writes the entries of the samples it
trains on): at a checkpoint every rank calls `session.state_dict(gather=True)`, which merges it
over the ranks (the method's hook), so the checkpoint holds all of it and a resumed run (with
any number of workers) starts from it.
"""

import json
import logging
import sys
import tempfile
import warnings
from pathlib import Path

import torch

from components.config.run import RunParams
from components.console import LOG_DATE_FORMAT, LOG_FORMAT, ConsoleOptions, ProgressBar, StepProgress
from components.data.batch import Batch
from components.training.checkpoints import checkpoint_due, load_checkpoint, write_checkpoint
from components.training.collectives import AgreeingDetector, all_reduce_sum
from components.training.compatibility import decide_resume, job_record
from components.training.compile_cache import session_compile_cache
from components.training.health import TrainingDiverged
from components.training.job import StepHook, TrainingJob
from components.training.outcome import (
    StopRequested,
    data_error_recorded,
    end_early,
    record_data_error,
    report,
    stop_on_data_error,
)
from components.training.validation import EpochValidation
from components.training.warm_start import load_start_weights, read_start_weights

logger = logging.getLogger(__name__)


# broadcast_buffers=False: D runs on the real and the fake batch before one backward;
# re-broadcasting its buffers between those calls is the in-place error of BatchNorm under DDP.
DDP_OPTIONS = {"broadcast_buffers": False}


def ddp_wrap(module: torch.nn.Module) -> torch.nn.Module:
    from ray.train.torch import prepare_model

    # Modules without trainable parameters (nothing to all-reduce) stay as they are.
    if not any(parameter.requires_grad for parameter in module.parameters()):
        return module
    return prepare_model(module, parallel_strategy_kwargs=DDP_OPTIONS)


class ObservedLoader:
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


def configure_worker_logging(rank: int, console: ConsoleOptions) -> None:
    # Ray forwards a worker's stdout to the driver. One progress line per epoch, from rank 0:
    # the statistics are reduced over all workers, so the other ranks' lines would repeat it.
    package_logger = logging.getLogger("components")
    if not package_logger.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter(LOG_FORMAT, LOG_DATE_FORMAT))
        package_logger.addHandler(handler)
        package_logger.propagate = False
    if rank != 0:
        package_logger.setLevel(logging.WARNING)
    else:
        package_logger.setLevel(logging.DEBUG if console.verbose else logging.INFO)
    if console.verbose:
        return
    # Ray Train gives the worker's root logger an INFO console handler: the libraries' info
    # lines would reach the driver's console. (MLflow sets its own level when it is imported,
    # from MLFLOW_LOGGING_LEVEL, which the driver passes to the workers.)
    logging.getLogger().setLevel(logging.WARNING)
    # ddp_wrap passes broadcast_buffers=False on purpose (its replacement still syncs buffers
    # at start-up); torch's deprecation notice is for developers, shown with --verbose.
    warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated", category=FutureWarning)


def _ray_progress_bar(description: str, total: int) -> ProgressBar:
    # Drawn by the driver, which owns the terminal: a worker's own stdout is a pipe.
    from ray.experimental import tqdm_ray

    return tqdm_ray.tqdm(desc=description, total=total, unit="step")


def train_worker(config: dict) -> None:
    """Train the job's epochs on this worker, reporting (and checkpointing) each one."""
    import ray.train
    import ray.train.torch

    from components.data.integrity import DataError
    from components.data.loaders import make_loader
    from components.tracking import EpochLogger
    from components.training.loop import TrainingSession, run_epochs

    job: TrainingJob = config["job"]
    run: RunParams = job.train.run
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    configure_worker_logging(rank, job.console)
    if data_error_recorded(config["outcome"]):
        report({"data_error": 1})  # an earlier attempt met a damaged shard: the same bytes again, so stop
        return

    session = TrainingSession(job.model, job.train, job.dataset_size, ray.train.torch.get_device(),
                              wrap=ddp_wrap, reduce=all_reduce_sum)
    session.detector = AgreeingDetector(job.train.health, session.device)
    # Before the first forward pass, which is where the blocks compile.
    compile_cache = session_compile_cache(job.compile_cache, session)
    if compile_cache is not None:
        compile_cache.load()
    record = job_record(job)

    # Resume the same job (a finished one only to raise its epochs), refuse an unfinished job
    # with other params, or start over (compatibility.py says which).
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        saved_info, state = load_checkpoint(checkpoint, session.device)
        decision = decide_resume(saved_info, record, job.train.epochs, checkpoint.path)
        if decision.action == "refuse":
            # Every rank sees the same, so all stop here.
            incompatible = json.dumps([change.__dict__ for change in decision.changes])
            end_early(config["outcome"], rank, {"incompatible": incompatible, "checkpoint": checkpoint.path})
            return
        if decision.action == "resume":
            session.load_state_dict(state)
        if rank == 0:
            logger.info("%s", decision.message)
    if job.start_weights is not None and session.step == 0:  # not resuming: start from the given networks
        load_start_weights(session, read_start_weights(job.start_weights))

    # Each worker reads its own share from where the job says the data is (a path every node
    # sees, or s3://), verified against the manifest the driver started from.
    try:
        rank_loader = make_loader(job.data_location, "train", job.loader, job.train.batch_size, train=True,
                                  rank=rank, world_size=world_size, seed=job.train.seed, device=session.device,
                                  expected_checksum=job.data_checksum)
        data_error = None
    except DataError as error:
        rank_loader, data_error = None, str(error)
    if stop_on_data_error(config["outcome"], data_error, session.device):
        return
    loader = ObservedLoader(rank_loader, rank, job.step_hook, session)
    # The validation subset is decoded once, by rank 0 only, which scores it alone: the other
    # ranks go on to the epoch's report (a barrier), so every rank still reports once per epoch.
    validation = None
    if rank == 0:
        validation = EpochValidation.from_split(job.train.validation, job.data_location, job.loader,
                                                job.train.batch_size, session.device, job.data_checksum)
    epoch_logger = None
    if rank == 0 and job.tracking_uri and job.mlflow_run_id:
        epoch_logger = EpochLogger(job.tracking_uri, job.mlflow_run_id, run.tracking.system_metrics,
                                   run.tracking.system_metrics_interval_s)
    epochs = job.train.epochs
    grid_every = run.tracking.sample_grid_every_epochs
    info = {"job": record, "method": job.model.method.name}

    def save_and_report(metrics: dict, final: bool) -> None:
        state = session.state_dict(gather=True)  # every rank takes part
        with tempfile.TemporaryDirectory(prefix="pairgan-checkpoint-") as folder:
            if rank == 0:
                epoch_info = {**info, "epoch": session.epoch, "step": session.step}
                write_checkpoint(Path(folder), session, state, epoch_info, with_generator=final)
            report(metrics, folder if rank == 0 else None)

    def on_epoch_end(session, metrics: dict[str, float]) -> None:
        epoch = session.epoch
        metrics = {**metrics, "throughput/images_per_s_all_workers": metrics["throughput/images_per_s"] * world_size,
                   "epoch": epoch, "step": session.step}
        if validation is not None and validation.due(epoch, epochs):
            metrics.update(validation.score(session, final=epoch >= epochs))
        if epoch_logger is not None:
            epoch_logger.log_epoch(epoch, metrics)
            if (grid_every and epoch % grid_every == 0) or epoch == epochs:
                pairs = {key: value[: run.tracking.sample_grid_pairs] for key, value in loader.first_batch.items()}
                epoch_logger.log_sample_grid(epoch, pairs["source"], session.sample(pairs["source"]), pairs["target"])
        if compile_cache is not None and rank == 0 and epoch >= epochs:
            compile_cache.save()  # once, when the training and validation shapes have compiled
        if checkpoint_due(epoch, epochs, run.checkpoint.every_epochs):
            save_and_report(metrics, final=epoch >= epochs)
        else:
            report(metrics)

    progress = None
    if rank == 0:
        progress = StepProgress(logging.getLogger("components.training.loop"), job.console.progress_interval_s,
                                bar=_ray_progress_bar if job.console.interactive else None)
    first_epoch = session.epoch
    try:
        run_epochs(session, loader, epochs, on_epoch_end, progress)
    except TrainingDiverged as diverged:
        # Reported, not raised: a raise would make Ray retry the run from its last checkpoint.
        end_early(config["outcome"], rank, {"diverged": 1, "divergence_reason": diverged.reason,
                                            "epoch": session.epoch, "step": session.step})
        return
    except StopRequested:
        # Every rank stops at the same step, after the same reports: nothing more to report.
        if rank == 0:
            logger.info("stopped early at epoch %d, step %d, as asked (a sweep's scheduler)", session.epoch, session.step)
        return
    except DataError as error:
        # Mid-epoch the other ranks may be waiting in a collective: record it, then fail; the
        # workers Ray restarts find it recorded and stop at once instead of training again.
        record_data_error(config["outcome"], str(error))
        raise
    finally:
        if epoch_logger is not None:
            epoch_logger.close()
    if session.epoch == first_epoch:
        # Nothing to train (the checkpoint is already at `epochs` or past it): report the state
        # once more, with the exported generator, so the job ends with a final checkpoint; with
        # its validation score, which the report that was lost (a killed sweep) carried.
        metrics = {"epoch": session.epoch, "step": session.step}
        if validation is not None:
            metrics.update(validation.score(session, final=True))
        save_and_report(metrics, final=True)
