"""Shared fixtures: synthetic paired images on disk, a prepared data set, an S3 server (moto),
new MLflow stores."""

import os
import shutil
import socket
import sqlite3
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from components.config import with_overrides
from support.images import pair_halves, pair_seed
from support.params import write_shipped
from support.prepared_sets import SMALL_DATA, prepare_small


def pytest_configure(config: pytest.Config) -> None:
    # Tests make their own MLflow stores and local Ray instances: never write to a tracking
    # server or join a cluster that the developer's shell happens to point at.
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "RAY_ADDRESS", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        os.environ.pop(name, None)
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    # The loaders' shard cache defaults to the user's cache folder: the tests use their own
    # (inherited by the Ray workers they start), never the developer's ~/.cache.
    os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="pairgan-test-cache-")
    # Under pytest-xdist, each process's PyTorch (and every command its tests start) gets its
    # share of the cores: PyTorch's default, all of them in every process, has the processes'
    # OpenMP threads contend (the method tests on 2 cores: 13% more CPU, 14% longer). The tests'
    # Ray workers have one CPU each (cpus_per_worker), so one thread either way.
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        import torch

        threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(os.environ["XDG_CACHE_HOME"], ignore_errors=True)


# what `pairgan` sets for its own process (pipelines/environment.py), and what
# mlflow.set_tracking_uri sets (it exports the URI); tests run commands in-process
_PROCESS_SETTINGS = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_REGISTRY_URI",
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT",
    "MLFLOW_ALLOW_PICKLE_DESERIALIZATION",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR",
)


@pytest.fixture(autouse=True)
def _process_settings_restored() -> Iterator[None]:
    """Each test starts with the environment the developer's shell gave, whatever commands ran before."""
    before = {name: os.environ.get(name) for name in _PROCESS_SETTINGS}
    yield
    for name, value in before.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(autouse=True)
def _checkout_keeps_no_mlflow_store(request: pytest.FixtureRequest) -> Iterator[None]:
    """A command run from the checkout without MLFLOW_TRACKING_URI writes the default store,
    ./mlflow.db, next to the developer's own: each test runs its commands in its own folder."""
    store = request.config.rootpath / "mlflow.db"
    existed = store.exists()
    yield
    if not existed and store.exists():
        store.unlink()
        pytest.fail(f"MLflow's default store was written into the checkout ({store}) by this test or, under "
                    "pytest-xdist, one running beside it: run its commands in a folder of its own "
                    "(monkeypatch.chdir) or give them MLFLOW_TRACKING_URI")


# The modules that run for minutes, longest first (`--durations`, on two processes). Under the
# README's `-n 2 --dist loadscope --no-loadscope-reorder`, each process takes the next module in
# collection order: these start first and the many short modules even out the end, instead of
# a long module starting last while the other process has nothing left to run.
LONGEST_MODULES = (
    "tests/pipeline/test_pipeline_e2e.py",
    "tests/training/test_compile_cache.py",
    "tests/operations/test_retrain.py",
    "tests/bench/test_gpu_check_cpu.py",
    "tests/tuning/test_tune_sweep.py",
    "tests/training/test_train_ray.py",
    "tests/cluster/test_two_node_cluster.py",
    "tests/tuning/test_tune_asha.py",
    "tests/training/test_interrupted_runs.py",
    "tests/methods/test_methods.py",
    "tests/data/test_s3_stages.py",
    "tests/operations/test_ray_connection.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {module: index for index, module in enumerate(LONGEST_MODULES)}
    # stable: every module's tests stay together and in file order
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))

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
    """write_params(folder, **overrides) writes folder/data.yaml: the shipped file, SMALL_DATA, the overrides."""

    def write(folder: Path, **overrides: object) -> Path:
        write_shipped(folder, "data", **with_overrides(SMALL_DATA, overrides))
        return folder

    return write


@pytest.fixture(scope="session")
def _empty_mlflow_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new MLflow SQLite store, made once: making one runs MLflow's schema migrations, seconds
    of CPU that dozens of tests would otherwise each spend."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def mlflow_store(tmp_path: Path, _empty_mlflow_store: Path) -> str:
    """A new, empty MLflow store at tmp_path/mlflow.db (a copy of the session's), as its tracking
    URI; its Default experiment keeps artifacts in tmp_path/mlruns/0, as a store made there would."""
    path = tmp_path / "mlflow.db"
    shutil.copyfile(_empty_mlflow_store, path)
    with sqlite3.connect(path) as database:
        database.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0",
                         (str(tmp_path / "mlruns" / "0"),))
    database.close()
    return f"sqlite:///{path}"


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
    return prepare_small(tmp_path_factory.mktemp("prepared"))


@pytest.fixture(scope="session")
def prepared_subsampled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """prepared_builtin's pairs with the sources stored at 4:2:2 chroma and the targets at 4:2:0:
    each decoder upsamples the colour planes its own way."""
    return prepare_small(tmp_path_factory.mktemp("prepared"), jpeg_chroma={"source": "4:2:2", "target": "4:2:0"})
