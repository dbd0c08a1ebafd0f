"""`pairgan prepare --out s3://bucket/prefix`: the same data set as a local folder, the manifest last, append and overwrite."""

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest
import yaml

from components.data.manifest import ManifestError, load_manifest
from pipelines.cli import main

REPO = Path(__file__).resolve().parents[2]

# prepare in a real process that is SIGKILLed after its Nth upload: no clean-up code runs
KILLED_UPLOAD = """
import os, signal, sys
from pathlib import Path
from components.config import load_params
from components.config.data import DataParams
from components.data import writer
from components.data.sources import open_source

out, uploads = sys.argv[1], int(sys.argv[2])
upload = writer.upload_file
done = []

def upload_then_crash(client, source, uri):
    upload(client, source, uri)
    done.append(uri)
    if len(done) == uploads:
        os.kill(os.getpid(), signal.SIGKILL)

writer.upload_file = upload_then_crash
params = load_params("params/data.yaml", DataParams, context={"base_dir": Path.cwd()})
# a crashed run's lock object blocks the next run for its time to live: 1 s here
writer.prepare_dataset(params, open_source(params, Path.cwd()), out, progress=False, lock_ttl_s=1)
"""


def merged(base: dict, overrides: dict) -> dict:
    out = dict(base)
    for key, value in overrides.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def write_data_params(folder: Path, train_pairs: int = 12, **overrides) -> None:
    shipped = yaml.safe_load((REPO / "params/data.yaml").read_text())
    small = {"source": {"kind": "builtin", "path": None,
                        "builtin": {"train_pairs": train_pairs, "val_pairs": 3, "test_pairs": 3}},
             "image_size": 32, "shard_max_count": 5}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "data.yaml").write_text(yaml.safe_dump(merged(merged(shipped, small), overrides)))


def prepare(out: str) -> int:
    return main(["prepare", "--params-dir", "params", "--out", out, "--report", "reports/prepare.json", "--no-progress"])


def objects(client, bucket: str) -> dict[str, bytes]:
    listing = client.list_objects_v2(Bucket=bucket).get("Contents", [])
    return {item["Key"]: client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read() for item in listing}


def local_files(folder: Path, prefix: str) -> dict[str, bytes]:
    return {f"{prefix}/{p.relative_to(folder).as_posix()}": p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture
def s3(s3_endpoint, monkeypatch, tmp_path, request):
    """A fresh bucket, reached the way the stages reach prepared data: AWS_ENDPOINT_URL."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.chdir(tmp_path)
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    bucket = request.node.name.lower().replace("_", "-")[:40].strip("-")
    client.create_bucket(Bucket=bucket)
    return client, bucket


def test_prepare_to_s3_writes_the_same_bytes_as_a_local_folder(s3, tmp_path):
    client, bucket = s3
    write_data_params(tmp_path / "params")
    assert prepare(f"s3://{bucket}/sets/one") == 0
    assert prepare("local") == 0
    assert objects(client, bucket) == local_files(tmp_path / "local", "sets/one")
    manifest = load_manifest(f"s3://{bucket}/sets/one/")
    assert manifest.location == f"s3://{bucket}/sets/one" and manifest.split("train").count == 12
    assert (tmp_path / "reports/prepare.json").exists()


def test_overwrite_uploads_only_what_changed_and_removes_what_is_no_longer_listed(s3, tmp_path, caplog):
    client, bucket = s3
    uri = f"s3://{bucket}/set"
    caplog.set_level(logging.INFO, logger="components")
    write_data_params(tmp_path / "params")
    assert prepare(uri) == 0
    stamps = {o["Key"]: o["LastModified"] for o in client.list_objects_v2(Bucket=bucket)["Contents"]}
    assert prepare(uri) == 0  # the same params again: deterministic, nothing to upload
    assert "nothing to upload" in caplog.text
    assert {o["Key"]: o["LastModified"] for o in client.list_objects_v2(Bucket=bucket)["Contents"]} == stamps
    write_data_params(tmp_path / "params", train_pairs=4, jpeg_quality=80)
    assert prepare(uri) == 0
    assert prepare("local") == 0
    assert objects(client, bucket) == local_files(tmp_path / "local", "set")  # train-000001/2 are gone
    assert load_manifest(uri).params["jpeg_quality"] == 80


def test_append_on_s3_keeps_the_existing_shards_and_matches_a_local_append(s3, tmp_path):
    client, bucket = s3
    uri = f"s3://{bucket}/set"
    write_data_params(tmp_path / "params", mode="append")
    assert prepare(uri) == 0
    assert prepare("local") == 0
    etags = {o["Key"]: o["ETag"] for o in client.list_objects_v2(Bucket=bucket)["Contents"] if o["Key"] != "set/manifest.json"}
    write_data_params(tmp_path / "params", train_pairs=24, mode="append")
    assert prepare(uri) == 0
    assert prepare("local") == 0
    after = {o["Key"]: o["ETag"] for o in client.list_objects_v2(Bucket=bucket)["Contents"]}
    assert all(after[key] == etag for key, etag in etags.items())  # never rewritten
    assert objects(client, bucket) == local_files(tmp_path / "local", "set")
    assert load_manifest(uri).split("train").count == 24


def test_a_run_killed_during_upload_never_shows_a_partial_data_set(s3, tmp_path):
    client, bucket = s3
    uri = f"s3://{bucket}/set"
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def killed_after(uploads: int) -> None:
        result = subprocess.run([sys.executable, "-c", KILLED_UPLOAD, uri, str(uploads)], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == -9, result.stderr
        time.sleep(2.5)  # the lock object outlives its dead holder by the time to live (1 s)

    write_data_params(tmp_path / "params", mode="append")
    killed_after(3)  # a first run: shards uploaded, no manifest
    with pytest.raises(ManifestError, match="no manifest"):
        load_manifest(uri)
    assert prepare(uri) == 0
    write_data_params(tmp_path / "params", train_pairs=24, mode="append")
    killed_after(2)  # an append: new shards uploaded, the old manifest still in force
    assert load_manifest(uri).split("train").count == 12
    assert prepare(uri) == 0
    # the same two runs on a local folder, uninterrupted
    write_data_params(tmp_path / "params", mode="append")
    assert prepare("reference") == 0
    write_data_params(tmp_path / "params", train_pairs=24, mode="append")
    assert prepare("reference") == 0
    assert objects(client, bucket) == local_files(tmp_path / "reference", "set")


def test_a_prefix_holding_other_objects_is_refused(s3, tmp_path, caplog):
    client, bucket = s3
    client.put_object(Bucket=bucket, Key="set/notes.txt", Body=b"mine")
    write_data_params(tmp_path / "params")
    assert prepare(f"s3://{bucket}/set") == 1
    assert f"refusing to write into s3://{bucket}/set" in caplog.text and "notes.txt" in caplog.text
    assert objects(client, bucket) == {"set/notes.txt": b"mine"}
