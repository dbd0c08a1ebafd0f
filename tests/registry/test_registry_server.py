"""Against a real `mlflow server` on 127.0.0.1, reached through a URI with user:password.

The server has no auth app, so it ignores the basic-auth header the client derives from the
URI: what is tested is where the client-side URI, password included, could end up.
"""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest

from components.redaction import redact_text
from components.registry.lock import RegistryBusy, RegistryLock, lock_name
from components.tracking import finish_job_run, start_job_run
from pipelines import environment
from support.evaluation_fixtures import make_project, write_generator, write_train_report

pytestmark = pytest.mark.slow
SECRET = "s3cr3t-Passw0rd"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(plain URL, URL with user:password) of a tracking server with a SQLite backend."""
    root = tmp_path_factory.mktemp("server")
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError("mlflow server did not start") from None
                time.sleep(0.5)
        yield url, f"http://pairgan:{SECRET}@127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = make_project(tmp_path_factory.mktemp("project"))
    write_generator(root / "models/generator.pt")
    write_train_report(root / "reports/train.json")  # no MLflow run: register makes and closes its own
    return root


def pairgan(*args: str, env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


def everything_mlflow_holds(url: str) -> str:
    """Params, tags, descriptions and names of every run, logged model and registered version, as text."""
    client = mlflow.MlflowClient(tracking_uri=url)
    experiments = client.search_experiments()
    held = [experiment.name + str(experiment.tags) + experiment.artifact_location for experiment in experiments]
    ids = [experiment.experiment_id for experiment in experiments]
    for run in client.search_runs(ids):
        held += [run.info.run_name, str(run.data.params), str(run.data.tags)]
    for model in client.search_logged_models(experiment_ids=ids):
        held += [str(model.params), str(model.tags), model.artifact_location]
    for model in client.search_registered_models():
        held += [str(model.tags), model.description or ""]
        for version in client.search_model_versions(f"name='{model.name}'"):
            held += [str(version.tags), version.description or "", version.source]
    return "\n".join(held)


def test_evaluate_and_register_never_show_the_tracking_password(server, project, tmp_path):
    url, secret_url = server
    client = mlflow.MlflowClient(tracking_uri=url)
    training_run = client.create_run(client.create_experiment("training")).info.run_id
    write_train_report(tmp_path / "train.json", mlflow_run_id=training_run)
    env = {**os.environ, "MLFLOW_TRACKING_URI": secret_url}
    common = ["--params-dir", str(project / "params"), "--data", str(project / "data/prepared"),
              "--model", str(project / "models/generator.pt")]
    evaluated = pairgan("evaluate", *common, "--train-report", str(tmp_path / "train.json"),
                        "--out", str(tmp_path / "evaluate"), env=env, cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr
    registered = pairgan("register", *common, "--train-report", str(project / "reports/train.json"),
                         "--evaluation", str(tmp_path / "evaluate"), "--out", str(tmp_path / "register.json"),
                         env=env, cwd=tmp_path)
    assert registered.returncode == 0, registered.stderr

    assert "eval/psnr" in client.get_run(training_run).data.metrics  # evaluate reached the server
    report = json.loads((tmp_path / "register.json").read_text())
    assert report["decision"] == "first_champion"
    assert "127.0.0.1" in registered.stderr  # the store is named, without its password
    for text in (evaluated.stdout, evaluated.stderr, registered.stdout, registered.stderr,
                 (tmp_path / "register.json").read_text(), (tmp_path / "evaluate/metrics.json").read_text(),
                 everything_mlflow_holds(url)):
        assert SECRET not in text and "pairgan:" not in text


def test_closing_a_training_run_prints_no_password_in_a_pairgan_process(server, capfd):
    url, secret_url = server
    environment.configure_process()  # what `pairgan train` does first
    run_id = start_job_run(secret_url, "training", "pix2pix", {"model.method.name": "pix2pix"}, {})
    finish_job_run(secret_url, run_id, "finished")
    captured = capfd.readouterr()
    assert SECRET not in captured.out + captured.err
    assert mlflow.MlflowClient(tracking_uri=url).get_run(run_id).info.status == "FINISHED"


def test_the_registry_lock_works_through_a_tracking_server(server):
    url, _ = server
    first, second = (RegistryLock(mlflow.MlflowClient(tracking_uri=url), "served-model", wait_s=0, poll_s=0.1) for _ in range(2))
    with first:
        with pytest.raises(RegistryBusy, match="served-model is locked by"):
            second.acquire()
        first.confirm()
    with second:
        second.confirm()
    assert mlflow.MlflowClient(tracking_uri=url).search_registered_models(f"name='{lock_name('served-model')}'") == []


def test_error_messages_lose_the_password_wherever_mlflow_quotes_the_uri():
    uri = f"http://pairgan:{SECRET}@mlflow.internal:5000"
    message = f"API request to {uri}/api/2.0/mlflow/runs/get failed (auth pairgan:{SECRET}, token {SECRET})"
    cleaned = redact_text(message, uri)
    assert SECRET not in cleaned and "pairgan:" not in cleaned
    assert "API request to http://mlflow.internal:5000/api/2.0/mlflow/runs/get failed" in cleaned
    assert redact_text(message, "sqlite:///mlflow.db") == message  # nothing to hide
