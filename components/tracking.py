"""MLflow tracking of a training job: one run per job, created by the driver, filled by worker rank 0.

The driver checks that the tracking store answers before anything is trained, creates the run
with the validated config as params and the provenance tags (data manifest checksum, git
commit), and closes it with the outcome. Worker rank 0 logs the per-epoch metrics, the sample
grids and (optionally) the system metrics of its own machine, where the GPU is: that is why
the worker, not the driver, owns the epoch logging. Other ranks never log.

Nothing here logs a credential: tracking URIs are shown with their user:password part removed,
and params come from the validated config models, which hold no secrets.
"""

import contextlib
import hashlib
import json
import logging
import os
import socket
import sqlite3
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import psutil

from components.config.flatten import flatten
from components.config.model import ATMEParams, DDGANParams, ModelParams, Pix2PixParams
from components.redaction import redact_text, redact_uri

if TYPE_CHECKING:
    import torch
    from mlflow import MlflowClient

logger = logging.getLogger(__name__)

TAG_MANIFEST_CHECKSUM = "pairgan.data_manifest_checksum"
TAG_GIT_COMMIT = "mlflow.source.git.commit"  # the tag MLflow's UI shows as the source version
TAG_OUTCOME = "pairgan.outcome"  # finished | diverged | failed
TAG_DIVERGED = "pairgan.diverged"
TAG_DIVERGENCE_REASON = "pairgan.divergence_reason"
TAG_FAILURE = "pairgan.failure"  # why a run ended FAILED, in words
TAG_PARAMS_HASH = "pairgan.params_hash"  # the same training params give the same hash
TAG_DVC_EXPERIMENT = "pairgan.dvc_experiment"  # the `dvc exp run` experiment that trained the model
# storage_path/run.name: the Ray run folder this MLflow run trains (it holds the checkpoints)
TAG_RUN_FOLDER = "pairgan.run_folder"
TAG_DRIVER = "pairgan.driver"  # host:pid of the `pairgan train` process, to tell a live run from a killed one

# MLflow caps a param value at 6000 characters; a flattened config value never comes close,
# but a long list (e.g. a T schedule) is cut rather than failing the whole job.
_PARAM_VALUE_LIMIT = 6000


class TrackingUnavailable(RuntimeError):
    """The MLflow tracking store cannot be used; raised before any training starts."""


def default_tracking_uri(working_dir: Path) -> str:
    """The embedded store used when MLFLOW_TRACKING_URI is not set: a SQLite file in the working dir."""
    return f"sqlite:///{Path(working_dir).resolve() / 'mlflow.db'}"


def _sqlite_file(uri: str) -> Path:
    # sqlite:////abs/path.db is absolute, sqlite:///rel.db is relative to the working dir.
    return (Path.cwd() / uri.removeprefix("sqlite:///")).resolve()


def _check_sqlite_location(uri: str) -> None:
    database = _sqlite_file(uri)
    folder = database.parent
    if not folder.is_dir():
        raise TrackingUnavailable(f"MLflow store {uri}: folder {folder} does not exist")
    if database.exists() and not database.is_file():
        raise TrackingUnavailable(f"MLflow store {uri}: {database} is not a file")


def _check_http_health(uri: str, timeout_s: float) -> None:
    # MLflow's own client retries a dead server with back-off for minutes; one short probe
    # of the server's /health endpoint answers "is anyone there" at once.
    health = uri.rstrip("/") + "/health"
    parts = urllib.parse.urlsplit(health)
    host = parts.hostname or ""
    request_url = urllib.parse.urlunsplit(
        (parts.scheme, f"{host}:{parts.port}" if parts.port else host, parts.path, "", "")
    )
    request = urllib.request.Request(request_url, method="GET")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            status = response.status
    except urllib.error.HTTPError as error:
        # An answer with an error status still proves the server is up (e.g. auth proxies
        # that guard /health); the real client call below checks access.
        status = error.code
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise TrackingUnavailable(
            f"MLflow tracking server {redact_uri(uri)} is not reachable ({reason}); start it, fix "
            "MLFLOW_TRACKING_URI, or unset MLFLOW_TRACKING_URI to use the local SQLite store"
        ) from None
    if status >= 500:
        raise TrackingUnavailable(f"MLflow tracking server {redact_uri(uri)} answered /health with HTTP {status}")


def check_tracking_reachable(uri: str, experiment: str, timeout_s: float = 5.0) -> None:
    """Fail fast, with the reason, when the tracking store cannot be written to.

    Run this before Ray starts: a job that trains for hours and then cannot log is worse than
    one that refuses to start.
    """
    scheme = urllib.parse.urlsplit(uri).scheme
    if scheme == "sqlite":
        _check_sqlite_location(uri)
    elif scheme in {"http", "https"}:
        _check_http_health(uri, timeout_s)
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        ensure_experiment(MlflowClient(tracking_uri=uri), uri, experiment)
    except MlflowException as error:
        raise TrackingUnavailable(f"MLflow store {redact_uri(uri)} cannot be used: {redact_text(error.message, uri)}") from None
    except OSError as error:
        raise TrackingUnavailable(f"MLflow store {redact_uri(uri)} cannot be used: {redact_text(str(error), uri)}") from None


def ensure_experiment(client: "MlflowClient", uri: str, experiment: str) -> str:
    """The experiment's id, creating it if needed.

    With a SQLite store MLflow's default artifact root is the relative path ./mlruns, which
    each process resolves against its own working directory, and Ray workers run elsewhere:
    the grids would land in a folder nobody looks in. Give the experiment an absolute
    artifact folder next to the database instead (a server decides its own).
    """
    existing = client.get_experiment_by_name(experiment)
    if existing is not None:
        location = existing.artifact_location
        if ":" not in location and not Path(location).is_absolute():
            logger.warning(
                "MLflow experiment %r stores artifacts under the relative path %r: each process "
                "resolves it against its own working directory, so sample grids logged by Ray "
                "workers may not appear in the UI; use a new experiment name (run.tracking.experiment)",
                experiment, location,
            )
        return existing.experiment_id
    location = None
    if urllib.parse.urlsplit(uri).scheme == "sqlite":
        location = (_sqlite_file(uri).parent / "mlartifacts").as_uri()
    from mlflow.exceptions import MlflowException

    try:
        return client.create_experiment(experiment, artifact_location=location)
    except MlflowException as error:
        # Two stages started at once on a new store (two registers, a sweep's trials): the
        # other one created it between the lookup above and this call.
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        created_meanwhile = client.get_experiment_by_name(experiment)
        if created_meanwhile is None:
            raise
        return created_meanwhile.experiment_id


def flatten_params(config: Mapping, prefix: str = "") -> dict[str, str]:
    """Nested config -> {"run.scaling.num_workers": "2", ...}, the form MLflow params take."""
    return {name: str(value)[:_PARAM_VALUE_LIMIT] for name, value in flatten(config, prefix).items()}


def git_commit(repo_dir: Path) -> str | None:
    """The checked-out commit of the repository holding `repo_dir`, or None outside git."""
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo_dir, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    commit = result.stdout.strip()
    return commit if result.returncode == 0 and commit else None


def start_job_run(
    uri: str, experiment: str, run_name: str, params: Mapping[str, str], tags: Mapping[str, str]
) -> str:
    """Create the job's run with its params and tags; returns the run id the workers log to."""
    from mlflow import MlflowClient
    from mlflow.entities import Param, RunTag

    client = MlflowClient(tracking_uri=uri)
    run = client.create_run(ensure_experiment(client, uri, experiment), run_name=run_name, tags=dict(tags))
    items = [Param(key, value) for key, value in params.items()]
    # log_batch accepts at most 100 params per call.
    for start in range(0, len(items), 100):
        client.log_batch(run.info.run_id, params=items[start : start + 100])
    if not items:
        client.log_batch(run.info.run_id, tags=[RunTag(TAG_OUTCOME, "running")])
    return run.info.run_id


def finish_job_run(
    uri: str, run_id: str, outcome: Literal["finished", "diverged", "failed"], tags: Mapping[str, str] | None = None
) -> None:
    """Close the run: FINISHED for a trained model, FAILED otherwise, with the outcome as a tag."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    for key, value in {TAG_OUTCOME: outcome, **(tags or {})}.items():
        client.set_tag(run_id, key, value)
    client.set_terminated(run_id, status="FINISHED" if outcome == "finished" else "FAILED")


def log_evaluation(
    uri: str, run_id: str, metrics: Mapping[str, float], artifacts: Sequence[Path] = (), timeout_s: float = 5.0
) -> None:
    """Log an evaluation to the run that trained the model: `metrics` as `eval/<name>`, `artifacts`
    (report files) under `evaluation/`. Raises TrackingUnavailable, with the reason, when the
    store does not answer, does not hold the run or refuses the writes.
    """
    from mlflow import MlflowClient
    from mlflow.entities import Metric
    from mlflow.exceptions import MlflowException

    if urllib.parse.urlsplit(uri).scheme in {"http", "https"}:
        _check_http_health(uri, timeout_s)
    client = MlflowClient(tracking_uri=uri)
    try:
        client.get_run(run_id)
    except MlflowException as error:
        raise TrackingUnavailable(
            f"MLflow run {run_id} is not in {redact_uri(uri)} ({redact_text(error.message, uri)})"
        ) from None
    now_ms = int(time.time() * 1000)
    # prefixed: the run already holds the per-epoch training curves under plain names
    items = [Metric(_metric_key(f"eval/{name}"), float(value), now_ms, 0) for name, value in metrics.items()]
    try:
        for start in range(0, len(items), 1000):
            client.log_batch(run_id, metrics=items[start : start + 1000])
        for path in artifacts:
            client.log_artifact(run_id, str(path), artifact_path="evaluation")
    except (MlflowException, OSError) as error:
        reason = redact_text(getattr(error, "message", None) or str(error), uri)
        raise TrackingUnavailable(f"logging to MLflow run {run_id} in {redact_uri(uri)} failed: {reason}") from None


def _metric_key(name: str) -> str:
    # MLflow accepts letters, digits, '_', '-', '.', ' ', ':' and '/' in metric names.
    return "".join(char if char.isalnum() or char in "_-. :/" else "_" for char in name)


class EpochLogger:
    """Worker rank 0's view of the job's run: per-epoch metrics, sample grids, system metrics."""

    def __init__(self, uri: str, run_id: str, system_metrics: bool, system_metrics_interval_s: int) -> None:
        from mlflow import MlflowClient

        self._client = MlflowClient(tracking_uri=uri)
        self._run_id = run_id
        self._monitor = None
        if system_metrics:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            # resume_logging continues the step count after a worker restart instead of
            # writing a second series from step 0 into the same run.
            self._monitor = SystemMetricsMonitor(
                run_id, sampling_interval=system_metrics_interval_s, resume_logging=True, tracking_uri=uri
            )
            self._monitor.start()

    def log_epoch(self, epoch: int, metrics: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        now_ms = int(time.time() * 1000)
        items = [Metric(_metric_key(name), float(value), now_ms, epoch) for name, value in metrics.items()]
        for start in range(0, len(items), 1000):
            self._client.log_batch(self._run_id, metrics=items[start : start + 1000])

    def log_sample_grid(self, epoch: int, source: "torch.Tensor", generated: "torch.Tensor", target: "torch.Tensor") -> None:
        from components.evaluation.grid import sample_grid  # torch: only the processes that draw grids import it

        grid = sample_grid(list(zip(source, generated, target, strict=True)))
        self._client.log_image(self._run_id, grid, artifact_file=f"samples/epoch_{epoch:04d}.png")

    def close(self) -> None:
        if self._monitor is not None:
            self._monitor.finish()
            self._monitor = None


def method_label(model: ModelParams) -> str:
    """The method as a run name shows it: pix2pix, atme-dg (with Diffusion-GAN), ddgan-cfg (with guidance)."""
    method = model.method
    if isinstance(method, Pix2PixParams | ATMEParams) and method.diffusion_gan is not None:
        return f"{method.name}-dg"
    if isinstance(method, DDGANParams) and method.guidance is not None:
        return f"{method.name}-cfg"
    return method.name


def params_hash(config: Mapping) -> str:
    """8 hex digits identifying a training config: runs with equal hashes trained with equal params."""
    canonical = json.dumps(flatten(config), sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:8]


def job_run_name(uri: str, experiment: str, base: str) -> str:
    """`base #n`, n counting the runs of the experiment named `base #...` (the n-th run of this
    method and experiment); e.g. "atme-dg fussy-bran #2" or "pix2pix 3f2a91c0 #1"."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    existing = client.get_experiment_by_name(experiment)
    if existing is None:
        return f"{base} #1"
    pattern = base.replace("'", "_").replace("%", "_") + " #%"  # _ matches any one character
    runs = client.search_runs([existing.experiment_id], filter_string=f"attributes.run_name LIKE '{pattern}'",
                              max_results=50000)
    return f"{base} #{len(runs) + 1}"


def driver_identity() -> str:
    """host:pid of this process, stored on the run (TAG_DRIVER)."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _driver_alive(identity: str, run_started_ms: int) -> bool:
    # Only a process on this host can be checked; one that started after the run did is a
    # reused pid, not the run's driver.
    host, _, pid = identity.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        process = psutil.Process(int(pid))
        return process.is_running() and process.create_time() <= run_started_ms / 1000 + 1
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


@dataclass(frozen=True)
class UnfinishedRuns:
    """Runs of one run folder that were still RUNNING when a new training of it started."""

    closed: list[str]  # run ids closed as FAILED: their training process is gone
    live: list[tuple[str, str]]  # (run id, host:pid) whose training process is still running


def close_interrupted_runs(uri: str, experiment: str, run_folder: str, started_by: str) -> UnfinishedRuns:
    """Close as FAILED the runs of `run_folder` that a killed training left RUNNING.

    A run whose `pairgan train` process still runs on this host is left alone and returned in
    `live` (two trainings of one folder would overwrite each other's checkpoints). A run started
    on another host cannot be checked and is taken as interrupted: one run folder is trained by
    one job at a time. The closed runs get TAG_OUTCOME "failed" and TAG_FAILURE saying why.
    """
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    existing = client.get_experiment_by_name(experiment)
    if existing is None:
        return UnfinishedRuns([], [])
    closed, live = [], []
    # Filtered on the tag here, not in the filter string: a path may hold quotes.
    for run in client.search_runs([existing.experiment_id], filter_string="attributes.status = 'RUNNING'",
                                  max_results=50000):
        if run.data.tags.get(TAG_RUN_FOLDER) != run_folder:
            continue
        driver = run.data.tags.get(TAG_DRIVER, "")
        if _driver_alive(driver, run.info.start_time):
            live.append((run.info.run_id, driver))
            continue
        reason = (f"interrupted: its training process ({driver or 'unknown'}) ended without closing the run "
                  f"(killed, or the machine stopped); closed when {started_by} started on the same run folder")
        client.set_tag(run.info.run_id, TAG_OUTCOME, "failed")
        client.set_tag(run.info.run_id, TAG_FAILURE, reason)
        client.set_terminated(run.info.run_id, status="FAILED")
        closed.append(run.info.run_id)
    return UnfinishedRuns(closed, live)


# system metrics are sampled on their own clock (their step is a sample count, not an epoch)
_SYSTEM_METRICS_PREFIX = "system/"


def epoch_history(uri: str, run_id: str) -> list[dict[str, float]]:
    """Every per-epoch metric the run logged, one row per epoch (the MLflow step), in epoch order.

    An epoch logged twice (a worker restarted from an earlier checkpoint and trained it again)
    keeps its later values. Raises MlflowException when the store or the run cannot be read.
    """
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    rows: dict[int, dict[str, float]] = {}
    for key in sorted(client.get_run(run_id).data.metrics):
        if key.startswith(_SYSTEM_METRICS_PREFIX):
            continue
        for point in sorted(client.get_metric_history(run_id, key), key=lambda point: point.timestamp):
            rows.setdefault(point.step, {})[key] = point.value
    return [{**values, "epoch": epoch} for epoch, values in sorted(rows.items())]


def require_existing_store(tracking_uri: str) -> None:
    """For readers of a store (predict): a SQLite store must already exist and be MLflow's.

    MLflow creates a SQLite database on first contact; to a reader a missing or foreign file
    means the wrong store (another working directory, a mistyped MLFLOW_TRACKING_URI), so it
    raises TrackingUnavailable instead of creating an empty store. Other stores are not checked.
    """
    if urllib.parse.urlsplit(tracking_uri).scheme != "sqlite":
        return
    database = _sqlite_file(tracking_uri)
    hint = "set MLFLOW_TRACKING_URI to the store that holds the model, or run where its mlflow.db is"
    if not database.is_file():
        raise TrackingUnavailable(f"MLflow store {redact_uri(tracking_uri)}: {database} does not exist; {hint}")
    try:
        # read-only: even a foreign file is left untouched
        with contextlib.closing(sqlite3.connect(f"{database.as_uri()}?mode=ro", uri=True)) as connection:
            tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.DatabaseError as error:
        raise TrackingUnavailable(
            f"MLflow store {redact_uri(tracking_uri)}: {database} is not a SQLite database ({error}); {hint}"
        ) from None
    if "registered_models" not in tables:
        raise TrackingUnavailable(f"MLflow store {redact_uri(tracking_uri)}: {database} is not an MLflow store; {hint}")
