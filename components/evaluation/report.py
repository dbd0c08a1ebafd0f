"""The evaluation report: written by `pairgan evaluate`, read and validated by `pairgan register`.

In the evaluate output folder (reports/evaluate by default):

- `metrics.json`, a DVC metric: only numbers worth comparing between runs: `psnr`, `ssim`, `l1`
  (means over the split), `fid`, `kid`, `kid_std` when the Inception features were computed,
  `ms_per_image` (batch 1), `ms_per_image_batched`, `nfe`. A mean that is not finite (a NaN
  generator) is null.
- `info.json`: what was evaluated and how (model, method, training run, data manifest checksum,
  split and sample count, feature extractor or why FID/KID were skipped, guidance, latency set-up).
- `per_image.csv` (`index,l1,psnr,ssim`, one row per sample), `guidance_sweep.csv` (one row per
  guidance weight; only the header for a generator without guidance, so DVC draws no sweep) and
  `samples.png`: DVC plots.

`metrics.json` is written last: when it exists, the whole report is there.
"""

import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from PIL import Image
from pydantic import BaseModel, ConfigDict

from components.atomic_files import write_bytes_atomic, write_csv_atomic, write_json_atomic
from components.report_files import read_report

METRICS_FILE, INFO_FILE = "metrics.json", "info.json"
PER_IMAGE_FILE, SWEEP_FILE, GRID_FILE = "per_image.csv", "guidance_sweep.csv", "samples.png"

PER_IMAGE_COLUMNS = ("index", "l1", "psnr", "ssim")
# computed for every generator, and only with the Inception features
IMAGE_METRICS, FEATURE_METRICS = ("psnr", "ssim", "l1"), ("fid", "kid", "kid_std")
# direction of every metric the gate and a sweep can use: True when higher is better
HIGHER_IS_BETTER: dict[str, bool] = {"l1": False, "psnr": True, "ssim": True, "fid": False, "kid": False}


class _Report(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EvaluationMetrics(_Report):
    """metrics.json. fid/kid/kid_std are absent (not null) when the features were not computed."""

    psnr: float | None
    ssim: float | None
    l1: float | None
    fid: float | None = None
    kid: float | None = None
    kid_std: float | None = None
    ms_per_image: float
    ms_per_image_batched: float
    nfe: int


class FeaturesInfo(_Report):
    extractor: str | None
    skipped: str | None  # why FID/KID were not computed


class GuidanceInfo(_Report):
    supported: bool
    weight: float  # the generator's own w (the one registered); 0 without guidance


class LatencyInfo(_Report):
    device: str
    batch_size: int  # of ms_per_image_batched
    warmup: int
    repeats: int


class EvaluationInfo(_Report):
    """info.json."""

    model: str
    method: str
    train_run_id: str | None
    data: str
    data_manifest_checksum: str
    split: str
    samples: int
    features: FeaturesInfo
    guidance: GuidanceInfo
    latency: LatencyInfo


class EvaluationReport(_Report):
    metrics: EvaluationMetrics
    info: EvaluationInfo

    @property
    def scores(self) -> dict[str, float | None]:
        """The quality metrics that were computed, by name (None: not finite)."""
        computed = [name for name in (*IMAGE_METRICS, *FEATURE_METRICS) if name in self.metrics.model_fields_set]
        return {name: getattr(self.metrics, name) for name in computed}

    @property
    def finite(self) -> bool:
        return all(value is not None for value in self.scores.values())


def quality_metrics(means: Mapping[str, float]) -> dict[str, float | None]:
    """`score_held_out`'s means in metrics.json's form: NaN and infinity (not JSON) become null."""
    computed = [name for name in (*IMAGE_METRICS, *FEATURE_METRICS) if name in means]
    return {name: means[name] if math.isfinite(means[name]) else None for name in computed}


def write_evaluation(
    folder: Path | str,
    report: EvaluationReport,
    per_image: Sequence[Mapping[str, float | int]],
    sweep: Sequence[Mapping[str, float | int]],
    grid: Image.Image,
) -> None:
    """Every file of the report, metrics.json last. `sweep` is empty for a generator without guidance."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_csv_atomic(folder / PER_IMAGE_FILE, PER_IMAGE_COLUMNS, per_image)
    computed = [name for name in (*IMAGE_METRICS, *FEATURE_METRICS) if name in report.scores]
    write_csv_atomic(folder / SWEEP_FILE, ["w", "nfe", *computed], sweep)
    picture = io.BytesIO()
    grid.save(picture, format="PNG")
    write_bytes_atomic(folder / GRID_FILE, picture.getvalue())
    write_json_atomic(folder / INFO_FILE, report.info.model_dump(), sort_keys=False)
    write_json_atomic(folder / METRICS_FILE, report.metrics.model_dump(exclude_unset=True), sort_keys=False)


def read_evaluation(folder: Path | str) -> EvaluationReport:
    """metrics.json and info.json of `folder`; missing, unreadable or foreign files are errors naming the file."""
    folder = Path(folder)
    when_missing = "no evaluation report; run `pairgan evaluate` first"
    return EvaluationReport(
        metrics=read_report(folder / METRICS_FILE, EvaluationMetrics, when_missing),
        info=read_report(folder / INFO_FILE, EvaluationInfo, when_missing),
    )
