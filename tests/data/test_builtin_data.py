"""The builtin_data stage: the default example pairs written as a pix2pix folder for `prepare`."""

import hashlib

import numpy as np
from PIL import Image

from components.config import load_params
from components.config.data import DataParams
from components.data.builtin import make_builtin_pair
from pipelines.cli import main


def digest(folder):
    return {path.relative_to(folder).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


def test_writes_pix2pix_layout_that_prepare_reads(tmp_path, write_params, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = write_params(tmp_path / "params", source={"kind": "pix2pix", "path": "data/builtin", "direction": "AtoB",
                                                       "builtin": {"train_pairs": 5, "val_pairs": 2, "test_pairs": 1}})
    assert main(["builtin-data", "--params-dir", str(params), "--out", "data/builtin"]) == 0

    folder = tmp_path / "data/builtin"
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.png")) == [
        "test/000000.png", "train/000000.png", "train/000001.png", "train/000002.png", "train/000003.png",
        "train/000004.png", "val/000000.png", "val/000001.png"]
    # Left half the edge map (source), right half the photo (target), exactly the built-in pair.
    loaded = load_params(params / "data.yaml", DataParams, context={"check_source_path": False})
    edges, photo = make_builtin_pair(loaded.source.builtin, "train", 3, 32)
    stored = np.asarray(Image.open(folder / "train/000003.png"))
    assert stored.shape == (32, 64, 3)
    np.testing.assert_array_equal(stored[:, :32], edges)
    np.testing.assert_array_equal(stored[:, 32:], photo)

    # Same params, same bytes: DVC sees an unchanged output.
    first = digest(folder)
    assert main(["builtin-data", "--params-dir", str(params), "--out", "data/builtin"]) == 0
    assert digest(folder) == first
    assert not (tmp_path / "data/.builtin.staging").exists()

    assert main(["prepare", "--params-dir", str(params), "--out", "data/prepared", "--report", "prepare.json",
                 "--no-progress"]) == 0
    manifest = (tmp_path / "data/prepared/manifest.json").read_text()
    assert '"train"' in manifest and '"val"' in manifest


def test_fewer_pairs_leave_no_stale_files(tmp_path, write_params, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = write_params(tmp_path / "params", source={"kind": "pix2pix", "path": "out", "builtin": {"train_pairs": 4}})
    assert main(["builtin-data", "--params-dir", str(params), "--out", "out"]) == 0
    write_params(tmp_path / "params", source={"kind": "pix2pix", "path": "out", "builtin": {"train_pairs": 2}})
    assert main(["builtin-data", "--params-dir", str(params), "--out", "out"]) == 0
    assert sorted(p.name for p in (tmp_path / "out/train").iterdir()) == ["000000.png", "000001.png"]


def test_a_split_with_no_pairs_gets_no_folder_and_prepare_carves_val(tmp_path, write_params, monkeypatch):
    # val_pairs: 0 is valid: an empty val/ folder would make prepare stop on an "empty split"
    monkeypatch.chdir(tmp_path)
    params = write_params(tmp_path / "params", source={"kind": "pix2pix", "path": "data/builtin",
                                                       "builtin": {"train_pairs": 8, "val_pairs": 0, "test_pairs": 2}},
                          val_fraction=0.25)
    assert main(["builtin-data", "--params-dir", str(params), "--out", "data/builtin"]) == 0
    assert sorted(p.name for p in (tmp_path / "data/builtin").iterdir()) == ["test", "train"]
    assert main(["prepare", "--params-dir", str(params), "--out", "data/prepared", "--report", "prepare.json",
                 "--no-progress"]) == 0
    from components.data.manifest import load_manifest

    counts = {name: split.count for name, split in load_manifest(tmp_path / "data/prepared").splits.items()}
    assert counts["test"] == 2 and counts["train"] + counts["val"] == 8
