"""The train stage's report, read by evaluate and register, and its per-epoch curves.

Beside the report path given to `pairgan train` (reports/train.json by default):

- `train.json`, a DVC metric: only the end-of-training numbers worth comparing between runs:
  the validation scores when the run has them (`val/*`), the final losses (`loss/*`), the
  discriminator's health (`health/D_entropy`, `health/V_gap`), the job's `images_per_s` (all
  workers) and the `epoch` reached.
- `train_info.json`: what produced them (status, method, steps, data manifest checksum, MLflow
  run id, checkpoint, divergence reason). Not a DVC metric: ids and paths are not compared.
- `train_curves.csv`, a DVC plot: one row per epoch with every statistic the run logged.
- `train_validation.csv`, a DVC plot: one row per epoch that has a validation score; only the
  header when the run has none, so that DVC shows no empty validation plot.
"""

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, RootModel

from components.atomic_files import write_csv_atomic, write_json_atomic
from components.report_files import read_report

VALIDATION_PREFIX = "val/"
# the validation curve's columns, named so even when the run has no validation score: the DVC
# plot definitions refer to them
VALIDATION_COLUMNS = ("val/psnr", "val/l1")
MAIN_LOSSES = ("loss/G", "loss/D")
COMPARED_HEALTH = ("health/D_entropy", "health/V_gap")
# the job's throughput as the worker reports it, and its name in train.json
_JOB_THROUGHPUT, IMAGES_PER_S = "throughput/images_per_s_all_workers", "images_per_s"


class TrainInfo(BaseModel):
    """train_info.json."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    status: Literal["finished", "diverged"]
    method: str
    steps: int
    data_checksum: str
    mlflow_run_id: str | None
    checkpoint: str | None
    divergence_reason: str | None = None


class TrainReport(TrainInfo):
    """train.json (`metrics`) and train_info.json (the other fields) as one object."""

    metrics: dict[str, int | float]


TrainMetrics = RootModel[dict[str, int | float]]


def compared_metrics(final: Mapping[str, float], epoch: int) -> dict[str, int | float]:
    """The numbers of the final epoch that go into train.json, validation first, the epoch last."""
    chosen: dict[str, int | float] = {name: final[name] for name in sorted(final) if name.startswith(VALIDATION_PREFIX)}
    # the two players' totals first, then their parts (G_L1, G_gan, R1, ...)
    def loss_order(name: str) -> tuple[int, str]:
        return (MAIN_LOSSES.index(name) if name in MAIN_LOSSES else len(MAIN_LOSSES), name)

    losses = sorted((name for name in final if name.startswith("loss/")), key=loss_order)
    chosen.update({name: final[name] for name in losses})
    chosen.update({name: final[name] for name in COMPARED_HEALTH if name in final})
    if _JOB_THROUGHPUT in final:
        chosen[IMAGES_PER_S] = final[_JOB_THROUGHPUT]
    chosen["epoch"] = epoch
    return chosen


def sibling(report_path: Path | str, suffix: str) -> Path:
    """reports/train.json -> reports/train_<suffix>."""
    report_path = Path(report_path)
    return report_path.with_name(f"{report_path.stem}_{suffix}")


def write_train_report(path: Path | str, report: TrainReport, history: Sequence[Mapping[str, float]]) -> None:
    """Write the curves, train_info.json, then train.json (last: its presence means the rest is there).

    `history`: one mapping per epoch, with its `epoch`, in epoch order (see `epoch_history`).
    """
    path = Path(path)
    curves = [{name: value for name, value in row.items() if not name.startswith(VALIDATION_PREFIX)} for row in history]
    curve_columns = ["epoch", *sorted({name for row in curves for name in row} - {"epoch"})]
    write_csv_atomic(sibling(path, "curves.csv"), curve_columns, curves)
    reported = {name for row in history for name in row if name.startswith(VALIDATION_PREFIX)}
    validation_columns = [*VALIDATION_COLUMNS, *sorted(reported - set(VALIDATION_COLUMNS))]
    validated = [
        {"epoch": row["epoch"], **{name: row[name] for name in validation_columns if name in row}}
        for row in history
        if any(name.startswith(VALIDATION_PREFIX) for name in row)
    ]
    write_csv_atomic(sibling(path, "validation.csv"), ["epoch", *validation_columns], validated)
    write_json_atomic(sibling(path, "info.json"), report.model_dump(exclude={"metrics"}), sort_keys=False)
    write_json_atomic(path, report.metrics, sort_keys=False)


def read_train_report(path: Path | str) -> TrainReport:
    """train.json and its train_info.json; a missing, unreadable or foreign one is an error naming the file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no train report; run `pairgan train` first")
    # info before the metrics: a report older than the split into two files has no train_info.json
    info_path = sibling(path, "info.json")
    info = read_report(info_path, TrainInfo, "missing: the train report is older; run `pairgan train` again")
    metrics = read_report(path, TrainMetrics, "no train report; run `pairgan train` first")
    return TrainReport(metrics=metrics.root, **info.model_dump())
