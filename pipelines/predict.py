"""Translate a folder of source images with a registered or saved generator.

--model is an MLflow model URI (models:/NAME@champion, models:/NAME/3, runs:/RUN_ID/translator)
or a generator file written by the train stage. Each input is resized to the model's size,
translated in batches (on the GPU when there is one) and written as OUTPUT/<name>.png at the
input's own size. Existing outputs are never overwritten unless --overwrite is given; an
unreadable input stops the run before anything is written (--on-bad-input stop, the default)
or is named and skipped while the others are written (--on-bad-input skip).
"""

import argparse
import logging
import pickle
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import nn
from tqdm import tqdm

from components.atomic_files import atomic_path
from components.evaluation.held_out import pick_device
from components.evaluation.image_metrics import to_unit_range
from components.methods.translator import translator_from_export
from components.registry.loading import UnsafeModelArtifact, load_registered
from components.tracking import TrackingUnavailable, check_tracking_reachable, redact_text, redact_uri
from pipelines import environment
from pipelines.exit_status import ExitStatus

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
MLFLOW_SCHEMES = ("models:/", "runs:/")


@dataclass
class LoadedModel:
    module: nn.Module
    image_size: int
    channels: int
    description: str


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="models:/NAME@champion, models:/NAME/VERSION, runs:/ID/translator, or a generator .pt file")
    parser.add_argument("--input", required=True, type=Path, help="folder of source images")
    parser.add_argument("--output", required=True, type=Path, help="folder for the translated images (created if missing)")
    parser.add_argument("--on-bad-input", choices=("stop", "skip"), default="stop",
                        help="an unreadable image stops the run before anything is written (stop), or is skipped (skip)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per generator call (default 8)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: the GPU when there is one")
    parser.add_argument("--overwrite", action="store_true", help="replace outputs that already exist")


def load_model(reference: str, device: torch.device) -> LoadedModel:
    """The generator behind an MLflow URI or a train-stage file, on `device`, with its input size.

    A registry artifact is checked before anything in it is loaded: only the pt2 format pairgan
    writes is accepted (UnsafeModelArtifact otherwise), never a pickle.
    """
    if reference.startswith(MLFLOW_SCHEMES):
        from mlflow.exceptions import MlflowException

        tracking_uri = environment.tracking_uri()
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


def _read(path: Path, channels: int) -> Image.Image:
    """Decode the whole image now (PIL is lazy), so a truncated file fails here, not later."""
    with Image.open(path) as image:
        image.load()
        return image.convert("L" if channels == 1 else "RGB")


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


def _fail(message: str) -> int:
    print(f"pairgan predict: {message}", file=sys.stderr)
    return ExitStatus.FAILED


def _listing(paths: list[Path], limit: int = 10) -> str:
    shown = ", ".join(str(path) for path in paths[:limit])
    return shown + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        return _fail(f"--batch-size must be at least 1, got {args.batch_size}")
    if not args.input.is_dir():
        return _fail(f"{args.input}: no such folder")
    inputs = sorted(path for path in args.input.iterdir() if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES)
    if not inputs:
        return _fail(f"{args.input}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    stems: dict[str, list[Path]] = {}
    for path in inputs:
        stems.setdefault(path.stem, []).append(path)
    clashes = [paths for paths in stems.values() if len(paths) > 1]
    if clashes:
        return _fail("inputs that would write the same output: " + "; ".join(_listing(paths) for paths in clashes))
    outputs = {path: args.output / f"{path.stem}.png" for path in inputs}
    # an output written over its own (or another) input would destroy the source image, --overwrite or not
    input_files = {path.resolve() for path in inputs}
    over_inputs = [output for output in outputs.values() if output.resolve() in input_files]
    if over_inputs:
        return _fail(f"outputs would replace input images, nothing was written (choose another --output): {_listing(over_inputs)}")
    existing = [output for output in outputs.values() if output.exists()]
    if existing and not args.overwrite:
        return _fail(f"outputs already exist, nothing was written (use --overwrite to replace them): {_listing(existing)}")

    try:
        device = pick_device(args.device)
        model = load_model(args.model, device)
    except (FileNotFoundError, TrackingUnavailable, UnsafeModelArtifact) as error:
        return _fail(str(error))
    except (RuntimeError, ValueError, KeyError, pickle.UnpicklingError) as error:
        # a file that is not a generator export, or device cuda without a GPU
        return _fail(f"{args.model}: cannot be used as a generator ({type(error).__name__}: {error})")
    log.info("model %s on %s, input %dx%d", model.description, device, model.image_size, model.image_size)

    # Check every input before translating any: with --on-bad-input stop nothing is written, so
    # fixing the bad files and running again never runs into this run's outputs.
    bad: dict[Path, str] = {}
    for path in inputs:
        try:
            _read(path, model.channels)
        except (UnidentifiedImageError, OSError, ValueError) as error:
            bad[path] = str(error) or type(error).__name__
    for path, reason in bad.items():
        log.error("unreadable image %s: %s", path, reason)
    if bad and args.on_bad_input == "stop":
        return _fail(f"{len(bad)} unreadable image(s), nothing was written (--on-bad-input skip writes the others): {_listing(list(bad))}")
    good = [path for path in inputs if path not in bad]

    args.output.mkdir(parents=True, exist_ok=True)
    written = 0
    with torch.no_grad(), tqdm(total=len(good), unit="img", desc="predict", disable=None) as progress:
        for start in range(0, len(good), args.batch_size):
            chunk = good[start : start + args.batch_size]
            images = [_read(path, model.channels) for path in chunk]
            source = torch.stack([_to_tensor(image, model.image_size) for image in images]).to(device)
            generated = model.module(source)
            for path, image, result in zip(chunk, images, generated):
                _write_png(result, image.size, outputs[path])
                written += 1
            progress.update(len(chunk))
    if bad:
        log.warning("wrote %d image(s) to %s; skipped %d unreadable: %s", written, args.output, len(bad), _listing(list(bad)))
    else:
        log.info("wrote %d image(s) to %s", written, args.output)
    return ExitStatus.OK
