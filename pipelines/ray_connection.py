"""Starting a local Ray, or joining a cluster, for `pairgan train` and `pairgan tune`.

A local Ray can give up while it starts: its raylet stops when its Python agents take more than
15 s to come up, and `ray.init` then waits out its own 30 s and raises "The current node timed
out during startup". Neither wait has a setting, and a busy machine (a laptop compiling, a CI
runner at full load) can meet them; the node is then started once more, after the half-started
one's processes are stopped. Joining a cluster (RAY_ADDRESS) is never retried: that failure is
the cluster's, and a second try would only hide it.
"""

import logging

import psutil

from pipelines import environment

logger = logging.getLogger(__name__)

# The text of the exception `ray.init` raises (a bare Exception) when its local node does not
# come up in time; nothing else tells this failure apart.
NODE_START_TIMEOUT = "The current node timed out during startup"
LOCAL_START_ATTEMPTS = 2


class RayStartFailed(RuntimeError):
    """The local Ray did not start, after every attempt."""


def connect_ray(address: str, workers_environment: dict[str, str], verbose: bool) -> None:
    """`ray.init` at `address` ("local": a fresh local Ray) unless this process is connected already.

    Every worker gets `environment.ray_runtime_env(workers_environment)`: on other nodes that is
    how they reach the stores the job names (docs/operations.md); credentials come from each
    node's own environment.
    """
    import ray

    if ray.is_initialized():
        return
    options = {"address": address, "include_dashboard": False,
               "runtime_env": environment.ray_runtime_env(workers_environment),
               "logging_level": logging.INFO if verbose else logging.ERROR}
    if address != "local":
        ray.init(**options)
        return
    for attempt in range(1, LOCAL_START_ATTEMPTS + 1):
        running_before = _child_processes()
        try:
            ray.init(**options)
            return
        except Exception as error:
            if NODE_START_TIMEOUT not in str(error):
                raise
            # The failed node's processes (GCS, log monitor, a dead raylet) stay until this
            # process exits, and `ray.shutdown` does not know them: stop them here.
            _kill(set(_child_processes()) - set(running_before))
            if attempt == LOCAL_START_ATTEMPTS:
                attempts = f"{attempt} attempt{'s' if attempt > 1 else ''}"
                raise RayStartFailed(
                    f"the local Ray did not start ({attempts}): {error} On a busy machine Ray's processes can "
                    "take longer to start than Ray waits for them; run it again when the machine is less loaded"
                ) from error
            logger.warning("the local Ray did not start in time (%s); its processes were stopped and it is "
                           "started once more", NODE_START_TIMEOUT.lower())


def warn_if_auto_sees_no_gpu(use_gpu: bool | str, address: str, cluster: dict[str, float], key: str) -> None:
    """Warn when `use_gpu: auto` finds no GPU on a cluster it joined: there it trains on CPUs.

    `auto` sees the GPUs of the nodes up now. A cluster whose GPU nodes an autoscaler starts on
    demand (scaled to 0 when idle, as the cluster files here are) shows none until a job asks for
    them, and Ray 2.60 publishes nothing of what its autoscaler could start, so `auto` cannot
    tell such a cluster from one without GPUs. A local Ray has no autoscaler: it has what it shows.
    key: where the setting is, as the user would look for it ("params/train.yaml: run.scaling.use_gpu").
    """
    if use_gpu == "auto" and address != "local" and cluster.get("GPU", 0) < 1:
        logger.warning("%s is auto and the Ray cluster has no GPU now: training on CPUs. If its GPU nodes start "
                       "on demand (autoscaled from 0), auto cannot see them: set it to true", key)


def _child_processes() -> list[psutil.Process]:
    return psutil.Process().children(recursive=True)


def _kill(processes: set[psutil.Process]) -> None:
    for process in processes:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(list(processes), timeout=10)  # reaps them: no zombies left beside the next node
