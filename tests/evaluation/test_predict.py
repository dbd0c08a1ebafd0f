"""`pairgan predict` on a folder: corrupt inputs, existing outputs, batching."""

import pytest
from PIL import Image

from pipelines.cli import main as pairgan
from support.evaluation_fixtures import write_generator


@pytest.fixture(scope="module")
def generator(tmp_path_factory):
    return write_generator(tmp_path_factory.mktemp("model") / "generator.pt")


@pytest.fixture
def inputs(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for index, size in enumerate([(20, 20), (33, 17), (16, 40)]):
        Image.new("RGB", size, (40 * index, 100, 200)).save(folder / f"photo{index}.jpg")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"truncated")
    (folder / "README.txt").write_text("not an image, ignored")
    return folder


def predict(generator, inputs, output, *extra):
    return pairgan(["predict", "--model", str(generator), "--input", str(inputs), "--output", str(output), *extra])


def test_corrupt_image_stops_the_run_before_anything_is_written(generator, inputs, tmp_path, capsys):
    assert predict(generator, inputs, tmp_path / "out") == 1
    assert "broken.png" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_skip_names_the_corrupt_image_and_writes_the_others_at_their_size(generator, inputs, tmp_path, caplog):
    assert predict(generator, inputs, tmp_path / "out", "--on-bad-input", "skip", "--batch-size", "2") == 0
    assert "broken.png" in caplog.text
    written = {path.name: Image.open(path).size for path in (tmp_path / "out").iterdir()}
    assert written == {"photo0.png": (20, 20), "photo1.png": (33, 17), "photo2.png": (16, 40)}


def test_existing_outputs_are_never_overwritten_silently(generator, inputs, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "photo1.png").write_bytes(b"earlier result")
    assert predict(generator, inputs, out, "--on-bad-input", "skip") == 1
    assert "photo1.png" in capsys.readouterr().err
    assert (out / "photo1.png").read_bytes() == b"earlier result" and sorted(p.name for p in out.iterdir()) == ["photo1.png"]
    assert predict(generator, inputs, out, "--on-bad-input", "skip", "--overwrite") == 0
    assert Image.open(out / "photo1.png").size == (33, 17)


def test_two_inputs_that_would_write_one_output_are_refused(generator, inputs, tmp_path, capsys):
    Image.new("RGB", (8, 8)).save(inputs / "photo0.png")
    assert predict(generator, inputs, tmp_path / "out", "--on-bad-input", "skip") == 1
    assert "photo0.jpg" in capsys.readouterr().err


def test_missing_or_wrong_model_file_is_named(inputs, tmp_path, capsys):
    assert predict(tmp_path / "nothing.pt", inputs, tmp_path / "out") == 1
    assert "nothing.pt" in capsys.readouterr().err
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    assert predict(tmp_path / "notes.pt", inputs, tmp_path / "out") == 1
    assert "notes.pt: cannot be used as a generator" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_outputs_never_replace_the_input_images_even_with_overwrite(generator, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    Image.new("RGB", (20, 20), (10, 100, 200)).save(folder / "sketch.png")
    before = (folder / "sketch.png").read_bytes()
    assert predict(generator, folder, folder, "--overwrite") == 1
    assert "sketch.png" in capsys.readouterr().err
    assert (folder / "sketch.png").read_bytes() == before
