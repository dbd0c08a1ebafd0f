"""infra/mlflow-server.yaml's server, started the way the manifest starts it, answers its in-cluster host name.

The command and arguments come from the manifest. Only what cannot be the same on this machine
is replaced: the backend store (SQLite instead of the PostgreSQL Secret), the bind address and
port, and the number of workers (1: four would only slow the start on a small CI machine).
The artifact store is the manifest's bucket on a moto S3 server. Clients in the cluster call
it as http://mlflow:5000 (the Service), so they send `Host: mlflow:5000`.
"""

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import boto3
import pytest
import yaml

pytestmark = pytest.mark.slow

MANIFEST = Path(__file__).resolve().parents[2] / "infra/mlflow-server.yaml"
REPLACED = ("--backend-store-uri=", "--host=", "--port=", "--workers=")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def request(url: str, host: str, method: str = "GET", body: bytes | None = None) -> int:
    call = urllib.request.Request(url, data=body, method=method, headers={"Host": host, "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(call, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:  # not listening yet
        return 0


@pytest.fixture(scope="module")
def server(tmp_path_factory, s3_endpoint):
    deployment = next(document for document in yaml.safe_load_all(MANIFEST.read_text()) if document["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    args = container["args"]
    bucket = next(arg for arg in args if arg.startswith("--artifacts-destination=")).split("s3://", 1)[1].strip("/")
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    port = free_port()
    store = tmp_path_factory.mktemp("mlflow-server") / "mlflow.db"
    command = [*container["command"], *[arg for arg in args if not arg.startswith(REPLACED)],
               f"--backend-store-uri=sqlite:///{store}", "--host=127.0.0.1", f"--port={port}", "--workers=1"]
    environment = {**os.environ, "MLFLOW_S3_ENDPOINT_URL": s3_endpoint,
                   **{item["name"]: item["value"] for item in container.get("env", []) if "value" in item}}
    process = subprocess.Popen(command, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)  # the server and its uvicorn workers: one group
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while request(f"{url}/health", "localhost") != 200:
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError(f"mlflow server did not start: {command}")
            time.sleep(0.5)
        yield url, bucket, s3_endpoint
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def test_the_service_host_name_is_answered_and_a_foreign_host_refused(server):
    url, _, _ = server
    search = f"{url}/api/2.0/mlflow/experiments/search?max_results=1"
    for host in ("mlflow:5000", "mlflow", "mlflow.pairgan.svc.cluster.local:5000", "localhost:5000"):
        assert request(search, host) == 200, host
    # the middleware is on: another host name is refused, though the probes' /health answers it
    assert request(search, "attacker.example:5000") == 403
    assert request(f"{url}/health", "attacker.example:5000") == 200


def test_runs_and_artifacts_go_through_the_service_name_to_the_manifests_bucket(server):
    url, bucket, s3_endpoint = server
    created = request(f"{url}/api/2.0/mlflow/experiments/create", "mlflow:5000", "POST",
                      json.dumps({"name": "through-the-service"}).encode())
    assert created == 200
    stored = request(f"{url}/api/2.0/mlflow-artifacts/artifacts/probe/hello.txt", "mlflow:5000", "PUT", b"hello")
    assert stored == 200
    keys = [item["Key"] for item in boto3.client("s3", endpoint_url=s3_endpoint)
            .list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert any(key.endswith("probe/hello.txt") for key in keys)
