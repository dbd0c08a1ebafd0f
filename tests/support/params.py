"""Params for tests: the shipped params/*.yaml with a test's overrides, validated as a stage would.

    shipped("train", epochs=2, run={"scaling": {"num_workers": 1}})          -> TrainParams
    shipped("model", image_size=32, method={"name": "atme", "w": {...}})     -> ModelParams
    shipped_yaml("evaluate", batch_size=2)                                   -> the mapping
    write_shipped(folder, "train", epochs=2)                                 -> folder/train.yaml

Overrides merge into the file's mapping key by key (a mapping into a mapping; a list or a
scalar replaces the value), so a test names only what it changes. Values need their real
types: the schema does not coerce.

Model params: the base is params/model.yaml for pix2pix; for another `method.name` it is that
method's reference preset in params/examples/, and a `diffusion_gan:` or `guidance:` mapping
given where the base has null starts from a preset that has one. model.yaml holds no sizes:
`image_size` defaults to params/data.yaml's and `load_size` to `image_size` (no crop margin).
"""

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from components.config import with_overrides
from components.config.data import DataParams
from components.config.evaluate import EvaluateParams
from components.config.model import ModelParams
from components.config.register import RegisterParams
from components.config.retrain import RetrainParams
from components.config.train import TrainParams

PARAMS = Path(__file__).resolve().parents[2] / "params"
EXAMPLES = PARAMS / "examples"
SCHEMAS: dict[str, type[BaseModel]] = {
    "data": DataParams, "model": ModelParams, "train": TrainParams, "evaluate": EvaluateParams, "register": RegisterParams,
    "retrain": RetrainParams,
}
METHOD_PRESETS = {"atme": "atme-reference", "ddgan": "ddgan-reference"}
SECTION_PRESETS = {"diffusion_gan": "diffusion-gan-reference", "guidance": "ddgan-guided-small"}


def read_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _model_base(method: dict) -> dict:
    name = method.get("name", "pix2pix")
    base = read_yaml(EXAMPLES / f"{METHOD_PRESETS[name]}.yaml" if name in METHOD_PRESETS else PARAMS / "model.yaml")
    for section, preset in SECTION_PRESETS.items():
        if isinstance(method.get(section), dict) and base["method"].get(section) is None:
            base["method"][section] = read_yaml(EXAMPLES / f"{preset}.yaml")["method"][section]
    return base


def shipped_yaml(name: str, **overrides: Any) -> dict:
    """params/<name>.yaml as a mapping, with the overrides merged in (model: without the sizes)."""
    base = _model_base(overrides.get("method", {})) if name == "model" else read_yaml(PARAMS / f"{name}.yaml")
    return with_overrides(base, overrides)


def shipped(name: str, **overrides: Any) -> Any:
    """params/<name>.yaml with the overrides, validated by its schema."""
    if name == "model":
        image_size = overrides.pop("image_size", read_yaml(PARAMS / "data.yaml")["image_size"])
        load_size = overrides.pop("load_size", image_size)
        data = {**shipped_yaml("model", **overrides), "image_size": image_size, "load_size": load_size}
        return ModelParams.model_validate(data)
    return SCHEMAS[name].model_validate(shipped_yaml(name, **overrides), context={"check_source_path": False})


def write_shipped(folder: Path, name: str, **overrides: Any) -> Path:
    """Write folder/<name>.yaml: the shipped file with the overrides (not validated: tests write bad ones too)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(shipped_yaml(name, **overrides), sort_keys=False))
    return path
