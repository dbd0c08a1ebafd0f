"""Loading a registered translator without running code from the artifact.

A registry artifact is data someone else may have written (or replaced). MLflow's pytorch
loader picks its format from the files it finds: a `data/model.pth` with a
`pickle_module_info.txt` is unpickled with that module, i.e. any code in it runs, and MLflow
3.17 allows that by default. So before anything is loaded, the MLmodel and the file list are
checked against the only format pairgan writes (`components.registry.flavor`):

- a `pytorch` flavour whose `model_data` is `data/`, holding exactly `model.pt2`, and no
  `code` folder (MLflow would put it on `sys.path`) or extra files;
- a `python_function` flavour, if any, whose loader is pairgan's own module, with no code
  and no model-from-code file;
- a tensor signature `(-1, C, H, W)`.

Anything else is refused with `UnsafeModelArtifact`, naming what was found. The pt2 archive
is then loaded with pickle deserialisation switched off for the process
(`MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false`), which makes MLflow check that every record in
the archive is a tensor or plain data before `torch.export.load` reads it.
"""

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from torch import nn

from components.registry.flavor import MODEL_DATA, PT2_FILE, SERVING_LOADER_MODULE, TranslatorCard

PICKLE_FILES = ("model.pth", "pickle_module_info.txt")


class UnsafeModelArtifact(RuntimeError):
    """The artifact is not in the format pairgan writes; nothing of it was loaded."""


@dataclass(frozen=True)
class LoadedTranslator:
    module: nn.Module  # a frozen GraphModule in eval mode (it refuses `.eval()`)
    card: TranslatorCard
    description: str  # where it came from, for messages


def forbid_pickle_deserialization() -> None:
    """Switch MLflow's pickle loading off for this process (its default in 3.17 is on)."""
    os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] = "false"


def _inside(folder: Path, relative: object, what: str) -> Path:
    if not isinstance(relative, str) or not relative:
        raise UnsafeModelArtifact(f"{what} is {relative!r}, expected a folder name")
    path = (folder / relative).resolve()
    if not path.is_relative_to(folder.resolve()):
        raise UnsafeModelArtifact(f"{what} {relative!r} points outside the model folder")
    return path


def check_model_folder(folder: Path) -> TranslatorCard:
    """Raise UnsafeModelArtifact unless `folder` is a translator as pairgan writes it; return its card.

    Reads only YAML (safely) and a directory listing.
    """
    mlmodel = folder / "MLmodel"
    if not mlmodel.is_file():
        raise UnsafeModelArtifact("no MLmodel file: not an MLflow model")
    try:
        spec = yaml.safe_load(mlmodel.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise UnsafeModelArtifact(f"its MLmodel file is not valid YAML ({error})") from None
    if not isinstance(spec, dict):
        raise UnsafeModelArtifact("its MLmodel file holds no mapping")
    flavors = spec.get("flavors") or {}
    pytorch = flavors.get("pytorch")
    if not isinstance(pytorch, dict):
        raise UnsafeModelArtifact(f"no pytorch flavour (flavours: {', '.join(sorted(flavors)) or 'none'})")
    if pytorch.get("code") or pytorch.get("extra_files"):
        raise UnsafeModelArtifact("its pytorch flavour ships code or extra files, which pairgan never writes")
    data = _inside(folder, pytorch.get("model_data"), "pytorch model_data")
    if data.name != MODEL_DATA or not data.is_dir():
        raise UnsafeModelArtifact(f"pytorch model_data is {pytorch.get('model_data')!r}, expected the folder '{MODEL_DATA}'")
    files = sorted(path.name for path in data.iterdir())
    pickled = [name for name in files if name in PICKLE_FILES]
    if pickled or files != [PT2_FILE]:
        found = ", ".join(f"{MODEL_DATA}/{name}" for name in files) or "nothing"
        kind = "MLflow's pickle format, which runs code when loaded" if pickled else "not the pt2 format"
        raise UnsafeModelArtifact(f"it holds {found} ({kind}); pairgan loads only {MODEL_DATA}/{PT2_FILE}")
    pyfunc = flavors.get("python_function")
    if pyfunc is not None:
        if not isinstance(pyfunc, dict) or pyfunc.get("loader_module") != SERVING_LOADER_MODULE:
            loader = pyfunc.get("loader_module") if isinstance(pyfunc, dict) else pyfunc
            raise UnsafeModelArtifact(f"its python_function flavour loads with {loader!r}, not {SERVING_LOADER_MODULE}")
        if pyfunc.get("code") or pyfunc.get("model_code_path"):
            raise UnsafeModelArtifact("its python_function flavour ships code, which pairgan never writes")
    metadata = (spec.get("metadata") or {}).get("pairgan")
    try:
        return TranslatorCard(**metadata)
    except TypeError:
        raise UnsafeModelArtifact(f"no pairgan metadata (nfe, image size) in its MLmodel: {metadata!r}") from None


def load_model_folder(folder: Path, device: torch.device, description: str | None = None) -> LoadedTranslator:
    """The translator in a local MLflow model folder, checked first, as a runnable module on `device`.

    A pt2 graph records the device it was exported on inside its operations (DDGAN's
    `torch.full(..., device=source.device)` becomes `device='cpu'`), so moving the loaded
    module's weights is not enough: the graph itself is rewritten with torch.export's
    `move_to_device_pass`.
    """
    import mlflow.pytorch
    from torch.export.passes import move_to_device_pass

    card = check_model_folder(folder)
    forbid_pickle_deserialization()
    # With pickle deserialisation off, MLflow verifies every record of the archive before
    # torch.export.load reads it; a record that would unpickle objects is refused.
    module = mlflow.pytorch.load_model(str(folder))
    if device.type != "cpu":
        # the archive was verified just above, in this folder, which only this process writes
        module = move_to_device_pass(torch.export.load(folder / MODEL_DATA / PT2_FILE), device).module()
    return LoadedTranslator(module, card, description or str(folder))


def load_registered(model_uri: str, tracking_uri: str, device: torch.device) -> LoadedTranslator:
    """A logged or registered translator (`models:/NAME@ALIAS`, `models:/NAME/3`, `models:/m-ID`, `runs:/...`).

    Raises UnsafeModelArtifact (naming the model) for anything that is not a pt2 translator;
    MlflowException when the URI does not resolve.
    """
    import mlflow.artifacts

    with tempfile.TemporaryDirectory(prefix="pairgan-model-") as download:
        # downloading copies files; nothing in them is read as code
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=download, tracking_uri=tracking_uri))
        try:
            return load_model_folder(local, device, model_uri)
        except UnsafeModelArtifact as error:
            raise UnsafeModelArtifact(f"{model_uri}: refused to load: {error}") from None
