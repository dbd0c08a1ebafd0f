"""What a source may hold: symbolic links only within the folder, halves neither blown up nor stretched; refusals reported."""

import io
import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from components.config import with_overrides
from components.data.manifest import load_manifest
from pipelines.cli import main
from support.params import write_shipped

OUTSIDE = "symbolic link to a location outside the source folder; refused"


def write_data_params(folder: Path, **overrides) -> None:
    write_shipped(folder, "data", **with_overrides({"image_size": 32, "val_fraction": 0.0}, overrides))


def png(width: int, height: int, seed: int = 0) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def prepare() -> int:
    return main(["prepare", "--params-dir", "params", "--report", "reports/prepare.json", "--no-progress"])


@pytest.fixture
def source(tmp_path, write_pix2pix) -> Path:
    """A pix2pix folder with every kind of input the policy decides on, and files outside it."""
    root = write_pix2pix(tmp_path / "pairs", {"train": 2}, size=32)
    outside = tmp_path / "elsewhere"
    (outside / "test").mkdir(parents=True)
    (outside / "secret.png").write_bytes(png(64, 32, seed=1))  # a valid pair: accepted if the link were followed
    (outside / "test/0000.png").write_bytes(png(64, 32, seed=2))
    (root / "train/out.png").symlink_to(outside / "secret.png")
    (root / "train/in.png").symlink_to(root / "train/0000.png")  # inside: followed
    (root / "train/broken.png").symlink_to(root / "train/gone.png")
    (root / "train/loop").symlink_to(root)
    (root / "test").symlink_to(outside / "test", target_is_directory=True)  # a split folder linked out
    (root / ".versions/v2/val").mkdir(parents=True)
    (root / ".versions/v2/val/0000.png").write_bytes(png(64, 32, seed=3))
    (root / "val").symlink_to(root / ".versions/v2/val", target_is_directory=True)  # linked inside: followed
    (root / "train/tiny.png").write_bytes(png(2, 1))  # two 1x1 halves
    (root / "train/wide.png").write_bytes(png(100, 64))  # halves 50x64: stretched by 1.28
    (root / "train/almost.png").write_bytes(png(68, 32))  # halves 34x32: within max_aspect_ratio
    return root


REFUSED = {
    "test": OUTSIDE,
    "train/broken.png": "broken symbolic link",
    "train/loop": "symbolic link to a folder that contains it (a loop); refused",
    "train/out.png": OUTSIDE,
    "train/tiny.png": "each half (1x1 of a 2x1 image) is too small for image_size 32: it would be enlarged 32.0x "
                      "(max_upscale 4; at least 8 px per side needed)",
    "train/wide.png": "each half (50x64 of a 100x64 image) has aspect ratio 1.28: resizing it to 32x32 would stretch "
                      "it (max_aspect_ratio 1.25); crop it closer to a square",
}


def test_each_refusal_is_reported_with_its_reason_and_nothing_outside_is_read(tmp_path, monkeypatch, source, caplog):
    monkeypatch.chdir(tmp_path)
    caplog.set_level(logging.WARNING)
    write_data_params(tmp_path / "params", source={"kind": "pix2pix", "path": "pairs"}, on_bad_input="skip")
    assert prepare() == 0
    manifest = load_manifest(tmp_path / "data/prepared")
    assert {s.key for s in manifest.split("train").samples} == {"0000", "0001", "in", "almost"}
    assert [s.origin for s in manifest.split("val").samples] == [["val/0000.png"]]
    assert manifest.split("test").count == 0
    skipped = {item["path"]: item["reason"] for item in manifest.skipped}
    assert skipped.keys() == REFUSED.keys()
    for path, reason in REFUSED.items():
        assert reason in skipped[path], path
        assert f"skipped {path}: {skipped[path]}" in caplog.text
    report = json.loads((tmp_path / "reports/prepare.json").read_text())
    assert report["skipped_inputs"] == manifest.skipped and report["skipped"] == len(REFUSED)
    assert "elsewhere" not in (tmp_path / "data/prepared/manifest.json").read_text()


def test_stop_names_the_link_that_leaves_the_source(tmp_path, monkeypatch, write_pix2pix, caplog):
    monkeypatch.chdir(tmp_path)
    root = write_pix2pix(tmp_path / "pairs", {"train": 2}, size=32)
    (tmp_path / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    (root / "train/passwd.png").symlink_to(tmp_path / "passwd")
    write_data_params(tmp_path / "params", source={"kind": "pix2pix", "path": "pairs"})
    assert prepare() == 1
    assert f"train/passwd.png: {OUTSIDE}" in caplog.text and "root:x" not in caplog.text
    assert not (tmp_path / "data/prepared").exists()


def test_a_training_split_linked_out_of_the_source_is_named_in_the_error(tmp_path, monkeypatch, write_pix2pix, caplog):
    monkeypatch.chdir(tmp_path)
    elsewhere = write_pix2pix(tmp_path / "elsewhere", {"train": 2}, size=32)
    (tmp_path / "pairs").mkdir()
    os.symlink(elsewhere / "train", tmp_path / "pairs/train", target_is_directory=True)
    write_data_params(tmp_path / "params", source={"kind": "pix2pix", "path": "pairs"})
    assert prepare() == 1
    assert "pairs: no training pairs found" in caplog.text and f"train: {OUTSIDE}" in caplog.text


def test_paired_folders_of_stretched_images_are_refused(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    for side in ("A", "B"):
        (tmp_path / f"ab/{side}/train").mkdir(parents=True)
        (tmp_path / f"ab/{side}/train/good.png").write_bytes(png(40, 32))  # 1.25: the limit, accepted
        (tmp_path / f"ab/{side}/train/long.png").write_bytes(png(48, 32))
    write_data_params(tmp_path / "params", source={"kind": "paired_folders", "path": "ab"}, on_bad_input="skip")
    assert prepare() == 0
    manifest = load_manifest(tmp_path / "data/prepared")
    assert [s.key for s in manifest.split("train").samples] == ["good"]
    assert manifest.skipped == [{
        "split": "train", "path": "A/train/long.png",
        "reason": "each image (48x32) has aspect ratio 1.50: resizing it to 32x32 would stretch it "
                  "(max_aspect_ratio 1.25); crop it closer to a square (the same for its partner B/train/long.png)",
    }]
