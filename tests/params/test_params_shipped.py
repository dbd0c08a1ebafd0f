"""The shipped params files are the only place values live: the schema has no defaults, every file and preset loads."""

from typing import get_args

import pytest
import torch
from pydantic import BaseModel

from components.config import load_params
from components.config.data import DataParams
from components.config.evaluate import EvaluateParams
from components.config.model import load_model_params
from components.config.register import RegisterParams
from components.config.train import TrainParams
from components.methods.translator import export_translator, translator_from_export
from components.training.loop import TrainingSession
from pipelines.cli import main
from support.params import EXAMPLES, PARAMS, shipped
from support.synthetic_pairs import SyntheticPairs

DATA = load_params(PARAMS / "data.yaml", DataParams, context={"check_source_path": False})
PRESETS = {
    "pix2pix-reference", "atme-small", "atme-reference", "diffusion-gan-small", "diffusion-gan-reference",
    "ddgan-small", "ddgan-reference", "ddgan-guided-small",
}


def _models_under(annotation) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [model for argument in get_args(annotation) for model in _models_under(argument)]


def every_params_model() -> set[type[BaseModel]]:
    from components.config.model import ModelParams

    found: set[type[BaseModel]] = set()
    pending = [DataParams, ModelParams, TrainParams, EvaluateParams, RegisterParams]
    while pending:
        model = pending.pop()
        if model not in found:
            found.add(model)
            pending += [inner for field in model.model_fields.values() for inner in _models_under(field.annotation)]
    return found


def test_the_schema_holds_no_values_so_it_cannot_disagree_with_the_files():
    models = every_params_model()
    assert len(models) > 20  # every section, every method branch
    defaults = [f"{model.__name__}.{name}" for model in models for name, field in model.model_fields.items()
                if not field.is_required()]
    assert defaults == [], "values belong in params/*.yaml, the schema declares types and constraints"


@pytest.mark.parametrize(("name", "schema"), [("data", DataParams), ("train", TrainParams), ("evaluate", EvaluateParams),
                                              ("register", RegisterParams)])
def test_every_shipped_file_loads(name, schema):
    assert isinstance(load_params(PARAMS / f"{name}.yaml", schema, context={"check_source_path": False}), schema)


def test_the_shipped_model_is_built_for_the_shipped_data_size():
    model = load_model_params(PARAMS / "model.yaml", DATA, PARAMS / "data.yaml")
    assert (model.image_size, model.load_size) == (DATA.image_size, DATA.load_size)


def test_every_preset_is_a_complete_model_yaml():
    assert {path.stem for path in EXAMPLES.glob("*.yaml")} == PRESETS
    for preset in sorted(PRESETS):
        model = load_model_params(EXAMPLES / f"{preset}.yaml", DATA, PARAMS / "data.yaml")
        assert model.method.name in preset or (preset.startswith("diffusion-gan") and model.method.diffusion_gan)


@pytest.mark.parametrize("preset", sorted(name for name in PRESETS if name.endswith("small")))
def test_each_small_preset_trains_a_step_and_translates(preset):
    model = load_model_params(EXAMPLES / f"{preset}.yaml", DATA, PARAMS / "data.yaml")
    torch.manual_seed(0)
    batch = next(iter(SyntheticPairs(2, model.image_size, 2, load_size=model.load_size)))
    session = TrainingSession(model, shipped("train"), 2, torch.device("cpu"))
    session.train_step(batch)
    translator = translator_from_export(export_translator(session))
    with torch.no_grad():
        image = translator(batch["source"])
    assert image.shape == batch["target"].shape and torch.isfinite(image).all()


@pytest.mark.parametrize(
    ("stage", "file"),
    [("builtin-data", "data.yaml"), ("prepare", "data.yaml"), ("train", "model.yaml"), ("train", "train.yaml"),
     ("evaluate", "evaluate.yaml"), ("register", "register.yaml")],
)
@pytest.mark.parametrize("problem", ["missing", "empty"])
def test_a_missing_or_empty_params_file_stops_the_stage_naming_it(tmp_path, monkeypatch, capsys, stage, file, problem):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params").mkdir()
    for shipped_file in PARAMS.glob("*.yaml"):
        (tmp_path / "params" / shipped_file.name).write_text(shipped_file.read_text())
    if problem == "missing":
        (tmp_path / "params" / file).unlink()
    else:
        (tmp_path / "params" / file).write_text("")
    assert main([stage, "--params-dir", "params"]) == 2
    assert f"params/{file}: {'file not found' if problem == 'missing' else 'is empty'}" in capsys.readouterr().err
    assert sorted(path.name for path in tmp_path.iterdir()) == ["params"]
