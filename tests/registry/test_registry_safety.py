"""No code runs from a registry artifact: a champion replaced by MLflow's pickle format is refused.

The malicious artifact is real: `data/model.pth` is a pickle whose unpickling writes a marker
file, with the `pickle_module_info.txt` and MLmodel that `mlflow.pytorch.save_model` writes
for the pickle format. Loading it the way MLflow does by default would run the payload.
"""

import pickle
import shutil
from pathlib import Path
from urllib.parse import urlparse

import mlflow
import mlflow.pytorch
import pytest
import torch
import yaml
from PIL import Image

from components.registry.loading import UnsafeModelArtifact, check_model_folder
from pipelines.cli import main as pairgan
from support.evaluation_fixtures import evaluated_project

MODEL = "pairgan-generator"


class Payload:
    """Unpickling this runs `exec` on its source: here, writing the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"import pathlib; pathlib.Path({str(self.marker)!r}).write_text('payload ran')",))


def artifact_folder(store: str, version: str) -> Path:
    return Path(urlparse(mlflow.MlflowClient(tracking_uri=store).get_model_version_download_uri(MODEL, version)).path)


def replace_with_pickle_flavour(folder: Path, marker: Path) -> None:
    """What an attacker with write access to the artifact store does to the champion: the MLmodel
    (and its pairgan metadata) stays, `data/` becomes what `mlflow.pytorch.save_model(...,
    serialization_format="pickle")` writes, with a payload for a model."""
    shutil.rmtree(folder / "data")
    (folder / "data").mkdir()
    torch.save(Payload(marker), folder / "data" / "model.pth", pickle_module=pickle)
    (folder / "data" / "pickle_module_info.txt").write_text("mlflow.pytorch.pickle_module")


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return evaluated_project(tmp_path_factory.mktemp("project"))


def register(project, out):
    return pairgan(["register", "--params-dir", str(project / "params"), "--data", str(project / "data/prepared"),
                    "--model", str(project / "models/generator.pt"), "--train-report", str(project / "reports/train.json"),
                    "--evaluation", str(project / "reports/evaluate"), "--out", str(out)])


@pytest.fixture(scope="module")
def champion_store(project, tmp_path_factory):
    """(store, a pristine copy of its model folder): one version, champion, by `pairgan register`."""
    root = tmp_path_factory.mktemp("store")
    with pytest.MonkeyPatch.context() as env:
        env.chdir(root)
        store = f"sqlite:///{root / 'mlflow.db'}"
        env.setenv("MLFLOW_TRACKING_URI", store)
        assert register(project, root / "register.json") == 0
    shutil.copytree(artifact_folder(store, "1"), root / "pristine")
    return store, root / "pristine"


@pytest.fixture
def poisoned(champion_store, tmp_path, monkeypatch):
    """The champion (version 1) replaced by a pickle whose payload writes this test's marker."""
    champion_store, _ = champion_store
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", champion_store)
    marker = tmp_path / "PAYLOAD_RAN"
    replace_with_pickle_flavour(artifact_folder(champion_store, "1"), marker)
    assert not marker.exists()
    return champion_store, marker


def test_the_poisoned_artifact_would_run_its_payload_under_mlflow_defaults(poisoned, monkeypatch):
    store, marker = poisoned
    monkeypatch.delenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", raising=False)
    mlflow.set_tracking_uri(store)
    with pytest.raises(Exception):  # the payload is no model: loading fails, after running it
        mlflow.pytorch.load_model(f"models:/{MODEL}@champion")
    assert marker.read_text() == "payload ran"


def test_predict_refuses_a_pickled_champion_and_runs_no_payload(poisoned, tmp_path, capsys):
    _, marker = poisoned
    (inputs := tmp_path / "in").mkdir()
    Image.new("RGB", (20, 20), "white").save(inputs / "a.png")
    code = pairgan(["predict", "--model", f"models:/{MODEL}@champion", "--input", str(inputs), "--output", str(tmp_path / "out")])
    error = capsys.readouterr().err
    assert code == 1
    assert f"models:/{MODEL}@champion: refused to load" in error
    assert "data/model.pth" in error and "pickle" in error
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_register_refuses_to_load_a_pickled_champion_and_changes_nothing(poisoned, project, tmp_path, capsys):
    store, marker = poisoned
    assert register(project, tmp_path / "second.json") == 1
    error = capsys.readouterr().err
    assert "the champion, pairgan-generator version 1, is not a model pairgan wrote" in error
    assert "data/model.pth" in error and "nothing was registered" in error and "pairgan rollback" in error
    assert not marker.exists()
    assert not (tmp_path / "second.json").exists()
    client = mlflow.MlflowClient(tracking_uri=store)
    assert [str(version.version) for version in client.search_model_versions(f"name='{MODEL}'")] == ["1"]
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == "1"


def test_after_any_pairgan_command_mlflow_itself_refuses_pickles(poisoned, tmp_path, monkeypatch):
    store, marker = poisoned
    monkeypatch.delenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", raising=False)
    pairgan(["predict", "--model", f"models:/{MODEL}@champion", "--input", str(tmp_path), "--output", str(tmp_path / "out")])
    mlflow.set_tracking_uri(store)
    with pytest.raises(mlflow.exceptions.MlflowException, match="pickle is disallowed"):
        mlflow.pytorch.load_model(f"models:/{MODEL}@champion")
    assert not marker.exists()


@pytest.fixture
def good_model(champion_store):
    """A model folder exactly as `pairgan register` left it in the registry."""
    return champion_store[1]


def _edit_mlmodel(folder: Path, change) -> None:
    spec = yaml.safe_load((folder / "MLmodel").read_text())
    change(spec)
    (folder / "MLmodel").write_text(yaml.safe_dump(spec))


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        (lambda f: (f / "data" / "pickle_module_info.txt").write_text("pickle"), "data/pickle_module_info.txt"),
        (lambda f: (f / "data" / "model.pt2").rename(f / "data" / "model.pth"), "data/model.pth"),
        (lambda f: (f / "data" / "model.pt2").unlink(), "holds nothing"),
        (lambda f: _edit_mlmodel(f, lambda s: s["flavors"]["pytorch"].update(code="code")), "ships code"),
        (lambda f: _edit_mlmodel(f, lambda s: s["flavors"]["pytorch"].update(model_data="../../x")), "outside the model folder"),
        (lambda f: _edit_mlmodel(f, lambda s: s["flavors"]["python_function"].update(loader_module="os")), "loads with 'os'"),
        (lambda f: _edit_mlmodel(f, lambda s: s["flavors"]["python_function"].update(code="code")), "ships code"),
        (lambda f: _edit_mlmodel(f, lambda s: s["flavors"].pop("pytorch")), "no pytorch flavour"),
        (lambda f: _edit_mlmodel(f, lambda s: s.pop("metadata")), "no pairgan metadata"),
        (lambda f: (f / "MLmodel").write_text("flavors: [unclosed"), "not valid YAML"),
    ],
)
def test_anything_but_the_format_pairgan_writes_is_refused_before_loading(good_model, tmp_path, tamper, reason):
    folder = tmp_path / "model"
    shutil.copytree(good_model, folder)
    check_model_folder(folder)  # the untouched copy passes
    tamper(folder)
    with pytest.raises(UnsafeModelArtifact, match=reason):
        check_model_folder(folder)
