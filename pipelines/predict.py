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
from pathlib import Path

from components.evaluation.held_out import pick_device
from components.inference import (
    MLFLOW_SCHEMES,
    PredictionRefused,
    find_unreadable,
    listing,
    load_model,
    plan_outputs,
    translate_images,
)
from components.registry.loading import UnsafeModelArtifact
from components.tracking import TrackingUnavailable, require_existing_store
from pipelines import environment
from pipelines.exit_status import ExitStatus

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="models:/NAME@champion, models:/NAME/VERSION, runs:/ID/translator, or a generator .pt file")
    parser.add_argument("--input", required=True, type=Path, help="folder of source images")
    parser.add_argument("--output", required=True, type=Path, help="folder for the translated images (created if missing)")
    parser.add_argument("--on-bad-input", choices=("stop", "skip"), default="stop",
                        help="an unreadable image stops the run before anything is written (stop), or is skipped (skip)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per generator call (default 8)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: the GPU when there is one")
    parser.add_argument("--overwrite", action="store_true", help="replace outputs that already exist")


def _fail(message: str) -> int:
    print(f"pairgan predict: {message}", file=sys.stderr)
    return ExitStatus.FAILED


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        return _fail(f"--batch-size must be at least 1, got {args.batch_size}")
    try:
        outputs = plan_outputs(args.input, args.output, args.overwrite)
    except PredictionRefused as error:
        return _fail(str(error))

    tracking_uri = environment.tracking_uri()
    try:
        device = pick_device(args.device)
        if args.model.startswith(MLFLOW_SCHEMES):
            require_existing_store(tracking_uri)
        model = load_model(args.model, device, tracking_uri)
    except (FileNotFoundError, TrackingUnavailable, UnsafeModelArtifact) as error:
        return _fail(str(error))
    except (RuntimeError, ValueError, KeyError, pickle.UnpicklingError) as error:
        # a file that is not a generator export, or device cuda without a GPU
        return _fail(f"{args.model}: cannot be used as a generator ({type(error).__name__}: {error})")
    log.info("model %s on %s, input %dx%d", model.description, device, model.image_size, model.image_size)

    # Every input is decoded before any is translated: with --on-bad-input stop nothing is
    # written, so fixing the bad files and running again never runs into this run's outputs.
    bad = find_unreadable(list(outputs), model.channels)
    for path, reason in bad.items():
        log.error("unreadable image %s: %s", path, reason)
    if bad and args.on_bad_input == "stop":
        return _fail(
            f"{len(bad)} unreadable image(s), nothing was written (--on-bad-input skip writes the others): {listing(list(bad))}"
        )

    try:
        readable = {path: output for path, output in outputs.items() if path not in bad}
        written = translate_images(model, readable, device, args.batch_size)
    except OSError as error:
        return _fail(f"cannot write to {args.output}: {error}")
    if bad:
        log.warning("wrote %d image(s) to %s; skipped %d unreadable: %s", written, args.output, len(bad), listing(list(bad)))
    else:
        log.info("wrote %d image(s) to %s", written, args.output)
    return ExitStatus.OK
