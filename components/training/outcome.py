"""How the workers tell the driver that a job ended without a trained epoch (diverged, incompatible checkpoint),
and how a job is asked to end before its last epoch (`StopRequested`).

Ray's Result carries the metrics of the latest *checkpoint* only, so a report without one
would never reach the driver: rank 0 leaves the outcome in a small actor (`OutcomeBox`) that
the driver reads after `fit()`. Every rank still makes its last `ray.train.report` (a barrier).
"""


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
