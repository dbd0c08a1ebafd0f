"""Shards on S3: each rank fetches its own share into a node-local cache, verified, reused, bounded, shared safely."""

import json
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest
import torch
import yaml

from components.config.data import DataParams, LoaderParams
from components.data.integrity import DataError
from components.data.loaders import make_loader, verified_shards
from components.data.manifest import load_manifest
from components.data.shard_cache import ShardCache
from components.data.sources import open_source
from components.data.writer import prepare_dataset

REPO = Path(__file__).resolve().parents[2]
BUCKET = "shard-cache"


def merged(base: dict, overrides: dict) -> dict:
    out = dict(base)
    for key, value in overrides.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def data_params(**overrides) -> DataParams:
    """The shipped params/data.yaml with the small built-in source (13 train pairs, shards of 5) and overrides."""
    shipped = yaml.safe_load((REPO / "params/data.yaml").read_text())
    small = {"source": {"kind": "builtin", "path": None, "builtin": {"train_pairs": 13, "val_pairs": 2, "test_pairs": 2}},
             "image_size": 32, "shard_max_count": 5, "loader": {"load_scale": 1.0, "num_threads": 1}}
    return DataParams.model_validate(merged(merged(shipped, small), overrides))


def loader_params(cache_dir: Path, **overrides) -> LoaderParams:
    return data_params(loader={"cache_dir": str(cache_dir), **overrides}).loader


@pytest.fixture(scope="module")
def s3_data(s3_endpoint, tmp_path_factory) -> tuple[str, Path]:
    """The same data set on S3 (s3://shard-cache/set) and in a local folder."""
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    client.create_bucket(Bucket=BUCKET)
    params = data_params()
    prepare_dataset(params, open_source(params, Path.cwd()), f"s3://{BUCKET}/set", progress=False, client=client)
    local = tmp_path_factory.mktemp("local") / "set"
    prepare_dataset(params, open_source(params, Path.cwd()), local, progress=False)
    return f"s3://{BUCKET}/set", local


@pytest.fixture
def client(s3_endpoint):
    return boto3.client("s3", endpoint_url=s3_endpoint)


def cached(cache_dir: Path) -> set[str]:
    return {path.stem for path in (cache_dir / "shards").glob("*.tar")}


def checksums(manifest, *numbers: int) -> set[str]:
    return {manifest.split("train").shards[n].sha256 for n in numbers}


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_each_rank_fetches_only_its_shards_and_reads_what_the_local_copy_gives(s3_data, client, tmp_path, backend):
    uri, local = s3_data
    manifest = load_manifest(uri, client)
    for rank, shards in ((0, (0, 1)), (1, (1, 2))):  # rank 0 owns samples 0..5, rank 1 samples 6..12
        cache = tmp_path / f"node{rank}"
        remote = make_loader(uri, "train", loader_params(cache, backend=backend), batch_size=2, train=False,
                             rank=rank, world_size=2, client=client)
        assert cached(cache) == checksums(manifest, *shards)
        plain = make_loader(local, "train", loader_params(cache, backend=backend), batch_size=2, train=False,
                            rank=rank, world_size=2)
        batches, expected = list(remote), list(plain)
        assert [b["index"].tolist() for b in batches] == [b["index"].tolist() for b in expected]
        assert all(torch.equal(b["source"], e["source"]) and torch.equal(b["target"], e["target"])
                   for b, e in zip(batches, expected))


def test_the_cache_is_reused_and_a_damaged_entry_fetched_again(s3_data, client, tmp_path):
    uri, _ = s3_data
    manifest = load_manifest(uri, client)
    everything = range(manifest.split("train").count)

    def fetch() -> tuple[ShardCache, list[Path]]:
        cache = ShardCache(tmp_path / "cache", max_bytes=1 << 30)
        shards, _ = verified_shards(manifest, "train", everything, cache, client)
        return cache, [shard.path for shard in shards]

    cache, paths = fetch()
    assert cache.fetched == 3
    content = [path.read_bytes() for path in paths]
    assert fetch()[0].fetched == 0  # a later run on this node downloads nothing
    paths[0].write_bytes(b"garbage")  # overwritten
    with open(paths[2], "r+b") as handle:
        handle.truncate(1000)  # cut short
    cache, paths = fetch()
    assert cache.fetched == 2 and [path.read_bytes() for path in paths] == content


def test_least_recently_used_shards_are_evicted_never_pinned_ones(s3_data, client, tmp_path, caplog):
    uri, _ = s3_data
    manifest = load_manifest(uri, client)
    shard_bytes = [len(client.get_object(Bucket=BUCKET, Key=f"set/{s.tar}")["Body"].read())
                   for s in manifest.split("train").shards]
    cache = ShardCache(tmp_path / "cache", max_bytes=shard_bytes[0] + shard_bytes[1] + 100)  # room for two
    one_shard = [range(0, 5), range(5, 10), range(10, 13)]

    def use(number: int):
        return verified_shards(manifest, "train", one_shard[number], cache, client)[1]

    use(0).release()
    pins = [use(1), use(2)]  # shard 0 is the least recently used and not pinned
    assert cached(cache.root) == checksums(manifest, 1, 2)
    use(1).release()  # shard 1 used again: now shard 2 is the least recently used
    for pin in pins:
        pin.release()
    use(0).release()
    assert cached(cache.root) == checksums(manifest, 0, 1)
    # a share larger than the cache stays whole while in use, with a warning
    small = ShardCache(tmp_path / "small", max_bytes=1)
    shards, pin = verified_shards(manifest, "train", range(0, 13), small, client)
    assert cached(small.root) == checksums(manifest, 0, 1, 2) and all(shard.path.exists() for shard in shards)
    assert "more than its" in caplog.text
    pin.release()
    small.evict()
    assert cached(small.root) == set()


FETCH_IN_A_PROCESS = """
import json, sys, time
from pathlib import Path
import boto3
from components.data.loaders import verified_shards
from components.data.manifest import load_manifest
from components.data.shard_cache import ShardCache

endpoint, uri, cache_dir, ready, go = sys.argv[1:]
client = boto3.client("s3", endpoint_url=endpoint)
manifest = load_manifest(uri, client)
cache = ShardCache(Path(cache_dir), max_bytes=1 << 30)
Path(ready).touch()
while not Path(go).exists():  # both processes start fetching at the same moment
    time.sleep(0.001)
shards, _ = verified_shards(manifest, "train", range(manifest.split("train").count), cache, client)
print(json.dumps({"fetched": cache.fetched, "paths": [str(s.path) for s in shards]}))
"""


def test_two_workers_of_one_node_download_each_shard_once(s3_data, s3_endpoint, tmp_path):
    uri, _ = s3_data
    go = tmp_path / "go"
    workers = [
        subprocess.Popen([sys.executable, "-c", FETCH_IN_A_PROCESS, s3_endpoint, uri, str(tmp_path / "cache"),
                          str(tmp_path / f"ready{number}"), str(go)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for number in range(2)
    ]
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"ready{number}").exists() for number in range(2)) and time.monotonic() < deadline:
        time.sleep(0.01)
    go.touch()
    results = []
    for worker in workers:
        out, err = worker.communicate(timeout=120)
        assert worker.returncode == 0, err
        results.append(json.loads(out))
    assert sum(result["fetched"] for result in results) == 3
    assert results[0]["paths"] == results[1]["paths"]
    manifest = load_manifest(uri, boto3.client("s3", endpoint_url=s3_endpoint))
    assert cached(tmp_path / "cache") == checksums(manifest, 0, 1, 2)
    assert list((tmp_path / "cache/tmp").iterdir()) == []  # no partial download left


def test_a_shard_replaced_on_s3_is_refused_naming_it_and_never_cached(s3_endpoint, client, tmp_path):
    client.create_bucket(Bucket="replaced")
    params = data_params()
    prepare_dataset(params, open_source(params, Path.cwd()), "s3://replaced/set", progress=False, client=client)
    other = data_params(jpeg_quality=50)
    prepare_dataset(other, open_source(other, Path.cwd()), tmp_path / "other", progress=False)
    client.upload_file(str(tmp_path / "other/train/train-000001.tar"), "replaced", "set/train/train-000001.tar")
    with pytest.raises(DataError) as caught:
        make_loader("s3://replaced/set", "train", loader_params(tmp_path / "cache", backend="torch"), batch_size=2,
                    train=True, client=client)
    assert str(caught.value).startswith("s3://replaced/set/train/train-000001.tar, sample train/train-000005 (index 5): ")
    manifest = load_manifest("s3://replaced/set", client)
    assert cached(tmp_path / "cache") == checksums(manifest, 0)  # only the good shard fetched before it
    assert list((tmp_path / "cache/tmp").iterdir()) == []
