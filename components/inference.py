"""Translating a folder of images with a saved or registered generator (`pairgan predict`).

The order of the work is what keeps a user's files safe: `plan_outputs` checks the folders
and names every output before anything is loaded, `find_unreadable` decodes every input before
any is translated, and `translate_images` writes each output through a temporary file.
"""

import logging
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import nn
from tqdm import tqdm

from components.atomic_files import atomic_path
from components.evaluation.image_metrics import to_unit_range
from components.methods.translator import translator_from_export
from components.redaction import redact_text, redact_uri
from components.registry.loading import load_registered
from components.tracking import check_tracking_reachable

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
MLFLOW_SCHEMES = ("models:/", "runs:/")


class PredictionRefused(ValueError):
    """The inputs or outputs are not safe to work on; nothing was written. The message says why."""


class UnreadableImage(ValueError):
    """An input that cannot be decoded, or is too large to decode safely."""


@dataclass
class LoadedModel:
    module: nn.Module
    image_size: int
    channels: int
    description: str


def load_model(reference: str, device: torch.device, tracking_uri: str) -> LoadedModel:
    """The generator behind an MLflow URI or a train-stage file, on `device`, with its input size.

    A registry artifact is checked before anything in it is loaded: only the pt2 format pairgan
    writes is accepted (UnsafeModelArtifact otherwise), never a pickle.
    """
    if reference.startswith(MLFLOW_SCHEMES):
        from mlflow.exceptions import MlflowException

        # "Default" exists in every store: the check reads, it creates nothing
        check_tracking_reachable(tracking_uri, "Default")
        try:
            loaded = load_registered(reference, tracking_uri, device)
        except MlflowException as error:
            message = redact_text(error.message, tracking_uri)
            raise FileNotFoundError(f"{reference}: not found in {redact_uri(tracking_uri)} ({message})") from None
        card = loaded.card
        return LoadedModel(loaded.module, card.image_size, card.channels, f"{reference} (NFE {card.nfe})")
    path = Path(reference)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such generator file (or use models:/NAME@champion)")
    exported = torch.load(path, map_location="cpu", weights_only=True)
    translator = translator_from_export(exported).to(device).eval()
    model = exported["model"]
    return LoadedModel(translator, model["image_size"], model["source_channels"], f"{path} ({translator.method}, NFE {translator.nfe})")


def listing(paths: list[Path], limit: int = 10) -> str:
    shown = ", ".join(str(path) for path in paths[:limit])
    return shown + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def _nearest_existing(path: Path) -> Path:
    return next(candidate for candidate in (path, *path.parents) if candidate.exists())


def plan_outputs(input_dir: Path, output_dir: Path, overwrite: bool) -> dict[Path, Path]:
    """Every input image of `input_dir` and the PNG it becomes in `output_dir`, in name order.

    Raises PredictionRefused, having touched nothing, when the folders or names are unsafe.
    """
    if not input_dir.is_dir():
        raise PredictionRefused(f"{input_dir}: no such folder")
    existing = _nearest_existing(output_dir.absolute())
    if not existing.is_dir():
        raise PredictionRefused(f"--output {output_dir}: {existing} is a file, not a folder")
    if output_dir.exists() and output_dir.resolve() == input_dir.resolve():
        # the outputs (.png) would mix with the sources, and the next run would take them as inputs
        raise PredictionRefused(f"--output {output_dir} is the --input folder: choose another folder for the outputs")
    inputs = sorted(path for path in input_dir.iterdir() if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES)
    if not inputs:
        raise PredictionRefused(f"{input_dir}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    stems: dict[str, list[Path]] = {}
    for path in inputs:
        stems.setdefault(path.stem, []).append(path)
    clashes = [paths for paths in stems.values() if len(paths) > 1]
    if clashes:
        raise PredictionRefused(
            "inputs that would write the same output: " + "; ".join(listing(paths) for paths in clashes)
        )
    outputs = {path: output_dir / f"{path.stem}.png" for path in inputs}
    # an output written over an input (through a link) would destroy the source image, --overwrite or not
    input_files = {path.resolve() for path in inputs}
    over_inputs = [output for output in outputs.values() if output.resolve() in input_files]
    if over_inputs:
        raise PredictionRefused(
            "outputs would replace input images, nothing was written (choose another --output): "
            + listing(over_inputs)
        )
    taken = [output for output in outputs.values() if output.exists()]
    if taken and not overwrite:
        raise PredictionRefused(
            f"outputs already exist, nothing was written (use --overwrite to replace them): {listing(taken)}"
        )
    return outputs


def read_image(path: Path, channels: int) -> Image.Image:
    """The whole image, decoded now (PIL is lazy, so a truncated file fails here, not later).

    Raises UnreadableImage for anything that is not a readable image, including one whose
    header announces more pixels than PIL's decompression-bomb limit (`Image.MAX_IMAGE_PIXELS`).
    """
    try:
        with warnings.catch_warnings():
            # PIL only warns between the limit and twice the limit, then decodes gigabytes
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.load()
                return image.convert("L" if channels == 1 else "RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise UnreadableImage(f"too large to decode safely, a possible decompression bomb ({error})") from None
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise UnreadableImage(str(error) or type(error).__name__) from None


def find_unreadable(paths: list[Path], channels: int) -> dict[Path, str]:
    """The inputs that cannot be used, each with the reason."""
    bad = {}
    for path in paths:
        try:
            read_image(path, channels)
        except UnreadableImage as error:
            bad[path] = str(error)
    return bad


def _to_tensor(image: Image.Image, size: int) -> torch.Tensor:
    resized = image.resize((size, size), Image.Resampling.BICUBIC)
    array = np.asarray(resized, dtype=np.float32) / 127.5 - 1.0
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array).permute(2, 0, 1)


def _write_png(image: torch.Tensor, size: tuple[int, int], path: Path) -> None:
    array = (to_unit_range(image) * 255.0).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    picture = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)
    if picture.size != size:
        picture = picture.resize(size, Image.Resampling.BICUBIC)
    # an interrupted run never leaves a half-written image under the final name
    with atomic_path(path) as temporary:
        picture.save(temporary, format="PNG")


@torch.no_grad()
def translate_images(model: LoadedModel, outputs: Mapping[Path, Path], device: torch.device, batch_size: int) -> int:
    """Translate each input of `outputs` in batches and write it to its output at the input's own size.

    Returns how many were written. The output folder is created here, not before.
    """
    inputs = list(outputs)
    for folder in {output.parent for output in outputs.values()}:
        folder.mkdir(parents=True, exist_ok=True)
    written = 0
    with tqdm(total=len(inputs), unit="img", desc="predict", disable=None) as progress:
        for start in range(0, len(inputs), batch_size):
            chunk = inputs[start : start + batch_size]
            images = [read_image(path, model.channels) for path in chunk]
            source = torch.stack([_to_tensor(image, model.image_size) for image in images]).to(device)
            for path, image, result in zip(chunk, images, model.module(source)):
                _write_png(result, image.size, outputs[path])
                written += 1
            progress.update(len(chunk))
    return written
