"""The builtin_data stage: the default example pairs (colour label map -> photo) written as a pix2pix folder."""

import hashlib

import numpy as np
import pytest
from PIL import Image

from components.config import load_params
from components.config.data import BuiltinSourceParams, DataParams
from components.data.builtin import LABEL_PALETTE, make_builtin_pair
from pipelines.cli import main
from support.params import shipped


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
    # Left half the label map (source), right half the photo (target), exactly the built-in pair.
    loaded = load_params(params / "data.yaml", DataParams, context={"check_source_path": False})
    labels, photo = make_builtin_pair(loaded.source.builtin, "train", 3, 32)
    stored = np.asarray(Image.open(folder / "train/000003.png"))
    assert stored.shape == (32, 64, 3)
    np.testing.assert_array_equal(stored[:, :32], labels)
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


def _pairs(params: BuiltinSourceParams, count: int, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    pairs = [make_builtin_pair(params, "train", index, size) for index in range(count)]
    return np.stack([labels for labels, _ in pairs]), np.stack([photo for _, photo in pairs]).astype(np.float64)


def test_a_label_means_the_same_colours_in_every_pair():
    # What makes the task learnable from few pairs, as a label map -> photo task should be: the
    # label map is painted in the palette only, and one label stands for similar photo colours
    # across all pairs (a label map with per-image colours would be noise to the network).
    params = shipped("data", source={"builtin": {"label_classes": 12}}).source.builtin
    labels, photos = _pairs(params, 24)
    palette = [tuple(colour) for colour in LABEL_PALETTE[: params.label_classes]]
    used = {tuple(colour) for colour in labels.reshape(-1, 3)}
    assert used <= set(palette) and len(used) >= 6
    flat_labels, flat_photos = labels.reshape(-1, 3), photos.reshape(-1, 3)
    spread_within = []
    for colour in used:
        members = flat_photos[(flat_labels == colour).all(axis=1)]
        spread_within.append(np.abs(members - members.mean(axis=0)).sum(axis=1).mean() * len(members))
    within = sum(spread_within) / len(flat_photos)
    overall = np.abs(flat_photos - flat_photos.mean(axis=0)).sum(axis=1).mean()
    assert within < 0.35 * overall, (within, overall)


def test_the_target_is_the_smoothed_photo_and_more_classes_give_a_finer_label_map():
    coarse, photos_smooth = _pairs(shipped("data", source={"builtin": {"label_classes": 4}}).source.builtin, 6)
    fine, _ = _pairs(shipped("data", source={"builtin": {"label_classes": 16}}).source.builtin, 6)
    _, photos_sharp = _pairs(shipped("data", source={"builtin": {"label_classes": 4, "target_smoothing": 0.0}}).source.builtin, 6)
    assert len({tuple(c) for c in coarse.reshape(-1, 3)}) <= 4 < len({tuple(c) for c in fine.reshape(-1, 3)})

    def roughness(images: np.ndarray) -> float:
        return float(np.abs(np.diff(images, axis=2)).mean())

    assert roughness(photos_smooth) < 0.8 * roughness(photos_sharp)


def test_raising_a_count_adds_pairs_and_keeps_the_existing_ones(tmp_path, write_params, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = write_params(tmp_path / "params", source={"kind": "pix2pix", "path": "out", "builtin": {"train_pairs": 3}})
    assert main(["builtin-data", "--params-dir", str(params), "--out", "out"]) == 0
    before = digest(tmp_path / "out")
    write_params(tmp_path / "params", source={"kind": "pix2pix", "path": "out", "builtin": {"train_pairs": 5}})
    assert main(["builtin-data", "--params-dir", str(params), "--out", "out"]) == 0
    after = digest(tmp_path / "out")
    assert {name: after[name] for name in before} == before
    assert sorted(after.keys() - before.keys()) == ["train/000003.png", "train/000004.png"]


@pytest.mark.parametrize(("builtin", "key"), [
    ({"label_classes": 1}, "source.builtin.label_classes"),
    ({"label_classes": 17}, "source.builtin.label_classes"),
    ({"target_smoothing": -1.0}, "source.builtin.target_smoothing"),
    ({"photos": ["astronaut", "moon"]}, "source.builtin.photos[1]"),
])
def test_a_bad_builtin_param_names_file_and_key_and_leaves_the_folder_as_it_was(
    tmp_path, write_params, monkeypatch, capsys, builtin, key
):
    monkeypatch.chdir(tmp_path)
    params = write_params(tmp_path / "params", source={"kind": "pix2pix", "path": "out", "builtin": {"train_pairs": 2}})
    assert main(["builtin-data", "--params-dir", str(params), "--out", "out"]) == 0
    before = digest(tmp_path / "out")
    write_params(tmp_path / "params", source={"kind": "pix2pix", "path": "out", "builtin": {"train_pairs": 4, **builtin}})
    assert main(["builtin-data", "--params-dir", str(params), "--out", "out"]) == 2
    error = capsys.readouterr().err
    assert f"{params / 'data.yaml'}: {key}: " in error
    assert digest(tmp_path / "out") == before
