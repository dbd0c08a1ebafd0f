"""What the stages take from the environment; components receive these values as arguments.

MLFLOW_TRACKING_URI: the tracking server or store (default: a SQLite file in the working dir).
RAY_ADDRESS: the Ray cluster to join (default: start a local Ray).
DVC_EXP_NAME: set by `dvc exp run` to the experiment's name; training runs are named after it.
PAIRGAN_DVC_REMOTE_URL: where `pairgan retrain` keeps its state (the DVC remote's URL), in place
of the one .dvc/config names.
PAIRGAN_START_WEIGHTS: a start-weights file (a path or s3://) that `pairgan train` starts the
networks from instead of random weights; set by `pairgan retrain` (start_from: champion).

`configure_process` sets what every `pairgan` command needs from MLflow, whatever the shell says:
MLflow prints no "View run ... at <tracking URI>" lines (the URI may hold a password), never
unpickles a model (a pickled artifact runs code when loaded; pairgan writes pt2 only), and
draws no per-file download bars. `ray_console` decides, before ray is imported, what of Ray's
output reaches the console of `pairgan train` and `pairgan tune`.
"""

import json
import os
from pathlib import Path

from components.console import ConsoleOptions
from components.tracking import default_tracking_uri


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(Path.cwd())


def ray_address() -> str:
    # "local" always starts a fresh local Ray (address=None would join any cluster a
    # `ray start` left on this machine); RAY_ADDRESS joins the cluster it names.
    return os.environ.get("RAY_ADDRESS") or "local"


# What a Ray worker on another node needs from this process's environment to reach the stores
# the job names. These go into the job's runtime_env, which Ray shows (job table, dashboard,
# logs), so nothing secret is among them; a worker on this machine would inherit them anyway.
WORKER_SETTINGS = (
    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION",  # the S3 store
    "AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_TRACKING_INSECURE_TLS",
    "MLFLOW_DISABLE_TELEMETRY", "MLFLOW_LOGGING_LEVEL",
)
# Set by `configure_process` for every pairgan process, workers included, whatever their node's environment says.
PROCESS_SETTINGS = {
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false",
}
DVC_REMOTE_URL = "PAIRGAN_DVC_REMOTE_URL"
START_WEIGHTS = "PAIRGAN_START_WEIGHTS"
# Ray Train's preemption watcher follows node drains, which a one-machine Ray never has: an
# actor process of its own per job, and Ray's core worker logs an error each time it is created.
LOCAL_RAY_WORKER_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}

# Set by Ray in the driver of a submitted job: the job's own runtime_env, which ray.init merges with ours.
_SUBMITTED_JOB_CONFIG = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def ray_runtime_env(extra: dict[str, str] | None = None) -> dict:
    """The runtime_env for `ray.init`: every worker's environment variables (nothing secret).

    WORKER_SETTINGS as this process has them, PROCESS_SETTINGS, then `extra`. Credentials never
    travel with the job (Ray shows a runtime_env in its job table, dashboard and logs): every
    node gets its own from where it runs (an instance profile, a pod's IAM role or Secret), and
    an endpoint with a user name or password in it is left out for that reason. A variable the
    submitted job's own runtime_env already sets is left to it: Ray refuses to merge two values
    of one variable.
    """
    from components.redaction import has_userinfo

    settings = {name: os.environ[name] for name in WORKER_SETTINGS
                if os.environ.get(name) and not has_userinfo(os.environ[name])}
    settings.update(PROCESS_SETTINGS)
    settings.update(extra or {})
    submitted = json.loads(os.environ.get(_SUBMITTED_JOB_CONFIG) or "{}").get("runtime_env") or {}
    for name in submitted.get("env_vars") or {}:
        settings.pop(name, None)
    return {"env_vars": settings}


def dvc_remote_url() -> str | None:
    return os.environ.get(DVC_REMOTE_URL) or None


def start_weights() -> str | None:
    return os.environ.get(START_WEIGHTS) or None


def configure_process() -> None:
    os.environ.update(PROCESS_SETTINGS)


def dvc_experiment_name() -> str | None:
    return os.environ.get("DVC_EXP_NAME") or None


def absolute_storage_path(storage: str) -> str:
    """`run.storage_path` as Ray must get it: workers change directory, so a local path is made absolute."""
    return storage if storage.startswith("s3://") else str(Path(storage).resolve())


def ray_console(console: ConsoleOptions, address: str) -> dict[str, str]:
    """Decide what of Ray's output reaches the console; call it before ray is imported.

    Unless --verbose, nothing of Ray's internals: only what our workers log (the epoch lines)
    and errors. Returns the environment variables the workers need for that.
    """
    if not console.interactive:
        # Ray colours the prefix of the lines it forwards from workers even into a file or pipe.
        os.environ["RAY_COLOR_PREFIX"] = "0"
    if console.verbose:
        return {}
    # Read when ray is imported: no "(RayTrainWorker pid=...)" before each epoch line.
    os.environ.setdefault("RAY_DISABLE_WORKER_LOG_PREFIX", "1")
    # Tune's newer console output prints its configuration box and result paths even at
    # verbose=0; its classic reporter at verbose=0 prints nothing (a sweep's own lines say
    # what happens). Read when a Tuner runs; `pairgan train` runs none.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # Read by the workers when they start: Ray's own loggers at ERROR (Train's placement group
    # cleaner warns every few seconds that the state API, served by the dashboard we do not
    # start, does not answer), MLflow's info lines off.
    workers = {"RAY_LOGGER_LEVEL": "error", "MLFLOW_LOGGING_LEVEL": os.environ.get("MLFLOW_LOGGING_LEVEL", "WARNING")}
    if address == "local":
        workers.update(LOCAL_RAY_WORKER_ENV)
    return workers
