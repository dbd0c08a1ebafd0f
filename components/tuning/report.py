"""What a sweep leaves behind: the results table, the metric against each swept param, the best params.

- results table (CSV): one row per trial in the order Tune created them: every swept value,
  the outcome, epochs trained, the metric at the last and at the best epoch, the best epoch,
  the best guidance weight (DDGAN with guidance), the score it is ranked by, and why it
  diverged or failed;
- plot (PNG): one panel per swept param, the score of each trial that has one against the
  param's value, marked by outcome;
- best params (YAML): the best trial's configuration (the sweep's `fixed` values and its drawn
  values, with the best guidance weight) as dotted keys per params file, which
  `pairgan tune --apply` writes into the params files;
- summary (JSON): the sweep's id, metric, mode and scope, the trial count per outcome, the
  command's wall time, where the sweep's state is, the best trial.
"""

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from components.config.flatten import flatten
from components.config.tune import TuneParams
from components.tuning.outcomes import OUTCOMES, TrialSummary, best_trial, count_outcomes
from components.tuning.space import SweepSpace

RESULTS_FILE, PLOT_FILE, SUMMARY_FILE, BEST_FILE = "results.csv", "metric_vs_params.png", "summary.json", "best_params.yaml"
GUIDANCE_WEIGHT_KEY = "model.method.guidance.weight"
# params file (in the params folder) of each key prefix
PARAMS_FILES = {"model": "model.yaml", "train": "train.yaml"}


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}" if math.isfinite(value) else str(value)
    if isinstance(value, list | dict):
        return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return value


def results_rows(summaries: Sequence[TrialSummary], keys: Sequence[str], metric: str) -> list[dict[str, Any]]:
    rows = []
    for number, summary in enumerate(summaries):
        values = summary.record.values
        rows.append({
            "number": number,
            "trial": summary.trial_id,
            "outcome": summary.outcome,
            **{key: _cell(values.get(key)) for key in keys},
            "epochs": summary.epochs,
            f"{metric} last": _cell(summary.last),
            f"{metric} best": _cell(summary.best),
            "best_epoch": _cell(summary.best_epoch),
            "guidance_weight": _cell(summary.guidance_weight),
            f"{metric} at guidance_weight": _cell(summary.guided),
            "score": _cell(summary.score),
            "reason": (summary.reason or "").splitlines()[0][:300] if summary.reason else "",
        })
    return rows


def results_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


_MARKERS = {"finished": ("o", "tab:blue"), "stopped": ("s", "tab:orange"), "unfinished": ("^", "tab:gray")}


def plot_png(summaries: Sequence[TrialSummary], keys: Sequence[str], metric: str, title: str) -> bytes:
    """One panel per swept key: each scored trial's score against its value (numbers on a linear
    axis, anything else as categories); diverged and failed trials, which have no score, are
    counted in the title."""
    import matplotlib

    matplotlib.use("Agg")  # no display: write the PNG only
    from matplotlib import pyplot

    columns = min(3, len(keys))
    rows = math.ceil(len(keys) / columns)
    figure, axes = pyplot.subplots(rows, columns, figsize=(4.2 * columns, 3.4 * rows), squeeze=False)
    scored = [summary for summary in summaries if summary.score is not None]
    for panel, key in zip(axes.flat, keys):
        values = [summary.record.values.get(key) for summary in scored]
        numeric = all(isinstance(value, int | float) and not isinstance(value, bool) for value in values)
        if numeric:
            positions = values
        else:
            labels = sorted({_cell(value) for value in values}, key=str)
            positions = [labels.index(_cell(value)) for value in values]
            panel.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
        for outcome, (marker, colour) in _MARKERS.items():
            points = [(x, s.score) for x, s in zip(positions, scored) if s.outcome == outcome]
            if points:
                panel.scatter(*zip(*points), marker=marker, color=colour, label=outcome, alpha=0.85)
        panel.set_xlabel(key.split(".", 1)[1], fontsize=8)
        panel.set_ylabel(metric)
        panel.grid(alpha=0.3)
    for panel in list(axes.flat)[len(keys):]:
        panel.set_visible(False)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if handles:
        axes.flat[0].legend(handles, labels, fontsize=7)
    counts = {outcome: sum(s.outcome == outcome for s in summaries) for outcome in OUTCOMES}
    figure.suptitle(f"{title}\n" + ", ".join(f"{count} {outcome}" for outcome, count in counts.items() if count), fontsize=9)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    pyplot.close(figure)
    return buffer.getvalue()


def best_params(configuration: Mapping[str, Any], best: TrialSummary) -> dict[str, dict[str, Any]]:
    """{"model.yaml": {"method.diffusion_gan.d_target": 0.62, ...}, "train.yaml": {...}}: leaves only.

    A mapping value (a whole `fixed: model.method.diffusion_gan: {...}`) is written as its
    leaves, so applying it edits one value per key.
    """
    values = dict(configuration)
    if best.guidance_weight is not None:
        values[GUIDANCE_WEIGHT_KEY] = best.guidance_weight
    files: dict[str, dict[str, Any]] = {name: {} for name in PARAMS_FILES.values()}
    for key, value in values.items():
        prefix, inner = key.split(".", 1)
        leaves = flatten(value, f"{inner}.") if isinstance(value, Mapping) and value else {inner: value}
        files[PARAMS_FILES[prefix]].update(leaves)
    return {name: leaves for name, leaves in files.items() if leaves}


def best_params_yaml(document: Mapping[str, Mapping[str, Any]], header: Sequence[str]) -> str:
    comments = "".join(f"# {line}\n" for line in header)
    return comments + yaml.safe_dump(dict(document), sort_keys=False, width=10_000)


def sweep_files(
    summaries: Sequence[TrialSummary], space: SweepSpace, tune: TuneParams, sweep_id: str, experiment_path: str,
    wall_s: float, apply_command: str,
) -> tuple[dict[str, bytes], TrialSummary | None]:
    """The files a sweep leaves (name -> content) and its best trial (None when no trial has a score).

    `best_params.yaml` is among the files only when there is a best trial; its header says how to
    apply it (`apply_command`).
    """
    counts = count_outcomes(summaries)
    best = best_trial(summaries, tune.mode)
    summary = {
        "sweep": sweep_id, "metric": tune.metric, "mode": tune.mode, "scope": tune.scope, "trials": len(summaries),
        **counts, "command_wall_time_s": round(wall_s, 1), "storage": experiment_path,
        "best": None if best is None else {
            "trial": best.trial_id, "score": best.score, "epoch": best.best_epoch, "guidance_weight": best.guidance_weight,
            "values": best.record.values,
        },
    }
    files = {
        RESULTS_FILE: results_csv(results_rows(summaries, space.keys, tune.metric)).encode(),
        PLOT_FILE: plot_png(summaries, space.keys, tune.metric, f"{sweep_id}: {tune.metric} ({tune.mode}, scope {tune.scope})"),
    }
    if best is not None:
        header = [
            f"Best trial {best.trial_id} of sweep {sweep_id}: {tune.metric} {best.score:.6g} ({tune.mode}, scope {tune.scope}).",
            f"Apply it (keeps the files' comments): {apply_command}",
        ]
        files[BEST_FILE] = best_params_yaml(best_params(space.configuration(best.record.values), best), header).encode()
    files[SUMMARY_FILE] = (json.dumps(summary, indent=2, sort_keys=True, default=str) + "\n").encode()
    return files, best
