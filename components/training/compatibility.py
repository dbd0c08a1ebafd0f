"""Whether a checkpoint belongs to the job about to run: a checkpoint is resumed only by the same job.

The job record is the model params (every tensor shape, the method, the image size), the
training params that shape the trajectory (seed, batch size, optimiser, LR schedule) and the
data (checksum and size), flattened to strings. `epochs` is not in it: raising it continues a
job. What happens to the run's latest checkpoint (`decide_resume`):

- same record, `epochs` at or past the checkpoint's epoch: resume it (a finished run with
  more epochs continues, and says so; with as many, there is nothing left to train);
- a finished run with another record, or with fewer `epochs` than it trained (a shorter
  run is not a longer one stopped early: its LR schedule ran over all its epochs): a new job,
  trained from scratch (what `dvc repro` / `dvc exp run -S` after a params change mean);
- an unfinished run with another record or past the new `epochs`: refused with
  `CheckpointIncompatible` naming the changed keys. Hours of training are never thrown
  away, or continued with other params, without the user saying so.
"""

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from components.config.flatten import flatten
from components.training.job import TrainingJob


@dataclass(frozen=True)
class ChangedKey:
    key: str
    checkpoint: str
    now: str


class CheckpointIncompatible(Exception):
    """The run's latest, unfinished checkpoint belongs to a job with other params."""

    def __init__(self, checkpoint_path: str, changes: Sequence[ChangedKey]):
        self.checkpoint_path = checkpoint_path
        self.changes = list(changes)
        lines = [f"  {change.key}: checkpoint has {change.checkpoint}, now {change.now}" for change in changes]
        super().__init__(
            f"the checkpoint {checkpoint_path} cannot be resumed with the current params:\n"
            + "\n".join(lines)
            + "\nrestore those values to resume it, or start over: change run.name (or run.storage_path) "
            "in params/train.yaml, or delete the run's folder"
        )


def job_record(job: TrainingJob) -> dict[str, str]:
    """What makes two trainings the same job, flattened to JSON strings.

    Left out: `epochs` (raising it continues a job), `run` (where and how it runs),
    `performance` and `health` (speed switches and the detector's thresholds), `validation`
    (what is measured, with its own RNG state: it never changes the weights). A job that
    starts from earlier weights has them in its record.
    """
    trajectory = job.train.model_dump(mode="json", exclude={"epochs", "run", "performance", "health", "validation"})
    record = {f"model.{key}": json.dumps(value) for key, value in flatten(job.model.model_dump(mode="json")).items()}
    record.update({f"train.{key}": json.dumps(value) for key, value in flatten(trajectory).items()})
    record["data.checksum"] = json.dumps(job.data_checksum)
    record["data.train_samples"] = str(job.dataset_size)
    if job.start_weights is not None:  # absent for a job from random weights, so their records stay as they were
        record["start_weights"] = json.dumps(job.start_weights)
    return record


def compare_records(saved: dict[str, str], current: dict[str, str]) -> list[ChangedKey]:
    """Keys whose values differ (a key only one side has counts as changed)."""
    missing = "(absent)"
    return [
        ChangedKey(key, saved.get(key, missing), current.get(key, missing))
        for key in sorted(saved.keys() | current.keys())
        if saved.get(key, missing) != current.get(key, missing)
    ]


@dataclass(frozen=True)
class ResumeDecision:
    """What a job does with its run's latest checkpoint, and the sentence that says so."""

    action: Literal["resume", "start_over", "refuse"]
    message: str
    changes: list[ChangedKey] = field(default_factory=list)


def decide_resume(saved_info: dict, record: dict[str, str], epochs: int, checkpoint_path: str) -> ResumeDecision:
    """Resume, start over or refuse, given the checkpoint's info (`checkpoint.json`) and the job about to run."""
    trained, finished = int(saved_info["epoch"]), bool(saved_info["final"])
    changes = compare_records(saved_info["job"], record)
    if changes:
        if finished:
            return ResumeDecision("start_over", (
                f"the finished run in {checkpoint_path} had other params "
                f"({', '.join(change.key for change in changes)}): training a new model from scratch"
            ))
        return ResumeDecision("refuse", "", changes)
    if epochs < trained:
        if finished:
            return ResumeDecision("start_over", (
                f"the finished run in {checkpoint_path} trained {trained} epochs, epochs is now {epochs}: "
                f"training a new {epochs}-epoch model from scratch (a longer run's weights are not a shorter run's)"
            ))
        return ResumeDecision("refuse", "", [ChangedKey("train.epochs", f"{trained} epochs trained", str(epochs))])
    if finished and epochs > trained:
        return ResumeDecision("resume", (
            f"continuing the finished {trained}-epoch run in {checkpoint_path} to {epochs} epochs "
            f"(epochs was raised; the LR schedule now spans {epochs} epochs)"
        ))
    if finished:
        return ResumeDecision("resume", f"the run in {checkpoint_path} has already trained its {epochs} epochs")
    return ResumeDecision("resume", f"resumed from {checkpoint_path} at epoch {trained} of {epochs}")
