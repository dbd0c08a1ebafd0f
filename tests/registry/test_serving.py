"""The registered translator as an MLflow pyfunc: `mlflow.pyfunc.load_model` and `mlflow models serve`."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from functools import partial
from pathlib import Path
from urllib.parse import urlparse

import mlflow
import numpy as np
import pytest
import torch

from components.registry.flavor import TranslatorCard
from components.registry.gate import register_with_gate
from components.registry.loading import UnsafeModelArtifact
from components.registry.model_card import Provenance
from support.params import shipped
from support.scaled_translators import Scale
from support.scaled_translators import score as scaled_score

PROJECT = Path(__file__).resolve().parents[2]
SIZE = 16
CARD = TranslatorCard(nfe=1, supports_guidance=False, guidance_weight=None, channels=3, image_size=SIZE)


score = partial(scaled_score, size=SIZE, pairs=4)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("serving")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as env:
        env.chdir(root)
        env.setenv("MLFLOW_TRACKING_URI", uri)  # undone on exit: mlflow.set_tracking_uri exports it
        register_with_gate(uri, shipped("register", model_name="facades"), Scale(0.4), CARD, score, torch.device("cpu"),
                           Provenance("pix2pix", {}, "abc", "f" * 64, None))
    return uri


def test_pyfunc_predicts_what_the_translator_does(store):
    mlflow.set_tracking_uri(store)
    model = mlflow.pyfunc.load_model("models:/facades@champion")
    source = np.random.default_rng(0).uniform(-1, 1, (3, 3, SIZE, SIZE)).astype(np.float32)
    expected = Scale(0.4)(torch.from_numpy(source)).detach().numpy()
    assert np.allclose(model.predict(source), expected, atol=1e-6)
    assert np.allclose(model.predict({"source": source}), expected, atol=1e-6)
    with pytest.raises(mlflow.exceptions.MlflowException, match="shape"):
        model.predict(np.zeros((1, 3, SIZE * 2, SIZE * 2), np.float32))  # the signature guards the size


def test_pyfunc_loading_refuses_a_pickle_like_every_pairgan_loader(store, tmp_path):
    source = urlparse(mlflow.MlflowClient(tracking_uri=store).get_model_version_download_uri("facades", "1")).path
    copy = tmp_path / "model"
    mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(copy))
    (folder,) = copy.iterdir()
    (folder / "data" / "model.pt2").unlink()
    torch.save({"weights": torch.zeros(1)}, folder / "data" / "model.pth")
    (folder / "data" / "pickle_module_info.txt").write_text("mlflow.pytorch.pickle_module")
    with pytest.raises(UnsafeModelArtifact, match="data/model.pth"):
        mlflow.pyfunc.load_model(str(folder))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_mlflow_models_serve_answers_a_request(store, tmp_path):
    port = _free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": store, "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT), os.environ.get("PYTHONPATH")]))}
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/facades@champion", "--env-manager", "local",
         "--host", "127.0.0.1", "--port", str(port)],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    source = np.random.default_rng(1).uniform(-1, 1, (2, 3, SIZE, SIZE)).astype(np.float32)
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/invocations", data=json.dumps({"inputs": source.tolist()}).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(request, timeout=10) as response:
                    predictions = np.asarray(json.loads(response.read())["predictions"], dtype=np.float32)
                break
            except (urllib.error.URLError, ConnectionError):
                if server.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"mlflow models serve did not answer:\n{server.communicate(timeout=30)[0]}") from None
                time.sleep(1)
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert predictions.shape == source.shape
    assert np.allclose(predictions, Scale(0.4)(torch.from_numpy(source)).detach().numpy(), atol=1e-5)
