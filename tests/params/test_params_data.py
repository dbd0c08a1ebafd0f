"""params/data.yaml validation: every mistake names the file, the dotted key and the reason, and nothing runs."""

from pathlib import Path

import pytest

from components.config import ParamsError, load_params
from components.config.data import DataParams
from pipelines.cli import main
from support.params import PARAMS, write_shipped


def test_shipped_params_use_the_small_builtin_source():
    # The default source is the folder the builtin_data stage writes, so that dvc.yaml can
    # make it a dependency of prepare; it does not exist before that stage runs.
    params = load_params(PARAMS / "data.yaml", DataParams, context={"check_source_path": False})
    assert (params.source.kind, params.source.path, params.source.direction) == ("pix2pix", "data/builtin", "AtoB")
    assert params.load_size == round(params.image_size * params.loader.load_scale) >= params.image_size
    assert params.image_size == 64
    assert (params.source.builtin.train_pairs, params.source.builtin.val_pairs, params.source.builtin.test_pairs) == (512, 16, 64)


def _errors(path: Path, base_dir: Path) -> dict[str, str]:
    with pytest.raises(ParamsError) as caught:
        load_params(path, DataParams, context={"base_dir": base_dir})
    assert str(path) in str(caught.value)
    return dict(caught.value.problems)


@pytest.mark.parametrize(
    ("overrides", "key", "reason"),
    [
        ({"image_sise": 64}, "image_sise", "unknown key"),
        ({"loader": {"flipp": True}}, "loader.flipp", "unknown key"),
        ({"image_size": "big"}, "image_size", "valid integer"),
        ({"image_size": 48}, "image_size", "not a power of two"),
        ({"image_size": 8}, "image_size", "greater than or equal to 16"),
        ({"jpeg_quality": 101}, "jpeg_quality", "less than or equal to 100"),
        ({"val_fraction": 1.0}, "val_fraction", "less than 1"),
        ({"jpeg_chroma": {"target": "4:1:1"}}, "jpeg_chroma.target", "'4:4:4', '4:2:2' or '4:2:0'"),
        ({"jpeg_chroma": {"sources": "4:4:4"}}, "jpeg_chroma.sources", "accepts source, target"),
        ({"jpeg_chroma": {"source": 444}}, "jpeg_chroma.source", "'4:4:4', '4:2:2' or '4:2:0'"),
        ({"mode": "merge"}, "mode", "'overwrite' or 'append'"),
        ({"on_bad_input": "ignore"}, "on_bad_input", "'stop' or 'skip'"),
        ({"source": {"kind": "pix2pix", "path": None}}, "source.path", "is required when source.kind is pix2pix"),
        ({"source": {"kind": "builtin", "path": "somewhere"}}, "source.path", "must be null"),
        ({"source": {"kind": "paired_folders", "path": "no/such/folder"}}, "source.path", "not an existing folder"),
        ({"source": {"path": "s3://"}}, "source.path", "names no bucket"),
        ({"source": {"builtin": {"photos": ["lena"]}}}, "source.builtin.photos[0]", "astronaut"),
        ({"source": {"s3": {"max_attempts": 0}}}, "source.s3.max_attempts", "greater than or equal to 1"),
        ({"loader": {"load_scale": 0.9}}, "loader.load_scale", "greater than or equal to 1"),
        ({"loader": {"load_scale": 3.0}}, "loader.load_scale", "less than or equal to 2"),
        ({"loader": {"backend": "tensorflow"}}, "loader.backend", "'auto', 'dali', 'torch' or 'nvjpeg'"),
        ({"loader": {"flip": "yes"}}, "loader.flip", "valid boolean"),
        ({"loader": {"crop_size": 64}}, "loader.crop_size", "the crop is image_size"),
        ({"loader": {"load_size": 72}}, "loader.load_size", "set loader.load_scale"),
    ],
)
def test_bad_value_names_key_and_reason(tmp_path, overrides, key, reason):
    errors = _errors(write_shipped(tmp_path, "data", **overrides), tmp_path)
    assert key in errors, errors
    assert reason in errors[key]


def test_all_mistakes_reported_at_once(tmp_path):
    path = write_shipped(tmp_path, "data", image_size=2, jpeg_quality=0, shard_max_count=0, source={"kind": "builtin", "path": None})
    assert set(_errors(path, tmp_path)) == {"image_size", "jpeg_quality", "shard_max_count"}


def test_source_path_is_checked_relative_to_the_run_directory(tmp_path):
    (tmp_path / "pairs" / "train").mkdir(parents=True)
    path = write_shipped(tmp_path, "data", source={"kind": "pix2pix", "path": "pairs"})
    assert load_params(path, DataParams, context={"base_dir": tmp_path}).source.path == "pairs"
    assert "source.path" in _errors(path, tmp_path / "elsewhere")


def test_s3_path_needs_no_local_folder(tmp_path):
    path = write_shipped(tmp_path, "data", source={"kind": "pix2pix", "path": "s3://bucket/facades",
                                                   "s3": {"endpoint_url": "http://127.0.0.1:9000"}})
    assert load_params(path, DataParams, context={"base_dir": tmp_path}).source.s3.endpoint_url == "http://127.0.0.1:9000"


def test_cli_exits_2_naming_file_and_key_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_shipped(tmp_path / "params", "data", source={"kind": "pix2pix", "path": "missing"})
    assert main(["prepare", "--params-dir", "params"]) == 2
    err = capsys.readouterr().err
    assert "params/data.yaml: source.path:" in err and "not an existing folder" in err
    assert not (tmp_path / "data").exists() and not (tmp_path / "reports").exists()


@pytest.mark.parametrize("stage", ["builtin-data", "prepare"])
def test_an_empty_data_yaml_prepares_nothing(tmp_path, monkeypatch, capsys, stage):
    # Not the built-in data by default: an empty file is a mistake, named.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params").mkdir()
    (tmp_path / "params" / "data.yaml").write_text("# emptied by mistake\n")
    assert main([stage, "--params-dir", "params"]) == 2
    assert "params/data.yaml: is empty" in capsys.readouterr().err
    assert sorted(path.name for path in tmp_path.iterdir()) == ["params"]


def test_an_unquoted_chroma_subsampling_is_explained(tmp_path):
    # YAML 1.1 reads 4:2:0 as the base-60 number 14520: the error says what was written and how to fix it.
    path = write_shipped(tmp_path, "data")
    text = path.read_text()
    assert "target: '4:4:4'" in text
    path.write_text(text.replace("target: '4:4:4'", "target: 4:2:0"))
    errors = _errors(path, tmp_path)
    assert errors["jpeg_chroma.target"] == "YAML read the unquoted 4:2:0 as the number 14520: quote it, '4:2:0'"
