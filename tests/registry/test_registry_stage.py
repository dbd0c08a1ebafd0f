"""`pairgan register` and `pairgan predict models:/...@champion` against a throwaway SQLite store."""

import json
import shutil
import socket

import mlflow
import pytest

from pipelines.cli import main as pairgan
from support.evaluation_fixtures import evaluated_project, write_generator, write_train_report
from support.params import write_shipped


@pytest.fixture(autouse=True)
def _isolated_mlflow(monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    # a SQLite store keeps its artifacts in ./mlruns of the working directory: keep them in tmp
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return evaluated_project(tmp_path_factory.mktemp("project"))


def register(project, store, monkeypatch, train_report="reports/train.json", out="reports/register.json", model="models/generator.pt"):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    return pairgan(["register", "--params-dir", str(project / "params"), "--data", str(project / "data/prepared"),
                    "--model", str(project / model), "--train-report", str(project / train_report),
                    "--evaluation", str(project / "reports/evaluate"), "--out", str(project / out)])


def test_first_registration_is_champion_and_a_rerun_keeps_it(mlflow_store, project, tmp_path, monkeypatch):
    store = mlflow_store
    assert register(project, store, monkeypatch) == 0
    first = json.loads((project / "reports/register.json").read_text())
    assert first["promoted"] is True and first["decision"] == "first_champion" and first["version"] == 1

    # the same generator again scores the same on the re-evaluated champion: not an improvement
    assert register(project, store, monkeypatch, out="reports/register2.json") == 0
    second = json.loads((project / "reports/register2.json").read_text())
    assert second["decision"] == "kept_champion" and second["version"] == 2 and second["champion_version"] == 1
    assert second["champion_score"] == pytest.approx(second["challenger_score"])

    client = mlflow.MlflowClient(tracking_uri=store)
    assert str(client.get_model_version_by_alias("pairgan-generator", "champion").version) == "1"
    challenger = client.get_model_version_by_alias("pairgan-generator", "challenger")
    assert str(challenger.version) == "2"
    evaluation = json.loads((project / "reports/evaluate/metrics.json").read_text())
    evaluation_info = json.loads((project / "reports/evaluate/info.json").read_text())
    assert challenger.tags["pairgan.data_manifest_checksum"] == evaluation_info["data_manifest_checksum"]
    assert len(challenger.tags["pairgan.params_sha256"]) == 64
    assert float(challenger.tags["metric.psnr"]) == pytest.approx(evaluation["psnr"], rel=1e-4)
    assert challenger.tags["gate.decision"] == "kept_champion"
    # the same model twice: every per-image difference is 0, an interval [0, 0] not above margin 0
    assert second["improvement"] == 0 and second["interval_low"] == second["interval_high"] == 0
    assert second["samples"] == evaluation_info["samples"] and second["resamples"] == 2000

    # predict straight from the registry
    (inputs := tmp_path / "in").mkdir()
    from PIL import Image

    Image.new("RGB", (40, 30), "white").save(inputs / "a.jpg")
    assert pairgan(["predict", "--model", "models:/pairgan-generator@champion", "--input", str(inputs),
                    "--output", str(tmp_path / "out")]) == 0
    assert Image.open(tmp_path / "out/a.png").size == (40, 30)


def test_diverged_run_is_never_registered(project, tmp_path, monkeypatch, capsys):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    write_train_report(project / "reports/diverged.json", status="diverged", divergence_reason="D loss stuck at 0")
    assert register(project, store, monkeypatch, train_report="reports/diverged.json", out="reports/refused.json") == 1
    assert "D loss stuck at 0" in capsys.readouterr().err
    assert not (project / "reports/refused.json").exists()
    assert not (tmp_path / "mlflow.db").exists()  # refused before MLflow was touched


def test_unreachable_tracking_server_fails_first_with_a_clear_error(project, monkeypatch, capsys):
    with socket.socket() as probe:  # a local port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    code = register(project, f"http://user:secret@127.0.0.1:{port}", monkeypatch, model="models/absent.pt", out="reports/no.json")
    error = capsys.readouterr().err
    assert code == 1
    assert f"127.0.0.1:{port} is not reachable" in error and "secret" not in error
    assert "absent.pt" not in error  # checked before the model is even loaded


def test_set_level_gate_metric_is_a_params_error_naming_the_key(project, tmp_path, monkeypatch, capsys):
    params = tmp_path / "params"
    params.mkdir()
    for name in ("data.yaml", "evaluate.yaml", "register.yaml"):
        (params / name).write_text((project / "params" / name).read_text())
    write_shipped(params, "register", primary_metric="fid")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    code = pairgan(["register", "--params-dir", str(params), "--data", str(project / "data/prepared"),
                    "--model", str(project / "models/generator.pt"), "--train-report", str(project / "reports/train.json"),
                    "--evaluation", str(project / "reports/evaluate"), "--out", str(tmp_path / "register.json")])
    assert code == 2
    error = capsys.readouterr().err
    assert f"{params / 'register.yaml'}: primary_metric:" in error and "fid is a set-level metric" in error
    assert not (tmp_path / "mlflow.db").exists()


def test_tags_hold_the_gates_own_scores_not_a_faked_evaluation_report(mlflow_store, project, tmp_path, monkeypatch, caplog):
    faked = tmp_path / "evaluate"
    shutil.copytree(project / "reports/evaluate", faked)
    metrics = json.loads((faked / "metrics.json").read_text())
    metrics["psnr"] = 99.0
    (faked / "metrics.json").write_text(json.dumps(metrics))
    store = mlflow_store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    assert pairgan(["register", "--params-dir", str(project / "params"), "--data", str(project / "data/prepared"),
                    "--model", str(project / "models/generator.pt"), "--train-report", str(project / "reports/train.json"),
                    "--evaluation", str(faked), "--out", str(tmp_path / "register.json")]) == 0
    report = json.loads((tmp_path / "register.json").read_text())
    tags = mlflow.MlflowClient(tracking_uri=store).get_model_version("pairgan-generator", "1").tags
    assert float(tags["metric.psnr"]) == pytest.approx(report["scores"]["psnr"], rel=1e-5)
    assert report["scores"]["psnr"] < 50
    assert all(value != "99" for value in tags.values())
    assert "says psnr 99, the registered model scores" in caplog.text


def test_evaluate_logs_its_metrics_to_the_run_that_trained_the_model(mlflow_store, project, tmp_path, monkeypatch):
    store = mlflow_store
    client = mlflow.MlflowClient(tracking_uri=store)
    run_id = client.create_run(client.create_experiment("training")).info.run_id
    write_train_report(tmp_path / "train.json", mlflow_run_id=run_id)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    assert pairgan(["evaluate", "--params-dir", str(project / "params"), "--data", str(project / "data/prepared"),
                    "--model", str(project / "models/generator.pt"), "--train-report", str(tmp_path / "train.json"),
                    "--out", str(tmp_path / "evaluate")]) == 0
    evaluation = json.loads((tmp_path / "evaluate/metrics.json").read_text())
    logged = client.get_run(run_id).data.metrics
    assert logged["eval/psnr"] == pytest.approx(evaluation["psnr"])
    assert logged["eval/nfe"] == 1 and "eval/ms_per_image" in logged
    artifacts = {item.path for item in client.list_artifacts(run_id, "evaluation")}
    assert artifacts == {"evaluation/metrics.json", "evaluation/info.json", "evaluation/per_image.csv",
                         "evaluation/samples.png"}


def test_evaluate_warns_and_succeeds_when_the_training_run_is_not_in_the_store(mlflow_store, project, tmp_path, monkeypatch, caplog):
    write_train_report(tmp_path / "train.json", mlflow_run_id="0123456789abcdef0123456789abcdef")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_store)
    assert pairgan(["evaluate", "--params-dir", str(project / "params"), "--data", str(project / "data/prepared"),
                    "--model", str(project / "models/generator.pt"), "--train-report", str(tmp_path / "train.json"),
                    "--out", str(tmp_path / "evaluate")]) == 0
    assert (tmp_path / "evaluate/metrics.json").exists()
    assert "evaluation not logged to MLflow: MLflow run 0123456789abcdef0123456789abcdef is not in" in caplog.text


def test_guided_ddgan_registers_and_loads_with_its_guidance(mlflow_store, project, tmp_path, monkeypatch):
    from support.evaluation_fixtures import DDGAN_GUIDED

    write_generator(project / "models/ddgan.pt", DDGAN_GUIDED)
    args = ["--params-dir", str(project / "params"), "--data", str(project / "data/prepared"),
            "--model", str(project / "models/ddgan.pt"), "--train-report", str(project / "reports/train.json")]
    assert pairgan(["evaluate", *args, "--out", str(tmp_path / "evaluate")]) == 0
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_store)
    assert pairgan(["register", *args, "--evaluation", str(tmp_path / "evaluate"), "--out", str(tmp_path / "register.json")]) == 0
    mlflow.set_tracking_uri(mlflow_store)
    info = mlflow.models.get_model_info("models:/pairgan-generator@champion")
    assert info.metadata["pairgan"]["nfe"] == 4 and info.metadata["pairgan"]["guidance_weight"] == 0.5
