"""How a translator is stored in MLflow, and how `mlflow models serve` runs it.

One MLmodel holds two flavours over one file, `data/model.pt2` (torch.export: a graph plus
tensors, no pickled code):

- `pytorch`, written by `mlflow.pytorch.save_model(serialization_format="pt2")`, which pairgan's
  own loader (`components.registry.loading`) and `mlflow.pytorch.load_model` read;
- `python_function`, whose loader module is *this* module, named by its import path. MLflow
  imports it from the environment the model is served in (where pairgan is installed), never
  from the artifact: the model ships no code (`code: null`) and nothing in it is unpickled.
  `_load_pyfunc` goes through the same checks as every other pairgan loader.

The pyfunc model takes what the translator takes: float32 N x C x H x W in [-1, 1] (a numpy
array, or `{"source": array}`), and returns the translated images in the same layout.

This module's import path is recorded in every registered model's MLmodel: renaming or moving
it makes the models registered before unservable.
"""

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

SERVING_LOADER_MODULE = __name__
MODEL_DATA = "data"  # the folder of the MLmodel that holds model.pt2
PT2_FILE = "model.pt2"


@dataclass(frozen=True)
class TranslatorCard:
    """What the registry records about a translator beside its graph (MLflow model metadata)."""

    nfe: int
    supports_guidance: bool
    guidance_weight: float | None
    channels: int
    image_size: int


def translator_signature(card: TranslatorCard):
    """TensorSpec signature: any batch size, the channels and size the translator was trained at."""
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    shape = (-1, card.channels, card.image_size, card.image_size)
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), shape, "source")]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), shape, "image")]),
    )


def pip_requirements() -> list[str]:
    # Stated, not inferred: inference would load the model in a subprocess on every log.
    import mlflow

    return [f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"]


def save_model(path: str, mlflow_model, translator: nn.Module, card: TranslatorCard) -> None:
    """The `save_model` of this flavour, called by `mlflow.models.Model.log(flavor=<this module>)`.

    Writes the pt2 graph with MLflow's pytorch flavour, then adds the pyfunc entry that points
    at this module, and no code.
    """
    import mlflow.pytorch
    from mlflow import pyfunc

    translator = translator.to("cpu").eval()
    mlflow.pytorch.save_model(
        translator,
        path,
        mlflow_model=mlflow_model,
        serialization_format="pt2",
        # batch 2: torch.export specialises a size-1 dimension, and the batch must stay dynamic
        input_example=torch.zeros(2, card.channels, card.image_size, card.image_size),
        signature=translator_signature(card),
        pip_requirements=pip_requirements(),
        metadata={"pairgan": asdict(card)},
    )
    pyfunc.add_to_model(
        mlflow_model,
        loader_module=SERVING_LOADER_MODULE,
        data=MODEL_DATA,
        conda_env="conda.yaml",
        python_env="python_env.yaml",
    )
    mlflow_model.save(os.path.join(path, "MLmodel"))


class TranslatorPyfunc:
    """The object `mlflow.pyfunc.load_model` returns the `predict` of (and `mlflow models serve` calls)."""

    def __init__(self, module: nn.Module, device: torch.device):
        self.module = module
        self.device = device

    def predict(self, model_input: Any, params: dict | None = None) -> np.ndarray:
        if isinstance(model_input, dict):  # MLflow hands a named tensor input over as {name: array}
            model_input = model_input["source"]
        source = torch.as_tensor(np.asarray(model_input, dtype=np.float32), device=self.device)
        with torch.no_grad():
            return self.module(source).float().cpu().numpy()


def _load_pyfunc(data_path: str, model_config: dict | None = None) -> TranslatorPyfunc:
    """MLflow's pyfunc entry point: the checked translator on `model_config["device"]` (default: the GPU if any)."""
    from components.evaluation.held_out import pick_device
    from components.registry.loading import load_model_folder

    device = pick_device((model_config or {}).get("device") or "auto")
    loaded = load_model_folder(Path(data_path).parent, device)
    return TranslatorPyfunc(loaded.module, device)
