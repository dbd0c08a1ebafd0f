"""`pairgan retrain` as a scheduler runs it: real processes in a git checkout of the project, with its
DVC remote (the shipped .dvc/config: a folder beside the checkout) and a shared MLflow store.

In order, on one project (each test continues from the state the previous one left):
the first retrain trains and registers a champion and stores the state; a second one finds
nothing new and runs nothing; with new pairs in the source, a second invocation started while
one runs is refused at once, and the running one is killed as the register stage starts,
leaving the champion where it was; the next retrain completes, starting from the champion's
weights; a fresh clone of the project finds nothing to do.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from mlflow import MlflowClient
from PIL import Image

from support.images import pair_halves, pair_seed
from support.params import write_shipped

pytestmark = pytest.mark.slow

PROJECT = Path(__file__).resolve().parents[2]
PROJECT_FILES = ["dvc.yaml", ".dvcignore", ".dvc/config", ".dvc/.gitignore", ".dvc/plots", "components", "pipelines"]
MODEL_NAME = "pairgan-generator"


def write_pairs(root: Path, counts: dict[str, int], first: int = 0) -> None:
    """pix2pix layout: root/<split>/NNNN.png, source left, target right, 32 px halves."""
    for split, count in counts.items():
        (root / split).mkdir(parents=True, exist_ok=True)
        for number in range(first, first + count):
            source, target = pair_halves(pair_seed(split, number), 32)
            Image.fromarray(np.concatenate([source, target], axis=1)).save(root / split / f"{number:04d}.png")


def copy_project(destination: Path) -> None:
    for name in PROJECT_FILES:
        source = PROJECT / name
        if source.is_dir():
            shutil.copytree(source, destination / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)


def git(folder: Path, *arguments: str) -> None:
    subprocess.run(["git", "-c", "user.name=test", "-c", "user.email=test@example.com", *arguments], cwd=folder,
                   check=True, capture_output=True)


def write_params(folder: Path, source: Path) -> None:
    write_shipped(folder, "data", source={"kind": "pix2pix", "path": str(source), "direction": "AtoB",
                                          "builtin": {"train_pairs": 2, "val_pairs": 1, "test_pairs": 1}},
                  image_size=32, shard_max_count=4, mode="append", val_fraction=0.0,
                  loader={"backend": "torch", "load_scale": 1.125, "num_threads": 1})
    write_shipped(folder, "model", method={"generator": {"ngf": 8, "max_multiplier": 2},
                                           "discriminator": {"ndf": 8, "n_layers": 2}})
    write_shipped(folder, "train", epochs=1, batch_size=2,
                  run={"name": "retrain", "scaling": {"num_workers": 1, "use_gpu": False},
                       "tracking": {"experiment": "retrain", "sample_grid_every_epochs": 0, "system_metrics": False}})
    write_shipped(folder, "evaluate", batch_size=4, latency={"warmup": 0, "repeats": 1})
    write_shipped(folder, "register", bootstrap_resamples=100)
    write_shipped(folder, "retrain", start_from="champion")


class Project:
    def __init__(self, root: Path):
        self.root = root
        self.checkout = root / "project"
        self.source = root / "source"
        self.store = root / "pairgan-store"  # the shipped .dvc/config: ../../pairgan-store from .dvc/
        self.tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
        self.environment = {
            **os.environ,
            "MLFLOW_TRACKING_URI": self.tracking_uri,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT), os.environ.get("PYTHONPATH")])),
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]),  # `pairgan` for DVC
        }

    def command(self) -> list[str]:
        return [sys.executable, "-m", "pipelines.cli", "retrain"]

    def retrain(self, checkout: Path | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(), cwd=checkout or self.checkout, env=self.environment,
                              capture_output=True, text=True, timeout=900)

    def summary(self, checkout: Path | None = None) -> dict:
        return json.loads(((checkout or self.checkout) / "reports/retrain.json").read_text())

    def champion(self) -> str | None:
        client = MlflowClient(tracking_uri=self.tracking_uri)
        try:
            return str(client.get_model_version_by_alias(MODEL_NAME, "champion").version)
        except Exception:
            return None

    def versions(self) -> list[str]:
        client = MlflowClient(tracking_uri=self.tracking_uri)
        return sorted(str(version.version) for version in client.search_model_versions(f"name='{MODEL_NAME}'"))


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Project:
    created = Project(tmp_path_factory.mktemp("retrain"))
    write_pairs(created.source, {"train": 6, "test": 4})
    created.checkout.mkdir()
    copy_project(created.checkout)
    write_params(created.checkout / "params", created.source)
    git(created.checkout, "init", "-q")
    git(created.checkout, "add", "-A")
    git(created.checkout, "commit", "-q", "-m", "the project")
    return created


def output_of(done: subprocess.CompletedProcess) -> str:
    return (done.stdout + done.stderr)[-5000:]


def test_the_first_retrain_trains_registers_and_stores_the_state(project):
    done = project.retrain()
    assert done.returncode == 0, output_of(done)
    summary = project.summary()
    assert summary["outcome"] == "done" and summary["state_before"] is None
    assert summary["source"]["new_pairs"] == {"test": 4, "train": 6}
    assert {"prepare", "train", "evaluate", "register"} <= set(summary["stages_run"])
    assert summary["gate"]["decision"] == "first_champion" and project.champion() == "1"
    assert summary["start_from"] == {"requested": "champion", "used": "scratch",
                                     "reason": f"{MODEL_NAME} has no champion yet"}
    assert summary["versions"]["git_commit"] and summary["versions"]["dvc"]
    # the state, under the DVC remote: the commit point, dvc.lock and reports, the champion's weights
    current = json.loads((project.store / "pairgan-state/current.json").read_text())
    assert current["run"] == summary["state_after"]
    assert (project.store / f"pairgan-state/runs/{current['run']}/dvc.lock").is_file()
    assert "reports/register.json" in current["files"]
    assert (project.store / f"pairgan-state/champions/{MODEL_NAME}/v1.pt").is_file()
    assert (project.store / "files/md5").is_dir()  # dvc push
    # the training run carries the summary
    run = MlflowClient(tracking_uri=project.tracking_uri).get_run(summary["mlflow_run_id"])
    assert run.data.tags["pairgan.retrain.outcome"] == "done"
    assert run.data.tags["pairgan.retrain.decision"] == "first_champion"


def test_nothing_new_runs_nothing(project):
    lock_before = (project.checkout / "dvc.lock").read_text()
    done = project.retrain()
    assert done.returncode == 0, output_of(done)
    summary = project.summary()
    assert summary["outcome"] == "nothing_new" and summary["stages_run"] == []
    assert summary["source"]["new_pairs_total"] == 0 and summary["stale_stages"] == []
    assert summary["source"]["files_read"] == 0  # the fingerprints of the first retrain spared the reading
    assert "nothing new" in done.stderr and "Running stage" not in done.stdout + done.stderr
    assert (project.checkout / "dvc.lock").read_text() == lock_before
    assert project.versions() == ["1"]


def wait_for(check, what: str, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def stage_running(process: subprocess.Popen, stage: str) -> bool:
    try:
        children = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return False
    for child in children:
        try:
            if f"pairgan {stage}" in " ".join(child.cmdline()):
                return True
        except psutil.Error:
            continue
    return False


def test_a_second_retrain_is_refused_and_one_killed_at_register_leaves_the_champion(project):
    write_pairs(project.source, {"train": 3}, first=6)  # three new training pairs
    stored = (project.store / "pairgan-state/current.json").read_text()
    running = subprocess.Popen(project.command(), cwd=project.checkout, env=project.environment,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(lambda: (project.store / ".pairgan-state.lock").exists() or running.poll() is not None,
                 "the first retrain to take the lock", timeout_s=120)
        started = time.monotonic()
        refused = project.retrain()
        assert refused.returncode == 1, output_of(refused)
        assert time.monotonic() - started < 60  # at once, not after the running one
        assert "another retrain is running" in refused.stderr and "(pairgan retrain)" in refused.stderr
        assert f"pid {running.pid}" in refused.stderr  # names the holder

        wait_for(lambda: stage_running(running, "register") or running.poll() is not None, "the register stage")
        assert running.poll() is None, "the retrain ended before its register stage"
        os.killpg(running.pid, signal.SIGKILL)  # the scheduler's node goes away
    finally:
        if running.poll() is None:
            os.killpg(running.pid, signal.SIGKILL)
        running.wait()
    assert project.champion() == "1" and project.versions() == ["1"]
    assert (project.store / "pairgan-state/current.json").read_text() == stored  # the state is the one before


def test_the_next_retrain_completes_from_the_champions_weights(project):
    done = project.retrain()
    assert done.returncode == 0, output_of(done)
    summary = project.summary()
    assert summary["outcome"] == "done"
    assert summary["source"]["new_pairs"] == {"train": 3} and summary["new_pairs_added"] == 3
    assert summary["start_from"]["used"] == "champion" and summary["start_from"]["champion_version"] == "1"
    assert summary["champion_before"] == "1"
    assert summary["gate"]["version"] == 2 or summary["gate"]["version"] == "2"
    assert summary["gate"]["decision"] in {"promoted", "kept_champion"}
    run = MlflowClient(tracking_uri=project.tracking_uri).get_run(summary["mlflow_run_id"])
    assert run.data.tags["pairgan.start_weights"].endswith(f"champions/{MODEL_NAME}/v1.pt")
    manifest = json.loads((project.checkout / "data/prepared/manifest.json").read_text())
    assert manifest["counts"]["train"] == 9


def test_a_fresh_clone_finds_nothing_to_do(project):
    clone = project.root / "clone"  # beside the first checkout: the same default remote
    subprocess.run(["git", "clone", "-q", str(project.checkout), str(clone)], check=True, capture_output=True)
    done = project.retrain(clone)
    assert done.returncode == 0, output_of(done)
    summary = project.summary(clone)
    assert summary["outcome"] == "nothing_new" and summary["stale_stages"] == []
    assert (clone / "data/prepared/manifest.json").read_text() == (
        project.checkout / "data/prepared/manifest.json").read_text()
    assert project.versions() == ["1", "2"]
