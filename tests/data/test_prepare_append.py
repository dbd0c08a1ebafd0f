"""mode: append: existing shards stay byte-identical, new pairs go to new shards, changed pairs are reported."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from components.data.manifest import load_manifest
from pipelines.cli import main


def prepare() -> int:
    return main(["prepare", "--params-dir", "params", "--report", "reports/prepare.json", "--no-progress"])


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_append_adds_new_pairs_in_new_shards_and_reports_changed_ones(tmp_path, monkeypatch, write_params, write_pix2pix, caplog):
    monkeypatch.chdir(tmp_path)
    write_pix2pix(tmp_path / "pairs", {"train": 6, "test": 2}, size=16)
    write_params(tmp_path / "params", source={"kind": "pix2pix", "path": "pairs"}, image_size=16,
                 val_fraction=0.0, shard_max_count=4, mode="append")
    assert prepare() == 0  # nothing there yet: a fresh data set
    out = tmp_path / "data/prepared"
    before = snapshot(out)
    first = load_manifest(out)
    assert [s.count for s in first.split("train").shards] == [4, 2]

    write_pix2pix(tmp_path / "pairs", {"train": 3}, size=16, first=6)  # new 0006..0008
    changed = tmp_path / "pairs/train/0001.png"
    Image.fromarray(255 - np.asarray(Image.open(changed))).save(changed)  # same name, new content
    assert prepare() == 0

    after = snapshot(out)
    for name, data in before.items():
        if name != "manifest.json":
            assert after[name] == data, f"{name} was rewritten"
    second = load_manifest(out)
    train = second.split("train")
    assert [s.count for s in train.shards] == [4, 2, 3]  # old shards as they were, one new shard
    assert train.samples[:6] == first.split("train").samples  # keys, indices, checksums kept
    assert [(s.key, s.index, s.shard) for s in train.samples[6:]] == [("0006", 6, 2), ("0007", 7, 2), ("0008", 8, 2)]
    assert [(c["key"], c["origin"]) for c in second.changed] == [("0001", ["train/0001.png"])]
    assert second.split("test").samples == first.split("test").samples
    report = json.loads((tmp_path / "reports/prepare.json").read_text())
    assert report["new_pairs"] == 3 and report["changed"] == 1 and report["counts"]["train"] == 9
    assert "changed pair train/0001 not re-added" in caplog.text

    # nothing new: nothing written, same manifest
    assert prepare() == 0
    assert snapshot(out) == after
    assert json.loads((tmp_path / "reports/prepare.json").read_text())["new_pairs"] == 0


@pytest.mark.parametrize(("change", "key"), [({"image_size": 64}, "image_size"),
                                           ({"jpeg_chroma": {"source": "4:4:4", "target": "4:2:0"}}, "jpeg_chroma.target")])
def test_append_refuses_params_that_would_mix_two_data_sets(tmp_path, monkeypatch, write_params, caplog, change, key):
    monkeypatch.chdir(tmp_path)
    write_params(tmp_path / "params", mode="append")
    assert prepare() == 0
    before = snapshot(tmp_path / "data/prepared")
    write_params(tmp_path / "params", mode="append", **change)
    assert prepare() == 1
    assert f"params key {key} differs" in caplog.text and "mode: overwrite" in caplog.text
    assert snapshot(tmp_path / "data/prepared") == before


def test_append_of_more_builtin_pairs_keeps_existing_ones(tmp_path, monkeypatch, write_params):
    monkeypatch.chdir(tmp_path)
    write_params(tmp_path / "params", mode="append")
    assert prepare() == 0
    first = load_manifest(tmp_path / "data/prepared")
    more = {"kind": "builtin", "builtin": {"train_pairs": 14, "val_pairs": 3, "test_pairs": 3}}
    write_params(tmp_path / "params", mode="append", source=more)
    assert prepare() == 0
    second = load_manifest(tmp_path / "data/prepared")
    assert second.split("train").samples[:12] == first.split("train").samples
    assert [s.key for s in second.split("train").samples[12:]] == ["train-000012", "train-000013"]

    write_params(tmp_path / "params", mode="append", source={**more, "builtin": {**more["builtin"], "seed": 1}})
    assert prepare() == 1  # another seed is another data set


def test_append_never_stores_a_pair_twice_when_it_moves_split_or_is_renamed(tmp_path, monkeypatch, write_params, write_pix2pix, caplog):
    monkeypatch.chdir(tmp_path)
    write_pix2pix(tmp_path / "pairs", {"train": 6, "test": 2}, size=16)
    write_params(tmp_path / "params", source={"kind": "pix2pix", "path": "pairs"}, image_size=16,
                 val_fraction=0.0, shard_max_count=4, mode="append")
    assert prepare() == 0
    out = tmp_path / "data/prepared"
    before = snapshot(out)
    # a training pair moved into test/ would leak training data into the held-out split
    (tmp_path / "pairs/train/0003.png").rename(tmp_path / "pairs/test/moved.png")
    (tmp_path / "pairs/train/0004.png").rename(tmp_path / "pairs/train/renamed.png")
    assert prepare() == 0
    manifest = load_manifest(out)
    assert manifest.split("test").count == 2 and manifest.split("train").count == 6
    assert {name: data for name, data in snapshot(out).items() if name != "manifest.json"} == {
        name: data for name, data in before.items() if name != "manifest.json"
    }
    reasons = {(c["split"], c["key"]): c["reason"] for c in manifest.changed}
    assert "same content as train/0003" in reasons[("test", "moved")]
    assert "same content as train/0004" in reasons[("train", "renamed")]
    assert json.loads((tmp_path / "reports/prepare.json").read_text())["new_pairs"] == 0


def test_append_accepts_new_s3_connection_settings_but_not_another_source():
    from components.data.writer import PrepareError, _check_append_compatible

    def used(path: str, endpoint: str, attempts: int) -> dict:
        return {"source": {"kind": "pix2pix", "path": path, "direction": "AtoB",
                           "s3": {"endpoint_url": endpoint, "region": None, "max_attempts": attempts}},
                "image_size": 64, "jpeg_quality": 95, "val_fraction": 0.1, "seed": 0}

    class Existing:
        params = used("s3://pairs/set", "http://minio-old:9000", 5)
        location = "data/prepared"

    _check_append_compatible(Existing, used("s3://pairs/set", "https://minio-new:9000", 10))
    with pytest.raises(PrepareError, match="source.path"):
        _check_append_compatible(Existing, used("s3://other/set", "http://minio-old:9000", 5))


def test_append_to_a_data_set_prepared_before_the_chroma_param_takes_it_as_4_4_4():
    from components.data.writer import PrepareError, _check_append_compatible

    def used(**chroma: str) -> dict:
        return {"source": {"kind": "pix2pix", "path": "pairs", "direction": "AtoB"}, "image_size": 64,
                "jpeg_quality": 95, "val_fraction": 0.1, "seed": 0} | ({"jpeg_chroma": chroma} if chroma else {})

    class Existing:
        params = used()  # its manifest has no jpeg_chroma: both sides were stored at 4:4:4
        location = "data/prepared"

    _check_append_compatible(Existing, used(source="4:4:4", target="4:4:4"))
    with pytest.raises(PrepareError, match=r"jpeg_chroma.target differs .*\('4:4:4' -> '4:2:0'\)"):
        _check_append_compatible(Existing, used(source="4:4:4", target="4:2:0"))
