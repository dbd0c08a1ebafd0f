"""A sweep's search space against the params schemas: which trial trains what, checked before any trial starts.

A trial's params are params/model.yaml and params/train.yaml as loaded, with params/tune.yaml's
`fixed` values, then the trial's drawn values, then the `trial:` budget (epochs, workers)
written over them, and validated by the same pydantic models the train stage uses. A key that
does not exist, or that belongs to another method, is the model's own "unknown key" error,
reported against params/tune.yaml and the sweep key that caused it.

`SweepSpace.check` validates every grid point, or for random and Optuna searches every corner
of the space (each range's ends, each choice) and a seeded sample of random points, so a
value that some draws would make invalid (t_min above some t_max) fails at once too. Ray is
not imported here: checking a sweep costs milliseconds.
"""

import copy
import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from components.config import ParamsError, validate_params
from components.config.data import DataParams
from components.config.model import ModelParams, validate_model_params
from components.config.train import TrainParams
from components.config.tune import Choice, IntRange, LogUniform, TuneParams, Uniform

# Random and Optuna searches: how many corners of the space, and how many random points, are
# validated up front (pydantic validates a point in well under a millisecond).
MAX_CORNERS = 512
RANDOM_POINTS = 64
# How the params loader words a key that does not exist, or belongs to another method: such an
# error is the key's, whatever value was drawn, so the message names no point.
KEY_ERRORS = ("unknown key", "belongs to")


def set_dotted(nested: dict, key: str, value: Any) -> None:
    """nested[a][b][c] = value for key "a.b.c", creating mappings where a level is absent or null."""
    *parents, leaf = key.split(".")
    node = nested
    walked = []
    for part in parents:
        walked.append(part)
        if node.get(part) is None:
            node[part] = {}
        elif not isinstance(node[part], dict):
            raise KeyError(f"{'.'.join(walked)} holds the value {node[part]!r}, not a mapping of keys")
        node = node[part]
    node[leaf] = copy.deepcopy(value)


def draw(distribution: Choice | Uniform | LogUniform | IntRange, rng: np.random.Generator) -> Any:
    """One value as Ray Tune would draw it (used to check random points up front)."""
    if isinstance(distribution, Choice):
        return distribution.choice[int(rng.integers(len(distribution.choice)))]
    if isinstance(distribution, Uniform):
        return float(rng.uniform(*distribution.uniform))
    if isinstance(distribution, LogUniform):
        low, high = distribution.loguniform
        return float(math.exp(rng.uniform(math.log(low), math.log(high))))
    low, high = distribution.int_range
    return int(rng.integers(low, high + 1))


def corners(distribution: Choice | Uniform | LogUniform | IntRange) -> list[Any]:
    """The values that bound what a distribution can give: each choice, each end of a range."""
    if isinstance(distribution, Choice):
        return list(distribution.choice)
    if isinstance(distribution, Uniform):
        return list(distribution.uniform)
    if isinstance(distribution, LogUniform):
        return list(distribution.loguniform)
    low, high = distribution.int_range
    return [low] if low == high else [low, high]


def _blamed(problem_key: str, fixed: list[str], space: list[str]) -> list[str]:
    """The sweep keys a schema error concerns ("fixed.<key>" / "space.<key>"), most specific first.

    An error at a value (`model.method.generator.ngf`) concerns the longest sweep key that set
    it or one of its parents; an error at a mapping (`model.method.diffusion_gan`: t_min above
    t_max) the swept keys inside it, which are what changes from point to point, else the fixed
    key that set the mapping.
    """
    tagged = [f"fixed.{key}" for key in fixed] + [f"space.{key}" for key in space]

    def key_of(entry: str) -> str:
        return entry.split(".", 1)[1]

    inside = [entry for entry in tagged if key_of(entry).startswith(problem_key + ".") and entry.startswith("space.")]
    if inside:
        return inside
    covering = [entry for entry in tagged if problem_key == key_of(entry) or problem_key.startswith(key_of(entry) + ".")]
    if covering:
        return [max(covering, key=lambda entry: len(key_of(entry)))]
    return [entry for entry in tagged if key_of(entry).startswith(problem_key + ".")]


def _describe(point: Mapping[str, Any]) -> str:
    return "{" + ", ".join(f"{key}: {value!r}" for key, value in point.items()) + "}"


@dataclass(frozen=True)
class SweepSpace:
    """params/model.yaml and params/train.yaml as read, and the sweep of params/tune.yaml over them.

    `data` (params/data.yaml) gives the model its image size, as for the train stage. Paths are
    only used in error messages.
    """

    tune: TuneParams
    base_model: dict
    base_train: dict
    data: DataParams
    tune_path: str
    model_path: str
    train_path: str
    data_path: str

    @property
    def keys(self) -> list[str]:
        """The swept keys, in the order of params/tune.yaml."""
        return list(self.tune.space)

    def configuration(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """What a trial's result means to adopt: the fixed values and the trial's drawn values."""
        return {**copy.deepcopy(self.tune.fixed), **copy.deepcopy(dict(values))}

    def budget(self) -> dict[str, Any]:
        """The `trial:` settings as train keys, written over everything else."""
        trial = self.tune.trial
        return {
            "train.epochs": trial.epochs,
            "train.run.max_failures": trial.max_failures,
            "train.run.scaling.num_workers": trial.num_workers,
            "train.run.scaling.use_gpu": trial.use_gpu,
            "train.run.scaling.cpus_per_worker": trial.cpus_per_worker,
            "train.run.scaling.gpus_per_worker": trial.gpus_per_worker,
        }

    def _params_dicts(self, values: Mapping[str, Any]) -> tuple[dict, dict]:
        files = {"model": copy.deepcopy(self.base_model), "train": copy.deepcopy(self.base_train)}
        for key, value in {**self.configuration(values), **self.budget()}.items():
            prefix, inner = key.split(".", 1)
            try:
                set_dotted(files[prefix], inner, value)
            except KeyError as error:
                raise ParamsError(self.tune_path, [(key, f"cannot be set: {error.args[0]}")]) from None
        return files["model"], files["train"]

    def resolve(self, values: Mapping[str, Any]) -> tuple[ModelParams, TrainParams]:
        """A trial's validated params; ParamsError names params/model.yaml or params/train.yaml and the key."""
        model, train = self._params_dicts(values)
        return (
            validate_model_params(model, self.data, self.model_path, self.data_path),
            validate_params(train, TrainParams, self.train_path),
        )

    def candidate_points(self) -> list[dict[str, Any]]:
        """The points `check` validates: the whole grid, or corners and random points."""
        space = self.tune.space
        if self.tune.search.algorithm == "grid":
            return [dict(zip(space, values)) for values in itertools.product(*(d.choice for d in space.values()))]
        rng = np.random.default_rng(self.tune.search.seed)
        ends = [corners(distribution) for distribution in space.values()]
        count = math.prod(len(values) for values in ends)
        if count <= MAX_CORNERS:
            points = [dict(zip(space, values)) for values in itertools.product(*ends)]
        else:
            points = [{key: values[int(rng.integers(len(values)))] for key, values in zip(space, ends)}
                      for _ in range(MAX_CORNERS)]
        points += [{key: draw(distribution, rng) for key, distribution in space.items()} for _ in range(RANDOM_POINTS)]
        return points

    def _schema_errors(self, point: Mapping[str, Any]) -> list[tuple[str, str, str]]:
        """(file, key as "model.<key>" / "train.<key>" or a tune.yaml key, reason) for each error at `point`."""
        try:
            self.resolve(point)
        except ParamsError as error:
            if error.path == self.tune_path:  # a key that cannot be set at all
                return [(error.path, key, reason) for key, reason in error.problems]
            prefix = "model" if error.path == self.model_path else "train"
            return [(error.path, f"{prefix}.{key}" if key else prefix, reason) for key, reason in error.problems]
        return []

    def check(self) -> None:
        """Validate the sweep against the schemas; ParamsError against params/tune.yaml naming the sweep keys."""
        fixed, swept = list(self.tune.fixed), list(self.tune.space)
        points = self.candidate_points()
        failing = [(point, errors) for point in points if (errors := self._schema_errors(point))]
        if not failing:
            return
        passing = next((point for point in points if not self._schema_errors(point)), None)
        problems: dict[str, str] = {}
        for point, errors in failing:
            for file, key, reason in errors:
                if file == self.tune_path:
                    problems.setdefault(f"{'space' if key in self.tune.space else 'fixed'}.{key}", reason)
                    continue
                detail = f"{reason} ({file}: {key.split('.', 1)[1] if '.' in key else 'the whole file'})"
                if not reason.startswith(KEY_ERRORS):
                    detail += f" at {_describe(point)}"  # the draw it fails at: the error depends on the values
                blamed = _blamed(key, fixed, swept)
                if len(blamed) > 1 and passing is not None:
                    # An error across keys (t_min above t_max): blame the swept keys whose value, taken
                    # from a point that validates, makes this error go away.
                    culprits = [
                        entry for entry in blamed
                        if entry.startswith("space.")
                        and (key, reason) not in {(k, r) for _, k, r in self._schema_errors(
                            {**point, entry.split(".", 1)[1]: passing[entry.split(".", 1)[1]]})}
                    ]
                    blamed = culprits or blamed
                for entry in blamed or [f"at {_describe(point)}"]:
                    problems.setdefault(entry, detail)
        raise ParamsError(self.tune_path, list(problems.items()))
