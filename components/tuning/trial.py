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
run (components/tuning/tracking.py), one process writing to the store.
"""

import logging
from dataclasses import dataclass

from components.config.data import LoaderParams
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
    data_dir: str
    data_checksum: str
    dataset_size: int
    # Where each trial's training run keeps its checkpoints: <train_storage>/<trial id>/.
    train_storage: str


def run_trial(config: dict, plan: TrialPlan) -> None:
    """Train the configuration Tune drew for this trial; raises (an errored trial) only on failure."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from components.training.driver import run_training
    from components.training.job import TrainingJob

    model, train = plan.space.resolve(config)
    trial_id = ray.tune.get_context().get_trial_id()
    job = TrainingJob(
        model=model, train=train, loader=plan.loader, data_dir=plan.data_dir, data_checksum=plan.data_checksum,
        dataset_size=plan.dataset_size,
    )
    run = train.run.model_copy(update={"name": trial_id})
    outcome = run_training(job, run, plan.train_storage, callbacks=[TuneReportCallback()])
    if outcome.status == "diverged":
        logger.warning("trial %s diverged at epoch %d: %s", trial_id, outcome.epoch, outcome.divergence_reason)
