"""params/data.yaml validation: every mistake names the file, the dotted key and the reason, and nothing runs."""

from pathlib import Path

import pytest

from components.config import ParamsError, load_params
from components.config.data import DataParams
from pipelines.cli import main

REPO = Path(__file__).resolve().parents[2]


def test_shipped_params_use_the_small_builtin_source():
    # The default source is the folder the builtin_data stage writes, so that dvc.yaml can
    # make it a dependency of prepare; it does not exist before that stage runs.
    params = load_params(REPO / "params" / "data.yaml", DataParams, context={"check_source_path": False})
    assert (params.source.kind, params.source.path, params.source.direction) == ("pix2pix", "data/builtin", "AtoB")
    assert params.image_size == 64
    assert (params.source.builtin.train_pairs, params.source.builtin.val_pairs, params.source.builtin.test_pairs) == (512, 16, 64)


def _errors(path: Path, base_dir: Path) -> dict[str, str]:
    with pytest.raises(ParamsError) as caught:
        load_params(path, DataParams, context={"base_dir": base_dir})
    assert str(path) in str(caught.value)
    return dict(caught.value.problems)


@pytest.mark.parametrize(
    ("yaml_text", "key", "reason"),
    [
        ("image_sise: 64\n", "image_sise", "unknown key"),
        ("loader:\n  flipp: true\n", "loader.flipp", "unknown key"),
        ("image_size: big\n", "image_size", "valid integer"),
        ("jpeg_quality: 101\n", "jpeg_quality", "less than or equal to 100"),
        ("val_fraction: 1.0\n", "val_fraction", "less than 1"),
        ("mode: merge\n", "mode", "'overwrite' or 'append'"),
        ("on_bad_input: ignore\n", "on_bad_input", "'stop' or 'skip'"),
        ("source:\n  kind: pix2pix\n", "source.path", "is required when source.kind is pix2pix"),
        ("source:\n  kind: builtin\n  path: somewhere\n", "source.path", "must be null"),
        ("source:\n  kind: paired_folders\n  path: no/such/folder\n", "source.path", "not an existing folder"),
        ("source:\n  kind: pix2pix\n  path: 's3://'\n", "source.path", "names no bucket"),
        ("source:\n  builtin:\n    photos: [lena]\n", "source.builtin.photos[0]", "astronaut"),
        ("source:\n  s3:\n    max_attempts: 0\n", "source.s3.max_attempts", "greater than or equal to 1"),
        ("loader:\n  load_size: 64\n  crop_size: 72\n", "loader.crop_size", "larger than loader.load_size"),
        ("loader:\n  backend: tensorflow\n", "loader.backend", "'auto', 'dali' or 'torch'"),
    ],
)
def test_bad_value_names_key_and_reason(tmp_path, yaml_text, key, reason):
    path = tmp_path / "data.yaml"
    path.write_text(yaml_text)
    errors = _errors(path, tmp_path)
    assert key in errors, errors
    assert reason in errors[key]


def test_all_mistakes_reported_at_once(tmp_path):
    path = tmp_path / "data.yaml"
    path.write_text("image_size: 2\njpeg_quality: 0\nshard_max_count: 0\n")
    assert set(_errors(path, tmp_path)) == {"image_size", "jpeg_quality", "shard_max_count"}


def test_source_path_is_checked_relative_to_the_run_directory(tmp_path):
    (tmp_path / "pairs" / "train").mkdir(parents=True)
    path = tmp_path / "data.yaml"
    path.write_text("source:\n  kind: pix2pix\n  path: pairs\n")
    assert load_params(path, DataParams, context={"base_dir": tmp_path}).source.path == "pairs"
    assert "source.path" in _errors(path, tmp_path / "elsewhere")


def test_s3_path_needs_no_local_folder(tmp_path):
    path = tmp_path / "data.yaml"
    path.write_text("source:\n  kind: pix2pix\n  path: s3://bucket/facades\n  s3:\n    endpoint_url: http://127.0.0.1:9000\n")
    assert load_params(path, DataParams, context={"base_dir": tmp_path}).source.s3.endpoint_url == "http://127.0.0.1:9000"


def test_cli_exits_2_naming_file_and_key_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params").mkdir()
    (tmp_path / "params" / "data.yaml").write_text("source:\n  kind: pix2pix\n  path: missing\n")
    assert main(["prepare", "--params-dir", "params"]) == 2
    err = capsys.readouterr().err
    assert "params/data.yaml: source.path:" in err and "not an existing folder" in err
    assert not (tmp_path / "data").exists() and not (tmp_path / "reports").exists()
