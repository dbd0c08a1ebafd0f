"""The Ray Tune side of a sweep: the Tuner, its search algorithm and scheduler, and resuming it.

A sweep lives in `<storage_path>/<sweep id>/`, where the id is the sweep's name and a
fingerprint of everything that decides its results (the search space and algorithm, the
scheduler, the trial budget, the base params, the loader and the data's checksum). Running the
same command again therefore finds the same folder: an interrupted sweep is restored
(`Tuner.restore`) and goes on where it stopped (finished trials are kept, not rerun; the trial
that was running resumes its training run from its latest checkpoint), and a finished one
returns its results at once. Changing anything that shapes the results starts a new sweep in
a new folder; the old one stays as it was.

Resources: each trial's own process only drives its training run, so it reserves no CPU
(a token share of the head node, where Ray's guide recommends running trial drivers); the
training workers reserve `trial.num_workers` x (`cpus_per_worker`, `gpus_per_worker`).
`max_concurrent_trials: auto` runs as many trials at once as the cluster's CPUs and GPUs hold.
"""

import hashlib
import json
import logging
import math
import time
from collections.abc import Sequence
from typing import Any

from components.config.data import LoaderParams
from components.config.tune import TuneParams, distribution_values
from components.tuning.outcomes import TrialRecord
from components.tuning.trial import TrialPlan, run_trial

logger = logging.getLogger(__name__)

# Each trial's driver: a token share of the head node instead of a CPU, so that the CPUs go to
# the training workers (with one CPU per trial driver, a 2-core machine runs one trial at a time).
TRIAL_DRIVER_RESOURCES = {"node:__internal_head__": 0.001}
# Folders inside the sweep's folder: the trials' training runs (one per trial id), and what
# interrupted trials had reported before the sweep was resumed.
TRAIN_RUNS = "train_runs"
RESUMED_HISTORY = "resumed_history"


class SearchUnavailable(RuntimeError):
    """The search algorithm's optional package is not installed."""


_OPTUNA_MISSING = "search.algorithm: optuna needs Optuna, an optional extra: pip install 'pairgan[optuna]'"


def fingerprint(tune: TuneParams, base_model: dict, base_train: dict, loader: LoaderParams, data_checksum: str) -> str:
    """8 hex digits that change with anything that changes the sweep's results.

    Left out: where and how fast it runs (run:, max_concurrent_trials, the trial's CPUs, GPUs
    and restarts) and the base train params' run: section (trials use the sweep's).
    """
    record = {
        "tune": tune.model_dump(mode="json", exclude={"max_concurrent_trials": True, "run": True,
                                                      "trial": {"use_gpu", "cpus_per_worker", "gpus_per_worker", "max_failures"}}),
        "model": base_model,
        "train": {key: value for key, value in base_train.items() if key != "run"},
        "loader": loader.model_dump(mode="json"),
        "data": data_checksum,
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()[:8]


def concurrency(tune: TuneParams, use_gpu: bool, cluster: dict[str, float]) -> int:
    """max_concurrent_trials, with `auto` = how many trials' workers the cluster holds at once."""
    if tune.max_concurrent_trials != "auto":
        return tune.max_concurrent_trials
    trial = tune.trial
    fits = [int(cluster.get("CPU", 0) // (trial.num_workers * trial.cpus_per_worker))]
    if use_gpu:
        fits.append(int(cluster.get("GPU", 0) // (trial.num_workers * trial.gpus_per_worker)))
        if fits[-1] == 0:
            # An autoscaling cluster's GPU nodes scaled to 0: the count never grows with them.
            logger.warning("max_concurrent_trials is auto and the cluster has no GPUs for a trial now: one trial at a "
                           "time. Where GPU nodes start on demand, set it to the number of trials to run at once")
    return max(1, min(fits))


def param_space(tune: TuneParams) -> dict[str, Any]:
    """The search space as Ray Tune distributions, keyed by the dotted params keys."""
    from ray import tune as ray_tune

    space = {}
    for key, distribution in tune.space.items():
        kind, arguments = distribution_values(distribution)
        if tune.search.algorithm == "grid":
            space[key] = ray_tune.grid_search(arguments)
        elif kind == "choice":
            space[key] = ray_tune.choice(arguments)
        elif kind == "uniform":
            space[key] = ray_tune.uniform(*arguments)
        elif kind == "loguniform":
            space[key] = ray_tune.loguniform(*arguments)
        else:  # int_range, both ends included; Ray's randint excludes the upper one
            space[key] = ray_tune.randint(arguments[0], arguments[1] + 1)
    return space


def trial_count(tune: TuneParams) -> int:
    if tune.search.algorithm == "grid":
        return tune.num_samples * math.prod(len(d.choice) for d in tune.space.values())
    return tune.num_samples


def search_algorithm(tune: TuneParams, max_concurrent: int):
    """Ray Tune's search algorithm for `search.algorithm`, running at most `max_concurrent` trials at once.

    The limit goes into the algorithm itself: Tune ignores TuneConfig's max_concurrent_trials
    (with a warning) when it is handed a ready-made random/grid generator. Optuna is imported
    only when asked for.
    """
    if tune.search.algorithm == "optuna":
        check_search_available(tune)
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        return ConcurrencyLimiter(OptunaSearch(seed=tune.search.seed), max_concurrent=max_concurrent)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(random_state=tune.search.seed, max_concurrent=max_concurrent)


def check_search_available(tune: TuneParams) -> None:
    """Raise SearchUnavailable before anything starts (and before Ray is imported) when the
    search algorithm's package is missing."""
    if tune.search.algorithm == "optuna":
        try:
            import optuna  # noqa: F401
        except ImportError:
            raise SearchUnavailable(_OPTUNA_MISSING) from None


def trial_name(trial) -> str:
    """Trials and their folders are named by their id (the default folder name lists every value)."""
    return trial.trial_id


def scheduler(tune: TuneParams, sweep_id: str):
    """ASHA on the validation metric, stopping trials by request (components/tuning/stopping.py)."""
    from ray.tune.schedulers import FIFOScheduler

    from components.tuning.stopping import GracefulASHA

    if tune.scheduler.kind == "none":
        return FIFOScheduler()
    # time_attr epoch, not Tune's iteration count: a trial resumed from a checkpoint goes on
    # counting its epochs. stop_last_trials=False: a trial reaching max_t ends by itself,
    # after its last report, instead of being stopped while it writes its last checkpoint.
    return GracefulASHA(
        sweep_id, time_attr="epoch", max_t=tune.trial.epochs, grace_period=tune.scheduler.grace_period,
        reduction_factor=tune.scheduler.reduction_factor, brackets=1, stop_last_trials=False,
    )


def run_sweep(
    tune: TuneParams, plan: TrialPlan, storage_path: str, sweep_id: str, callbacks: Sequence, max_concurrent: int,
) -> str:
    """Run (or resume) the sweep to its end; returns the experiment's path for `trial_records`."""
    import ray.tune

    from components.tuning.stopping import start_stop_requests

    experiment_path = f"{storage_path.rstrip('/')}/{sweep_id}"
    stop_requests = start_stop_requests(sweep_id)  # referenced until the sweep ends
    trainable = ray.tune.with_resources(ray.tune.with_parameters(run_trial, plan=plan), TRIAL_DRIVER_RESOURCES)
    if ray.tune.Tuner.can_restore(experiment_path):
        logger.info("resuming the sweep in %s (finished trials are kept)", experiment_path)
        _archive_unfinished_results(experiment_path)
        # Errored trials stay failed: a trial is retried only by its own training run's restarts.
        tuner = ray.tune.Tuner.restore(experiment_path, trainable, resume_unfinished=True, resume_errored=False)
    else:
        logger.info("sweep %s: %d trial(s), at most %d at once, in %s", sweep_id, trial_count(tune), max_concurrent,
                    experiment_path)
        tuner = ray.tune.Tuner(
            trainable,
            param_space=param_space(tune),
            tune_config=ray.tune.TuneConfig(
                metric=tune.metric, mode=tune.mode, num_samples=tune.num_samples,
                search_alg=search_algorithm(tune, max_concurrent), scheduler=scheduler(tune, sweep_id),
                trial_name_creator=trial_name, trial_dirname_creator=trial_name,
            ),
            run_config=ray.tune.RunConfig(
                name=sweep_id, storage_path=storage_path, callbacks=list(callbacks),
                failure_config=ray.tune.FailureConfig(max_failures=0), verbose=0,
            ),
        )
    tuner.fit()
    ray.kill(stop_requests)
    return experiment_path


def _filesystem(experiment_path: str):
    import pyarrow.fs

    return pyarrow.fs.FileSystem.from_uri(experiment_path)


def _archive_unfinished_results(experiment_path: str) -> None:
    # Tune restarts an interrupted trial with an empty results file (its training run resumes
    # from its checkpoint, but Tune's record of the epochs before starts over): keep what the
    # unfinished trials had reported, one file per resumption, read back by `trial_records`.
    unfinished = {record.trial_id: record.results for record in _tune_records(experiment_path)
                  if record.status not in ("TERMINATED", "ERROR") and record.results}
    if not unfinished:
        return
    filesystem, root = _filesystem(experiment_path)
    filesystem.create_dir(f"{root}/{RESUMED_HISTORY}", recursive=True)
    name = f"{root}/{RESUMED_HISTORY}/{time.strftime('%Y%m%dT%H%M%S')}-{time.monotonic_ns()}.json"
    with filesystem.open_output_stream(name) as stream:
        stream.write(json.dumps(unfinished, default=str).encode())


def _archived_results(experiment_path: str) -> dict[str, list[dict]]:
    import pyarrow.fs

    filesystem, root = _filesystem(experiment_path)
    selector = pyarrow.fs.FileSelector(f"{root}/{RESUMED_HISTORY}", allow_not_found=True)
    archived: dict[str, list[dict]] = {}
    for info in sorted(filesystem.get_file_info(selector), key=lambda info: info.path):
        with filesystem.open_input_stream(info.path) as stream:
            for trial_id, results in json.loads(stream.read()).items():
                archived.setdefault(trial_id, []).extend(results)
    return archived


def _creation_order(trial) -> tuple[int, str]:
    # Tune numbers its trials in the order it creates them at the start of their experiment tag
    # ("3_lr_g=0.0001"); Optuna's trial ids are random.
    number = str(trial.experiment_tag).split("_", 1)[0]
    return (int(number) if number.isdigit() else 1 << 30, trial.trial_id)


def _tune_records(experiment_path: str) -> list[TrialRecord]:
    from ray.tune import ExperimentAnalysis

    analysis = ExperimentAnalysis(experiment_path)
    frames = analysis.trial_dataframes
    records = []
    for trial in sorted(analysis.trials, key=_creation_order):
        frame = frames.get(trial.trial_id)
        results = [] if frame is None else frame.to_dict(orient="records")
        error = None
        if trial.status == "ERROR":
            exception = trial.get_pickled_error() or trial.get_error()
            error = str(exception).strip().splitlines()[-1] if exception else "the trial failed"
        records.append(TrialRecord(trial.trial_id, dict(trial.config), trial.status, results, error))
    return records


def trial_records(experiment_path: str) -> list[TrialRecord]:
    """Every trial of the sweep, in the order Tune created them, with all it reported (across resumptions)."""
    archived = _archived_results(experiment_path)
    return [
        TrialRecord(record.trial_id, record.values, record.status, archived.get(record.trial_id, []) + record.results,
                    record.error)
        for record in _tune_records(experiment_path)
    ]
