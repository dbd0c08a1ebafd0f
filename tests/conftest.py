"""Shared fixtures: synthetic paired images on disk, a prepared data set, an S3 server (moto)."""

import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from support.images import pair_halves, pair_seed


def pytest_configure(config: pytest.Config) -> None:
    # Tests make their own MLflow stores and local Ray instances: never write to a tracking
    # server or join a cluster that the developer's shell happens to point at.
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "RAY_ADDRESS"):
        os.environ.pop(name, None)
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (bench/gpu_check.py runs the cuda tests on a GPU)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture
def write_pix2pix() -> Callable[..., Path]:
    """write_pix2pix(root, {"train": 6, "test": 2}, size=32): pix2pix layout, A (source) left."""

    def write(root: Path, counts: dict[str, int], size: int = 32, suffix: str = ".png", first: int = 0) -> Path:
        for split, count in counts.items():
            (root / split).mkdir(parents=True, exist_ok=True)
            for i in range(first, first + count):
                source, target = pair_halves(pair_seed(split, i), size)
                Image.fromarray(np.concatenate([source, target], axis=1)).save(root / split / f"{i:04d}{suffix}")
        return root

    return write


@pytest.fixture
def write_paired_folders() -> Callable[..., Path]:
    """write_paired_folders(root, {"train": 6}, size=32): A/<split>/NNNN.png and B/<split>/NNNN.png."""

    def write(root: Path, counts: dict[str, int], size: int = 32) -> Path:
        for split, count in counts.items():
            for side in ("A", "B"):
                (root / side / split).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                source, target = pair_halves(pair_seed(split, i), size)
                Image.fromarray(source).save(root / "A" / split / f"{i:04d}.png")
                Image.fromarray(target).save(root / "B" / split / f"{i:04d}.png")
        return root

    return write


@pytest.fixture
def write_params() -> Callable[..., Path]:
    """write_params(folder, **overrides) writes folder/data.yaml from a small builtin default."""
    import yaml

    def write(folder: Path, **overrides: object) -> Path:
        data: dict = {
            "source": {"kind": "builtin", "builtin": {"train_pairs": 12, "val_pairs": 3, "test_pairs": 3}},
            "image_size": 32,
            "shard_max_count": 5,
            "loader": {"load_size": 36, "crop_size": 32, "num_threads": 1},
        }
        for key, value in overrides.items():
            if isinstance(value, dict) and isinstance(data.get(key), dict):
                data[key] = {**data[key], **value}
            else:
                data[key] = value
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "data.yaml").write_text(yaml.safe_dump(data))
        return folder

    return write


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 (a real HTTP endpoint, boto3 talks to it over the wire),
    with dummy credentials in the environment so boto3's standard chain finds them."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AWS_ACCESS_KEY_ID", "testing")
        env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        env.setenv("AWS_DEFAULT_REGION", "us-east-1")
        env.delenv("AWS_PROFILE", raising=False)
        yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture(scope="session")
def prepared_builtin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small prepared data set (built-in source, 32 px, 13 train pairs in 3 shards): the
    folder holding manifest.json. Shared read-only by tests of the loaders."""
    from components.config.data import DataParams
    from components.data.sources import open_source
    from components.data.writer import prepare_dataset

    out = tmp_path_factory.mktemp("prepared") / "data"
    params = DataParams.model_validate(
        {
            "source": {"builtin": {"train_pairs": 13, "val_pairs": 2, "test_pairs": 2}},
            "image_size": 32,
            "shard_max_count": 5,
        }
    )
    prepare_dataset(params, open_source(params, Path.cwd()), out, progress=False)
    return out
