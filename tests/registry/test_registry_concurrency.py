"""Two `pairgan register` processes at once, and a lock holder killed with SIGKILL.

The dangerous interleaving is forced, not hoped for: each register process is started through
a small driver that lets MLflow answer its first read of `@champion`, then waits until the
other process has read it too. Both therefore see "no champion yet", as in the race the gate
must survive. Nothing else is changed in the processes.
"""

import json
import os
import signal
import subprocess
import sys
import time

import mlflow
import pytest

from components.registry.lock import RegistryBusy, RegistryLock, lock_name
from pipelines.cli import main as pairgan
from support.evaluation_fixtures import make_project, write_generator, write_train_report

pytestmark = pytest.mark.slow
MODEL = "pairgan-generator"

BOTH_READ_FIRST = """
import pathlib, sys, time
from mlflow.tracking.client import MlflowClient

barrier, me = pathlib.Path(sys.argv[1]), sys.argv[2]
read_alias = MlflowClient.get_model_version_by_alias
first = [True]

def read_then_wait_for_the_other(self, name, alias):
    try:
        return read_alias(self, name, alias)
    finally:
        if first.pop() if first else False:
            (barrier / me).touch()
            deadline = time.monotonic() + 180
            while len(list(barrier.iterdir())) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)

MlflowClient.get_model_version_by_alias = read_then_wait_for_the_other
from pipelines.cli import main
sys.exit(main(sys.argv[3:]))
"""

HOLD_THE_LOCK = """
import sys, time
from mlflow import MlflowClient
from components.registry.lock import RegistryLock
lock = RegistryLock(MlflowClient(tracking_uri=sys.argv[1]), sys.argv[2], wait_s=0)
lock.acquire()
print("held", flush=True)
time.sleep(600)
"""


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """One data set, two generators: a mid-grey one (better on photos) and a near-white one."""
    root = make_project(tmp_path_factory.mktemp("project"))
    write_train_report(root / "reports/train.json")
    for name, grey in (("better", 0.0), ("worse", 0.9)):
        write_generator(root / f"models/{name}.pt", constant=grey)
        assert pairgan(["evaluate", "--params-dir", str(root / "params"), "--data", str(root / "data/prepared"),
                        "--model", str(root / f"models/{name}.pt"), "--train-report", str(root / "reports/train.json"),
                        "--out", str(root / f"reports/evaluate-{name}")]) == 0
    return root


def test_two_registers_at_once_end_with_the_better_champion_and_truthful_reports(mlflow_store, project, tmp_path):
    store = mlflow_store
    env = {**os.environ, "MLFLOW_TRACKING_URI": store}
    (barrier := tmp_path / "barrier").mkdir()
    processes = {}
    for name in ("worse", "better"):
        command = [sys.executable, "-c", BOTH_READ_FIRST, str(barrier), name, "register",
                   "--params-dir", str(project / "params"), "--data", str(project / "data/prepared"),
                   "--model", str(project / f"models/{name}.pt"), "--train-report", str(project / "reports/train.json"),
                   "--evaluation", str(project / f"reports/evaluate-{name}"), "--out", str(tmp_path / f"{name}.json")]
        processes[name] = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for name, process in processes.items():
        output, _ = process.communicate(timeout=300)
        assert process.returncode == 0, f"{name}:\n{output}"
    assert sorted(path.name for path in barrier.iterdir()) == ["better", "worse"]  # both read before either set

    reports = {name: json.loads((tmp_path / f"{name}.json").read_text()) for name in processes}
    first, second = sorted(reports.values(), key=lambda report: report["version"])
    # the registry decided one after the other: only one can have been the first champion
    assert first["decision"] == "first_champion" and first["promoted"] and first["champion_version"] == first["version"]
    assert second["champion_version_before"] == str(first["version"])
    assert second["decision"] in {"promoted", "kept_champion"} and second["interval_low"] is not None

    client = mlflow.MlflowClient(tracking_uri=store)
    champion = str(client.get_model_version_by_alias(MODEL, "champion").version)
    assert champion == str(reports["better"]["version"])
    # the last report says what the registry holds
    assert str(second["champion_version"]) == champion
    assert second["promoted"] == (second["version"] == int(champion))
    for report in reports.values():
        tags = client.get_model_version(MODEL, str(report["version"])).tags
        assert tags["gate.decision"] == report["decision"]
    assert client.search_registered_models(f"name='{lock_name(MODEL)}'") == []  # released


def test_a_lock_whose_holder_was_killed_is_taken_over_after_it_goes_stale(mlflow_store, tmp_path):
    store = mlflow_store
    client = mlflow.MlflowClient(tracking_uri=store)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_THE_LOCK, store, MODEL], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RegistryBusy, match=f"locked by .* pid {holder.pid} since"):
            RegistryLock(client, MODEL, wait_s=1, stale_after_s=60, poll_s=0.2).acquire()
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    finally:
        holder.kill()
    start = time.monotonic()
    with RegistryLock(client, MODEL, wait_s=60, stale_after_s=2, poll_s=0.2) as lock:
        assert time.monotonic() - start >= 2  # not before it went stale
        lock.confirm()
        assert client.get_registered_model(lock_name(MODEL)).tags["pairgan.lock.token"] == lock.token
    assert client.search_registered_models(f"name='{lock_name(MODEL)}'") == []


def test_a_lock_released_while_mlflow_words_its_already_exists_error_is_taken_on_the_next_try(mlflow_store, monkeypatch):
    # What two registers at once met: the waiter's create fails on the unique name, MLflow's SQL
    # store then reads the existing model to word the error, and the holder has just released
    # it: "not found". Here the holder releases at exactly that moment.
    from mlflow.store.model_registry.sqlalchemy_store import SqlAlchemyStore

    client = mlflow.MlflowClient(tracking_uri=mlflow_store)
    holder = RegistryLock(client, MODEL, wait_s=0)
    holder.acquire()
    read_existing = SqlAlchemyStore.get_registered_model
    released = []

    def release_first(store, name):
        if name == lock_name(MODEL) and not released:
            released.append(name)
            holder.release()
        return read_existing(store, name)

    monkeypatch.setattr(SqlAlchemyStore, "get_registered_model", release_first)
    with RegistryLock(client, MODEL, wait_s=5, poll_s=0.1) as waiter:
        assert released == [lock_name(MODEL)]  # the race happened
        waiter.confirm()
    assert client.search_registered_models(f"name='{lock_name(MODEL)}'") == []
