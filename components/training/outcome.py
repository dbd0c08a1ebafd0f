"""How the workers tell the driver that a job ended without a trained epoch (diverged, incompatible checkpoint, bad data),
and how a job is asked to end before its last epoch (`StopRequested`).

Ray's Result carries the metrics of the latest *checkpoint* only, so a report without one
would never reach the driver: rank 0 leaves the outcome in a small actor (`OutcomeBox`) that
the driver reads after `fit()`. Every rank still makes its last `ray.train.report` (a barrier).

A data error (a damaged shard) is the same on every attempt, so it must not be retried like a
crashed worker: the rank that meets it records it in the box, and workers that find a data
error recorded stop at once (`data_error_recorded`), whatever Ray's failure policy.

torch is imported where it is used: the box's own Ray actor imports this module and nothing
else of the project, so on every job it is a plain Ray worker process, not one that spends
seconds of CPU and hundreds of MB importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

DATA_ERROR = "data_error"


class StopRequested(Exception):
    """Raised by a step hook on every worker at the same step when whoever runs the job (a
    sweep's scheduler) asks it to end early; the workers return normally, so Ray Train shuts the
    job down cleanly (its workers and their reserved resources are released)."""


class OutcomeBox:
    """A Ray actor holding how the workers ended when that is not a trained epoch."""

    def __init__(self) -> None:
        self.outcome: dict = {}

    def set(self, outcome: dict) -> None:
        self.outcome = outcome

    def get(self) -> dict:
        return self.outcome


def report(metrics: dict, checkpoint_folder: str | None = None) -> None:
    """`ray.train.report` (a barrier: every rank calls it equally often), attaching a folder if given."""
    import ray.train

    checkpoint = ray.train.Checkpoint.from_directory(checkpoint_folder) if checkpoint_folder else None
    ray.train.report(metrics, checkpoint=checkpoint)


def end_early(box, rank: int, outcome: dict) -> None:
    """Record why the job stops (rank 0), then the last report of every rank, keeping them in step."""
    import ray

    if rank == 0:
        ray.get(box.set.remote(outcome))
    report(outcome)


def stop_on_data_error(box, error: str | None, device: torch.device) -> bool:
    """Whether any rank's data failed; if so every rank records (its own error) and ends early.

    Called by every rank at the same point: the agreement is a collective, so a rank whose
    shards are fine does not go on into DDP's all-reduce, waiting for a rank that stopped.
    """
    import ray
    import torch

    from components.training.collectives import all_reduce

    failed = all_reduce(torch.tensor([0 if error is None else 1], device=device), "max")
    if not failed.item():
        return False
    if error is not None:
        ray.get(box.set.remote({DATA_ERROR: error}))
    report({DATA_ERROR: 1})
    return True


def record_data_error(box, error: str) -> None:
    """Record a data error met mid-epoch (the other ranks may be inside a collective: no agreement possible)."""
    import ray

    ray.get(box.set.remote({DATA_ERROR: error}))


def data_error_recorded(box) -> bool:
    """Whether an earlier attempt of this job met a data error (then the restarted workers stop at once)."""
    import ray

    return DATA_ERROR in ray.get(box.get.remote())
