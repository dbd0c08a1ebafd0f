"""Every shard reader refuses tar members with absolute paths, '..' or links, before reading anything."""

import io
import shutil
import tarfile
from pathlib import Path

import pytest

from components.data.loaders import make_loader
from components.data.manifest import load_manifest
from components.data.tar_safety import UnsafeTarError, check_tar_members
from support.params import shipped


def write_tar(path: Path, members: list[tarfile.TarInfo]) -> Path:
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for member in members:
            data = b"x" * member.size
            tar.addfile(member, io.BytesIO(data) if member.isfile() else None)
    return path


def regular(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = 4
    return info


def symlink(name: str, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.SYMTYPE
    info.linkname = target
    return info


@pytest.mark.parametrize(
    ("member", "reason"),
    [
        (regular("/etc/cron.d/k.src.jpg"), "absolute path"),
        (regular("../../outside.src.jpg"), "'..'"),
        (regular("shards/../../k.tgt.jpg"), "'..'"),
        (regular("..\\windows.src.jpg"), "backslash"),
        (symlink("k.src.jpg", "/etc/passwd"), "not a regular file"),
    ],
)
def test_unsafe_member_is_refused_naming_shard_and_member(tmp_path, member, reason):
    shard = write_tar(tmp_path / "evil.tar", [regular("good.src.jpg"), member])
    with pytest.raises(UnsafeTarError) as caught:
        check_tar_members(shard)
    message = str(caught.value)
    assert str(shard) in message and repr(member.name) in message and reason in message


def test_plain_shard_passes(tmp_path):
    check_tar_members(write_tar(tmp_path / "ok.tar", [regular("k.src.jpg"), regular("k.tgt.jpg")]))


def test_not_a_tar_is_refused(tmp_path):
    (tmp_path / "junk.tar").write_bytes(b"\x00junk" * 20)
    with pytest.raises(UnsafeTarError, match="not a readable tar archive"):
        check_tar_members(tmp_path / "junk.tar")


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_loaders_check_every_shard_before_reading(tmp_path, prepared_builtin, backend):
    import hashlib
    import json

    from components.data.integrity import DataError
    from components.data.manifest import _canonical

    copy = shutil.copytree(prepared_builtin, tmp_path / "data")
    shard = copy / load_manifest(copy).split("train").shards[1].tar
    write_tar(shard, [regular("k.src.jpg"), regular("../k.tgt.jpg")])
    params = shipped("data", loader={"backend": backend}).loader
    # a replaced shard fails its checksum first
    with pytest.raises(DataError, match="train-000001.tar.*missing"):
        make_loader(copy, "train", params, batch_size=2, train=True)
    # a manifest crafted to match it: the tar headers are still checked before anything is read
    body = json.loads((copy / "manifest.json").read_text())
    body.pop("checksum")
    body["splits"]["train"]["shards"][1]["sha256"] = hashlib.sha256(shard.read_bytes()).hexdigest()
    body["checksum"] = hashlib.sha256(_canonical(body)).hexdigest()
    (copy / "manifest.json").write_text(json.dumps(body))
    with pytest.raises(UnsafeTarError, match="k.tgt.jpg"):
        make_loader(copy, "train", params, batch_size=2, train=True)


@pytest.mark.parametrize("bad_path", ["../../outside/train-000000.tar", "/etc/shard.tar"])
def test_a_manifest_pointing_a_shard_outside_its_folder_is_refused(tmp_path, prepared_builtin, bad_path):
    import hashlib
    import json

    from components.data.manifest import ManifestError, _canonical

    copy = shutil.copytree(prepared_builtin, tmp_path / "data")
    body = json.loads((copy / "manifest.json").read_text())
    body.pop("checksum")
    body["splits"]["train"]["shards"][0]["tar"] = bad_path
    # a consistent checksum: the checksum catches accidents, not a crafted manifest
    body["checksum"] = hashlib.sha256(_canonical(body)).hexdigest()
    (copy / "manifest.json").write_text(json.dumps(body))
    with pytest.raises(ManifestError, match=r"splits\.train\.shards\[0\]\.tar .*leaves the data set's folder"):
        make_loader(copy, "train", shipped("data", loader={"backend": "torch"}).loader, batch_size=2, train=True)
