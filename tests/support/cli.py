"""`pairgan` run as a user runs it: a new Python process whose output is a pipe."""

import os
import subprocess
import sys
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[2]

# What a person must not see in `pairgan train`'s output (Ray's and MLflow's own lines).
LIBRARY_INTERNALS = [
    "TrainingReport(",  # Ray Train's echo of every ray.train.report
    "Checkpoint successfully created",
    "Failed to query Ray Train Controller",  # the placement group cleaner, without a dashboard
    "core_worker.cc",
    "Started a local Ray instance",
    "Requesting resources",
    "Setting up process group",
    "Wrapping provided model",
    "mlflow.system_metrics",
    "Creating initial MLflow database tables",
    "broadcast_buffers",
    "(RayTrainWorker pid=",
]


def run_pairgan_train(params: Path, data: Path, out: Path, extra_env: dict[str, str] | None = None,
                      ) -> subprocess.CompletedProcess:
    """`pairgan train` with the params folder `params` on the prepared set `data`, in the folder
    `out` (its generator.pt and train.json go there), with a local Ray and MLflow whatever the
    caller's environment names."""
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT), os.environ.get("PYTHONPATH")])), **(extra_env or {})}
    for name in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "MLFLOW_LOGGING_LEVEL", "RAY_DISABLE_WORKER_LOG_PREFIX"):
        env.pop(name, None)
    return subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "train", "--params-dir", str(params), "--data", str(data),
         "--model-out", str(out / "generator.pt"), "--report", str(out / "train.json")],
        cwd=out, env=env, capture_output=True, text=True, timeout=600,
    )
