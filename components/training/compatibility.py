"""Whether a checkpoint belongs to the job about to run: a checkpoint is resumed only by the same job.

The job record is the model params (every tensor shape, the method), the training params
that shape the trajectory (seed, batch size, optimiser, LR schedule) and the data (checksum
and size), flattened to strings. If it changed and the checkpoint's job had finished, this is
a new job and trains from scratch (what `dvc repro` after a params change means); if it had
not finished, the run is refused with `CheckpointIncompatible` naming the changed keys: hours
of training are never thrown away, or continued with other params, without the user saying so.
"""

import json
from collections.abc import Sequence
from dataclasses import dataclass

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
    (what is measured, with its own RNG state: it never changes the weights).
    """
    trajectory = job.train.model_dump(mode="json", exclude={"epochs", "run", "performance", "health", "validation"})
    record = {f"model.{key}": json.dumps(value) for key, value in flatten(job.model.model_dump(mode="json")).items()}
    record.update({f"train.{key}": json.dumps(value) for key, value in flatten(trajectory).items()})
    record["data.checksum"] = json.dumps(job.data_checksum)
    record["data.train_samples"] = str(job.dataset_size)
    return record


def compare_records(saved: dict[str, str], current: dict[str, str]) -> list[ChangedKey]:
    """Keys whose values differ (a key only one side has counts as changed)."""
    missing = "(absent)"
    return [
        ChangedKey(key, saved.get(key, missing), current.get(key, missing))
        for key in sorted(saved.keys() | current.keys())
        if saved.get(key, missing) != current.get(key, missing)
    ]
