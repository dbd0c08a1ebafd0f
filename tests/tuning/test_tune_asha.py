"""ASHA on a Ray cluster (RAY_ADDRESS): a weak trial is stopped early and the next trial still gets the cluster.

The cluster is a one-CPU Ray head started by the test, so the trials run one at a time in the
order Tune creates them: lr_g 2e-4 (learns), 1e-9 (frozen: below the first at epoch 1, so ASHA
stops it), 1e-4. A stopped trial must give its CPU back: were it killed with its training run
still holding the CPU, the third trial would wait forever (the run has a timeout instead).
"""

import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from components.tracking import TAG_OUTCOME
from components.tuning.tracking import TAG_SWEEP_TRIAL
from support.sweeps import PROJECT, sweep_runs, tune_args, write_project

pytestmark = pytest.mark.slow

LR = "train.optimizer.lr_g"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def one_cpu_cluster():
    """A Ray head with one CPU and no dashboard, in its own process group (stopped by that group only).

    Ray 2.60's `ray start` turns on token authentication unless RAY_AUTH_MODE=disabled; a test
    cluster on 127.0.0.1 goes without, and so does the driver that joins it.
    """
    port = free_port()
    # Ray's socket paths live under its temp dir and must stay short (a Unix socket path has
    # about 100 characters): not under pytest's tmp_path.
    temp_dir = tempfile.mkdtemp(prefix="pairgan-ray-")
    head = subprocess.Popen(
        [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", f"--port={port}", "--num-cpus=1",
         "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp_dir}",
         f"--dashboard-agent-listen-port={free_port()}"],  # not Ray's fixed default, which another test's Ray may hold
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        # no draining on SIGTERM: nothing to hand over when the test is done
        env={**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"},
    )
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.5)
    try:
        yield address
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=30)
        shutil.rmtree(temp_dir, ignore_errors=True)


EPOCHS = 6


def test_asha_stops_a_weak_trial_on_the_cluster_and_frees_its_resources(mlflow_store, tmp_path, one_cpu_cluster):
    # 6 epochs of 12 steps: a stop asked for after epoch 1 reaches the workers well before the
    # end, also on a busy machine (with 3, a late stop could find the trial finished).
    write_project(tmp_path, {"search": {"algorithm": "grid", "seed": 0}, "num_samples": 1, "trial": {"epochs": EPOCHS},
                             "scheduler": {"kind": "asha", "grace_period": 1, "reduction_factor": 2.0},
                             "space": {LR: {"choice": [2.0e-4, 1.0e-9, 1.0e-4]}}}, train_pairs=24)
    environment = {**os.environ, "RAY_ADDRESS": one_cpu_cluster, "RAY_AUTH_MODE": "disabled",
                   "MLFLOW_TRACKING_URI": mlflow_store,
                   "PYTHONPATH": os.pathsep.join([str(PROJECT), os.environ.get("PYTHONPATH", "")])}

    result = subprocess.run([sys.executable, "-m", "pipelines.cli", *tune_args(tmp_path)], cwd=tmp_path,
                            env=environment, capture_output=True, text=True, timeout=480)

    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "at most 1 at once" in result.stdout + result.stderr  # the cluster's one CPU, one trial at a time
    with (tmp_path / "reports/tune/results.csv").open() as table:
        rows = {float(row[LR]): row for row in csv.DictReader(table)}
    assert rows[2.0e-4]["outcome"] == "finished" and rows[2.0e-4]["epochs"] == str(EPOCHS)
    assert rows[1.0e-9]["outcome"] == "stopped" and int(rows[1.0e-9]["epochs"]) < EPOCHS
    assert rows[1.0e-4]["outcome"] in ("finished", "stopped")  # it got the CPU after the stopped one
    summary = json.loads((tmp_path / "reports/tune/summary.json").read_text())
    assert summary["stopped"] >= 1 and summary["best"]["values"] == {LR: 2.0e-4}
    _, _, children = sweep_runs(environment["MLFLOW_TRACKING_URI"])
    (stopped,) = [child for child in children if child.data.tags[TAG_SWEEP_TRIAL] == rows[1.0e-9]["trial"]]
    assert stopped.info.status == "FINISHED" and stopped.data.tags[TAG_OUTCOME] == "stopped"
