"""params/tune.yaml: a Ray Tune sweep over keys of params/model.yaml and params/train.yaml.

Like every params model, no defaults: params/tune.yaml holds every value.

Keys of the other two files are named with the file's prefix and the key's dotted path:
`model.method.diffusion_gan.d_target`, `train.optimizer.lr_g`. `fixed` sets values every trial
uses (adopted with the result), `space` draws them per trial, `trial` says how long and on
what each trial trains (not adopted: the sweep's budget, not the configuration). Whether a key
exists and belongs to the chosen method is checked by the model and train schemas themselves
(components/tuning/space.py), before any trial starts.
"""

import re
from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Strict, Tag, ValidationInfo, field_validator, model_validator

from components.config.loading import StrictModel
from components.config.run import one_gpu_per_worker
from components.evaluation.report import HIGHER_IS_BETTER

PositiveInt = Annotated[int, Field(gt=0)]

# The metrics a trial reports per validated epoch (params/train.yaml `validation:`).
TuneMetric = Literal["val/psnr", "val/l1", "val/ssim"]
PARAMS_PREFIXES = ("model", "train")
# Keys a sweep may not set through fixed/space, and where to set them instead.
_OWNED_ELSEWHERE = {
    "train.epochs": "set trial.epochs in params/tune.yaml (the epochs of every trial, the ASHA budget)",
    "train.run": "trials run with the sweep's trial: and run: settings in params/tune.yaml",
    "model.image_size": "the image size is set once, in params/data.yaml (image_size), and the data is prepared at it",
    "model.load_size": "the load size follows params/data.yaml (image_size x loader.load_scale)",
    "model.method.name": "a sweep trains one method: set method.name in params/model.yaml (one sweep per method)",
}
_DOTTED_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+$")
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,79}$")


class Choice(StrictModel):
    """One of the listed values, drawn uniformly (with `search.algorithm: grid`, each in turn)."""

    choice: list[Any] = Field(min_length=1)

    @field_validator("choice")
    @classmethod
    def _distinct(cls, values: list[Any]) -> list[Any]:
        if len({repr(value) for value in values}) != len(values):
            raise ValueError("the choices must not repeat")
        return values


class Uniform(StrictModel):
    """A float drawn uniformly from [low, high]."""

    uniform: Annotated[tuple[float, float], Strict(False)]

    @field_validator("uniform")
    @classmethod
    def _ordered(cls, bounds: tuple[float, float]) -> tuple[float, float]:
        if not bounds[0] < bounds[1]:
            raise ValueError(f"[low, high] needs low < high, got {list(bounds)}")
        return bounds


class LogUniform(StrictModel):
    """A positive float drawn uniformly in log scale from [low, high] (learning rates, R1 gamma)."""

    loguniform: Annotated[tuple[float, float], Strict(False)]

    @field_validator("loguniform")
    @classmethod
    def _ordered_positive(cls, bounds: tuple[float, float]) -> tuple[float, float]:
        if not 0 < bounds[0] < bounds[1]:
            raise ValueError(f"[low, high] needs 0 < low < high, got {list(bounds)}")
        return bounds


class IntRange(StrictModel):
    """An integer drawn uniformly from low to high, both included."""

    int_range: Annotated[tuple[int, int], Strict(False)]

    @field_validator("int_range")
    @classmethod
    def _ordered(cls, bounds: tuple[int, int]) -> tuple[int, int]:
        if not bounds[0] <= bounds[1]:
            raise ValueError(f"[low, high] needs low <= high, got {list(bounds)}")
        return bounds


DISTRIBUTIONS = ("choice", "uniform", "loguniform", "int_range")


def _distribution_tag(data: Any) -> str | None:
    if isinstance(data, dict) and len(data) == 1 and next(iter(data)) in DISTRIBUTIONS:
        return f"[{next(iter(data))}]"
    if isinstance(data, StrictModel):
        return f"[{next(iter(type(data).model_fields))}]"
    return None


Distribution = Annotated[
    Annotated[Choice, Tag("[choice]")]
    | Annotated[Uniform, Tag("[uniform]")]
    | Annotated[LogUniform, Tag("[loguniform]")]
    | Annotated[IntRange, Tag("[int_range]")],
    Discriminator(
        _distribution_tag,
        custom_error_type="unknown_distribution",
        custom_error_message=(
            "must be a mapping with exactly one of choice: [values], uniform: [low, high], "
            "loguniform: [low, high], int_range: [low, high]"
        ),
    ),
]


def distribution_values(distribution: Choice | Uniform | LogUniform | IntRange) -> tuple[str, list[Any]]:
    """(kind, arguments) of a distribution: ("uniform", [0.45, 0.8])."""
    kind = next(iter(type(distribution).model_fields))
    return kind, list(getattr(distribution, kind))


class SearchParams(StrictModel):
    """random: `num_samples` draws; grid: every combination of the choices, `num_samples` times each;
    optuna: Optuna's TPE, learning from finished trials (`pip install 'pairgan[optuna]'`)."""

    algorithm: Literal["random", "grid", "optuna"]
    seed: int


class SchedulerParams(StrictModel):
    """ASHA stops a trial whose metric at a rung (grace_period x reduction_factor^k epochs) is
    below the top 1/reduction_factor of the trials that reached that rung; `none` runs every
    trial to the end."""

    kind: Literal["asha", "none"]
    grace_period: PositiveInt
    reduction_factor: float = Field(gt=1.0)


class TrialParams(StrictModel):
    """How each trial trains; the sweep's budget, never adopted into params/train.yaml."""

    epochs: PositiveInt
    num_workers: int = Field(ge=1, le=1024)
    use_gpu: Literal["auto", True, False]
    cpus_per_worker: int = Field(ge=1, le=256)
    gpus_per_worker: int
    # Worker crashes a trial survives (restarting its Train run from its latest checkpoint).
    # A trial that still fails is recorded as failed; divergence is never retried.
    max_failures: int = Field(ge=0, le=100)

    check_gpus_per_worker = field_validator("gpus_per_worker")(one_gpu_per_worker)


class SweepRunParams(StrictModel):
    """Where the sweep keeps its state: storage_path/<name>-<fingerprint of the sweep's params>."""

    name: str
    storage_path: str
    experiment: str = Field(min_length=1, max_length=200)  # MLflow experiment

    @field_validator("name")
    @classmethod
    def _safe_folder(cls, value: str) -> str:
        if not _NAME_PATTERN.match(value):
            raise ValueError("must start with a letter or digit and use only letters, digits, '.', '_' and '-' (at most 80)")
        return value

    @field_validator("storage_path")
    @classmethod
    def _local_or_s3(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must be a local folder or s3://bucket/prefix, found an empty string")
        if "://" in value and not value.startswith("s3://"):
            raise ValueError(f"scheme '{value.split('://', 1)[0]}://' is not supported: use a local folder or s3://bucket/prefix")
        if value.startswith("s3://") and not value.removeprefix("s3://").split("/", 1)[0]:
            raise ValueError("s3:// path needs a bucket name: s3://bucket/prefix")
        return value


def _check_key(key: str) -> str | None:
    """Why a fixed/space key cannot be used, or None."""
    if not _DOTTED_KEY.match(key) or key.split(".", 1)[0] not in PARAMS_PREFIXES:
        return "must be model.<key> or train.<key>, a dotted path into params/model.yaml or params/train.yaml"
    for owned, where in _OWNED_ELSEWHERE.items():
        if key == owned or key.startswith(owned + "."):
            return f"cannot be swept or fixed: {where}"
    return None


class TuneParams(StrictModel):
    """All of params/tune.yaml."""

    metric: TuneMetric
    mode: Literal["max", "min"]
    # last: a trial scores its last validated epoch (what training it for trial.epochs gives);
    # all: its best epoch.
    scope: Literal["last", "all"]
    num_samples: PositiveInt
    max_concurrent_trials: PositiveInt | Literal["auto"]
    search: SearchParams
    scheduler: SchedulerParams
    trial: TrialParams
    fixed: dict[str, Any]
    space: dict[str, Distribution] = Field(min_length=1)
    run: SweepRunParams

    @field_validator("mode")
    @classmethod
    def _mode_matches_metric(cls, mode: str, info: ValidationInfo) -> str:
        metric = info.data.get("metric")
        if metric is not None:
            wanted = "max" if HIGHER_IS_BETTER[metric.removeprefix("val/")] else "min"
            if mode != wanted:
                raise ValueError(f"{metric} is {'higher' if wanted == 'max' else 'lower'} is better: use mode: {wanted}")
        return mode

    @field_validator("fixed", "space")
    @classmethod
    def _keys_usable(cls, entries: dict) -> dict:
        problems = [f"{key}: {reason}" for key in entries if (reason := _check_key(key))]
        if problems:
            raise ValueError("; ".join(problems))
        return entries

    @model_validator(mode="after")
    def _consistent(self) -> "TuneParams":
        both = sorted(set(self.fixed) & set(self.space))
        if both:
            raise ValueError(f"{', '.join(both)} is in both fixed and space: keep it in one")
        keys = sorted(self.space)
        nested = [(outer, inner) for outer in keys for inner in keys if inner.startswith(outer + ".")]
        if nested:
            raise ValueError(f"space: {nested[0][1]} lies inside {nested[0][0]}: sweep one or the other")
        if self.search.algorithm == "grid":
            continuous = [key for key, value in self.space.items() if not isinstance(value, Choice)]
            if continuous:
                raise ValueError(
                    f"search.algorithm: grid needs choice: lists, but {', '.join(continuous)} "
                    "draw from a range (use choice: [...] or algorithm: random)"
                )
        if self.scheduler.kind == "asha" and self.scheduler.grace_period > self.trial.epochs:
            raise ValueError(
                f"scheduler.grace_period = {self.scheduler.grace_period} exceeds trial.epochs = {self.trial.epochs}"
            )
        return self
