"""What the stages take from the environment; components receive these values as arguments.

MLFLOW_TRACKING_URI: the tracking server or store (default: a SQLite file in the working dir).
RAY_ADDRESS: the Ray cluster to join (default: start a local Ray).
DVC_EXP_NAME: set by `dvc exp run` to the experiment's name; training runs are named after it.

`configure_process` sets what every `pairgan` command needs from MLflow, whatever the shell says:
MLflow prints no "View run ... at <tracking URI>" lines (the URI may hold a password), never
unpickles a model (a pickled artifact runs code when loaded; pairgan writes pt2 only), and
draws no per-file download bars.
"""

import os
from pathlib import Path

from components.registry.loading import forbid_pickle_deserialization
from components.tracking import default_tracking_uri


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(Path.cwd())


def ray_address() -> str:
    # "local" always starts a fresh local Ray (address=None would join any cluster a
    # `ray start` left on this machine); RAY_ADDRESS joins the cluster it names.
    return os.environ.get("RAY_ADDRESS") or "local"


def configure_process() -> None:
    os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    forbid_pickle_deserialization()


def dvc_experiment_name() -> str | None:
    return os.environ.get("DVC_EXP_NAME") or None
