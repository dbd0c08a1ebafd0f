"""The evaluation report register reads, and the progress lines of a long evaluation."""

import json
import logging

import pytest
import torch
from PIL import Image

from components.evaluation.progress import EvaluationProgress, duration
from components.evaluation.report import (
    EvaluationInfo,
    EvaluationMetrics,
    EvaluationReport,
    FeaturesInfo,
    GuidanceInfo,
    LatencyInfo,
    quality_metrics,
    read_evaluation,
    write_evaluation,
)

INFO = EvaluationInfo(
    model="models/generator.pt", method="ddgan", train_run_id="run1", data="data/prepared",
    data_manifest_checksum="ab" * 32, split="test", samples=2,
    features=FeaturesInfo(extractor="inception_v3", skipped=None), guidance=GuidanceInfo(supported=True, weight=0.5),
    latency=LatencyInfo(device="cpu", batch_size=2, warmup=0, repeats=1),
)


def write(folder, means, sweep=()):
    metrics = EvaluationMetrics(**quality_metrics(means), ms_per_image=3.0, ms_per_image_batched=1.5, nfe=4)
    per_image = [{"index": 0, "l1": 0.1, "psnr": 20.0, "ssim": 0.5}, {"index": 1, "l1": 0.3, "psnr": 14.0, "ssim": 0.3}]
    write_evaluation(folder, EvaluationReport(metrics=metrics, info=INFO), per_image, list(sweep), Image.new("RGB", (4, 4)))


def test_features_that_were_computed_are_metrics_and_a_nan_mean_is_null(tmp_path):
    means = {"psnr": 17.0, "ssim": 0.4, "l1": 0.2, "fid": float("nan"), "kid": 0.01, "kid_std": 0.002}
    write(tmp_path, means, sweep=[{"w": 0.0, "nfe": 2, **means}])
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert list(metrics) == ["psnr", "ssim", "l1", "fid", "kid", "kid_std", "ms_per_image", "ms_per_image_batched", "nfe"]
    assert metrics["fid"] is None  # JSON has no NaN; DVC shows it as missing
    report = read_evaluation(tmp_path)
    assert report.scores == {"psnr": 17.0, "ssim": 0.4, "l1": 0.2, "fid": None, "kid": 0.01, "kid_std": 0.002}
    assert not report.finite and report.info == INFO
    assert (tmp_path / "guidance_sweep.csv").read_text().splitlines()[0] == "w,nfe,psnr,ssim,l1,fid,kid,kid_std"


def test_without_features_fid_is_absent_not_null(tmp_path):
    write(tmp_path, {"psnr": 17.0, "ssim": 0.4, "l1": 0.2})
    assert "fid" not in json.loads((tmp_path / "metrics.json").read_text())
    report = read_evaluation(tmp_path)
    assert set(report.scores) == {"psnr", "ssim", "l1"} and report.finite


def test_a_missing_or_older_report_is_named_with_what_to_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.json: no evaluation report; run `pairgan evaluate` first"):
        read_evaluation(tmp_path)
    write(tmp_path, {"psnr": 17.0, "ssim": 0.4, "l1": 0.2})
    (tmp_path / "info.json").unlink()
    with pytest.raises(FileNotFoundError, match="info.json: no evaluation report"):
        read_evaluation(tmp_path)
    # the layout before the split into metrics.json and info.json
    (tmp_path / "metrics.json").write_text(json.dumps({"mean": {"psnr": 17.0}, "nfe": 1, "split": "test"}))
    with pytest.raises(ValueError, match=r"metrics.json: not a valid report \(psnr: Field required; .*mean: Extra inputs"):
        read_evaluation(tmp_path)


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_a_long_pass_logs_a_line_every_interval_with_rate_and_eta(caplog):
    caplog.set_level(logging.INFO, logger="components.evaluation.progress")
    clock = Clock()
    progress = EvaluationProgress(planned_images=100, log_every_s=30.0, clock=clock)
    batches = [{"source": torch.zeros(10, 3, 4, 4)} for _ in range(5)]
    for _ in progress.track("scoring test", 50, batches):
        clock.now += 20.0  # 2 s per image
    lines = [record.getMessage() for record in caplog.records]
    # logged at 40 s and 80 s (every 30 s at the earliest), then at the end of the pass
    assert lines == [
        "scoring test: 20/50 images, 0.50 images/s; evaluation ETA 2 min 40 s",
        "scoring test: 40/50 images, 0.50 images/s; evaluation ETA 2 min 0 s",
        "scoring test: 50 images in 1 min 40 s, 0.50 images/s; evaluation ETA 1 min 40 s",
    ]


def test_durations_read_naturally():
    assert [duration(s) for s in (0.4, 59, 61, 3599, 7260)] == ["0 s", "59 s", "1 min 1 s", "59 min 59 s", "2 h 1 min"]
