"""Ray Train's per-worker function: one process per replica, G, D (and W) each under DDP.

    resume or start  -> the rank's loader -> per epoch: a train_step per batch, end_epoch
    (statistics reduced over all workers), the validation score and MLflow logging on rank 0, and every
    `checkpoint.every_epochs` and at the end a checkpoint (ATME's memory gathered from all
    ranks, rank 0 writes) with `ray.train.report`, a barrier every rank reaches.

Recovery: a worker that dies makes Ray restart the whole group (up to `max_failures`); the new
workers load `ray.train.get_checkpoint()` and continue with the epoch after it, so no epoch
before the checkpoint is trained twice. Divergence is caught here and reported, and the worker
returns normally, so Ray's FailureConfig never retries a diverged run. The detector's check
runs at the same step on every rank and first takes the maximum of its flags over all ranks
(`AgreeingDetector`), so every rank stops at the same point and the reports stay in step.

ATME's per-sample memory: each worker writes the entries of the samples it trains on (its
`owned` mask); at a checkpoint the memories of all ranks are gathered and merged, entry by
entry from the rank that owns it, so the checkpoint holds the complete memory and a resumed
run (with any number of workers) starts from it.
"""

import json
import logging
import sys
import tempfile
from pathlib import Path

import torch

from components.config.run import RunParams
from components.data.batch import Batch
from components.training.checkpoints import checkpoint_due, gathered_memory, load_checkpoint, write_checkpoint
from components.training.collectives import AgreeingDetector, all_reduce_sum
from components.training.compatibility import compare_records, job_record
from components.training.health import TrainingDiverged
from components.training.job import StepHook, TrainingJob
from components.training.outcome import StopRequested, end_early, report
from components.training.validation import EpochValidation

logger = logging.getLogger(__name__)


def ddp_wrap(module: torch.nn.Module) -> torch.nn.Module:
    from ray.train.torch import prepare_model

    # broadcast_buffers=False: D runs on the real and the fake batch before one backward;
    # re-broadcasting its buffers between those calls is the in-place error of BatchNorm under DDP.
    # Modules without trainable parameters (nothing to all-reduce) stay as they are.
    if not any(parameter.requires_grad for parameter in module.parameters()):
        return module
    return prepare_model(module, parallel_strategy_kwargs={"broadcast_buffers": False})


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


def configure_worker_logging(rank: int) -> None:
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
    """Train the job's epochs on this worker, reporting (and checkpointing) each one."""
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
    configure_worker_logging(rank)

    session = TrainingSession(job.model, job.train, job.dataset_size, ray.train.torch.get_device(),
                              wrap=ddp_wrap, reduce=all_reduce_sum)
    session.detector = AgreeingDetector(job.train.health, session.device)
    memory = session.method.memory if isinstance(session.method, ATME) else None
    record = job_record(job)
    written_before = None

    # Resume the same job, refuse an unfinished job with other params, or start over.
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        saved_info, state = load_checkpoint(checkpoint, session.device)
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
            # Every rank sees the same, so all stop here.
            incompatible = json.dumps([change.__dict__ for change in changes])
            end_early(config["outcome"], rank, {"incompatible": incompatible, "checkpoint": checkpoint.path})
            return
        elif rank == 0:
            logger.info("the finished run in %s had other params (%s): training a new model from scratch",
                        checkpoint.path, ", ".join(change.key for change in changes))

    loader = ObservedLoader(
        make_loader(job.data_dir, "train", job.loader, job.train.batch_size, train=True,
                    rank=rank, world_size=world_size, seed=job.train.seed, device=session.device),
        rank, job.step_hook, session,
    )
    # The validation subset is decoded once, by rank 0 only, which scores it alone: the other
    # ranks go on to the epoch's report (a barrier), so every rank still reports once per epoch.
    validation = None
    if rank == 0:
        validation = EpochValidation.from_split(job.train.validation, job.data_dir, job.loader,
                                                job.train.batch_size, session.device)
    epoch_logger = None
    if rank == 0 and job.tracking_uri and job.mlflow_run_id:
        epoch_logger = EpochLogger(job.tracking_uri, job.mlflow_run_id, run.tracking.system_metrics,
                                   run.tracking.system_metrics_interval_s)
    epochs = job.train.epochs
    grid_every = run.tracking.sample_grid_every_epochs
    info = {"job": record, "method": job.model.method.name}

    def save_and_report(metrics: dict, final: bool) -> None:
        memory_state = gathered_memory(memory, written_before)  # every rank takes part
        with tempfile.TemporaryDirectory(prefix="pairgan-checkpoint-") as folder:
            if rank == 0:
                epoch_info = {**info, "epoch": session.epoch, "step": session.step}
                write_checkpoint(Path(folder), session, memory_state, epoch_info, with_generator=final)
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
        if checkpoint_due(epoch, epochs, run.checkpoint.every_epochs):
            save_and_report(metrics, final=epoch >= epochs)
        else:
            report(metrics)

    first_epoch = session.epoch
    try:
        run_epochs(session, loader, epochs, on_epoch_end)
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
    finally:
        if epoch_logger is not None:
            epoch_logger.close()
    if session.epoch == first_epoch:
        # Nothing to train (the checkpoint is already at `epochs` or past it): report the state
        # once more, with the exported generator, so the job ends with a final checkpoint.
        save_and_report({"epoch": session.epoch, "step": session.step}, final=True)
