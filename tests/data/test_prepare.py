"""pairgan prepare on each source: built-in, pix2pix folder, A/B folders, and both layouts on S3."""

import io
import json
import tarfile
from pathlib import Path

import boto3
import numpy as np
import pytest
from PIL import Image, JpegImagePlugin

from components.data.builtin import LABEL_PALETTE
from components.data.manifest import load_manifest
from components.data.tar_safety import check_tar_members
from pipelines.cli import main
from support.images import pair_halves, pair_seed


def prepare(tmp_path: Path, out: str = "data/prepared") -> int:
    return main(["prepare", "--params-dir", "params", "--out", out, "--report", "reports/prepare.json", "--no-progress"])


def read_members(tar_path: Path) -> dict[str, bytes]:
    with tarfile.open(tar_path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar}


def decoded(jpeg: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"), dtype=np.int16)


def test_builtin_source_writes_shards_index_manifest_and_report(tmp_path, monkeypatch, write_params):
    monkeypatch.chdir(tmp_path)
    write_params(tmp_path / "params")
    assert prepare(tmp_path) == 0

    manifest = load_manifest(tmp_path / "data/prepared")
    assert {name: split.count for name, split in manifest.splits.items()} == {"train": 12, "val": 3, "test": 3}
    train = manifest.split("train")
    assert [s.count for s in train.shards] == [5, 5, 2]  # shard_max_count 5
    assert [s.index for s in train.samples] == list(range(12))
    for shard in train.shards:
        tar = tmp_path / "data/prepared" / shard.tar
        check_tar_members(tar)
        assert (tmp_path / "data/prepared" / shard.index).read_text().startswith("v1.2")  # wds2idx format
    members = read_members(tmp_path / "data/prepared" / train.shards[0].tar)
    key = train.samples[0].key
    assert {f"{key}.src.jpg", f"{key}.tgt.jpg", f"{key}.json", f"{key}.index"} <= set(members)
    meta = json.loads(members[f"{key}.json"])
    assert meta["index"] == 0 and meta["sha256"] == train.samples[0].sha256
    source, target = decoded(members[f"{key}.src.jpg"]), decoded(members[f"{key}.tgt.jpg"])
    assert source.shape == target.shape == (32, 32, 3)
    # the built-in source is a label map painted in the label palette (JPEG blurs its edges a little)
    nearest_palette = np.abs(source.reshape(-1, 1, 3).astype(int) - LABEL_PALETTE.astype(int)).max(axis=2).min(axis=1)
    assert np.median(nearest_palette) < 12 and np.abs(source.astype(int) - target).mean() > 20
    assert manifest.params["image_size"] == 32 and "loader" not in manifest.params

    report = json.loads((tmp_path / "reports/prepare.json").read_text())
    assert report["counts"] == {"train": 12, "val": 3, "test": 3}
    assert report["new_pairs"] == 18 and report["skipped"] == 0 and report["seconds"] > 0
    assert report["manifest_checksum"] == manifest.checksum


def test_same_input_and_params_give_byte_identical_output(tmp_path, monkeypatch, write_params):
    monkeypatch.chdir(tmp_path)
    write_params(tmp_path / "params")
    assert prepare(tmp_path, "first") == 0
    assert prepare(tmp_path, "second") == 0
    files = sorted(p.relative_to(tmp_path / "first") for p in (tmp_path / "first").rglob("*") if p.is_file())
    assert len(files) == 1 + 2 * (3 + 1 + 1)
    for relative in files:
        assert (tmp_path / "first" / relative).read_bytes() == (tmp_path / "second" / relative).read_bytes(), relative
    # and a rerun over an existing output (mode overwrite) gives the same bytes again
    assert prepare(tmp_path, "first") == 0
    assert (tmp_path / "first/manifest.json").read_bytes() == (tmp_path / "second/manifest.json").read_bytes()


@pytest.mark.parametrize("direction", ["AtoB", "BtoA"])
def test_pix2pix_folder_splits_halves_by_direction_and_carves_val(tmp_path, monkeypatch, write_params, write_pix2pix, direction):
    monkeypatch.chdir(tmp_path)
    write_pix2pix(tmp_path / "pairs", {"train": 20, "test": 2}, size=32)
    write_params(tmp_path / "params", source={"kind": "pix2pix", "path": "pairs", "direction": direction},
                 val_fraction=0.25, jpeg_quality=100)
    assert prepare(tmp_path) == 0
    manifest = load_manifest(tmp_path / "data/prepared")
    counts = {name: split.count for name, split in manifest.splits.items()}
    assert counts["test"] == 2 and counts["train"] + counts["val"] == 20 and 1 <= counts["val"] <= 10
    assert manifest.split("val").samples[0].origin[0].startswith("train/")  # carved off train

    sample = manifest.split("test").samples[1]
    assert sample.origin == ["test/0001.png"]
    members = read_members(tmp_path / "data/prepared" / manifest.split("test").shards[0].tar)
    left, right = pair_halves(pair_seed("test", 1), 32)
    want_source, want_target = (left, right) if direction == "AtoB" else (right, left)
    assert np.abs(decoded(members[f"{sample.key}.src.jpg"]) - want_source).mean() < 3
    assert np.abs(decoded(members[f"{sample.key}.tgt.jpg"]) - want_target).mean() < 3


@pytest.mark.parametrize("chroma", [{"source": "4:4:4", "target": "4:4:4"}, {"source": "4:4:4", "target": "4:2:0"},
                                    {"source": "4:2:0", "target": "4:2:2"}])
def test_each_side_is_stored_at_its_chroma_subsampling(tmp_path, monkeypatch, write_params, write_pix2pix, chroma):
    monkeypatch.chdir(tmp_path)
    write_pix2pix(tmp_path / "pairs", {"train": 4, "test": 2}, size=32)
    write_params(tmp_path / "params", source={"kind": "pix2pix", "path": "pairs"}, val_fraction=0.0, jpeg_chroma=chroma)
    assert prepare(tmp_path) == 0
    manifest = load_manifest(tmp_path / "data/prepared")
    assert manifest.params["jpeg_chroma"] == chroma
    by_code = {0: "4:4:4", 1: "4:2:2", 2: "4:2:0"}  # Pillow's codes
    for split in ("train", "test"):
        members = read_members(tmp_path / "data/prepared" / manifest.split(split).shards[0].tar)
        stored = {(name.split(".")[-2], by_code[JpegImagePlugin.get_sampling(Image.open(io.BytesIO(data)))])
                  for name, data in members.items() if name.endswith(".jpg")}
        assert stored == {("src", chroma["source"]), ("tgt", chroma["target"])}, split


def test_val_carving_is_seeded(tmp_path, monkeypatch, write_params, write_pix2pix):
    monkeypatch.chdir(tmp_path)
    write_pix2pix(tmp_path / "pairs", {"train": 30}, size=16)
    keys = {}
    for seed in (0, 1):
        write_params(tmp_path / "params", source={"kind": "pix2pix", "path": "pairs"}, val_fraction=0.3, seed=seed)
        assert prepare(tmp_path, f"out{seed}") == 0
        keys[seed] = [s.key for s in load_manifest(tmp_path / f"out{seed}").split("val").samples]
    assert keys[0] and keys[1] and keys[0] != keys[1]
    assert load_manifest(tmp_path / "out0").split("test").count == 0  # no test/ folder, no test split


def test_paired_folders_match_by_name(tmp_path, monkeypatch, write_params, write_paired_folders):
    monkeypatch.chdir(tmp_path)
    write_paired_folders(tmp_path / "ab", {"train": 6, "val": 2}, size=32)
    write_params(tmp_path / "params", source={"kind": "paired_folders", "path": "ab"}, image_size=32, jpeg_quality=100)
    assert prepare(tmp_path) == 0
    manifest = load_manifest(tmp_path / "data/prepared")
    assert (manifest.split("train").count, manifest.split("val").count) == (6, 2)
    sample = manifest.split("val").samples[1]
    assert sample.origin == ["A/val/0001.png", "B/val/0001.png"]
    members = read_members(tmp_path / "data/prepared" / manifest.split("val").shards[0].tar)
    source, target = pair_halves(pair_seed("val", 1), 32)
    assert np.abs(decoded(members[f"{sample.key}.src.jpg"]) - source).mean() < 3
    assert np.abs(decoded(members[f"{sample.key}.tgt.jpg"]) - target).mean() < 3


def _upload(folder: Path, endpoint: str, bucket: str, prefix: str) -> None:
    client = boto3.client("s3", endpoint_url=endpoint)
    client.create_bucket(Bucket=bucket)
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        client.put_object(Bucket=bucket, Key=f"{prefix}/{path.relative_to(folder).as_posix()}", Body=path.read_bytes())


@pytest.mark.parametrize("kind", ["pix2pix", "paired_folders"])
def test_s3_source_gives_the_same_data_set_as_the_local_folder(
    tmp_path, monkeypatch, write_params, write_pix2pix, write_paired_folders, s3_endpoint, kind
):
    monkeypatch.chdir(tmp_path)
    writer = write_pix2pix if kind == "pix2pix" else write_paired_folders
    writer(tmp_path / "local", {"train": 4, "test": 2}, size=16)
    bucket = f"pairs-{kind.replace('_', '-')}"
    _upload(tmp_path / "local", s3_endpoint, bucket, "sets/one")
    s3 = {"endpoint_url": s3_endpoint, "region": "us-east-1", "max_attempts": 2}
    write_params(tmp_path / "params", source={"kind": kind, "path": f"s3://{bucket}/sets/one", "s3": s3}, image_size=16)
    assert prepare(tmp_path, "from_s3") == 0
    write_params(tmp_path / "params", source={"kind": kind, "path": "local"}, image_size=16)
    assert prepare(tmp_path, "from_local") == 0
    remote, local = load_manifest(tmp_path / "from_s3"), load_manifest(tmp_path / "from_local")
    assert remote.source == f"s3://{bucket}/sets/one"
    for split in ("train", "val", "test"):
        assert [(s.key, s.sha256) for s in remote.split(split).samples] == [(s.key, s.sha256) for s in local.split(split).samples]
        for remote_shard, local_shard in zip(remote.split(split).shards, local.split(split).shards):
            remote_members = read_members(tmp_path / "from_s3" / remote_shard.tar)
            local_members = read_members(tmp_path / "from_local" / local_shard.tar)
            jpegs = sorted(name for name in local_members if name.endswith(".jpg"))
            assert jpegs and [remote_members[n] for n in jpegs] == [local_members[n] for n in jpegs]
    assert remote.split("train").count + remote.split("val").count == 4


def test_s3_prefix_without_pairs_fails_clearly(tmp_path, monkeypatch, write_params, s3_endpoint, caplog):
    monkeypatch.chdir(tmp_path)
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="empty-bucket")
    write_params(tmp_path / "params", source={"kind": "pix2pix", "path": "s3://empty-bucket/nothing", "s3": {"endpoint_url": s3_endpoint}})
    assert prepare(tmp_path) == 1
    assert "s3://empty-bucket/nothing: no training pairs found" in caplog.text
    assert not (tmp_path / "data/prepared").exists()


def test_s3_missing_bucket_fails_clearly(tmp_path, monkeypatch, write_params, s3_endpoint, caplog):
    monkeypatch.chdir(tmp_path)
    write_params(tmp_path / "params", source={"kind": "pix2pix", "path": "s3://no-such-bucket/x", "s3": {"endpoint_url": s3_endpoint, "max_attempts": 1}})
    assert prepare(tmp_path) == 1
    assert "s3://no-such-bucket/x: cannot list objects" in caplog.text and "NoSuchBucket" in caplog.text


class _CutFirstBodyProxy:
    """An HTTP proxy in front of the moto server that cuts the first download of each object
    short (the connection drops mid-body, as on a flaky network); later requests pass through."""

    def __init__(self, upstream: str):
        import http.client
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from urllib.parse import urlsplit

        target = urlsplit(upstream)
        cut: set[str] = set()
        lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _forward(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                connection = http.client.HTTPConnection(target.hostname, target.port, timeout=30)
                connection.request(self.command, self.path, body=body, headers=dict(self.headers))
                response = connection.getresponse()
                payload = response.read()
                is_object_get = self.command == "GET" and "?" not in self.path and "." in self.path.rsplit("/", 1)[-1]
                with lock:
                    first = is_object_get and response.status == 200 and self.path not in cut
                    if first:
                        cut.add(self.path)
                self.send_response(response.status)
                for name, value in response.getheaders():
                    if name.lower() not in {"content-length", "transfer-encoding", "connection"}:
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                if first:
                    self.send_header("Connection", "close")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload[: len(payload) // 2] if first else payload)
                if first:
                    self.close_connection = True
                connection.close()

            do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.cut = cut
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_s3_downloads_cut_short_are_retried_not_reported_as_bad_input(
    tmp_path, monkeypatch, write_params, write_pix2pix, s3_endpoint
):
    monkeypatch.chdir(tmp_path)
    write_pix2pix(tmp_path / "local", {"train": 3}, size=16)
    _upload(tmp_path / "local", s3_endpoint, "flaky-network", "set")
    proxy = _CutFirstBodyProxy(s3_endpoint)
    try:
        s3 = {"endpoint_url": proxy.url, "region": "us-east-1", "max_attempts": 3}
        write_params(tmp_path / "params", source={"kind": "pix2pix", "path": "s3://flaky-network/set", "s3": s3},
                     image_size=16, val_fraction=0)
        assert prepare(tmp_path) == 0
    finally:
        proxy.close()
    assert len(proxy.cut) == 3  # every object's first download really was cut short
    manifest = load_manifest(tmp_path / "data/prepared")
    assert manifest.split("train").count == 3 and manifest.skipped == []
