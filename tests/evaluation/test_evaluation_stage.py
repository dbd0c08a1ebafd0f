"""`pairgan evaluate` on a tiny prepared data set: what a user finds in reports/evaluate and in the log."""

import csv
import json
import logging
import math

import pytest
from PIL import Image

from components.data.manifest import load_manifest
from components.evaluation.report import read_evaluation
from pipelines.cli import main as pairgan
from support.evaluation_fixtures import (
    DDGAN_GUIDED,
    SIZE,
    TEST_PAIRS,
    make_project,
    write_generator,
    write_train_report,
)
from support.params import write_shipped


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = make_project(tmp_path_factory.mktemp("project"))
    write_generator(root / "models/generator.pt")
    write_generator(root / "models/ddgan.pt", DDGAN_GUIDED)
    write_train_report(root / "reports/train.json", mlflow_run_id="0123456789abcdef")
    return root


@pytest.fixture(autouse=True)
def in_project(project, monkeypatch):
    # where a user runs pairgan: the default MLflow store, which evaluate reads, is the project's
    monkeypatch.chdir(project)


def evaluate(project, *extra):
    return pairgan(["evaluate", "--params-dir", str(project / "params"), "--data", str(project / "data/prepared"),
                    "--train-report", str(project / "reports/train.json"), *extra])


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_metrics_hold_only_numbers_worth_comparing_and_info_the_rest(project):
    out = project / "reports/evaluate"
    assert evaluate(project, "--model", str(project / "models/generator.pt"), "--out", str(out)) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    # quality first (the columns `dvc metrics show` and `dvc exp show` lead with), then cost
    assert list(metrics) == ["psnr", "ssim", "l1", "ms_per_image", "ms_per_image_batched", "nfe"]
    assert all(isinstance(value, int | float) and math.isfinite(value) for value in metrics.values())
    assert metrics["nfe"] == 1 and metrics["ms_per_image"] > 0

    info = json.loads((out / "info.json").read_text())
    assert info["samples"] == TEST_PAIRS and info["split"] == "test" and info["method"] == "pix2pix"
    assert info["model"] == str(project / "models/generator.pt")
    assert info["train_run_id"] == "0123456789abcdef"
    assert info["data_manifest_checksum"] == load_manifest(project / "data/prepared").checksum
    assert "Inception weights not found" in info["features"]["skipped"]
    assert info["latency"]["device"] == "cpu" and info["latency"]["batch_size"] == TEST_PAIRS

    per_image = read_csv(out / "per_image.csv")
    assert [row["index"] for row in per_image] == ["0", "1", "2"]
    assert sum(float(row["psnr"]) for row in per_image) / TEST_PAIRS == pytest.approx(metrics["psnr"])
    # no sweep for a generator without guidance: the header alone, which DVC draws as no plot
    assert (out / "guidance_sweep.csv").read_text() == "w,nfe,psnr,ssim,l1\n"
    grid = Image.open(out / "samples.png")
    assert grid.size == (3 * 64 + 4, 14 + TEST_PAIRS * (64 + 2))  # 16 px samples shown at 64 px

    report = read_evaluation(out)  # what register reads
    assert report.scores == {name: metrics[name] for name in ("psnr", "ssim", "l1")} and report.finite


def test_ddgan_guidance_sweep_has_a_row_per_weight_and_every_pass_logs_its_rate_and_eta(project, caplog):
    caplog.set_level(logging.INFO)
    out = project / "reports/evaluate_ddgan"
    assert evaluate(project, "--model", str(project / "models/ddgan.pt"), "--out", str(out)) == 0
    sweep = read_csv(out / "guidance_sweep.csv")
    assert [(row["w"], row["nfe"]) for row in sweep] == [("0.0", "2"), ("1.0", "4")]  # guidance doubles NFE
    info = json.loads((out / "info.json").read_text())
    assert info["guidance"] == {"supported": True, "weight": 0.5}  # the model's own w, restored after the sweep
    assert json.loads((out / "metrics.json").read_text())["nfe"] == 4

    # under pytest stderr is not a terminal: no bar, so the log carries the progress of each pass
    lines = [record.getMessage() for record in caplog.records if record.name == "components.evaluation.progress"]
    assert [line.split(":")[0] for line in lines] == ["scoring test", "latency", "guidance sweep w=0", "guidance sweep w=1"]
    assert all("images/s" in line for line in lines)
    assert all("evaluation ETA" in line for line in lines[:-1]) and lines[-1].endswith("evaluation done")
    assert lines[0].startswith(f"scoring test: {TEST_PAIRS} images in ")


def test_missing_generator_or_report_is_named(project, capsys):
    assert evaluate(project, "--model", str(project / "models/none.pt"), "--out", str(project / "reports/x")) == 1
    assert "models/none.pt" in capsys.readouterr().err
    code = pairgan(["evaluate", "--params-dir", str(project / "params"), "--data", str(project / "data/prepared"),
                    "--train-report", str(project / "reports/absent.json"), "--model", str(project / "models/generator.pt")])
    assert code == 1 and "absent.json: no train report; run `pairgan train` first" in capsys.readouterr().err


def test_a_train_report_of_another_shape_is_named_with_its_key(project, tmp_path, capsys):
    (tmp_path / "train.json").write_text(json.dumps({"loss/G": 1.0, "epoch": 1}))
    (tmp_path / "train_info.json").write_text(json.dumps({"status": "maybe"}))
    code = pairgan(["evaluate", "--params-dir", str(project / "params"), "--data", str(project / "data/prepared"),
                    "--train-report", str(tmp_path / "train.json"), "--model", str(project / "models/generator.pt"),
                    "--out", str(tmp_path / "out")])
    error = capsys.readouterr().err
    assert code == 1 and f"{tmp_path / 'train_info.json'}: not a valid report (status:" in error
    assert not (tmp_path / "out").exists()


def test_a_split_the_data_does_not_have_is_named(project, tmp_path, capsys):
    params = tmp_path / "params"
    params.mkdir()
    (params / "data.yaml").write_text((project / "params/data.yaml").read_text())
    write_shipped(params, "evaluate", split="holdout")
    code = pairgan(["evaluate", "--params-dir", str(params), "--data", str(project / "data/prepared"),
                    "--train-report", str(project / "reports/train.json"), "--model", str(project / "models/generator.pt"),
                    "--out", str(tmp_path / "out")])
    assert code == 1 and "no split 'holdout'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_bad_evaluate_params_exit_2_naming_file_and_key(project, tmp_path, capsys):
    params = tmp_path / "params"
    params.mkdir()
    (params / "data.yaml").write_text((project / "params/data.yaml").read_text())
    write_shipped(params, "evaluate", features={"kid_subsets": 0})
    code = pairgan(["evaluate", "--params-dir", str(params), "--data", str(project / "data/prepared"),
                    "--train-report", str(project / "reports/train.json"), "--model", str(project / "models/generator.pt")])
    assert code == 2
    assert f"{params / 'evaluate.yaml'}: features.kid_subsets:" in capsys.readouterr().err


def test_a_generator_trained_at_another_size_is_not_scored(project, tmp_path, capsys):
    # Trained at 32 px, the data (params/data.yaml image_size and data/prepared) at 16.
    model = write_generator(tmp_path / "generator-32px.pt", image_size=2 * SIZE)
    assert evaluate(project, "--model", str(model), "--out", str(tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert f"params/data.yaml: image_size: is {SIZE}, but {model} was trained at {2 * SIZE} px" in err
    assert "train it again" in err and not (tmp_path / "out").exists()
