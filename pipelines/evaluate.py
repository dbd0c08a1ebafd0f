"""Stage evaluate: score the trained generator on the held-out split.

Writes into --out: metrics.json (DVC metrics: mean L1/PSNR/SSIM, FID/KID or why they were
skipped, latency per image, NFE, the end-of-training health), per_image.csv and
guidance_sweep.csv (DVC plots), and samples.png (source | generated | target).
"""

import argparse
import csv
import io
import json
import logging
import math
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

from tqdm import tqdm

from components.atomic_files import write_bytes_atomic, write_json_atomic
from components.config import load_params
from components.config.data import READS_SHARDS_ONLY, DataParams
from components.config.evaluate import EvaluateParams
from components.config.flatten import flatten
from components.data.batch import Batch
from components.data.loaders import make_loader
from components.data.manifest import load_manifest
from components.evaluation.features import FeaturesUnavailable, load_inception
from components.evaluation.grid import sample_grid
from components.evaluation.held_out import measure_latency, pick_device, score_held_out, sweep_guidance
from components.methods.translator import load_translator
from components.tracking import TrackingUnavailable, log_evaluation
from pipelines import environment
from pipelines.exit_status import ExitStatus

log = logging.getLogger(__name__)


METRICS_FILE, PER_IMAGE_FILE, SWEEP_FILE, GRID_FILE = "metrics.json", "per_image.csv", "guidance_sweep.csv", "samples.png"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default="data/prepared", help="prepared data set (folder with manifest.json)")
    parser.add_argument("--model", default="models/generator.pt", help="the trained generator (train stage)")
    parser.add_argument("--train-report", default="reports/train.json", help="train stage report (health, divergence)")
    parser.add_argument("--out", default="reports/evaluate", help="folder for metrics.json, plots and samples.png")


def read_train_report(path: Path) -> dict:
    """The train stage's report; a missing or unreadable one is an error naming the file."""
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no train report; run `pairgan train` first") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(report, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return report


def numeric_leaves(report: Mapping, prefix: str = "") -> dict[str, float | bool]:
    """Flatten the numbers and flags of a nested report ({"health": {"d_loss": 0.6}} -> "health.d_loss")."""
    return {name: value for name, value in flatten(report, prefix).items() if isinstance(value, bool | int | float)}


def _csv_text(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _json_number(value: float) -> float | None:
    # NaN/inf are not JSON: a diverged model's NaN metric is written as null and flagged
    return value if math.isfinite(value) else None


def run(args: argparse.Namespace) -> int:
    params_dir = Path(args.params_dir)
    params = load_params(params_dir / "evaluate.yaml", EvaluateParams)
    data_params = load_params(params_dir / "data.yaml", DataParams, context=READS_SHARDS_ONLY)
    out = Path(args.out)
    def held_out(description: str = "evaluate") -> Iterable[Batch]:
        loader = make_loader(args.data, params.split, data_params.loader, params.batch_size, train=False, device=device)
        # disable=None: a bar on a terminal, nothing in DVC's logs
        return tqdm(loader, total=len(loader), desc=description, unit="batch", disable=None)

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
    log.info("generator %s: method %s, NFE %d", args.model, translator.method, translator.nfe)

    extractor, features_note = None, None
    try:
        extractor = load_inception(params.features.inception_weights, device)
    except FeaturesUnavailable as reason:
        features_note = f"FID/KID skipped: {reason}"
        log.warning("%s", features_note)

    score_options = {"seed": params.seed, "max_samples": params.max_samples, "extractor": extractor, "features": params.features}
    log.info("scoring %s split of %s on %s", params.split, args.data, device)
    scores = score_held_out(translator, held_out(), device, keep_samples=params.grid_samples, **score_options)
    example = next(iter(held_out()))["source"]
    latency = measure_latency(translator, example, device, params.latency)

    if translator.supports_guidance:
        sweep = sweep_guidance(
            translator, lambda: held_out("guidance sweep"), params.guidance_sweep.weights, device, **score_options
        )
    else:
        # no guidance is w = 0 in the classifier-free formula (1 + w) f(x) - w f(null); one row keeps
        # the plot file present for DVC whatever the method
        sweep = [{"w": 0.0, "nfe": translator.nfe, **scores.means}]

    metrics = {
        "split": params.split,
        "samples": len(scores.per_image),
        "data_manifest_checksum": manifest.checksum,
        "mean": {name: _json_number(value) for name, value in scores.means.items()},
        "finite": scores.finite,
        "features": {"extractor": getattr(extractor, "name", None), "skipped": features_note},
        "nfe": translator.nfe,
        "method": translator.method,
        "guidance": {"supported": translator.supports_guidance, "weight": translator.guidance_weight},
        "latency": {**latency, "device": device.type},
        "train": {"status": train_report.get("status"), **numeric_leaves(train_report)},
    }

    out.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(out / PER_IMAGE_FILE, _csv_text(scores.per_image).encode())
    write_bytes_atomic(out / SWEEP_FILE, _csv_text(sweep).encode())
    grid = io.BytesIO()
    sample_grid(scores.samples).save(grid, format="PNG")
    write_bytes_atomic(out / GRID_FILE, grid.getvalue())
    # metrics.json last: its presence means the whole report is there
    write_json_atomic(out / METRICS_FILE, metrics, sort_keys=False)
    if train_report.get("mlflow_run_id"):
        try:  # the run that trained the model shows its evaluation; the report above is the record
            log_evaluation(
                environment.tracking_uri(), train_report["mlflow_run_id"],
                {**{name: value for name, value in metrics["mean"].items() if value is not None}, "nfe": translator.nfe,
                 **{name: value for name, value in latency.items() if name.startswith("latency_ms")}},
                [out / METRICS_FILE, out / PER_IMAGE_FILE, out / GRID_FILE],
            )
        except TrackingUnavailable as error:
            log.warning("evaluation not logged to MLflow: %s", error)
    mean = scores.means
    log.info(
        "%s: L1 %.4f  PSNR %.2f dB  SSIM %.4f%s  NFE %d  %.1f ms/image (batch 1, %s)",
        params.split, mean["l1"], mean["psnr"], mean["ssim"],
        f"  FID {mean['fid']:.2f}  KID {mean['kid']:.4f}" if "fid" in mean else "  (FID/KID skipped)",
        translator.nfe, latency["latency_ms_per_image_batch1"], device.type,
    )
    if not scores.finite:
        log.error("some metrics are not finite: the generator produces NaN/inf; register will refuse it")
    return ExitStatus.OK
