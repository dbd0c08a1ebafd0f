"""A Ray cluster of two nodes started here, as an operator would start one, and a job on it.

The nodes are started with `ray start` (each its own temp dir, one CPU and no GPU) **without** the S3
endpoint and region in their environment: only their own credentials, as an instance profile
or a pod's IAM role would give them. The data set is prepared to a moto S3 server and exists
nowhere else; `pairgan train` joins the cluster with RAY_ADDRESS, trains one worker on each
node and checkpoints to S3; evaluate and register read s3:// only. What the workers need
reaches them through the job's runtime_env, and the driver's own secret shows up nowhere Ray
writes or serves. The head runs the dashboard (ray[default]), and a job submitted to it the
way the RayJob manifest submits one gets the project's settings next to its own.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import boto3
import pytest

from components.data.manifest import load_manifest
from pipelines.cli import main as pairgan
from support.params import write_shipped

pytestmark = pytest.mark.slow

PROJECT = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).parent / "ray")
# What the nodes are started without: the store's address, as a driver's shell would have it.
S3_SETTINGS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION")
DRIVER_SECRET = "driver-only-Secret-7f3a9c"
TINY_MODEL = {"generator": {"ngf": 8, "max_multiplier": 2}, "discriminator": {"ndf": 8, "n_layers": 2}}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Cluster:
    address: str  # the GCS address drivers join with RAY_ADDRESS
    dashboard: str  # the job submission and dashboard HTTP address
    temp_dirs: list[Path]


def wait_for(check, what: str, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(1)


def alive_nodes(dashboard: str) -> int:
    try:
        with urllib.request.urlopen(f"{dashboard}/nodes?view=summary", timeout=5) as response:
            summary = json.loads(response.read())["data"]["summary"]
    except (OSError, ValueError, KeyError):
        return 0
    return sum(1 for node in summary if node.get("raylet", {}).get("state") == "ALIVE")


CONSOLE = "ray-start.log"  # what a node's `ray start` prints, in its temp dir


@dataclass
class Node:
    """One `ray start --block` in a process group of its own, with its temp dir and console."""
    process: subprocess.Popen
    temp_dir: Path

    @property
    def console(self) -> Path:
        return self.temp_dir / CONSOLE

    def has_started(self) -> bool:  # `ray start` says so once its raylet is registered
        return "Ray runtime started" in self.console.read_text(errors="replace")

    def send(self, number: int) -> None:
        try:
            os.killpg(self.process.pid, number)
        except ProcessLookupError:
            pass  # the whole group has exited

    def stop(self) -> None:
        self.send(signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.send(signal.SIGKILL)
            self.process.wait()

    def what_it_said(self) -> str:
        """The end of `ray start`'s console and of the logs of the processes it started.

        Named by file only: a node that did not join has its temp dir removed.
        """
        parts = [f"`ray start` (exit code {self.process.poll()}), {self.console.name}:", *tail(self.console, 15)]
        for log in ("raylet.out", "gcs_server.out", "dashboard_agent.log"):
            path = self.temp_dir / "session_latest" / "logs" / log
            if path.exists():
                parts += [f"{log}:", *tail(path, 8, keep=lambda line: line.startswith("[") or "ray::" in line)]
        return "\n".join(parts)


def tail(path: Path, lines: int, keep: Callable[[str], bool] = lambda line: True) -> list[str]:
    """The file's last `lines` lines that `keep` accepts (Ray's logs: log lines and Ray's own frames)."""
    return [line for line in path.read_text(errors="replace").splitlines() if keep(line)][-lines:]


def start_node(arguments: list[str], environment: dict[str, str], prefix: str) -> Node:
    # Unix socket paths under the temp dir must stay short: not under pytest's tmp_path.
    temp_dir = Path(tempfile.mkdtemp(prefix=prefix))
    with (temp_dir / CONSOLE).open("wb") as console:
        process = subprocess.Popen(
            [RAY, "start", f"--temp-dir={temp_dir}", "--block", "--num-cpus=1", "--num-gpus=0",
             "--node-ip-address=127.0.0.1", "--disable-usage-stats", *arguments],
            env=environment, stdout=console, stderr=subprocess.STDOUT, start_new_session=True)
    return Node(process, temp_dir)


def join(start: Callable[[], Node], dashboard: Callable[[], str], nodes: int, what: str, attempts: int = 3) -> Node:
    """Start a node until it joins as the cluster's `nodes`-th, as KubeRay restarts a failed pod.

    A node's raylet waits 15 s for its dashboard and runtime-env agents (Python processes) to
    report their ports, then stops (`WaitForDashboardAgentPorts` in raylet.out), and `ray start`
    gives up ("The current node timed out during startup"); on a loaded 2-core machine an
    agent's start can take longer. Such a node is started again, with a warning in pytest's
    summary that shows what it said; a node that neither joins nor exits within 180 s fails
    the setup at once.
    """
    said = []
    for attempt in range(1, attempts + 1):
        node = start()
        deadline = time.monotonic() + 180
        while not (node.has_started() and alive_nodes(dashboard()) == nodes):
            if node.process.poll() is not None or time.monotonic() > deadline:
                break
            time.sleep(1)
        else:
            return node
        gave_up = node.process.poll() is not None
        said.append(f"{what}, attempt {attempt} of {attempts}:\n{node.what_it_said()}")
        node.stop()
        shutil.rmtree(node.temp_dir, ignore_errors=True)
        if not gave_up:
            break  # it hung rather than gave up: starting it again would hang too
        if attempt < attempts:
            warnings.warn(f"starting it again: {said[-1]}", stacklevel=1)
    raise RuntimeError(f"{what} did not join the cluster\n" + "\n".join(said))


@pytest.fixture(scope="module")
def two_nodes(s3_endpoint) -> Iterator[Cluster]:
    """Head and worker node on 127.0.0.1, each `ray start --block` in its own process group."""
    node_environment = {name: value for name, value in os.environ.items() if name not in S3_SETTINGS}
    node_environment.update({
        "RAY_AUTH_MODE": "disabled",  # `ray start` turns token authentication on by default
        "RAY_enable_export_api_write": "1",  # Ray's export events, to check them for secrets
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT), os.environ.get("PYTHONPATH")])),
    })
    ports = {}

    def start_head() -> Node:  # fresh ports on every attempt, in case another process took one
        ports.update(gcs=free_port(), dashboard=free_port())
        return start_node(
            ["--head", f"--port={ports['gcs']}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
             f"--dashboard-port={ports['dashboard']}", f"--dashboard-agent-listen-port={free_port()}"],
            node_environment, "pg-head-")

    def dashboard() -> str:
        return f"http://127.0.0.1:{ports['dashboard']}"

    # Each node's dashboard agent on a port of its own: Ray's default (52365) is one fixed port,
    # which the other node's agent, or a local Ray another test starts, may hold first; the head's
    # agent then serves no HTTP and the head refuses every job ("No available agent").
    nodes = [join(start_head, dashboard, 1, "the head node")]
    try:
        nodes.append(join(lambda: start_node([f"--address=127.0.0.1:{ports['gcs']}",
                                              f"--dashboard-agent-listen-port={free_port()}"],
                                             node_environment, "pg-node-"),
                          dashboard, 2, "the second node"))
        yield Cluster(f"127.0.0.1:{ports['gcs']}", dashboard(), [node.temp_dir for node in nodes])
    finally:
        for node in reversed(nodes):
            node.stop()
        for node in nodes:
            shutil.rmtree(node.temp_dir, ignore_errors=True)


def write_params(folder: Path, checkpoints: str) -> Path:
    write_shipped(folder, "data", source={"kind": "builtin", "path": None,
                                          "builtin": {"train_pairs": 8, "val_pairs": 0, "test_pairs": 3}},
                  image_size=32, shard_max_count=2, loader={"backend": "torch", "num_threads": 1})
    write_shipped(folder, "model", method=TINY_MODEL)
    write_shipped(folder, "train", epochs=1, batch_size=2,
                  run={"name": "two-nodes", "storage_path": checkpoints, "max_failures": 0,
                       "scaling": {"num_workers": 2, "use_gpu": "auto", "cpus_per_worker": 1},  # CPU nodes
                       "tracking": {"experiment": "cluster", "sample_grid_every_epochs": 0, "system_metrics": False}})
    write_shipped(folder, "evaluate", latency={"warmup": 0, "repeats": 1})
    write_shipped(folder, "register")
    return folder


def files_holding(folders: list[Path], text: str) -> list[str]:
    found = []
    for folder in folders:
        for path in folder.rglob("*"):
            if path.is_file() and not path.is_symlink():
                try:
                    if text.encode() in path.read_bytes():
                        found.append(str(path))
                except OSError:
                    continue  # sockets, files removed meanwhile
    return found


def test_train_on_two_nodes_without_their_own_s3_settings_then_evaluate_and_register_from_s3(
    two_nodes, s3_endpoint, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="cluster")
    params = write_params(tmp_path / "params", checkpoints="s3://cluster/checkpoints")
    data = "s3://cluster/prepared"
    assert pairgan(["prepare", "--params-dir", str(params), "--out", data, "--no-progress"]) == 0
    assert sorted(os.listdir(tmp_path)) == ["params", "reports"]  # the data set is on S3 only
    manifest = load_manifest(data)

    # The driver on this machine, as `pairgan train` under a scheduler: its shell has the store's
    # address and a secret of its own, which must reach no node, log or Ray state.
    driver_environment = {**os.environ, "RAY_ADDRESS": two_nodes.address, "RAY_AUTH_MODE": "disabled",
                          "AWS_DEFAULT_REGION": "us-east-1", "MLFLOW_TRACKING_PASSWORD": DRIVER_SECRET,
                          "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT), os.environ.get("PYTHONPATH")]))}
    trained = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "train", "--params-dir", str(params), "--data", data,
         "--model-out", "models/generator.pt", "--report", "reports/train.json"],
        env=driver_environment, cwd=tmp_path, capture_output=True, text=True, timeout=480)
    output = trained.stdout + trained.stderr
    assert trained.returncode == 0, output[-4000:]
    # The shipped `use_gpu: auto` on a joined cluster without GPUs: the console says it trains on
    # CPUs, and which key to set where GPU nodes start on demand.
    assert f"{params / 'train.yaml'}: run.scaling.use_gpu is auto and the Ray cluster has no GPU now" in output
    report = json.loads((tmp_path / "reports/train_info.json").read_text())
    assert report["data_checksum"] == manifest.checksum
    assert report["checkpoint"].startswith("cluster/checkpoints/two-nodes/checkpoint_")  # on S3 (pyarrow drops s3://)
    stored = [item["Key"] for item in boto3.client("s3", endpoint_url=s3_endpoint)
              .list_objects_v2(Bucket="cluster", Prefix="checkpoints/two-nodes/")["Contents"]]
    assert any(key.endswith("/generator.pt") for key in stored)
    # the workers fetched the training shards into the shard cache (the nodes have this
    # process's XDG_CACHE_HOME)
    cache = Path(os.environ["XDG_CACHE_HOME"]) / "pairgan/shards/shards"
    assert {shard.sha256 for shard in manifest.split("train").shards} <= {path.stem for path in cache.glob("*.tar")}

    # one training worker on each node (each node's own logs name the worker actor it ran)
    for temp_dir in two_nodes.temp_dirs:
        assert files_holding([temp_dir], ":actor_name:RayTrainWorker"), f"no training worker ran on {temp_dir}"

    # the secret: not in the driver's output, in any file either node wrote (logs, export
    # events, runtime env records), or in what the dashboard serves about jobs
    assert DRIVER_SECRET not in output
    assert files_holding(two_nodes.temp_dirs, DRIVER_SECRET) == []
    with urllib.request.urlopen(f"{two_nodes.dashboard}/api/jobs/", timeout=30) as response:
        jobs = response.read().decode()
    assert '"AWS_ENDPOINT_URL"' in jobs  # the job table shows the runtime_env, settings only
    assert DRIVER_SECRET not in jobs

    common = ["--params-dir", str(params), "--data", data, "--model", "models/generator.pt",
              "--train-report", "reports/train.json"]
    assert pairgan(["evaluate", *common, "--out", "reports/evaluate"]) == 0
    evaluation = json.loads((tmp_path / "reports/evaluate/info.json").read_text())
    assert evaluation["samples"] == 3 and evaluation["data_manifest_checksum"] == manifest.checksum
    assert pairgan(["register", *common, "--evaluation", "reports/evaluate", "--out", "reports/register.json"]) == 0
    assert json.loads((tmp_path / "reports/register.json").read_text())["decision"] == "first_champion"


def test_a_data_set_in_a_local_folder_is_shared_with_the_other_node(mlflow_store, two_nodes, s3_endpoint, tmp_path, monkeypatch):
    # What `dvc repro` does on a cluster: --data is the driver's data/prepared folder, which the
    # other node cannot read; the driver copies it under the job's S3 storage for the workers.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_store)
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="shared")
    params = write_params(tmp_path / "params", checkpoints="s3://shared/checkpoints")
    assert pairgan(["prepare", "--params-dir", str(params), "--out", "data/prepared", "--no-progress"]) == 0
    manifest = load_manifest(tmp_path / "data/prepared")
    trained = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "train", "--params-dir", str(params), "--data", "data/prepared",
         "--model-out", "models/generator.pt", "--report", "reports/train.json"],
        env={**os.environ, "RAY_ADDRESS": two_nodes.address, "RAY_AUTH_MODE": "disabled",
             "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT), os.environ.get("PYTHONPATH")]))},
        cwd=tmp_path, capture_output=True, text=True, timeout=480)
    assert trained.returncode == 0, (trained.stdout + trained.stderr)[-4000:]
    shared = f"s3://shared/checkpoints/data/{manifest.checksum[:16]}"
    assert f"the workers read the data set from {shared}" in trained.stdout + trained.stderr
    assert load_manifest(shared).checksum == manifest.checksum
    assert json.loads((tmp_path / "reports/train_info.json").read_text())["data_checksum"] == manifest.checksum


PROBE = '''
import json, os, ray
from pipelines import environment

ray.init(runtime_env=environment.ray_runtime_env())  # the address: the job's own cluster


@ray.remote(num_cpus=0)
def seen() -> dict:
    return {name: os.environ.get(name) for name in ("AWS_REGION", "AWS_ENDPOINT_URL", "MLFLOW_ALLOW_PICKLE_DESERIALIZATION")}


print("SEEN " + json.dumps(ray.get(seen.remote())))
'''


def test_a_job_submitted_to_the_head_keeps_its_own_settings_and_gets_the_projects(two_nodes, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    client = JobSubmissionClient(two_nodes.dashboard)
    # As a RayJob or `ray job submit --runtime-env-json` would: the job sets AWS_REGION itself,
    # which the driver's ray.init would set too (Ray refuses two values of one variable).
    job = client.submit_job(entrypoint=f"{sys.executable} {probe}",
                            runtime_env={"env_vars": {"AWS_REGION": "eu-test-1", "AWS_ENDPOINT_URL": "http://s3.test"}})
    wait_for(lambda: client.get_job_status(job) in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED},
             "the submitted job", timeout_s=240)
    logs = client.get_job_logs(job)
    assert client.get_job_status(job) == JobStatus.SUCCEEDED, logs[-3000:]
    seen = json.loads(logs.split("SEEN ", 1)[1].splitlines()[0])
    assert seen == {"AWS_REGION": "eu-test-1", "AWS_ENDPOINT_URL": "http://s3.test",
                    "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false"}
