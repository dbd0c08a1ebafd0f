"""`pairgan predict` on a folder: corrupt inputs, decompression bombs, existing outputs, unsafe folders, batching."""

import struct
import zlib

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
    folder, out = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    out.mkdir()
    Image.new("RGB", (20, 20), (10, 100, 200)).save(out / "sketch.png")
    (folder / "sketch.png").symlink_to(out / "sketch.png")  # the input lives where its output would go
    before = (out / "sketch.png").read_bytes()
    assert predict(generator, folder, folder, "--overwrite") == 1
    assert "is the --input folder" in capsys.readouterr().err
    assert predict(generator, folder, out, "--overwrite") == 1
    assert f"outputs would replace input images, nothing was written (choose another --output): {out / 'sketch.png'}" in (
        capsys.readouterr().err
    )
    assert (out / "sketch.png").read_bytes() == before


def decompression_bomb(path, side, complete=True):
    """A 1-bit greyscale PNG of side x side pixels, all black: a few kB that decode to side² pixels.

    complete=False writes only the start of the pixel data: PIL refuses it from the header alone."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    pixels = zlib.compress(b"\0" * ((1 + (side + 7) // 8) * (side if complete else 1)))
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # bit depth 1, greyscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b""))
    return path


@pytest.fixture(params=["warned", "refused"])
def bomb(request, inputs):
    """The input folder with one decompression bomb instead of the broken PNG; returns the bomb's name."""
    (inputs / "broken.png").unlink()
    if request.param == "warned":
        assert 10_000**2 > Image.MAX_IMAGE_PIXELS  # PIL only warns, then decodes 100 megapixels
        decompression_bomb(inputs / "warned.png", 10_000)
    else:
        assert 20_000**2 > 2 * Image.MAX_IMAGE_PIXELS  # PIL raises, from the header alone
        decompression_bomb(inputs / "refused.png", 20_000, complete=False)
    return f"{request.param}.png"


def test_a_decompression_bomb_stops_the_run_naming_the_file(generator, inputs, bomb, tmp_path, capsys):
    assert predict(generator, inputs, tmp_path / "out") == 1
    error = capsys.readouterr().err
    assert "1 unreadable image(s)" in error and bomb in error
    assert not (tmp_path / "out").exists()


def test_a_decompression_bomb_is_skipped_with_the_reason(generator, inputs, bomb, tmp_path, caplog):
    assert predict(generator, inputs, tmp_path / "out", "--on-bad-input", "skip") == 0
    assert any(bomb in record.getMessage() and "decompression bomb" in record.getMessage() for record in caplog.records)
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["photo0.png", "photo1.png", "photo2.png"]


def test_an_output_path_that_is_a_file_is_refused_and_kept(generator, inputs, tmp_path, capsys):
    (tmp_path / "results").write_text("my notes")
    for output in (tmp_path / "results", tmp_path / "results" / "sub"):
        assert predict(generator, inputs, output, "--on-bad-input", "skip") == 1
        assert f"{tmp_path / 'results'} is a file, not a folder" in capsys.readouterr().err
    assert (tmp_path / "results").read_text() == "my notes"


def test_outputs_into_the_input_folder_are_refused_whatever_the_input_format(generator, inputs, capsys):
    (inputs / "broken.png").unlink()  # only .jpg inputs: no output has an input's name
    before = sorted(path.name for path in inputs.iterdir())
    assert predict(generator, inputs, inputs) == 1
    assert "is the --input folder" in capsys.readouterr().err
    assert sorted(path.name for path in inputs.iterdir()) == before


def test_a_registry_reference_never_creates_a_tracking_store(generator, inputs, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no MLFLOW_TRACKING_URI: the store would be ./mlflow.db
    assert predict("models:/pairgan-generator@champion", inputs, tmp_path / "out", "--on-bad-input", "skip") == 1
    assert f"{tmp_path / 'mlflow.db'} does not exist" in capsys.readouterr().err
    assert sorted(path.name for path in tmp_path.iterdir()) == ["in"]  # no mlflow.db, no mlruns/, no out/

    (tmp_path / "mlflow.db").write_text("my own notes, not a database")
    assert predict("models:/pairgan-generator@champion", inputs, tmp_path / "out", "--on-bad-input", "skip") == 1
    assert "is not a SQLite database" in capsys.readouterr().err
    assert (tmp_path / "mlflow.db").read_text() == "my own notes, not a database"
