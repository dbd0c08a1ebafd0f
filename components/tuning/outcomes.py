"""How each trial of a sweep ended, and what it scored.

Outcomes, each counted on its own in the summary:
- finished: trained all `trial.epochs` epochs;
- stopped: stopped early by ASHA (its metric at a rung was below the rung's cut-off);
- diverged: the divergence detector fired; the trial stopped at once, is not an error and was
  not retried;
- failed: the trial raised (a crash after its training run's own restarts, invalid values);
- unfinished: the sweep was interrupted before the trial ended (running the same command again
  resumes it).

A trial's score is its metric at its last validated epoch (`scope: last`: what training that
configuration for `trial.epochs` epochs gives) or at its best epoch (`scope: all`). For DDGAN
trained with guidance, the validation subset is also scored at each guidance weight after the
last epoch; the trial's score is then the one at its best weight, which the table reports.
Only finished trials compete for the best trial: a stopped trial was cut short by design.
"""

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from components.training.validation import GUIDANCE_PREFIX

Outcome = Literal["finished", "stopped", "diverged", "failed", "unfinished"]
OUTCOMES: tuple[Outcome, ...] = ("finished", "stopped", "diverged", "failed", "unfinished")


@dataclass(frozen=True)
class TrialRecord:
    """A trial as Tune kept it: its drawn values, Tune's status, every result it reported."""

    trial_id: str
    values: dict[str, Any]
    status: str  # Tune's: TERMINATED, ERROR, RUNNING, PENDING, PAUSED
    results: list[dict[str, Any]]
    error: str | None = None


@dataclass(frozen=True)
class TrialSummary:
    record: TrialRecord
    outcome: Outcome
    epochs: int  # epochs trained
    history: dict[int, dict[str, float]]  # per epoch: its metrics
    last: float | None  # the metric at the last validated epoch
    best: float | None
    best_epoch: int | None
    score: float | None  # what the trial is ranked by (see the module doc)
    guidance_weight: float | None = None  # the best guidance weight, for DDGAN with guidance
    guided: float | None = None  # the metric at that weight
    reason: str | None = None  # why it diverged or failed
    guidance: dict[float, float] = field(default_factory=dict)  # metric per guidance weight

    @property
    def trial_id(self) -> str:
        return self.record.trial_id


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def merged_history(results: Iterable[Mapping[str, Any]]) -> dict[int, dict[str, Any]]:
    """The reported results per epoch, later reports of an epoch completing earlier ones.

    A trial resumed after its sweep was interrupted repeats the epochs after its last
    checkpoint, and a trial that had already finished reports its last epoch once more with
    no scores: merging keeps every epoch's latest known values.
    """
    history: dict[int, dict[str, Any]] = {}
    for result in results:
        epoch = result.get("epoch")
        if not _is_number(epoch):
            continue
        known = {key: value for key, value in result.items() if value is not None and not (isinstance(value, float) and math.isnan(value))}
        history.setdefault(int(epoch), {}).update(known)
    return dict(sorted(history.items()))


def _better(mode: str) -> Any:
    return max if mode == "max" else min


def summarise(record: TrialRecord, metric: str, mode: str, scope: str, epochs: int) -> TrialSummary:
    """The outcome and scores of one trial."""
    history = merged_history(record.results)
    # A results table has a `diverged` column for every row: NaN where the trial did not diverge.
    diverged = next((result for result in reversed(record.results) if _is_number(result.get("diverged")) and result["diverged"]), None)
    trained = max(history, default=0)
    if record.status == "ERROR":
        outcome, reason = "failed", record.error
    elif diverged is not None:
        outcome, reason = "diverged", diverged.get("divergence_reason")
    elif record.status != "TERMINATED":
        outcome, reason = "unfinished", None
    elif trained >= epochs:
        outcome, reason = "finished", None
    else:
        outcome, reason = "stopped", None
    scored = {epoch: values[metric] for epoch, values in history.items() if _is_number(values.get(metric))}
    last = scored[max(scored)] if scored else None
    best_epoch = _better(mode)(scored, key=scored.get) if scored else None
    best = scored[best_epoch] if scored else None
    score = last if scope == "last" else best
    guidance: dict[float, float] = {}
    prefix = f"{GUIDANCE_PREFIX}{metric.removeprefix('val/')}_w"
    for key, value in history.get(trained, {}).items():
        if key.startswith(prefix) and _is_number(value):
            guidance[float(key.removeprefix(prefix))] = float(value)
    weight = guided = None
    if guidance and outcome == "finished":
        weight = _better(mode)(guidance, key=guidance.get)
        guided = guidance[weight]
        score = guided
    return TrialSummary(
        record=record, outcome=outcome, epochs=trained, history=history, last=last, best=best,
        best_epoch=best_epoch, score=score, guidance_weight=weight, guided=guided, reason=reason, guidance=guidance,
    )


def best_trial(summaries: Iterable[TrialSummary], mode: str) -> TrialSummary | None:
    """The finished trial with the best score (None when no trial finished with a score)."""
    candidates = [summary for summary in summaries if summary.outcome == "finished" and summary.score is not None]
    if not candidates:
        return None
    return _better(mode)(candidates, key=lambda summary: summary.score)


def count_outcomes(summaries: Iterable[TrialSummary]) -> dict[str, int]:
    counts = dict.fromkeys(OUTCOMES, 0)
    for summary in summaries:
        counts[summary.outcome] += 1
    return counts
