"""The train report: what goes into the DVC metric, the info file and the per-epoch curves."""

import json
import time

import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric

from components.tracking import epoch_history
from components.training.report import TrainReport, compared_metrics, read_train_report, write_train_report

# the final metrics of a pix2pix epoch as the worker reports them
FINAL = {
    "epoch": 10.0, "step": 40.0, "grad_norm/D": 2.0, "grad_norm/G": 50.3, "health/D_accuracy": 0.94,
    "health/D_entropy": 0.45, "health/D_fake": 0.25, "health/D_real": 0.27, "health/V": -0.52, "health/V_gap": 0.86,
    "loss/D": 0.26, "loss/G": 38.3, "loss/G_L1": 0.36, "loss/G_gan": 1.82, "lr/D": 3e-5, "lr/G": 3e-5,
    "throughput/images_per_s": 81.9, "throughput/images_per_s_all_workers": 163.9,
}


def report(**metrics) -> TrainReport:
    return TrainReport(metrics=metrics or compared_metrics(FINAL, 10), status="finished", method="pix2pix", steps=40,
                       data_checksum="ab" * 32, mlflow_run_id="run1", checkpoint="/ckpt/checkpoint_1")


def test_train_json_keeps_the_final_numbers_worth_comparing_in_a_fixed_order():
    assert list(compared_metrics(FINAL, 10).items()) == [
        ("loss/G", 38.3), ("loss/D", 0.26), ("loss/G_L1", 0.36), ("loss/G_gan", 1.82),
        ("health/D_entropy", 0.45), ("health/V_gap", 0.86), ("images_per_s", 163.9), ("epoch", 10),
    ]
    with_validation = compared_metrics({**FINAL, "val/psnr": 21.5, "val/l1": 0.08, "loss/R1": 0.01}, 10)
    assert list(with_validation)[:2] == ["val/l1", "val/psnr"] and with_validation["loss/R1"] == 0.01


def test_numbers_and_context_go_to_separate_files_and_read_back_as_one_report(tmp_path):
    path = tmp_path / "reports/train.json"
    history = [{"epoch": 1, "loss/G": 40.0, "step": 4}, {"epoch": 2, "loss/G": 39.0, "step": 8, "val/psnr": 20.0, "val/l1": 0.1}]
    write_train_report(path, report(), history)
    assert json.loads(path.read_text()) == compared_metrics(FINAL, 10)
    info = json.loads((tmp_path / "reports/train_info.json").read_text())
    assert info == {"status": "finished", "method": "pix2pix", "steps": 40, "data_checksum": "ab" * 32,
                    "mlflow_run_id": "run1", "checkpoint": "/ckpt/checkpoint_1", "divergence_reason": None}
    assert read_train_report(path) == report()
    # the training curves hold every epoch; the validation curve only the epochs that were validated
    assert (tmp_path / "reports/train_curves.csv").read_text() == "epoch,loss/G,step\n1,40.0,4\n2,39.0,8\n"
    assert (tmp_path / "reports/train_validation.csv").read_text() == "epoch,val/psnr,val/l1\n2,20.0,0.1\n"


def test_a_run_without_validation_writes_only_the_header_so_dvc_draws_no_plot(tmp_path):
    write_train_report(tmp_path / "train.json", report(), [{"epoch": 1, "loss/G": 40.0}])
    assert (tmp_path / "train_validation.csv").read_text() == "epoch,val/psnr,val/l1\n"


def test_a_missing_or_foreign_report_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="train.json: no train report; run `pairgan train` first"):
        read_train_report(tmp_path / "train.json")
    (tmp_path / "train.json").write_text(json.dumps({"status": "finished", "metrics": {"loss/G": 1.0}}))  # an old report
    with pytest.raises(FileNotFoundError, match="train_info.json: missing: the train report is older"):
        read_train_report(tmp_path / "train.json")
    write_train_report(tmp_path / "train.json", report(), [])
    (tmp_path / "train.json").write_text(json.dumps({"status": "finished", "metrics": {"loss/G": 1.0}}))  # an old report
    with pytest.raises(ValueError, match=r"train.json: not a valid report \(status"):
        read_train_report(tmp_path / "train.json")


def test_epoch_history_has_one_row_per_epoch_the_later_value_of_a_retrained_epoch_and_no_system_metrics(mlflow_store, tmp_path):
    uri = mlflow_store
    client = MlflowClient(tracking_uri=uri)
    run_id = client.create_run(client.create_experiment("curves")).info.run_id
    now = int(time.time() * 1000)
    logged = [(1, 40.0, now), (2, 39.0, now + 1), (3, 38.0, now + 2), (2, 37.0, now + 3)]  # epoch 2 again after a restart
    client.log_batch(run_id, metrics=[Metric("loss/G", value, at, epoch) for epoch, value, at in logged])
    client.log_batch(run_id, metrics=[Metric("epoch", epoch, now, epoch) for epoch in (1, 2, 3)])
    client.log_batch(run_id, metrics=[Metric("system/cpu_utilization_percentage", 50.0, now, sample) for sample in range(7)])
    assert epoch_history(uri, run_id) == [
        {"epoch": 1, "loss/G": 40.0}, {"epoch": 2, "loss/G": 37.0}, {"epoch": 3, "loss/G": 38.0},
    ]
