"""The `run:` section of params/train.yaml: every bad value stops the stage with the file, key and reason."""

import pytest

from components.config import ParamsError, load_params
from components.config.train import TrainParams
from support.params import PARAMS, shipped, write_shipped


def load_run(tmp_path, run: dict):
    return load_params(write_shipped(tmp_path, "train", run=run), TrainParams).run


def test_the_shipped_file_loads():
    run = load_params(PARAMS / "train.yaml", TrainParams).run
    assert run == shipped("train").run and run.checkpoint.every_epochs >= 1 and run.tracking.experiment


def test_s3_storage_is_accepted(tmp_path):
    assert load_run(tmp_path, {"storage_path": "s3://bucket/runs"}).storage_path == "s3://bucket/runs"


@pytest.mark.parametrize(
    ("run", "key", "reason"),
    [
        ({"storage_path": "gs://bucket/x"}, "run.storage_path", "scheme 'gs://' is not supported"),
        ({"storage_path": "s3:///x"}, "run.storage_path", "needs a bucket name"),
        ({"storage_path": " "}, "run.storage_path", "empty"),
        ({"name": "../escape"}, "run.name", "letters, digits"),
        ({"name": "a/b"}, "run.name", "letters, digits"),
        ({"max_failures": -1}, "run.max_failures", "greater than or equal to 0"),
        ({"scaling": {"num_workers": 0}}, "run.scaling.num_workers", "greater than or equal to 1"),
        ({"scaling": {"num_workers": "2"}}, "run.scaling.num_workers", "valid integer"),
        ({"scaling": {"use_gpu": "sometimes"}}, "run.scaling.use_gpu", "'auto', True or False"),
        ({"scaling": {"cpus_per_worker": 0.5}}, "run.scaling.cpus_per_worker", "integer"),
        ({"scaling": {"gpus_per_worker": 2}}, "run.scaling.gpus_per_worker", "a worker trains on one GPU"),
        ({"scaling": {"gpus_per_worker": 0}}, "run.scaling.gpus_per_worker", "keep 1"),
        ({"checkpoint": {"every_epochs": 0}}, "run.checkpoint.every_epochs", "greater than or equal to 1"),
        ({"checkpoint": {"num_to_keep": 0}}, "run.checkpoint.num_to_keep", "greater than or equal to 1"),
        ({"tracking": {"sample_grid_every_epochs": -1}}, "run.tracking.sample_grid_every_epochs", "greater than"),
        ({"tracking": {"experiment": ""}}, "run.tracking.experiment", "at least 1 character"),
        ({"tracking": {"system_metrics": "maybe"}}, "run.tracking.system_metrics", "boolean"),
        ({"checkpoints": {"every_epochs": 1}}, "run.checkpoints", "unknown key"),
    ],
)
def test_bad_run_values_name_file_key_and_reason(tmp_path, run, key, reason):
    with pytest.raises(ParamsError) as caught:
        load_run(tmp_path, run)
    message = str(caught.value)
    assert f"{tmp_path / 'train.yaml'}: {key}" in message
    assert reason in message
