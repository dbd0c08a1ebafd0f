"""Shards are verified against the manifest before use; a damaged one is one DataError line naming shard and sample."""

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from components.config.data import LoaderParams
from components.data.integrity import DataError, read_tar_samples
from components.data.loaders import make_loader, verified_shards
from components.data.manifest import load_manifest
from components.data.shard_cache import ShardCache

BACKENDS = ["dali", "torch"]
REPO = Path(__file__).resolve().parents[2]


def loader_params(**overrides) -> LoaderParams:
    """The shipped params/data.yaml loader section with overrides."""
    shipped = yaml.safe_load((REPO / "params/data.yaml").read_text())["loader"]
    return LoaderParams.model_validate({**shipped, "load_scale": 1.0, "num_threads": 1, **overrides})


@pytest.fixture
def data(tmp_path, prepared_builtin) -> Path:
    """A private copy of the session's prepared set (13 train pairs in shards of 5, 5, 3)."""
    return shutil.copytree(prepared_builtin, tmp_path / "data")


def member(shard: Path, index_in_shard: int, suffix: str):
    sample = read_tar_samples(shard)[index_in_shard]
    return next(m for m in sample.members if m.suffix == suffix)


def overwrite(path: Path, offset: int, data: bytes, keep_mtime: bool = False) -> None:
    stat = path.stat()
    with open(path, "r+b") as handle:
        handle.seek(offset)
        handle.write(data)
    if keep_mtime:  # damage that leaves size and modification time as they were (bit rot)
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_shard_cut_at_a_member_boundary_names_the_shard_and_the_missing_sample(data, backend):
    shard = data / "train/train-000001.tar"  # samples 5..9
    last = member(shard, 1, "index")  # cut right after sample 6's last member: a valid-looking tar
    end = last.offset + last.size
    with open(shard, "r+b") as handle:
        handle.truncate(end + (-end % 512))
    with pytest.raises(DataError) as caught:
        make_loader(data, "train", loader_params(backend=backend), batch_size=2, train=True)
    message = str(caught.value)
    assert message.startswith(f"{data / 'train/train-000001.tar'}, sample train/train-000007 (index 7): missing")
    assert "3 of the shard's 5 samples are not in it" in message and "cut short" in message
    assert "\n" not in message and "Malformed index" not in message


@pytest.mark.parametrize("backend", BACKENDS)
def test_random_bytes_inside_a_jpeg_member_name_the_sample(data, backend):
    shard = data / "train/train-000001.tar"
    jpeg = member(shard, 1, "tgt.jpg")
    # inside the compressed data, where a decoder shows noise rather than an error
    overwrite(shard, jpeg.offset + jpeg.size // 2, np.random.default_rng(0).integers(0, 256, 16, np.uint8).tobytes())
    with pytest.raises(DataError) as caught:
        make_loader(data, "train", loader_params(backend=backend), batch_size=2, train=True)
    # Whether the decoder shows noise or fails on these bytes, the error names the shard and the sample.
    message = str(caught.value)
    assert message.startswith(f"{shard}, sample train/train-000006 (index 6): ") and "\n" not in message
    assert "its bytes differ from what `prepare` wrote" in message or "does not decode" in message


@pytest.mark.parametrize("backend", BACKENDS)
def test_damage_after_verification_met_while_reading_names_the_shard_and_sample(data, backend):
    loader = make_loader(data, "train", loader_params(backend=backend), batch_size=13, train=False)
    shard = data / "train/train-000002.tar"  # samples 10..12
    jpeg = member(shard, 1, "src.jpg")
    overwrite(shard, jpeg.offset, b"\x00" * 64, keep_mtime=True)  # the JPEG header is gone
    with pytest.raises(DataError) as caught:
        list(loader)
    message = str(caught.value)
    assert message.startswith(f"{shard}, sample train/train-000011 (index 11): ")
    assert "src.jpg" in message and "\n" not in message


def test_each_shard_is_hashed_once_per_node_until_it_changes(data, tmp_path):
    manifest = load_manifest(data)
    everything = range(0, manifest.split("train").count)

    def verify() -> ShardCache:
        cache = ShardCache(tmp_path / "cache", max_bytes=1 << 30)
        verified_shards(manifest, "train", everything, cache)
        return cache

    assert verify().hashed == 3
    assert verify().hashed == 0  # a later run (a new process) trusts the record
    shard = data / "train/train-000000.tar"
    shard.write_bytes(shard.read_bytes())  # rewritten with the same bytes: checked again, and fine
    assert verify().hashed == 1
    overwrite(shard, 600, b"\xff" * 8)
    with pytest.raises(DataError, match="train-000000.tar, sample train/train-000000 "):
        verify()


def test_a_shard_missing_from_disk_is_named(data):
    (data / "train/train-000002.tar").unlink()
    with pytest.raises(DataError, match=r"train/train-000002.tar: shard listed in the manifest is missing"):
        make_loader(data, "train", loader_params(backend="torch"), batch_size=2, train=True)


def test_a_data_set_rewritten_since_the_job_started_is_refused(data):
    with pytest.raises(DataError, match="the data set changed since this job started"):
        make_loader(data, "train", loader_params(backend="torch"), batch_size=2, train=True,
                    expected_checksum="0" * 64)
