"""Two `prepare` runs on one output: the second stops at once naming the first, which completes a valid data set."""

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest

from components.config import with_overrides
from components.data.manifest import load_manifest
from support.params import write_shipped

REPO = Path(__file__).resolve().parents[2]

# The first run: the stage's component in a real process that pauses after its first shard
# (holding the lock, its staging folder live) until the test lets it go on.
PAUSED_RUN = """
import sys, time
from pathlib import Path
from components.config import load_params
from components.config.data import DataParams
from components.data.sources import open_source
from components.data.writer import prepare_dataset

out, started, go = sys.argv[1:]
params = load_params("first/data.yaml", DataParams, context={"base_dir": Path.cwd()})

def pause(path):
    if not Path(started).exists():
        Path(started).touch()
        while not Path(go).exists():
            time.sleep(0.01)

prepare_dataset(params, open_source(params, Path.cwd()), out, progress=False, on_shard_written=pause)
"""


def write_data_params(folder: Path, **overrides) -> None:
    small = {"source": {"kind": "builtin", "path": None, "builtin": {"train_pairs": 12, "val_pairs": 3, "test_pairs": 3}},
             "image_size": 32, "shard_max_count": 5}
    write_shipped(folder, "data", **with_overrides(small, overrides))


def shard_bytes(out: str, relative: str, client) -> bytes:
    if out.startswith("s3://"):
        return client.get_object(Bucket="concurrent", Key=f"set/{relative}")["Body"].read()
    return (Path(out) / relative).read_bytes()


@pytest.mark.parametrize("store", ["local", "s3"])
def test_a_second_prepare_on_the_same_output_is_refused_and_the_first_completes(tmp_path, s3_endpoint, store):
    env = {**os.environ, "PYTHONPATH": str(REPO), "AWS_ENDPOINT_URL": s3_endpoint}
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    if store == "s3":
        client.create_bucket(Bucket="concurrent")
    out = "s3://concurrent/set" if store == "s3" else str(tmp_path / "data/prepared")
    write_data_params(tmp_path / "first")
    write_data_params(tmp_path / "second", jpeg_quality=80)
    first = subprocess.Popen([sys.executable, "-c", PAUSED_RUN, out, "started", "go"], cwd=tmp_path, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (tmp_path / "started").exists():
        assert first.poll() is None and time.monotonic() < deadline, first.stderr.read()
        time.sleep(0.05)

    second_command = [sys.executable, "-m", "pipelines.cli", "prepare", "--params-dir", "second", "--out", out,
                      "--report", "reports/second.json", "--no-progress"]
    second = subprocess.run(second_command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    (tmp_path / "go").touch()
    first_out, first_err = first.communicate(timeout=120)

    assert second.returncode == 1
    assert f"pid {first.pid} (pairgan prepare)" in second.stderr and "is locked by" in second.stderr
    assert not (tmp_path / "reports/second.json").exists()
    assert first.returncode == 0, first_err
    manifest = load_manifest(out, client)
    assert manifest.params["jpeg_quality"] == 95 and manifest.split("train").count == 12
    for split in manifest.splits.values():
        for shard in split.shards:
            assert hashlib.sha256(shard_bytes(out, shard.tar, client)).hexdigest() == shard.sha256
    if store == "local":
        assert sorted(os.listdir(tmp_path / "data")) == ["prepared"]  # no staging folder, no lock file left

    # once the first has finished, the second runs
    again = subprocess.run(second_command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert load_manifest(out, client).params["jpeg_quality"] == 80
