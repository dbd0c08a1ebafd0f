"""The README's main job, `dvc repro`, on the built-in data, in a fresh copy of the project.

One test on purpose: every step reuses the state the previous one left, as a user's repository
would (a second `dvc repro` after the first, a param change after that).
"""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from components.config.flatten import flatten
from support.cli import LIBRARY_INTERNALS

PROJECT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def run(args: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


def copy_project(destination: Path) -> None:
    """The files a fresh clone has: tracked ones plus new files git does not ignore."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=PROJECT, capture_output=True, check=True,
    ).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = PROJECT / name
        if source.is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)


def ran_stages(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")}


def test_dvc_repro_end_to_end(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    copy_project(repo)
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "GIT_AUTHOR_NAME": "ci", "GIT_AUTHOR_EMAIL": "ci@example.com",
           "GIT_COMMITTER_NAME": "ci", "GIT_COMMITTER_EMAIL": "ci@example.com"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RAY_ADDRESS", None)
    run(["git", "init", "-q"], repo, env)
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", "fresh clone"], repo, env)

    first = run(["dvc", "repro"], repo, env)
    assert {"prepare", "train", "evaluate", "register"} <= ran_stages(first.stdout)

    # What the demo prints off a terminal (a CI log, `dvc repro > log`): one plain line per epoch
    # with its rate and ETA, the MLflow run and the result; no colour codes, none of Ray's or
    # MLflow's own lines.
    printed = first.stdout + first.stderr
    assert "\x1b[" not in printed
    for internal in LIBRARY_INTERNALS:
        assert internal not in printed, f"{internal!r} reached the console:\n{printed[-5000:]}"
    epochs = yaml.safe_load((repo / "params/train.yaml").read_text())["epochs"]
    epoch_lines = [line for line in printed.splitlines() if re.search(rf"\bepoch \d+/{epochs} \|", line)]
    assert len(epoch_lines) == epochs, printed[-5000:]
    for number, line in enumerate(epoch_lines, start=1):
        assert re.search(rf"epoch {number}/{epochs} \| [\d.]+ s \| [\d.]+ images/s \| ETA \d+:\d\d \| loss G ", line), line
    assert re.search(r"MLflow: sqlite:.*, experiment 'pairgan', run 'pix2pix [0-9a-f]{8} #1'", printed), printed[-5000:]
    assert f"trained {epochs} epochs" in printed

    register_report = json.loads((repo / "reports/register.json").read_text())
    assert register_report["promoted"] is True  # the first model ever becomes champion
    evaluation = json.loads((repo / "reports/evaluate/metrics.json").read_text())
    evaluation_info = json.loads((repo / "reports/evaluate/info.json").read_text())
    # The demo learns: the champion's test samples are recognisably the targets (the README's promise).
    assert evaluation_info["samples"] >= 32 and evaluation["psnr"] >= 20, evaluation

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    register_params = yaml.safe_load((repo / "params/register.yaml").read_text())
    champion = client.get_model_version_by_alias(register_params["model_name"], "champion")
    assert str(champion.version) == str(register_report["version"])

    # `dvc metrics show`: the evaluation first, numbers only, nothing in two files
    shown = json.loads(run(["dvc", "metrics", "show", "--json"], repo, env).stdout)[""]["data"]
    table = run(["dvc", "metrics", "show"], repo, env)
    assert "failed" not in table.stdout + table.stderr and len(table.stdout.splitlines()[0].split()) <= 20, table.stdout
    metrics = {path: content["data"] for path, content in shown.items()}
    assert list(metrics) == ["reports/evaluate/metrics.json", "reports/train.json"]
    evaluation, training = metrics["reports/evaluate/metrics.json"], metrics["reports/train.json"]
    assert list(evaluation) == ["psnr", "ssim", "l1", "ms_per_image", "ms_per_image_batched", "nfe"]
    assert {"loss/G", "loss/D", "loss/G_L1", "loss/G_gan", "health/D_entropy", "health/V_gap", "images_per_s", "epoch"} <= set(training)
    assert all(isinstance(value, int | float) for value in [*evaluation.values(), *training.values()])
    columns = [set(flatten(content)) for content in metrics.values()]
    assert all(not (first_file & other) for index, first_file in enumerate(columns) for other in columns[index + 1 :])
    # ids, checksums and paths are in the info files, which are not metrics
    train_info = json.loads((repo / "reports/train_info.json").read_text())
    evaluation_info = json.loads((repo / "reports/evaluate/info.json").read_text())
    assert evaluation_info["train_run_id"] == train_info["mlflow_run_id"] == register_report["run_id"]
    assert evaluation_info["data_manifest_checksum"] == train_info["data_checksum"]

    # `dvc plots show`: the training curves, the per-image histograms, the samples; no sweep for
    # pix2pix, and no validation plot unless the run has a validation score; no warning
    plots = run(["dvc", "plots", "show", "-o", str(tmp_path / "plots")], repo, env)
    assert (tmp_path / "plots" / "index.html").exists()
    assert "WARNING" not in plots.stderr + plots.stdout and "failed" not in plots.stderr + plots.stdout
    drawn = {name for name, items in json.loads(run(["dvc", "plots", "show", "--json"], repo, env).stdout)["data"].items() if items}
    validated = len((repo / "reports/train_validation.csv").read_text().splitlines()) > 1
    assert drawn == {
        "Adversarial losses per epoch", "Generator L1 loss per epoch", "Discriminator health per epoch",
        "Test PSNR per image", "Test SSIM per image", "reports/evaluate/samples.png",
    } | ({"Validation PSNR per epoch"} if validated else set())
    assert len((repo / "reports/train_curves.csv").read_text().splitlines()) == 1 + epochs

    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", "first repro"], repo, env)
    second = run(["dvc", "repro"], repo, env)
    assert ran_stages(second.stdout) == set(), second.stdout

    # A quick experiment after the demo (`dvc exp run -S params/train.yaml:epochs=1`): one epoch
    # instead of the demo's keeps this second training short.
    train_params_path = repo / "params/train.yaml"
    train_params = yaml.safe_load(train_params_path.read_text())
    train_params["epochs"] = 1
    train_params_path.write_text(yaml.safe_dump(train_params, sort_keys=False))
    third = run(["dvc", "repro"], repo, env)
    assert "prepare" not in ran_stages(third.stdout)
    assert {"train", "evaluate", "register"} <= ran_stages(third.stdout)
    # The finished 10-epoch run is not a 1-epoch model: a new one is trained from scratch (not
    # refused, not answered with the old weights), and every record says 1 epoch.
    retrained = json.loads((repo / "reports/train.json").read_text())
    retrained_info = json.loads((repo / "reports/train_info.json").read_text())
    generator_epoch = torch.load(repo / "models/generator.pt", weights_only=True)["metadata"]["epoch"]
    assert (retrained["epoch"], generator_epoch) == (1, 1), retrained
    assert len((repo / "reports/train_curves.csv").read_text().splitlines()) == 1 + 1
    assert retrained_info["mlflow_run_id"] != train_info["mlflow_run_id"]
    assert [point.value for point in client.get_metric_history(retrained_info["mlflow_run_id"], "epoch")] == [1]

    metrics_diff = json.loads(run(["dvc", "metrics", "diff", "--json"], repo, env).stdout)
    assert "psnr" in metrics_diff["reports/evaluate/metrics.json"]
    # the comparison fits a 120-column terminal, the evaluation's columns in full
    table = run(["dvc", "exp", "show", "--only-changed", "--no-pager"], repo, {**env, "COLUMNS": "120"}).stdout
    assert max(len(line) for line in table.splitlines()) <= 120, table
    assert all(f" {name} " in table.splitlines()[1] for name in ("psnr", "ssim", "l1")), table
    run(["dvc", "plots", "diff", "HEAD", "-o", str(tmp_path / "plots_diff")], repo, env)
    assert (tmp_path / "plots_diff" / "index.html").exists()
