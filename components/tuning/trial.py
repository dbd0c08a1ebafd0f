"""One trial of a sweep: a function Ray Tune runs, which trains one configuration with Ray Train.

The trial is only the driver of its training run: it validates its drawn values again (the
same schemas as the train stage), builds the `TrainingJob` and fits a `TorchTrainer` whose
workers do the work, with Tune's `TuneReportCallback` forwarding every epoch's report (with its
`val/...` scores) to Tune, where ASHA reads them. Each trial's training run keeps its
checkpoints under the sweep's folder, named by the trial id, so a trial interrupted with its
sweep resumes from its latest checkpoint when the sweep is resumed.

Divergence is an outcome, not an error: the workers report it (`diverged: 1` with the
reason) and return normally, so the trial ends without an exception and is never retried.
The workers log nothing to MLflow: the sweep's driver logs each trial's reports into its child
run (components/tuning/tracking.py), one process writing to the store. When ASHA stops the
trial, its workers end at the same step and the run shuts down cleanly
(components/tuning/stopping.py).
"""

import logging
from dataclasses import dataclass

from components.config.data import LoaderParams
from components.console import ConsoleOptions
from components.data.loaders import batches_per_epoch
from components.tuning.space import SweepSpace

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrialPlan:
    """What every trial needs besides its drawn values.

    Handed to the trials with `tune.with_parameters` (Ray's object store), never written into
    the sweep's saved state. Paths are absolute: Ray workers change directory.
    """

    space: SweepSpace
    loader: LoaderParams
    data_location: str  # an absolute path every node sees, or s3://bucket/prefix
    data_checksum: str
    dataset_size: int
    # Where each trial's training run keeps its checkpoints: <train_storage>/<trial id>/.
    train_storage: str
    # The sweep's id: its scheduler's stop requests are found by it.
    sweep_id: str
    # The compile caches' folder, shared by the trials and with later sweeps (used where
    # performance.compile_cache is on).
    compile_cache: str | None
    console: ConsoleOptions  # what the trials' workers print


def run_trial(config: dict, plan: TrialPlan) -> None:
    """Train the configuration Tune drew for this trial; raises (an errored trial) only on failure."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from components.training.driver import run_training
    from components.training.job import TrainingJob
    from components.tuning.stopping import StopCheck

    model, train = plan.space.resolve(config)
    trial_id = ray.tune.get_context().get_trial_id()
    # ASHA's stop reaches the workers through their step hook, checked at the detector's
    # cadence and at least once an epoch.
    steps_per_epoch = batches_per_epoch(plan.dataset_size, train.batch_size, True, 0, train.run.scaling.num_workers)
    stop_check = StopCheck(plan.sweep_id, trial_id, every=max(1, min(train.health.check_interval, steps_per_epoch)))
    job = TrainingJob(
        model=model, train=train, loader=plan.loader, data_location=plan.data_location,
        data_checksum=plan.data_checksum, dataset_size=plan.dataset_size, step_hook=stop_check, console=plan.console,
        compile_cache=plan.compile_cache,
    )
    run = train.run.model_copy(update={"name": trial_id})
    outcome = run_training(job, run, plan.train_storage, callbacks=[TuneReportCallback()])
    if outcome.status == "diverged":
        logger.warning("trial %s diverged at epoch %d: %s", trial_id, outcome.epoch, outcome.divergence_reason)
