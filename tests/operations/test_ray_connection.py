"""A local Ray that gives up while it starts (its agents slower than Ray waits, on a busy machine)
is started once more, after the half-started node's processes are stopped; a Ray that does not
start at all fails `pairgan train` and `pairgan tune` with the reason, before any MLflow run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

import pipelines.ray_connection as ray_connection
from pipelines.cli import main as pairgan
from pipelines.ray_connection import NODE_START_TIMEOUT, RayStartFailed
from support.params import write_shipped
from support.sweeps import tune_args, write_project

PROJECT = Path(__file__).resolve().parents[2]

# Loaded by every Python process started with this folder on PYTHONPATH: the first dashboard
# agent (the one of the first node) sleeps past the raylet's 15 s wait for it, then exits.
SLOW_FIRST_AGENT = """
import os
import time

if any(part.endswith(b"dashboard/agent.py") for part in open("/proc/self/cmdline", "rb").read().split(b"\\0")):
    try:
        os.close(os.open(os.environ["SLOW_AGENT_SENTINEL"], os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        pass
    else:
        time.sleep(25)
        os._exit(1)
"""

# Connects as `pairgan train` does, then says what it got and which processes it has under it.
CONNECT = """
import json, os, sys
import psutil, ray
from pipelines import ray_connection

ray_connection.LOCAL_START_ATTEMPTS = int(sys.argv[1])
try:
    ray_connection.connect_ray("local", {}, verbose=False)
    outcome = {"answer": ray.get(ray.remote(lambda: 42).remote())}
except ray_connection.RayStartFailed as error:
    outcome = {"failed": str(error)}
processes = []
for process in psutil.Process().children(recursive=True):
    try:
        processes.append([process.name(), process.status(), process.ppid() == os.getpid()])
    except psutil.NoSuchProcess:
        pass
outcome["processes"] = processes
print(json.dumps(outcome))
"""


def connect_with_a_slow_first_agent(tmp_path: Path, attempts: int) -> tuple[dict, str]:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SLOW_FIRST_AGENT)
    env = {**os.environ, "SLOW_AGENT_SENTINEL": str(tmp_path / "slowed"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(site), str(PROJECT), os.environ.get("PYTHONPATH")]))}
    env.pop("RAY_ADDRESS", None)
    result = subprocess.run([sys.executable, "-c", CONNECT, str(attempts)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "slowed").exists()  # the fault was injected
    return json.loads(result.stdout.strip().splitlines()[-1]), result.stderr


@pytest.mark.slow
def test_a_local_ray_that_gives_up_at_start_is_started_once_more_without_the_first_nodes_processes(tmp_path):
    outcome, stderr = connect_with_a_slow_first_agent(tmp_path, attempts=2)
    assert outcome.get("answer") == 42, outcome
    assert stderr.count("the local Ray did not start in time") == 1, stderr[-3000:]
    assert "started once more" in stderr
    names = [name for name, _, _ in outcome["processes"]]
    assert names.count("gcs_server") == 1 and names.count("raylet") == 1, outcome["processes"]
    # The first node's processes were this process's children: none left unreaped. (A worker
    # of the running node may be a zombie for a moment, until its raylet reaps it.)
    unreaped = [name for name, status, ours in outcome["processes"] if ours and status == "zombie"]
    assert not unreaped, outcome["processes"]


@pytest.mark.slow
def test_a_local_ray_that_does_not_start_fails_with_the_reason_and_leaves_no_process(tmp_path):
    outcome, stderr = connect_with_a_slow_first_agent(tmp_path, attempts=1)
    assert "answer" not in outcome
    assert outcome["failed"].startswith("the local Ray did not start (1 attempt): " + NODE_START_TIMEOUT)
    assert "less loaded" in outcome["failed"]
    assert outcome["processes"] == []  # nor a GCS, nor a zombie raylet
    assert "started once more" not in stderr


class FakeInit:
    """ray.init that fails as given, counting its calls (the retry's decisions, without a Ray)."""

    def __init__(self, error: Exception):
        self.error, self.calls, self.runtime_envs = error, [], []

    def __call__(self, **options):
        self.calls.append(options["address"])
        self.runtime_envs.append(options["runtime_env"])
        raise self.error


@pytest.fixture
def fake_ray(monkeypatch):
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: False)

    def install(error: Exception) -> FakeInit:
        init = FakeInit(error)
        monkeypatch.setattr(ray, "init", init)
        return init

    return install


def test_joining_a_cluster_that_times_out_is_not_retried(fake_ray):
    init = fake_ray(Exception(NODE_START_TIMEOUT + ". This could happen because ..."))
    with pytest.raises(Exception, match=NODE_START_TIMEOUT):
        ray_connection.connect_ray("ray://head:10001", {}, verbose=False)
    assert init.calls == ["ray://head:10001"]


def test_a_local_start_failing_for_another_reason_is_not_retried(fake_ray):
    init = fake_ray(ValueError("object_store_memory is too small"))
    with pytest.raises(ValueError, match="object_store_memory"):
        ray_connection.connect_ray("local", {}, verbose=False)
    assert init.calls == ["local"]


@pytest.mark.parametrize("use_gpu, address, cluster, warns", [
    ("auto", "10.0.0.1:6379", {"CPU": 4.0}, True),  # a joined cluster, its GPU nodes maybe scaled to 0
    ("auto", "10.0.0.1:6379", {"CPU": 12.0, "GPU": 1.0}, False),
    ("auto", "local", {"CPU": 2.0}, False),  # a local Ray has no autoscaler: no GPU is no GPU
    (False, "10.0.0.1:6379", {"CPU": 4.0}, False),  # said so
    (True, "10.0.0.1:6379", {"CPU": 4.0}, False),  # Ray waits for GPU nodes
])
def test_auto_finding_no_gpu_on_a_joined_cluster_says_it_trains_on_cpus(use_gpu, address, cluster, warns, caplog):
    caplog.set_level("WARNING", logger=ray_connection.__name__)
    ray_connection.warn_if_auto_sees_no_gpu(use_gpu, address, cluster, "params/train.yaml: run.scaling.use_gpu")
    warnings = [record.getMessage() for record in caplog.records]
    if warns:
        assert len(warnings) == 1
        assert warnings[0].startswith("params/train.yaml: run.scaling.use_gpu is auto")
        assert "training on CPUs" in warnings[0] and "set it to true" in warnings[0]
    else:
        assert warnings == []


def test_a_local_start_timing_out_each_time_is_tried_twice_then_reported(fake_ray):
    init = fake_ray(Exception(NODE_START_TIMEOUT + ". This could happen because ..."))
    with pytest.raises(RayStartFailed, match=r"did not start \(2 attempts\)"):
        ray_connection.connect_ray("local", {}, verbose=False)
    assert init.calls == ["local", "local"]


# --- the stages -------------------------------------------------------------------------


def refuse_to_start(fake_ray, monkeypatch) -> FakeInit:
    """Ray's start times out on every attempt; returns what the stage asked Ray for."""
    # what every worker, a sweep's trials included, must get to reach the stores (docs/operations.md)
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    return fake_ray(Exception(NODE_START_TIMEOUT + ". This could happen because ..."))


def runs_of(tracking_uri: str, experiment_name: str) -> list:
    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name(experiment_name)
    return [] if experiment is None else client.search_runs([experiment.experiment_id])


def assert_asked_for_a_local_ray_with_the_worker_settings(init: FakeInit) -> None:
    assert init.calls == ["local"] * ray_connection.LOCAL_START_ATTEMPTS
    for runtime_env in init.runtime_envs:
        assert runtime_env["env_vars"]["AWS_REGION"] == "eu-west-1"
        assert runtime_env["env_vars"]["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] == "false"
        assert runtime_env["env_vars"]["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "0"  # the console's, on a local Ray


def test_pairgan_train_without_a_ray_fails_with_the_reason_and_leaves_no_run(
        mlflow_store, tmp_path, prepared_builtin, fake_ray, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_store)
    init = refuse_to_start(fake_ray, monkeypatch)
    params = tmp_path / "params"
    write_shipped(params, "model", method={"generator": {"ngf": 8}, "discriminator": {"ndf": 8}})
    write_shipped(params, "train", run={"name": "job", "storage_path": str(tmp_path / "checkpoints")})
    write_shipped(params, "data", image_size=32)
    status = pairgan(["train", "--params-dir", str(params), "--data", str(prepared_builtin),
                      "--model-out", str(tmp_path / "generator.pt"), "--report", str(tmp_path / "train.json")])
    assert status == 1
    assert_asked_for_a_local_ray_with_the_worker_settings(init)
    assert f"pairgan train: the local Ray did not start (2 attempts): {NODE_START_TIMEOUT}" in capsys.readouterr().err
    assert runs_of(mlflow_store, "pairgan") == []
    assert not (tmp_path / "train.json").exists() and not (tmp_path / "generator.pt").exists()


def test_pairgan_tune_without_a_ray_fails_with_the_reason_and_leaves_no_run(
        mlflow_store, tmp_path, fake_ray, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_store)
    write_project(tmp_path, {"space": {"model.method.diffusion_gan.d_target": {"choice": [0.5, 0.6]}}})
    init = refuse_to_start(fake_ray, monkeypatch)
    assert pairgan(tune_args(tmp_path)) == 1
    assert_asked_for_a_local_ray_with_the_worker_settings(init)
    assert f"pairgan tune: the local Ray did not start (2 attempts): {NODE_START_TIMEOUT}" in capsys.readouterr().err
    assert runs_of(mlflow_store, "pairgan-tune") == []
    assert not (tmp_path / "reports" / "tune").exists()
