"""MLflow for a sweep: one parent run, one child run per trial, all written by the sweep's driver.

The parent run (tag `pairgan.sweep` = the sweep's id) holds the sweep's params, and at the end
the results table, the plot, the best params and the outcome counts. Each trial's child run
(tags `mlflow.parentRunId`, `pairgan.sweep_trial`) holds the trial's complete params (the same
keys as a `pairgan train` run), every epoch's metrics (losses, health, `val/...`) as they are
reported, and at the end its outcome and scores.

Why the driver writes everything: the trials' reports reach the driver anyway (Ray Tune needs
them for ASHA), so a Tune callback logs them from one process. Many processes writing one
SQLite store can fail with "database is locked", and on a multi-node cluster a SQLite file on
the driver's machine cannot be reached by the workers at all. Trials stopped by ASHA are
killed, so their child runs are closed here too, from the final results.

Both the parent and the children are found again by their tags, so a resumed sweep continues
in the same runs. Ray Tune saves its callbacks in the sweep's folder (and uses that saved copy
when the sweep resumes): the tracking URI, which may carry credentials, is therefore a class
attribute set by `SweepTracker.connect` in the driver, never saved with an instance.
"""

import logging
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

from ray.tune import Callback

from components.config import ParamsError
from components.tracking import TAG_OUTCOME, EpochLogger, ensure_experiment, flatten_params
from components.tuning.outcomes import TrialSummary
from components.tuning.space import SweepSpace

logger = logging.getLogger(__name__)

TAG_SWEEP = "pairgan.sweep"  # parent: the sweep's id (its folder name)
TAG_SWEEP_TRIAL = "pairgan.sweep_trial"  # child: the Tune trial id
TAG_PARENT = "mlflow.parentRunId"  # MLflow's own parent/child link
TAG_REASON = "pairgan.outcome_reason"

# Keys Ray Tune adds to every result; the trial's own metrics are the rest.
_TUNE_KEYS = {
    "training_iteration", "time_this_iter_s", "time_total_s", "timestamp", "time_since_restore",
    "iterations_since_restore", "timesteps_total", "episodes_total", "timesteps_since_restore",
    "done", "pid", "node_ip", "hostname", "date", "trial_id", "experiment_tag", "warmup_time",
    "should_checkpoint", "checkpoint_dir_name", "epoch",
}


def _client():
    from mlflow import MlflowClient

    if SweepTracker.tracking_uri is None:
        raise RuntimeError("SweepTracker.connect(tracking_uri) was not called in this process")
    return MlflowClient(tracking_uri=SweepTracker.tracking_uri)


def _quote(value: str) -> str:
    return value.replace("'", "''")


def _find_parent(client, experiment_id: str, sweep_id: str):
    found = client.search_runs(
        [experiment_id], filter_string=f"tags.`{TAG_SWEEP}` = '{_quote(sweep_id)}'", max_results=1,
        order_by=["attributes.start_time DESC"],
    )
    return found[0] if found else None


def start_parent_run(experiment: str, sweep_id: str, params: Mapping[str, str], tags: Mapping[str, str]) -> str:
    """The sweep's parent run: the one tagged with this sweep id (a resumed sweep), else a new one."""
    from mlflow.entities import Param

    client = _client()
    experiment_id = ensure_experiment(client, SweepTracker.tracking_uri, experiment)
    found = _find_parent(client, experiment_id, sweep_id)
    if found:
        if found.info.status != "RUNNING":
            client.update_run(found.info.run_id, status="RUNNING")
        return found.info.run_id
    run = client.create_run(experiment_id, run_name=sweep_id, tags={**tags, TAG_SWEEP: sweep_id})
    items = [Param(key, value) for key, value in params.items()]
    for start in range(0, len(items), 100):
        client.log_batch(run.info.run_id, params=items[start : start + 100])
    return run.info.run_id


def _child_name(values: Mapping[str, Any], trial_id: str) -> str:
    shown = ", ".join(f"{key.rsplit('.', 1)[-1]}={value:.4g}" if isinstance(value, float) else f"{key.rsplit('.', 1)[-1]}={value}"
                      for key, value in values.items())
    return f"{trial_id} {shown}"[:250]


class SweepTracker(Callback):
    """Ray Tune callback in the sweep's driver: child runs, per-epoch metrics, a progress line per trial."""

    # The MLflow store of this process (see the module doc: never pickled with an instance).
    tracking_uri: ClassVar[str | None] = None

    @classmethod
    def connect(cls, tracking_uri: str) -> None:
        cls.tracking_uri = tracking_uri

    def __init__(self, experiment: str, sweep_id: str, space: SweepSpace, tags: Mapping[str, str], total: int):
        self.experiment = experiment
        self.sweep_id = sweep_id
        self.space = space
        self.tags = dict(tags)
        self.total = total
        self._parent: str | None = None
        self._runs: dict[str, str] = {}
        self._loggers: dict[str, EpochLogger] = {}
        self._started = time.monotonic()
        self._ended = 0

    def __getstate__(self) -> dict:
        # Ray Tune saves its callbacks with the sweep (and restores this copy when the sweep is
        # resumed): keep nothing bound to this process or to one tracking store.
        state = self.__dict__.copy()
        state.update(_parent=None, _runs={}, _loggers={}, _ended=0)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._started = time.monotonic()

    @property
    def parent_run_id(self) -> str:
        """The sweep's parent run (created by `start_parent_run` before the sweep), found by its tag."""
        if self._parent is None:
            client = _client()
            experiment = client.get_experiment_by_name(self.experiment)
            found = _find_parent(client, experiment.experiment_id, self.sweep_id) if experiment else None
            if found is None:
                raise RuntimeError(f"no MLflow run tagged {TAG_SWEEP}={self.sweep_id}: call start_parent_run first")
            self._parent = found.info.run_id
        return self._parent

    def child_run(self, trial_id: str, values: Mapping[str, Any]) -> str:
        return self.ensure_child_run(trial_id, values)[0]

    def ensure_child_run(self, trial_id: str, values: Mapping[str, Any]) -> tuple[str, bool]:
        """(the trial's child run id, whether it was created now), with the trial's complete params."""
        if trial_id in self._runs:
            return self._runs[trial_id], False
        from mlflow.entities import Param

        client = _client()
        parent = client.get_run(self.parent_run_id)
        found = client.search_runs(
            [parent.info.experiment_id],
            filter_string=f"tags.`{TAG_PARENT}` = '{self.parent_run_id}' and tags.`{TAG_SWEEP_TRIAL}` = '{_quote(trial_id)}'",
            max_results=1,
        )
        created = not found
        if found:
            run_id = found[0].info.run_id
        else:
            tags = {**self.tags, TAG_PARENT: self.parent_run_id, TAG_SWEEP_TRIAL: trial_id}
            run_id = client.create_run(parent.info.experiment_id, run_name=_child_name(values, trial_id), tags=tags).info.run_id
            try:
                model, train = self.space.resolve(values)
                params = flatten_params({"model": model.model_dump(mode="json"), "train": train.model_dump(mode="json")})
            except ParamsError:
                # The trial itself reports why it cannot train; record what was drawn.
                params = flatten_params(dict(values))
            items = [Param(key, value) for key, value in params.items()]
            for start in range(0, len(items), 100):
                client.log_batch(run_id, params=items[start : start + 100])
        self._runs[trial_id] = run_id
        return run_id, created

    def log_result(self, trial_id: str, values: Mapping[str, Any], result: Mapping[str, Any]) -> None:
        """One reported result into the trial's child run, at its epoch."""
        metrics = {
            key: float(value) for key, value in result.items()
            if key not in _TUNE_KEYS and not key.startswith("config/")  # Tune's copy of the drawn values
            and isinstance(value, int | float) and not isinstance(value, bool)
        }
        epoch = result.get("epoch", result.get("training_iteration", 0))
        if not metrics:
            return
        run_id = self.child_run(trial_id, values)
        if trial_id not in self._loggers:
            self._loggers[trial_id] = EpochLogger(self.tracking_uri, run_id, system_metrics=False, system_metrics_interval_s=1)
        self._loggers[trial_id].log_epoch(int(epoch), metrics)

    # --- Ray Tune's hooks ------------------------------------------------------------------

    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        self.child_run(trial.trial_id, trial.config)

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        self.log_result(trial.trial_id, trial.config, result)
        metric = self.space.tune.metric
        if metric in result:
            logger.info("trial %s epoch %s/%d: %s %.4f", trial.trial_id, result.get("epoch"),
                        self.space.tune.trial.epochs, metric, result[metric])

    def _ended_line(self, trial, how: str) -> None:
        self._ended += 1
        elapsed = time.monotonic() - self._started
        remaining = max(0, self.total - self._ended)
        eta = elapsed / self._ended * remaining
        logger.info("trial %s %s (%d/%d this session, %.0f s elapsed, ETA %.0f s)",
                    trial.trial_id, how, self._ended, self.total, elapsed, eta)

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        result = trial.last_result or {}
        if result.get("diverged"):
            self._ended_line(trial, f"diverged: {result.get('divergence_reason')}")
        else:
            self._ended_line(trial, f"ended after epoch {result.get('epoch')}")

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self._ended_line(trial, "failed (its error is in the results table)")


def finish_runs(
    tracker: SweepTracker, summaries: Sequence[TrialSummary],
    parent_metrics: Mapping[str, float], parent_tags: Mapping[str, str], artifacts: Mapping[str, bytes],
    finished: bool,
) -> None:
    """Close every child run with its outcome and scores (creating those a resumed sweep lacks,
    with their reported history), and give the parent the table, plot and best params."""
    from mlflow.entities import Metric, RunTag

    client = _client()
    now = int(time.time() * 1000)
    for summary in summaries:
        run_id, created = tracker.ensure_child_run(summary.trial_id, summary.record.values)
        if created:
            # A trial that ended before this tracking store saw it (e.g. MLFLOW_TRACKING_URI changed
            # between an interrupted sweep and its resumption): its reported history.
            for epoch, values in summary.history.items():
                tracker.log_result(summary.trial_id, summary.record.values, {**values, "epoch": epoch})
        final = {"sweep/epochs": summary.epochs}
        for name, value in (("last", summary.last), ("best", summary.best), ("best_epoch", summary.best_epoch),
                            ("guidance_weight", summary.guidance_weight), ("score", summary.score)):
            if value is not None:
                final[f"sweep/{name}"] = value
        client.log_batch(
            run_id,
            metrics=[Metric(key, float(value), now, summary.epochs) for key, value in final.items()],
            tags=[RunTag(TAG_OUTCOME, summary.outcome), RunTag(TAG_REASON, (summary.reason or "")[:5000])],
        )
        if summary.outcome != "unfinished":
            client.set_terminated(run_id, status="FINISHED" if summary.outcome in ("finished", "stopped") else "FAILED")
    parent = tracker.parent_run_id
    client.log_batch(
        parent,
        metrics=[Metric(key, float(value), now, 0) for key, value in parent_metrics.items()],
        tags=[RunTag(key, value) for key, value in parent_tags.items()],
    )
    with tempfile.TemporaryDirectory(prefix="pairgan-sweep-") as folder:
        for name, content in artifacts.items():
            (Path(folder) / name).write_bytes(content)
            client.log_artifact(parent, str(Path(folder) / name))
    if finished:
        client.set_terminated(parent, status="FINISHED")
