"""Stage evaluate: score the trained generator on the held-out split.

Writes the evaluation report into --out (components/evaluation/report.py): metrics.json (DVC
metrics: psnr, ssim, l1, fid/kid when computed, latency, NFE), info.json (what was evaluated:
model, training run, data checksum, split, why FID/KID were skipped), per_image.csv and
guidance_sweep.csv (DVC plots) and samples.png (source | generated | target).
"""

import argparse
import logging
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from components.config import load_params
from components.config.data import READS_SHARDS_ONLY, DataParams, check_prepared_size, check_trained_size
from components.config.evaluate import EvaluateParams
from components.data.manifest import load_manifest
from components.evaluation.report import (
    GRID_FILE,
    INFO_FILE,
    METRICS_FILE,
    PER_IMAGE_FILE,
    EvaluationInfo,
    EvaluationMetrics,
    EvaluationReport,
    FeaturesInfo,
    GuidanceInfo,
    LatencyInfo,
    quality_metrics,
    write_evaluation,
)
from components.tracking import TrackingUnavailable, log_evaluation
from components.training.report import read_train_report
from pipelines import environment
from pipelines.exit_status import ExitStatus

if TYPE_CHECKING:
    from components.data.batch import Batch

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data", default="data/prepared", help="prepared data set: folder with manifest.json, or s3://bucket/prefix"
    )
    parser.add_argument("--model", default="models/generator.pt", help="the trained generator (train stage)")
    parser.add_argument("--train-report", default="reports/train.json", help="train stage report (the training run)")
    parser.add_argument("--out", default="reports/evaluate", help="folder for the report: metrics.json, info.json, plots")


def run(args: argparse.Namespace) -> int:
    params_dir = Path(args.params_dir)
    params = load_params(params_dir / "evaluate.yaml", EvaluateParams)
    data_path = params_dir / "data.yaml"
    data_params = load_params(data_path, DataParams, context=READS_SHARDS_ONLY)
    # Imported here: they load torch (seconds), which a params error above need not wait for.
    from components.data.loaders import make_loader
    from components.evaluation.features import FeaturesUnavailable, load_inception
    from components.evaluation.grid import sample_grid
    from components.evaluation.held_out import evaluate_translator, pick_device
    from components.methods.translator import load_translator

    def held_out() -> Iterable["Batch"]:
        return make_loader(args.data, params.split, data_params.loader, params.batch_size, train=False, device=device,
                           expected_checksum=manifest.checksum)

    try:
        train_report = read_train_report(Path(args.train_report))
        manifest = load_manifest(args.data)
        device = pick_device(params.device)
        held_out()  # fails here, with the reason, on a missing or empty split
        translator = load_translator(args.model, map_location=device).to(device).eval()
    except (FileNotFoundError, ValueError, KeyError, RuntimeError) as error:
        # KeyError: the split is not in the manifest; RuntimeError: no GPU for device: cuda
        print(f"pairgan evaluate: {error.args[0] if isinstance(error, KeyError) else error}", file=sys.stderr)
        return ExitStatus.FAILED
    # Scored at the size it was trained at, on data prepared at that size, or not at all.
    check_trained_size(translator.image_size, args.model, data_params, data_path)
    check_prepared_size(data_params, manifest.image_size, data_path, args.data)
    log.info("generator %s: method %s, NFE %d", args.model, translator.method, translator.nfe)

    extractor, features_note = None, None
    try:
        extractor = load_inception(params.features.inception_weights, device)
    except FeaturesUnavailable as reason:
        features_note = f"FID/KID skipped: {reason}"
        log.warning("%s", features_note)

    split_size = manifest.split(params.split).count
    evaluation = evaluate_translator(translator, held_out, split_size, device, params, extractor)
    scores, latency = evaluation.scores, evaluation.latency
    report = EvaluationReport(
        metrics=EvaluationMetrics(
            **quality_metrics(scores.means),
            ms_per_image=latency["latency_ms_per_image_batch1"],
            ms_per_image_batched=latency["latency_ms_per_image_batched"],
            nfe=translator.nfe,
        ),
        info=EvaluationInfo(
            model=str(args.model),
            method=translator.method,
            train_run_id=train_report.mlflow_run_id,
            data=str(args.data),
            data_manifest_checksum=manifest.checksum,
            split=params.split,
            samples=len(scores.per_image),
            features=FeaturesInfo(extractor=extractor.name if extractor is not None else None, skipped=features_note),
            guidance=GuidanceInfo(supported=translator.supports_guidance, weight=translator.guidance_weight),
            latency=LatencyInfo(
                device=device.type, batch_size=int(latency["latency_batch_size"]),
                warmup=params.latency.warmup, repeats=params.latency.repeats,
            ),
        ),
    )
    write_evaluation(args.out, report, scores.per_image, evaluation.sweep, sample_grid(scores.samples))
    if train_report.mlflow_run_id:
        try:  # the run that trained the model shows its evaluation; the report files are the record
            folder = Path(args.out)
            logged = {name: value for name, value in report.metrics.model_dump().items() if value is not None}
            log_evaluation(environment.tracking_uri(), train_report.mlflow_run_id, logged,
                           [folder / METRICS_FILE, folder / INFO_FILE, folder / PER_IMAGE_FILE, folder / GRID_FILE])
        except TrackingUnavailable as error:
            log.warning("evaluation not logged to MLflow: %s", error)

    mean = scores.means
    log.info(
        "%s: PSNR %.2f dB  SSIM %.4f  L1 %.4f%s  NFE %d  %.1f ms/image (batch 1, %s); report in %s",
        params.split, mean["psnr"], mean["ssim"], mean["l1"],
        f"  FID {mean['fid']:.2f}  KID {mean['kid']:.4f}" if "fid" in mean else "  (FID/KID skipped)",
        translator.nfe, latency["latency_ms_per_image_batch1"], device.type, args.out,
    )
    if not report.finite:
        log.error("some metrics are not finite: the generator produces NaN/inf; register will refuse it")
    return ExitStatus.OK
