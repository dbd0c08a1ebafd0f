"""How a training job runs: Ray scaling, checkpoints, failures, MLflow tracking (params/train.yaml `run:`).

Placeholder with the section's shape; the Ray Train issue fills it in.
"""

from components.config.loading import StrictModel


class RunParams(StrictModel):
    pass
