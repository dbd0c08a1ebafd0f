"""`pairgan tune` end to end on local Ray: trials, ASHA, divergence, MLflow parent and child runs, resume.

The trials train the small built-in set at 32 px with a 1-worker Ray Train run each, two
trials at a time; a trial is forced to diverge by a health threshold that fires at its first
check. The resume test runs `pairgan tune` as a real process, kills it with SIGKILL while its
second trial trains, and runs the same command again.
"""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from components.tracking import TAG_OUTCOME
from components.tuning import sweep
from components.tuning.outcomes import merged_history
from components.tuning.sweep import TRAIN_RUNS, trial_records
from components.tuning.tracking import TAG_PARENT, TAG_SWEEP_TRIAL
from pipelines.cli import main as pairgan
from support.sweeps import PROJECT, sweep_runs, tune_args, write_project

pytestmark = pytest.mark.slow

FLOOR = "train.health.d_loss_floor"
EPOCHS = 6  # of the resume test's trials


@pytest.fixture(scope="module")
def ray_local():
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"MLFLOW_DISABLE_TELEMETRY": "true"}})
    yield
    ray.shutdown()


def test_a_sweep_of_three_trials_with_one_diverging(ray_local, tmp_path, monkeypatch):
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    # A D loss below 1000 for one step is "D has won": that trial diverges at its first check.
    write_project(tmp_path, {"search": {"algorithm": "grid", "seed": 0}, "num_samples": 1, "max_concurrent_trials": 2,
                             "fixed": {"train.health.check_interval": 1, "train.health.patience_steps": 1,
                                       "train.health.stop_on_perfect_d": False},
                             "space": {FLOOR: {"choice": [0.001, 0.002, 1000.0]}}})

    plans = []  # what the trials are handed
    run_sweep = sweep.run_sweep
    monkeypatch.setattr(sweep, "run_sweep", lambda tune, plan, *rest: plans.append(plan) or run_sweep(tune, plan, *rest))

    assert pairgan(tune_args(tmp_path)) == 0

    (plan,) = plans
    storage = plan.train_storage.removesuffix(f"/{plan.sweep_id}/{TRAIN_RUNS}")
    assert Path(storage).is_relative_to(tmp_path)
    assert plan.compile_cache == f"{storage}/compile-cache"  # shared by the trials and the next sweeps
    reports = tmp_path / "reports/tune"
    with (reports / "results.csv").open() as table:
        rows = {float(row[FLOOR]): row for row in csv.DictReader(table)}
    assert {floor: row["outcome"] for floor, row in rows.items()} == {0.001: "finished", 0.002: "finished", 1000.0: "diverged"}
    assert "discriminator loss stayed below 1000.0" in rows[1000.0]["reason"]
    assert rows[0.001]["epochs"] == "2" and float(rows[0.001]["val/psnr last"]) > 0
    summary = json.loads((reports / "summary.json").read_text())
    assert (summary["finished"], summary["stopped"], summary["diverged"], summary["failed"]) == (2, 0, 1, 0)
    best = yaml.safe_load((reports / "best_params.yaml").read_text())
    assert best["model.yaml"]["method.diffusion_gan.t_max"] == 50  # the fixed values are part of the result
    assert best["train.yaml"]["health.d_loss_floor"] in (0.001, 0.002)
    assert (reports / "metric_vs_params.png").read_bytes().startswith(b"\x89PNG")

    client, parents, children = sweep_runs(tracking_uri)
    (parent,) = parents
    assert parent.info.status == "FINISHED" and parent.data.metrics["trials_diverged"] == 1
    assert {item.path for item in client.list_artifacts(parent.info.run_id)} >= {
        "results.csv", "metric_vs_params.png", "best_params.yaml", "summary.json"}
    assert len(children) == 3 and {child.data.tags[TAG_PARENT] for child in children} == {parent.info.run_id}
    by_floor = {float(child.data.params[FLOOR]): child for child in children}
    for floor in (0.001, 0.002):
        child = by_floor[floor]
        assert child.info.status == "FINISHED" and child.data.tags[TAG_OUTCOME] == "finished"
        assert child.data.params["model.method.diffusion_gan.t_max"] == "50"
        # every epoch of both trials that ran side by side is in its own run
        history = client.get_metric_history(child.info.run_id, "val/psnr")
        assert sorted(point.step for point in history) == [1, 2]
        assert "sweep/score" in child.data.metrics
    diverged = by_floor[1000.0]
    assert diverged.info.status == "FAILED" and diverged.data.tags[TAG_OUTCOME] == "diverged"
    assert diverged.data.tags[TAG_SWEEP_TRIAL] == rows[1000.0]["trial"]


def experiment_state(folder: Path) -> dict[str, str]:
    """Trial id -> status, as Ray Tune last saved it in the sweep's folder."""
    states = sorted(folder.glob("experiment_state-*.json"))
    if not states:
        return {}
    try:
        trials = json.loads(states[-1].read_text())["trial_data"]
    except (json.JSONDecodeError, KeyError):
        return {}  # being written
    return {json.loads(entry[0])["trial_id"]: json.loads(entry[0])["status"] for entry in trials}


def reported_epochs(trial_folder: Path) -> list[int]:
    path = trial_folder / "result.json"
    if not path.exists():
        return []
    return [json.loads(line)["epoch"] for line in path.read_text().splitlines() if line.strip() and '"epoch"' in line]


def checkpointed_epoch(train_run: Path) -> int:
    """The epoch of the training run's latest checkpoint that Ray Train has registered (0: none)."""
    try:
        snapshot = json.loads((train_run / "checkpoint_manager_snapshot.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return 0
    return int(((snapshot.get("latest_checkpoint_result") or {}).get("metrics") or {}).get("epoch", 0))


def test_an_interrupted_sweep_resumes_without_rerunning_finished_trials(tmp_path):
    environment = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
                   "PYTHONPATH": os.pathsep.join([str(PROJECT), os.environ.get("PYTHONPATH", "")]),
                   # Tune saves the sweep's state every 10 s or more by default, longer than the
                   # second trial may take here: every second, the kill below finds it mid-run.
                   "TUNE_GLOBAL_CHECKPOINT_S": "1"}
    # One trial at a time; 40 pairs and 6 epochs give the second trial time to be killed mid-run.
    write_project(tmp_path, {"search": {"algorithm": "grid", "seed": 0}, "num_samples": 1, "max_concurrent_trials": 1,
                             "trial": {"epochs": EPOCHS}, "scheduler": {"kind": "none"},
                             "space": {FLOOR: {"choice": [0.001, 0.002]}}}, train_pairs=40)
    command = [sys.executable, "-m", "pipelines.cli", *tune_args(tmp_path)]
    log = (tmp_path / "first.log").open("w")
    # Its own process group: SIGKILL reaches the driver and the local Ray it started, nothing else.
    first = subprocess.Popen(command, cwd=tmp_path, env=environment, stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)
    finished, running = None, None
    deadline = time.monotonic() + 400
    try:
        while time.monotonic() < deadline and first.poll() is None:
            folders = list((tmp_path / "sweeps").glob("pairgan-tune-*"))
            states = experiment_state(folders[0]) if folders else {}
            done = [trial for trial, status in states.items() if status == "TERMINATED"]
            others = [trial for trial in states if trial not in done]
            # Killed once the first trial is recorded as finished and the second has a registered
            # checkpoint before its last epoch and a result in the sweep's folder.
            if (len(done) == 1 and others
                    and 1 <= checkpointed_epoch(folders[0] / "train_runs" / others[0]) < EPOCHS
                    and reported_epochs(folders[0] / others[0])):
                finished, running = done[0], others[0]
                break
            time.sleep(0.05)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=60)
        log.close()
    assert finished is not None, "the sweep was not caught between its trials:\n" + (tmp_path / "first.log").read_text()[-3000:]
    sweep = folders[0]
    finished_results = (sweep / finished / "result.json").read_bytes()
    finished_checkpoints = sorted(path.name for path in (sweep / "train_runs" / finished).iterdir())
    killed_at = checkpointed_epoch(sweep / "train_runs" / running)
    assert 1 <= killed_at < EPOCHS

    second = subprocess.run(command, cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=600)

    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    # a console a person reads: the sweep's own lines, not Tune's configuration box or paths
    assert "resuming the sweep" in second.stdout + second.stderr
    assert "Configuration for experiment" not in second.stdout + second.stderr
    assert "tensorboard" not in (second.stdout + second.stderr).lower()
    # The finished trial was not run again: no new result, no new checkpoint.
    assert (sweep / finished / "result.json").read_bytes() == finished_results
    assert sorted(path.name for path in (sweep / "train_runs" / finished).iterdir()) == finished_checkpoints
    # The interrupted one resumed its training run from its latest checkpoint (no epoch trained
    # twice before it) and finished; the sweep's record of it has every epoch.
    resumed_epochs = reported_epochs(sweep / running)
    assert resumed_epochs[-1] == EPOCHS and min(resumed_epochs) > killed_at, resumed_epochs
    records = {record.trial_id: record for record in trial_records(str(sweep))}
    history = sorted(merged_history(records[running].results))
    assert history[0] == 1 and history[-1] == EPOCHS, history
    summary = json.loads((tmp_path / "reports/tune/summary.json").read_text())
    assert (summary["trials"], summary["finished"], summary["unfinished"]) == (2, 2, 0)
    # One parent run for the sweep, used by both commands; both children closed, each epoch logged once.
    client, parents, children = sweep_runs(environment["MLFLOW_TRACKING_URI"])
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(child.data.tags[TAG_SWEEP_TRIAL] for child in children) == sorted([finished, running])
    assert {child.info.status for child in children} == {"FINISHED"}
    (resumed,) = [child for child in children if child.data.tags[TAG_SWEEP_TRIAL] == running]
    steps = sorted(point.step for point in client.get_metric_history(resumed.info.run_id, "val/psnr"))
    assert steps[0] == 1 and steps.count(1) == 1 and steps[-1] == EPOCHS, steps
