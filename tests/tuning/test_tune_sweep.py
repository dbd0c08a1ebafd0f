"""`pairgan tune` end to end on local Ray: trials, ASHA, divergence, MLflow parent and child runs, resume.

The trials train the small built-in set at 32 px with a 1-worker Ray Train run each, two
trials at a time; a trial is forced to diverge by a health threshold that fires at its first
check. One sweep of three trials, run as a real process, is killed with SIGKILL while its third
trial trains, and the same command is run again: one story, as a user would meet it (ASHA is
tests/tuning/test_tune_asha.py).
"""

import csv
import json
import os
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
from support.process_trees import kill_every_process_marked, marked
from support.sweeps import PROJECT, sweep_runs, tune_args, write_project

pytestmark = pytest.mark.slow

FLOOR = "train.health.d_loss_floor"
EPOCHS = 6  # of the sweep story's trials


def test_the_trials_train_runs_and_the_compile_cache_live_under_the_sweeps_storage(mlflow_store, tmp_path, monkeypatch):
    """What the trials are handed (no Ray started: the sweep is stopped where it would begin)."""
    import ray

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_store)
    write_project(tmp_path, {"space": {FLOOR: {"choice": [0.001, 0.002]}}})
    plans = []

    class Planned(Exception):
        pass

    def capture(tune, plan, *rest):
        plans.append(plan)
        raise Planned

    monkeypatch.setattr(sweep, "run_sweep", capture)
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    with pytest.raises(Planned):
        pairgan(tune_args(tmp_path))

    (plan,) = plans
    storage = plan.train_storage.removesuffix(f"/{plan.sweep_id}/{TRAIN_RUNS}")
    assert storage == str(tmp_path / "sweeps")  # tune.yaml's run.storage_path
    assert plan.compile_cache == f"{storage}/compile-cache"  # shared by the trials and the next sweeps


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
    epochs = []
    for line in path.read_text().splitlines():
        try:
            epochs.append(json.loads(line)["epoch"])
        except (json.JSONDecodeError, KeyError):
            continue  # a line being written, or one without an epoch
    return epochs


def checkpointed_epoch(train_run: Path) -> int:
    """The epoch of the training run's latest checkpoint that Ray Train has registered (0: none)."""
    try:
        snapshot = json.loads((train_run / "checkpoint_manager_snapshot.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return 0
    return int(((snapshot.get("latest_checkpoint_result") or {}).get("metrics") or {}).get("epoch", 0))


def folder_names(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir()) if folder.exists() else []


def test_a_sweep_with_a_diverging_trial_killed_mid_trial_resumes_without_rerunning_ended_trials(mlflow_store, tmp_path):
    tracking_uri = mlflow_store
    environment = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri,
                   "PYTHONPATH": os.pathsep.join([str(PROJECT), os.environ.get("PYTHONPATH", "")]),
                   # Tune saves the sweep's state every 10 s or more by default, longer than the
                   # last trial may take here: every second, the kill below finds it mid-run.
                   "TUNE_GLOBAL_CHECKPOINT_S": "1"}
    # Two trials at a time, in the grid's order: a D loss below 1000 for one step is "D has won",
    # so the first trial diverges at its first check while the second trains; the third starts
    # in its place. 40 pairs and 6 epochs give the third time to be killed mid-run.
    write_project(tmp_path, {"search": {"algorithm": "grid", "seed": 0}, "num_samples": 1, "max_concurrent_trials": 2,
                             "trial": {"epochs": EPOCHS}, "scheduler": {"kind": "none"},
                             "fixed": {"train.health.check_interval": 1, "train.health.patience_steps": 1,
                                       "train.health.stop_on_perfect_d": False},
                             "space": {FLOOR: {"choice": [1000.0, 0.001, 0.002]}}}, train_pairs=40)
    command = [sys.executable, "-m", "pipelines.cli", *tune_args(tmp_path)]
    log = (tmp_path / "first.log").open("w")
    # Marked: the SIGKILL below reaches the driver and every process of the local Ray it started
    # (as a machine's crash would), nothing else.
    first_environment, tree = marked(environment)
    first = subprocess.Popen(command, cwd=tmp_path, env=first_environment, stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)
    ended, running = [], None
    deadline = time.monotonic() + 400
    try:
        while time.monotonic() < deadline and first.poll() is None:
            folders = list((tmp_path / "sweeps").glob("pairgan-tune-*"))
            states = experiment_state(folders[0]) if folders else {}
            done = [trial for trial, status in states.items() if status == "TERMINATED"]
            others = [trial for trial in states if trial not in done]
            # Killed once two trials are recorded as ended and the third has a registered
            # checkpoint before its last epoch and a result in the sweep's folder.
            if (len(done) == 2 and others
                    and 1 <= checkpointed_epoch(folders[0] / "train_runs" / others[0]) < EPOCHS
                    and reported_epochs(folders[0] / others[0])):
                ended, running = done, others[0]
                break
            time.sleep(0.05)
    finally:
        kill_every_process_marked(tree)
        first.wait(timeout=60)
        log.close()
    assert running is not None, "the sweep was not caught in its last trial:\n" + (tmp_path / "first.log").read_text()[-3000:]
    sweep_folder = folders[0]
    ended_results = {trial: (sweep_folder / trial / "result.json").read_bytes() for trial in ended}
    ended_checkpoints = {trial: folder_names(sweep_folder / "train_runs" / trial) for trial in ended}
    killed_at = checkpointed_epoch(sweep_folder / "train_runs" / running)
    assert 1 <= killed_at < EPOCHS

    second = subprocess.run(command, cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=600)

    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    # a console a person reads: the sweep's own lines, not Tune's configuration box or paths
    assert "resuming the sweep" in second.stdout + second.stderr
    assert "Configuration for experiment" not in second.stdout + second.stderr
    assert "tensorboard" not in (second.stdout + second.stderr).lower()
    # The ended trials, the finished and the diverged, were not run again: no new result, no new checkpoint.
    for trial in ended:
        assert (sweep_folder / trial / "result.json").read_bytes() == ended_results[trial]
        assert folder_names(sweep_folder / "train_runs" / trial) == ended_checkpoints[trial]
    # The interrupted one resumed its training run from its latest checkpoint (no epoch trained
    # twice before it) and finished; the sweep's record of it has every epoch.
    resumed_epochs = reported_epochs(sweep_folder / running)
    assert resumed_epochs[-1] == EPOCHS and min(resumed_epochs) > killed_at, resumed_epochs
    records = {record.trial_id: record for record in trial_records(str(sweep_folder))}
    history = sorted(merged_history(records[running].results))
    assert history[0] == 1 and history[-1] == EPOCHS, history

    # The sweep's files: each trial's outcome, the best of the finished ones with the fixed values.
    reports = tmp_path / "reports/tune"
    with (reports / "results.csv").open() as table:
        rows = {float(row[FLOOR]): row for row in csv.DictReader(table)}
    assert {floor: row["outcome"] for floor, row in rows.items()} == {0.001: "finished", 0.002: "finished", 1000.0: "diverged"}
    assert rows[0.002]["trial"] == running and {rows[0.001]["trial"], rows[1000.0]["trial"]} == set(ended)
    assert "discriminator loss stayed below 1000.0" in rows[1000.0]["reason"]
    assert rows[0.001]["epochs"] == str(EPOCHS) and float(rows[0.001]["val/psnr last"]) > 0
    summary = json.loads((reports / "summary.json").read_text())
    assert (summary["trials"], summary["finished"], summary["stopped"], summary["diverged"], summary["failed"],
            summary["unfinished"]) == (3, 2, 0, 1, 0, 0)
    best = yaml.safe_load((reports / "best_params.yaml").read_text())
    assert best["model.yaml"]["method.diffusion_gan.t_max"] == 50  # the fixed values are part of the result
    assert best["train.yaml"]["health.d_loss_floor"] in (0.001, 0.002)
    assert (reports / "metric_vs_params.png").read_bytes().startswith(b"\x89PNG")

    # One parent run for the sweep, used by both commands, with the sweep's files; a child per
    # trial, each closed, each epoch logged once in its own run (two trials ran side by side).
    client, parents, children = sweep_runs(tracking_uri)
    (parent,) = parents
    assert parent.info.status == "FINISHED" and parent.data.metrics["trials_diverged"] == 1
    assert {item.path for item in client.list_artifacts(parent.info.run_id)} >= {
        "results.csv", "metric_vs_params.png", "best_params.yaml", "summary.json"}
    assert len(children) == 3 and {child.data.tags[TAG_PARENT] for child in children} == {parent.info.run_id}
    by_floor = {float(child.data.params[FLOOR]): child for child in children}
    assert {floor: child.data.tags[TAG_SWEEP_TRIAL] for floor, child in by_floor.items()} == {
        floor: row["trial"] for floor, row in rows.items()}
    for floor in (0.001, 0.002):
        child = by_floor[floor]
        assert child.info.status == "FINISHED" and child.data.tags[TAG_OUTCOME] == "finished"
        assert child.data.params["model.method.diffusion_gan.t_max"] == "50"
        assert "sweep/score" in child.data.metrics
        steps = sorted(point.step for point in client.get_metric_history(child.info.run_id, "val/psnr"))
        assert steps == list(range(1, EPOCHS + 1)), (floor, steps)
    diverged = by_floor[1000.0]
    assert diverged.info.status == "FAILED" and diverged.data.tags[TAG_OUTCOME] == "diverged"
