"""`pairgan rollback --to VERSION --reason ...` on a throwaway SQLite store."""

import json
from functools import partial
from pathlib import Path
from urllib.parse import urlparse

import mlflow
import pytest
import torch
import yaml

from components.config.register import RegisterParams
from components.registry.flavor import TranslatorCard
from components.registry.gate import register_with_gate
from components.registry.model_card import Provenance
from components.tracking import TAG_OUTCOME
from pipelines.cli import main as pairgan
from support.params import shipped
from support.scaled_translators import Scale
from support.scaled_translators import score as scaled_score

PROJECT = Path(__file__).resolve().parents[2]
SIZE = 16
MODEL = "facades"
CARD = TranslatorCard(nfe=1, supports_guidance=False, guidance_weight=None, channels=3, image_size=SIZE)
PROVENANCE = Provenance("pix2pix", {"method.name": "pix2pix"}, "abc123", "f" * 64, None)


score = partial(scaled_score, size=SIZE, pairs=8)


@pytest.fixture
def store(mlflow_store, tmp_path, monkeypatch):
    """Versions 1 (factor 0.3) and 2 (0.45, the better one: champion) of `facades`; the params folder."""
    monkeypatch.chdir(tmp_path)
    uri = mlflow_store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    params = tmp_path / "params"
    params.mkdir()
    register_yaml = {**yaml.safe_load((PROJECT / "params/register.yaml").read_text()), "model_name": MODEL}
    (params / "register.yaml").write_text(yaml.safe_dump(register_yaml))
    (params / "evaluate.yaml").write_text((PROJECT / "params/evaluate.yaml").read_text())
    for factor in (0.3, 0.45):
        register_with_gate(uri, RegisterParams.model_validate(register_yaml), Scale(factor), CARD, score, torch.device("cpu"), PROVENANCE)
    return uri


def rollback(tmp_path, to: str, reason: str = "v2 blurs night images"):
    return pairgan(["rollback", "--params-dir", str(tmp_path / "params"), "--to", to, "--reason", reason,
                    "--out", str(tmp_path / "rollback.json")])


def champion(uri: str) -> str:
    return str(mlflow.MlflowClient(tracking_uri=uri).get_model_version_by_alias(MODEL, "champion").version)


def test_rollback_moves_champion_and_records_why_everywhere(store, tmp_path):
    assert champion(store) == "2"
    assert rollback(tmp_path, "1") == 0
    assert champion(store) == "1"
    client = mlflow.MlflowClient(tracking_uri=store)
    restored, replaced = (client.get_model_version(MODEL, version).tags for version in ("1", "2"))
    assert restored["rollback.restored_reason"] == "v2 blurs night images" and restored["rollback.restored_from"] == "2"
    assert replaced["rollback.replaced_reason"] == "v2 blurs night images" and replaced["rollback.replaced_by"] == "1"
    assert restored["rollback.restored_at"] == replaced["rollback.replaced_at"]
    report = json.loads((tmp_path / "rollback.json").read_text())
    assert report["champion_version_before"] == "2" and report["champion_version"] == "1" and report["changed"] is True
    run = client.get_run(report["run_id"])  # visible in the MLflow UI, in the registry's experiment
    assert run.info.run_name == "rollback v2 -> v1" and run.info.status == "FINISHED"
    assert run.data.tags["pairgan.rollback.reason"] == "v2 blurs night images"
    assert client.get_experiment(run.info.experiment_id).name == "pairgan"

    # the next gate compares against the restored champion
    outcome = register_with_gate(store, shipped("register", model_name=MODEL), Scale(0.45), CARD, score, torch.device("cpu"), PROVENANCE)
    assert outcome.gate.champion_version_before == "1" and outcome.gate.decision == "promoted"


def test_a_version_that_does_not_exist_is_refused_listing_those_that_do(store, tmp_path, capsys):
    assert rollback(tmp_path, "7") == 1
    assert "facades has no version 7 (versions: 1, 2)" in capsys.readouterr().err
    assert champion(store) == "2" and not (tmp_path / "rollback.json").exists()


def test_a_version_from_a_diverged_run_is_refused(store, tmp_path, capsys):
    client = mlflow.MlflowClient(tracking_uri=store)
    run_id = client.get_model_version(MODEL, "1").run_id
    client.set_tag(run_id, TAG_OUTCOME, "diverged")
    assert rollback(tmp_path, "1") == 1
    assert f"version 1 was never a sound model: its training run {run_id} ended diverged" in capsys.readouterr().err
    assert champion(store) == "2" and "rollback.restored_reason" not in client.get_model_version(MODEL, "1").tags


def test_a_version_registered_outside_the_gate_is_refused(store, tmp_path, capsys):
    client = mlflow.MlflowClient(tracking_uri=store)
    outside = client.create_model_version(MODEL, client.get_model_version(MODEL, "1").source)
    assert rollback(tmp_path, str(outside.version)) == 1
    assert "was never a sound model: it was not registered by pairgan's gate" in capsys.readouterr().err
    assert champion(store) == "2"


def test_a_version_whose_artifact_became_a_pickle_is_refused_unloaded(store, tmp_path, capsys):
    download_uri = mlflow.MlflowClient(tracking_uri=store).get_model_version_download_uri(MODEL, "1")
    data = Path(urlparse(download_uri).path) / "data"
    (data / "model.pt2").unlink()
    torch.save({"weights": torch.zeros(1)}, data / "model.pth")
    (data / "pickle_module_info.txt").write_text("mlflow.pytorch.pickle_module")
    assert rollback(tmp_path, "1") == 1
    error = capsys.readouterr().err
    assert "version 1 cannot be restored" in error and "data/model.pth" in error
    assert champion(store) == "2"


@pytest.mark.parametrize(("to", "reason", "code", "message"), [
    ("1", "   ", 1, "a reason is required"),
    ("v1", "why", 2, "--to must be a version number, got 'v1'"),
])
def test_a_rollback_needs_a_version_number_and_a_reason(store, tmp_path, capsys, to, reason, code, message):
    assert rollback(tmp_path, to, reason) == code
    assert message in capsys.readouterr().err
    assert champion(store) == "2"


def test_rolling_back_to_the_current_champion_changes_nothing(store, tmp_path):
    assert rollback(tmp_path, "2") == 0
    report = json.loads((tmp_path / "rollback.json").read_text())
    assert report["changed"] is False and report["run_id"] is None
    assert "rollback.restored_reason" not in mlflow.MlflowClient(tracking_uri=store).get_model_version(MODEL, "2").tags
