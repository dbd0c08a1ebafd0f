"""Stopping a trial early without killing it: ASHA's decision goes to the trial's workers, which end cleanly.

Ray Tune stops a trial by killing its process. A trial's training workers are a Ray Train run
whose reserved resources (its placement group) Ray Train releases only when the run ends
cleanly, or through a helper that needs Ray's state API (the dashboard): killed from outside,
a run can keep its CPUs and GPUs reserved until the sweep ends, and the next trials wait for
them forever. So the sweep's scheduler does not kill a trial: when ASHA says stop, it records
the request in a small actor (`StopRequests`, named after the sweep) and lets the trial go
on; the trial's workers look at it every few steps (`StopCheck`, the job's step hook), all
ranks agree through one all-reduce, and they return at the same step. Ray Train then shuts the
run down and releases its resources, the trial function returns, and the trial counts as
stopped early (fewer epochs than `trial.epochs`). A stop takes effect within `every` steps.
"""

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from components.training.collectives import all_reduce
from components.training.outcome import StopRequested

logger = logging.getLogger(__name__)


def stop_requests_name(sweep_id: str) -> str:
    return f"pairgan-stop-requests-{sweep_id}"


class StopRequests:
    """A Ray actor, one per running sweep: the trials the scheduler asked to stop."""

    def __init__(self) -> None:
        self.requested: set[str] = set()

    def request(self, trial_id: str) -> None:
        self.requested.add(trial_id)

    def is_requested(self, trial_id: str) -> bool:
        return trial_id in self.requested


def start_stop_requests(sweep_id: str):
    """The sweep's StopRequests actor (created once per driver process; it lives as long as the driver)."""
    import ray

    return ray.remote(num_cpus=0)(StopRequests).options(name=stop_requests_name(sweep_id), get_if_exists=True).remote()


@dataclass
class StopCheck:
    """The step hook of a trial's training job: every `every` steps, stop if the sweep asked.

    Rank 0 asks the sweep's StopRequests; the answer is all-reduced so every rank stops at the
    same step (the hook runs at the same step on every rank).
    """

    sweep_id: str
    trial_id: str
    every: int
    _requests: Any = field(default=None, repr=False, compare=False)

    def __call__(self, rank: int, step: int) -> None:
        if step % self.every:
            return
        asked = 0
        if rank == 0:
            import ray

            if self._requests is None:
                self._requests = ray.get_actor(stop_requests_name(self.sweep_id))
            asked = int(ray.get(self._requests.is_requested.remote(self.trial_id)))
        if all_reduce(torch.tensor([asked]), "max").item():
            raise StopRequested(f"trial {self.trial_id} stopped at step {step}")

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_requests": None}


class GracefulASHA(ASHAScheduler):
    """ASHA whose STOP is a request to the trial (see the module doc) instead of a kill."""

    def __init__(self, sweep_id: str, **asha: Any) -> None:
        super().__init__(**asha)
        self.sweep_id = sweep_id
        self.stopped: set[str] = set()
        self._requests = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_requests": None}

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        decision = super().on_trial_result(tune_controller, trial, result)
        if decision != TrialScheduler.STOP:
            return decision
        # Already asked, or at its last epoch anyway (it ends by itself after this report).
        if trial.trial_id in self.stopped or result.get(self._time_attr, 0) >= self._max_t:
            return TrialScheduler.CONTINUE
        self.stopped.add(trial.trial_id)
        import ray

        if self._requests is None:
            self._requests = ray.get_actor(stop_requests_name(self.sweep_id))
        self._requests.request.remote(trial.trial_id)
        logger.info("trial %s: ASHA stops it after epoch %s (%s below the rung's cut-off)",
                    trial.trial_id, result.get(self._time_attr), self._metric)
        return TrialScheduler.CONTINUE
