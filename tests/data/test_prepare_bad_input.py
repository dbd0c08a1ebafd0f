"""Bad inputs: `stop` lists every bad file with its reason and writes nothing; `skip` writes the good pairs and lists the rest."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from components.data.manifest import load_manifest
from pipelines.cli import main

# file (relative to the source root) -> the reason the stage must give for it
PAIRED_FOLDER_PROBLEMS = {
    "A/train/corrupt.png": "not a readable image (unknown or corrupt format)",
    "B/train/truncated.jpg": "not a readable image",
    "A/train/lonely.png": "its partner is missing from B/",
    "B/train/orphan.png": "its partner is missing from A/",
    "A/train/mismatch.png": "size 16x16 differs from its partner B/train/mismatch.png (20x16)",
    "A/train/alpha.png": "image mode RGBA not supported",
    "B/train/cmyk.jpg": "image mode CMYK not supported",
    "A/train/deep.png": "image mode I;16 not supported",
    "A/train/notes.txt": "not an image file type (.txt)",
    "B/train/twin.png": "same pair key 'twin' as B/train/twin.jpg",
    "val/": "empty split",
}
PIX2PIX_PROBLEMS = {
    "train/odd.png": "width 33 is odd",
    "train/corrupt.jpg": "not a readable image",
    "test/": "empty split",
    "stray.png": "outside the layout (expected train|val|test/<image>)",
}


def _image(mode: str, size: tuple[int, int], fmt: str) -> bytes:
    buffer = io.BytesIO()
    rng = np.random.default_rng(0)
    if mode == "I;16":
        Image.fromarray(rng.integers(0, 65535, size[::-1], dtype=np.uint16)).save(buffer, format=fmt)
    else:
        Image.new(mode, size, (10, 20, 30, 40)[: len(mode)] if mode != "L" else 10).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture
def bad_paired_folders(tmp_path, write_paired_folders) -> Path:
    root = write_paired_folders(tmp_path / "ab", {"train": 4}, size=16)
    (root / "A/val").mkdir()  # a split folder with nothing in it
    (root / "B/val").mkdir()
    files = {
        "A/train/corrupt.png": b"\x89PNG\r\n\x1a\n but not really",
        "B/train/corrupt.png": _image("RGB", (16, 16), "PNG"),
        "A/train/truncated.jpg": _image("RGB", (16, 16), "JPEG"),
        "B/train/truncated.jpg": _image("RGB", (64, 64), "JPEG")[:300],
        "A/train/lonely.png": _image("RGB", (16, 16), "PNG"),
        "B/train/orphan.png": _image("RGB", (16, 16), "PNG"),
        "A/train/mismatch.png": _image("RGB", (16, 16), "PNG"),
        "B/train/mismatch.png": _image("RGB", (20, 16), "PNG"),
        "A/train/alpha.png": _image("RGBA", (16, 16), "PNG"),
        "B/train/alpha.png": _image("RGB", (16, 16), "PNG"),
        "A/train/cmyk.jpg": _image("RGB", (16, 16), "JPEG"),
        "B/train/cmyk.jpg": _image("CMYK", (16, 16), "JPEG"),
        "A/train/deep.png": _image("I;16", (16, 16), "PNG"),
        "B/train/deep.png": _image("L", (16, 16), "PNG"),
        "A/train/notes.txt": b"not a picture",
        "A/train/twin.png": _image("RGB", (16, 16), "PNG"),
        "B/train/twin.png": _image("RGB", (16, 16), "PNG"),
        "B/train/twin.jpg": _image("RGB", (16, 16), "JPEG"),
        "A/train/palette.png": _image("L", (16, 16), "PNG"),  # grey and palette images are fine
        "B/train/palette.png": _image("P", (16, 16), "PNG"),
        "A/train/.DS_Store": b"hidden files are ignored",
    }
    for name, data in files.items():
        (root / name).write_bytes(data)
    return root


@pytest.fixture
def bad_pix2pix(tmp_path, write_pix2pix) -> Path:
    root = write_pix2pix(tmp_path / "p2p", {"train": 3}, size=16)
    (root / "test").mkdir()
    (root / "train/odd.png").write_bytes(_image("RGB", (33, 16), "PNG"))
    (root / "train/corrupt.jpg").write_bytes(b"\xff\xd8\xff garbage")
    (root / "stray.png").write_bytes(_image("RGB", (32, 16), "PNG"))
    (root / "README.md").write_text("notes next to the data are not inputs")
    return root


def prepare() -> int:
    return main(["prepare", "--params-dir", "params", "--report", "reports/prepare.json", "--no-progress"])


@pytest.mark.parametrize(
    ("kind", "folder", "problems"),
    [("paired_folders", "bad_paired_folders", PAIRED_FOLDER_PROBLEMS), ("pix2pix", "bad_pix2pix", PIX2PIX_PROBLEMS)],
)
def test_stop_lists_every_bad_file_and_writes_nothing(tmp_path, monkeypatch, write_params, caplog, request, kind, folder, problems):
    root = request.getfixturevalue(folder)
    monkeypatch.chdir(tmp_path)
    write_params(tmp_path / "params", source={"kind": kind, "path": root.name}, image_size=16, shard_max_count=2)
    assert prepare() == 1
    lines = [line.strip() for line in caplog.text.splitlines()]
    assert f"{len(problems)} bad input(s) in {root.name}; nothing was written" in caplog.text
    for path, reason in problems.items():
        assert any(line.startswith(f"{path}: ") and reason in line for line in lines), (path, reason, caplog.text)
    assert ".DS_Store" not in caplog.text and "README" not in caplog.text
    assert not (tmp_path / "data/prepared").exists() and not list((tmp_path / "data").rglob("*"))
    assert not (tmp_path / "reports").exists()


def test_stop_leaves_an_existing_data_set_untouched(tmp_path, monkeypatch, write_params, write_pix2pix, bad_pix2pix):
    monkeypatch.chdir(tmp_path)
    write_pix2pix(tmp_path / "good", {"train": 3}, size=16)
    write_params(tmp_path / "params", source={"kind": "pix2pix", "path": "good"}, image_size=16)
    assert prepare() == 0
    before = (tmp_path / "data/prepared/manifest.json").read_bytes()
    write_params(tmp_path / "params", source={"kind": "pix2pix", "path": bad_pix2pix.name}, image_size=16)
    assert prepare() == 1
    assert (tmp_path / "data/prepared/manifest.json").read_bytes() == before


def test_skip_writes_good_pairs_and_lists_each_skipped_file(tmp_path, monkeypatch, write_params, bad_paired_folders):
    monkeypatch.chdir(tmp_path)
    write_params(tmp_path / "params", source={"kind": "paired_folders", "path": "ab"}, image_size=16,
                 on_bad_input="skip", val_fraction=0)
    assert prepare() == 0
    manifest = load_manifest(tmp_path / "data/prepared")
    assert [s.key for s in manifest.split("train").samples] == ["0000", "0001", "0002", "0003", "palette", "twin"]
    skipped = {item["path"]: item["reason"] for item in manifest.skipped}
    assert set(skipped) == set(PAIRED_FOLDER_PROBLEMS)
    for path, reason in PAIRED_FOLDER_PROBLEMS.items():
        assert reason in skipped[path]
    report = json.loads((tmp_path / "reports/prepare.json").read_text())
    assert report["skipped"] == len(PAIRED_FOLDER_PROBLEMS) and report["skipped_inputs"] == manifest.skipped
    assert report["counts"] == {"train": 6, "val": 0, "test": 0}


def test_no_training_pairs_at_all_is_an_error_even_with_skip(tmp_path, monkeypatch, write_params, caplog):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty/train").mkdir(parents=True)
    write_params(tmp_path / "params", source={"kind": "pix2pix", "path": "empty"}, on_bad_input="skip")
    assert prepare() == 1
    assert "empty: no training pairs found for layout pix2pix" in caplog.text
