"""`pairgan evaluate` on a tiny prepared data set: what a user finds in reports/evaluate."""

import csv
import json

import pytest
from PIL import Image

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
    write_train_report(root / "reports/train.json")
    return root


def evaluate(project, *extra):
    return pairgan(["evaluate", "--params-dir", str(project / "params"), "--data", str(project / "data/prepared"),
                    "--train-report", str(project / "reports/train.json"), *extra])


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_evaluate_writes_metrics_plots_and_sample_grid(project):
    out = project / "reports/evaluate"
    assert evaluate(project, "--model", str(project / "models/generator.pt"), "--out", str(out)) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["samples"] == TEST_PAIRS and metrics["split"] == "test"
    assert set(metrics["mean"]) == {"l1", "psnr", "ssim"} and metrics["finite"]
    assert "Inception weights not found" in metrics["features"]["skipped"]
    assert metrics["nfe"] == 1 and metrics["method"] == "pix2pix"
    assert metrics["latency"]["latency_ms_per_image_batch1"] > 0
    assert metrics["train"]["status"] == "finished" and metrics["train"]["metrics.loss_d"] == 0.7
    per_image = read_csv(out / "per_image.csv")
    assert [row["index"] for row in per_image] == ["0", "1", "2"]
    mean_l1 = sum(float(row["l1"]) for row in per_image) / TEST_PAIRS
    assert mean_l1 == pytest.approx(metrics["mean"]["l1"])
    assert [row["w"] for row in read_csv(out / "guidance_sweep.csv")] == ["0.0"]
    grid = Image.open(out / "samples.png")
    assert grid.size == (3 * 64 + 4, 14 + TEST_PAIRS * (64 + 2))  # 16 px samples shown at 64 px


def test_ddgan_guidance_sweep_has_a_row_per_weight(project):
    out = project / "reports/evaluate_ddgan"
    assert evaluate(project, "--model", str(project / "models/ddgan.pt"), "--out", str(out)) == 0
    sweep = read_csv(out / "guidance_sweep.csv")
    assert [(row["w"], row["nfe"]) for row in sweep] == [("0.0", "2"), ("1.0", "4")]  # guidance doubles NFE
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["guidance"] == {"supported": True, "weight": 0.5}  # the model's own w, restored after the sweep


def test_missing_generator_or_report_is_named(project, capsys):
    assert evaluate(project, "--model", str(project / "models/none.pt"), "--out", str(project / "reports/x")) == 1
    assert "models/none.pt" in capsys.readouterr().err
    code = pairgan(["evaluate", "--params-dir", str(project / "params"), "--data", str(project / "data/prepared"),
                    "--train-report", str(project / "reports/absent.json"), "--model", str(project / "models/generator.pt")])
    assert code == 1 and "absent.json" in capsys.readouterr().err


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
