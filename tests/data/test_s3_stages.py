"""A damaged shard in training: one clear error, no retry.

One local Ray instance serves the module; its workers reach the moto S3 server through
AWS_ENDPOINT_URL, the way they would reach MinIO. (The stages on a data set that lives only on
S3: tests/cluster/test_two_node_cluster.py, whose nodes read it too.)
"""

import functools
import os
import shutil
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from components.data.integrity import DataError, read_tar_samples
from components.data.manifest import load_manifest
from components.training.driver import run_training
from components.training.job import TrainingJob
from pipelines.cli import main as pairgan
from pipelines.environment import LOCAL_RAY_WORKER_ENV
from support.params import shipped, write_shipped

pytestmark = pytest.mark.slow

TINY_MODEL = {
    "method": {"name": "pix2pix", "generator": {"ngf": 8, "max_multiplier": 2, "norm": "instance"},
               "discriminator": {"ndf": 8, "n_layers": 2, "norm": "instance"}},
}
# the prepared data: 32 px, trained at a load size of 36 (32 x 1.125)
LOADER = {"backend": "torch", "load_scale": 1.125, "num_threads": 1}


def write_train_params(folder: Path, checkpoints: Path) -> Path:
    """The params of `pairgan train` on the session's prepared set (32 px), on 2 workers."""
    write_shipped(folder, "data", image_size=32, loader={"load_scale": 1.125, "num_threads": 1})
    write_shipped(folder, "model", **TINY_MODEL)
    write_shipped(folder, "train", epochs=1, batch_size=2,
                  run={"name": "s3-data", "storage_path": str(checkpoints), "max_failures": 2,
                       "scaling": {"num_workers": 2, "use_gpu": False},
                       "tracking": {"experiment": "tests", "sample_grid_every_epochs": 0, "sample_grid_pairs": 2,
                                    "system_metrics": False}})
    return folder


@pytest.fixture(scope="module")
def ray_with_s3(s3_endpoint):
    import ray
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the step hook below
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False,
             runtime_env={"env_vars": {"AWS_ENDPOINT_URL": s3_endpoint, "MLFLOW_DISABLE_TELEMETRY": "true",
                                       **LOCAL_RAY_WORKER_ENV}})
    yield
    ray.shutdown()


def damage_jpeg(shard: Path, sample: int, keep_mtime: bool = False) -> None:
    """Overwrite the start of a sample's source JPEG (its header): a decoder refuses it."""
    jpeg = next(m for m in read_tar_samples(shard)[sample].members if m.suffix == "src.jpg")
    stat = shard.stat()
    with open(shard, "r+b") as handle:
        handle.seek(jpeg.offset)
        handle.write(b"\0" * 64)
    if keep_mtime:
        os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_a_damaged_shard_fails_training_once_with_shard_and_sample(
    mlflow_store, ray_with_s3, tmp_path, monkeypatch, prepared_builtin, capfd
):
    tracking_uri = mlflow_store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    data = shutil.copytree(prepared_builtin, tmp_path / "data")
    damage_jpeg(data / "train/train-000002.tar", 1)  # sample 11: rank 1's share only (13 pairs, 2 workers)
    params = write_train_params(tmp_path / "params", checkpoints=tmp_path / "checkpoints")

    # --verbose: Ray Train's own lines, which say how many worker groups it started
    assert pairgan(["train", "--verbose", "--params-dir", str(params), "--data", str(data), "--model-out",
                    str(tmp_path / "generator.pt"), "--report", str(tmp_path / "train.json")]) == 1

    output = capfd.readouterr()
    assert (f"pairgan train: data error: {data / 'train/train-000002.tar'}, sample train/train-000011 (index 11): "
            "JPEG train-000011.src.jpg does not decode") in output.err
    printed = output.out + output.err
    # one worker group, no restart (Ray's own log lines say so), and no traceback of the project's code
    assert printed.count("Started training worker group") == 1 and "RETRY" not in printed
    assert "components/" not in printed
    (run,) = MlflowClient(tracking_uri=tracking_uri).search_runs(
        [MlflowClient(tracking_uri=tracking_uri).get_experiment_by_name("tests").experiment_id])
    assert run.info.status == "FAILED"
    assert not (tmp_path / "generator.pt").exists()


def damage_after_first_step(rank: int, step: int, *, shard: str) -> None:
    if rank == 0 and step == 1:
        damage_jpeg(Path(shard), 0, keep_mtime=True)  # read again in epoch 2


def test_damage_met_mid_training_is_reported_not_retried(ray_with_s3, tmp_path, prepared_builtin):
    data = shutil.copytree(prepared_builtin, tmp_path / "data")
    manifest = load_manifest(data)
    train = shipped("train", epochs=2, batch_size=2,
                    run={"name": "mid", "storage_path": str(tmp_path / "checkpoints"), "max_failures": 2,
                         "scaling": {"num_workers": 1, "use_gpu": False}, "checkpoint": {"every_epochs": 5}})
    job = TrainingJob(
        model=shipped("model", image_size=32, load_size=36, **TINY_MODEL),
        train=train, loader=shipped("data", loader=LOADER).loader, data_location=str(data),
        data_checksum=manifest.checksum,
        dataset_size=manifest.split("train").count,
        step_hook=functools.partial(damage_after_first_step, shard=str(data / "train/train-000000.tar")),
    )
    with pytest.raises(DataError, match=r"train-000000.tar, sample train/train-000000 \(index 0\): "):
        run_training(job, train.run, str(tmp_path / "checkpoints"))

